"""The lock files in requirements/ agree with pyproject.toml and with what is installed.

`make run`, `make test`, the Dockerfile and `.ci/run` install from the locks, never from a
fresh resolution; these tests fail when someone edits pyproject.toml without `make lock`,
edits a lock by hand, or runs the tests in an environment the lock did not produce.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
SERVE = ROOT / "requirements" / "serve.txt"
DEV = ROOT / "requirements" / "dev.txt"
BUILD_IN = ROOT / "requirements" / "build.in"


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    marker: Marker | None
    hashes: int
    via: tuple[str, ...]

    def applies(self) -> bool:
        return self.marker is None or self.marker.evaluate()


def _read_lock(path: Path) -> dict[str, Pin]:
    """Parse a `uv pip compile --generate-hashes` file: `name==version ; marker \\`, then
    `--hash=...` lines, then `# via ...` comments."""
    pins: dict[str, Pin] = {}
    entries = re.split(r"\n(?=[A-Za-z0-9])", path.read_text())
    for entry in entries:
        if entry.startswith("#") or not entry.strip():
            continue
        head = entry.split("\\", 1)[0].strip()
        spec, _, marker = head.partition(";")
        name, sep, version = spec.strip().partition("==")
        assert sep, f"{path.name}: not pinned with ==: {head!r}"
        via_lines = re.findall(r"#\s+(?:via\s+)?(.+)", entry)
        pins[canonicalize_name(name)] = Pin(
            canonicalize_name(name),
            version.strip(),
            Marker(marker.strip()) if marker.strip() else None,
            entry.count("--hash=sha256:"),
            tuple(v.strip() for v in via_lines),
        )
    return pins


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _direct(extra: bool) -> list[Requirement]:
    project = _pyproject()["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    if extra:
        reqs += [Requirement(r) for r in project["optional-dependencies"]["dev"]]
    reqs += [Requirement(r) for r in _pyproject()["build-system"]["requires"]]
    return reqs


def _extra_requirements(req: Requirement) -> list[Requirement]:
    """What ``req``'s extras add, read from the installed distribution's metadata."""
    out: list[Requirement] = []
    for extra in req.extras:
        for raw in metadata.requires(req.name) or []:
            dep = Requirement(raw)
            if dep.marker is not None and dep.marker.evaluate({"extra": extra}):
                if dep.marker.evaluate({"extra": ""}):
                    continue  # not extra-specific
                out.append(dep)
    return out


@pytest.mark.parametrize(("lock", "extra"), [(SERVE, False), (DEV, True)], ids=["serve", "dev"])
def test_every_requirement_of_pyproject_is_pinned_within_its_range(lock: Path, extra: bool) -> None:
    pins = _read_lock(lock)
    problems = []
    for req in _direct(extra):
        if req.marker is not None and not req.marker.evaluate():
            continue
        pin = pins.get(canonicalize_name(req.name))
        if pin is None:
            problems.append(f"{req} is not in {lock.name}")
            continue
        if not req.specifier.contains(pin.version, prereleases=True):
            problems.append(f"{req} but {lock.name} pins {pin.name}=={pin.version}")
        for dep in _extra_requirements(req):
            if canonicalize_name(dep.name) not in pins:
                problems.append(f"{req.name}[{','.join(req.extras)}] needs {dep.name}: missing")
    assert not problems, "pyproject.toml and the lock disagree (run `make lock`):\n" + "\n".join(
        problems
    )


@pytest.mark.parametrize(("lock", "extra"), [(SERVE, False), (DEV, True)], ids=["serve", "dev"])
def test_the_lock_asks_for_nothing_pyproject_dropped(lock: Path, extra: bool) -> None:
    direct = {canonicalize_name(r.name) for r in _direct(extra)}
    stale = [
        pin.name
        for pin in _read_lock(lock).values()
        if any("pyproject.toml" in v or "build.in" in v for v in pin.via)
        and pin.name not in direct
        and not any("pyproject.toml" not in v and "build.in" not in v for v in pin.via)
    ]
    assert not stale, f"{lock.name} still pins what pyproject.toml no longer asks for: {stale}"


def test_build_in_matches_the_build_system() -> None:
    wanted = {str(Requirement(r)) for r in _pyproject()["build-system"]["requires"]}
    listed = {
        str(Requirement(line))
        for line in BUILD_IN.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert listed == wanted


def test_every_pin_is_hashed_and_serving_is_a_subset_of_development() -> None:
    serve, dev = _read_lock(SERVE), _read_lock(DEV)
    assert all(p.hashes > 0 for p in (*serve.values(), *dev.values()))
    differing = {
        name: (pin.version, dev[name].version if name in dev else None)
        for name, pin in serve.items()
        if name not in dev or dev[name].version != pin.version
    }
    assert not differing, f"serve.txt and dev.txt pin different versions: {differing}"
    for tool in ("pytest", "ruff", "mypy", "hypothesis"):
        assert tool in dev and tool not in serve, tool


def test_the_installed_environment_is_the_locked_one() -> None:
    """The tests run on exactly the versions a fresh machine installs from the lock."""
    wrong = {}
    for pin in _read_lock(DEV).values():
        if not pin.applies():
            continue
        try:
            installed = metadata.version(pin.name)
        except metadata.PackageNotFoundError:
            wrong[pin.name] = (pin.version, None)
            continue
        if installed != pin.version:
            wrong[pin.name] = (pin.version, installed)
    assert not wrong, f"installed versions differ from requirements/dev.txt: {wrong}"
