# omniroute: the commands a newcomer needs. `make run` serves the demo; `make test` runs everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: run test lint bench install clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

## run: create .venv, install, migrate a SQLite file, load the examples, seed demo data, serve
run: $(STAMP)
	$(BIN)/omniroute demo

## test: install what the tests need and run them all (ends with "peers: N skipped (names)")
test: $(STAMP)
	@rm -f .pytest-peers.txt .pytest-status
	@status=0; $(BIN)/python -m pytest $(PYTEST_ARGS) || status=$$?; echo $$status > .pytest-status; \
	  [ $$status -ne 5 ] || echo "pytest collected no tests (exit 5)"; \
	  for b in bench/*.py; do \
	    echo "bench smoke: $$b"; $(BIN)/python $$b --smoke >/dev/null || { echo "bench smoke FAILED: $$b"; status=1; }; \
	  done; \
	  cat .pytest-peers.txt 2>/dev/null || echo "peers: unknown (pytest did not finish)"; \
	  exit $$status

## lint: ruff (lint + format check), mypy, import contracts
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

## bench: every benchmark, full size
bench: $(STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .pytest-peers.txt
