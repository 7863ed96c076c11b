# omniroute: the commands a newcomer needs. `make run` serves the demo; `make test` runs everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.10
# Installs come from the lock files in requirements/ (hash-checked), never from a fresh
# resolution: a new machine gets exactly what CI tested. `make lock` regenerates them.
SERVE_LOCK := requirements/serve.txt
DEV_LOCK := requirements/dev.txt
SERVE_STAMP := $(VENV)/.serve-$(shell cat pyproject.toml $(SERVE_LOCK) | sha256sum | cut -c1-12)
DEV_STAMP := $(VENV)/.dev-$(shell cat pyproject.toml $(DEV_LOCK) | sha256sum | cut -c1-12)
PIP := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: run test lint bench install install-serve lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# What serving needs, and nothing else (no test or lint tools).
$(SERVE_STAMP): pyproject.toml $(SERVE_LOCK) | $(BIN)/python
	@echo "omniroute: installing the pinned serving dependencies ($(SERVE_LOCK), $$(grep -c '==' $(SERVE_LOCK)) packages) into $(VENV)"
	$(PIP) install --progress-bar on --require-hashes -r $(SERVE_LOCK)
	$(PIP) install --progress-bar on --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.serve-* && touch $@
	@echo "omniroute: installed; the CLI is $(BIN)/omniroute (or: . $(BIN)/activate)"

# Serving plus the test, lint and peer tools.
$(DEV_STAMP): pyproject.toml $(DEV_LOCK) | $(BIN)/python
	@echo "omniroute: installing the pinned development dependencies ($(DEV_LOCK), $$(grep -c '==' $(DEV_LOCK)) packages) into $(VENV)"
	$(PIP) install --progress-bar on --require-hashes -r $(DEV_LOCK)
	$(PIP) install --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.dev-* $(VENV)/.serve-* && touch $@ $(SERVE_STAMP)

install-serve: $(SERVE_STAMP)
install: $(DEV_STAMP)

## lock: re-resolve requirements/*.txt from pyproject.toml (a deliberate upgrade: review and commit the diff)
lock: | $(BIN)/python
	$(PIP) install --quiet uv==$(UV_VERSION)
	$(BIN)/uv pip compile pyproject.toml requirements/build.in --extra dev --universal \
	  --python-version 3.11 --generate-hashes --upgrade --quiet -o $(DEV_LOCK)
	$(BIN)/uv pip compile pyproject.toml requirements/build.in -c $(DEV_LOCK) --universal \
	  --python-version 3.11 --generate-hashes --quiet -o $(SERVE_LOCK)
	@echo "locked: $$(grep -c '==' $(DEV_LOCK)) packages for development, $$(grep -c '==' $(SERVE_LOCK)) for serving"

## run: create .venv, install, migrate a SQLite file, load the examples, seed demo data, serve
run: $(SERVE_STAMP)
	$(BIN)/omniroute demo

## test: install what the tests need and run them all (ends with "peers: N skipped (names)")
test: $(DEV_STAMP)
	@rm -f .pytest-peers.txt .pytest-status
	@status=0; $(BIN)/python -m pytest $(PYTEST_ARGS) || status=$$?; echo $$status > .pytest-status; \
	  [ $$status -ne 5 ] || echo "pytest collected no tests (exit 5)"; \
	  for b in bench/*.py; do \
	    echo "bench smoke: $$b"; $(BIN)/python $$b --smoke >/dev/null || { echo "bench smoke FAILED: $$b"; status=1; }; \
	  done; \
	  cat .pytest-peers.txt 2>/dev/null || echo "peers: unknown (pytest did not finish)"; \
	  exit $$status

## lint: ruff (lint + format check), mypy, import contracts
lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

## bench: every benchmark, full size
bench: $(DEV_STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .pytest-peers.txt
