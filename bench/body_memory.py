"""Memory of a real `omniroute serve` under unauthenticated oversized request bodies.

Starts `omniroute serve` (SQLite, the example-style fake SMS inbox) from ``--source`` (this
tree by default; point it at an export of an older commit to compare), then sends ``--count``
bodies of ``--mb`` MB each, without credentials, round-robin to a JSON API, the sign-in, the
upload route and a webhook, one round with Content-Length, the next chunked. The client sends
everything unless the server answers first. Prints the server's resident memory (VmRSS)
before and after, its peak (VmHWM), the statuses, and how much of the bodies was sent.

    .venv/bin/python bench/body_memory.py                  # this tree
    .venv/bin/python bench/body_memory.py --source /tmp/old
"""

from __future__ import annotations

import argparse
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024
MULTIPART = "multipart/form-data; boundary=xyz"
PART = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n\r\n'
ROUTES = [
    ("/api/conversations/1/messages", "application/json"),
    ("/console/login", "application/json"),
    ("/api/uploads", MULTIPART),
    ("/webhooks/fake/sms", "application/json"),
]


def push(port: int, path: str, content_type: str, total: int, chunked: bool) -> tuple[str, int]:
    block = b"x" * (256 * 1024)
    with socket.create_connection(("127.0.0.1", port), timeout=300) as sock:
        framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"{framing}\r\n\r\n".encode()
        )
        sent = 0
        first = PART if content_type == MULTIPART else b""
        while sent < total and not select.select([sock], [], [], 0)[0]:
            piece = ((first + block) if sent == 0 else block)[: total - sent]
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        if sent == total and chunked:
            sock.sendall(b"0\r\n\r\n")
        answer = b""
        while b"\r\n" not in answer:
            data = sock.recv(4096)
            if not data:
                break
            answer += data
    status = answer.split(b" ", 2)[1].decode() if answer else "closed"
    return status, sent


def memory(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=ROOT, help="the tree to serve from")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--mb", type=int, default=150)
    parser.add_argument("--smoke", action="store_true", help="4 bodies of 8 MB (make test)")
    args = parser.parse_args()
    if args.smoke:
        args.count, args.mb = 4, 8

    work = Path(tempfile.mkdtemp(prefix="body-memory-"))
    secret = secrets.token_urlsafe(24)
    (work / "rules.yaml").write_text(
        "version: 1\nqueues:\n  general: {}\ndefault: {queue: general}\n"
    )
    (work / "channels.yaml").write_text(
        f'version: 1\ninboxes:\n  sms: {{channel: sms, provider: fake, secret: "{secret}"}}\n'
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": str(args.source),
        "OMNIROUTE_DATABASE_URL": f"sqlite:///{work / 'bench.db'}",
        "OMNIROUTE_RULES_PATH": str(work / "rules.yaml"),
        "OMNIROUTE_CHANNELS_PATH": str(work / "channels.yaml"),
        "OMNIROUTE_SECRET_KEY": secrets.token_urlsafe(48),
        "OMNIROUTE_DATA_DIR": str(work),
        "OMNIROUTE_PORT": str(port),
        "OMNIROUTE_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
    }
    subprocess.run(
        [sys.executable, "-m", "router.cli", "db", "upgrade"],
        env=env,
        cwd=args.source,
        check=True,
        capture_output=True,
    )
    log = open(work / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "serve"],
        env=env,
        cwd=args.source,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log_text = (work / "server.log").read_text()
                    raise SystemExit(f"server did not start: {log_text}") from None
                time.sleep(0.2)
        time.sleep(1)  # let start-up settle
        before = memory(proc.pid)
        statuses: Counter[str] = Counter()
        sent_total = 0
        total = args.mb * MB
        for i in range(args.count):
            path, content_type = ROUTES[i % len(ROUTES)]
            chunked = bool(i // len(ROUTES) % 2)  # a round with Content-Length, one chunked
            status, sent = push(port, path, content_type, total, chunked=chunked)
            statuses[f"{path} {'chunked' if chunked else 'length'} -> {status}"] += 1
            sent_total += sent
        time.sleep(1)
        after = memory(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"source: {args.source}")
    print(f"{args.count} bodies of {args.mb} MB, {sent_total / MB:.0f} MB actually sent")
    for line, n in sorted(statuses.items()):
        print(f"  {n} x {line}")
    print(
        f"RSS before {before['VmRSS'] / MB:.0f} MB, after {after['VmRSS'] / MB:.0f} MB "
        f"(+{(after['VmRSS'] - before['VmRSS']) / MB:.0f} MB); peak {after['VmHWM'] / MB:.0f} MB"
    )


if __name__ == "__main__":
    main()
