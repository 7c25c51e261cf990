# The two commands a newcomer needs: `make run` (example app) and `make test` (whole suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install system-deps js-deps run test lint typecheck check bench bench-smoke docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# What the example app needs, without the test and docs tools.
$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[server]"
	touch $@

# Services the tests use, from Debian's packages (needs root; skipped when present).
system-deps:
	@command -v redis-server >/dev/null && command -v chromium >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server chromium chromium-driver >/dev/null; \
		else echo "install redis-server and chromium (sudo apt-get install redis-server chromium)"; exit 1; fi; }

# The real EventSource client some tests drive (npm's eventsource), from its lock file.
js-deps: tests/js/node_modules/.package-lock.json

tests/js/node_modules/.package-lock.json: tests/js/package.json tests/js/package-lock.json
	@command -v npm >/dev/null || { echo "install Node.js 20 or newer with npm: the EventSource tests run on it"; exit 1; }
	npm ci --prefix tests/js --no-audit --no-fund

run: $(VENV)/.installed-run
	$(BIN)/uvicorn example_app.main:app --host $(HOST) --port $(PORT)

test: install system-deps js-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest --cov=fastapi_sse --cov-report=term-missing:skip-covered --cov-fail-under=90

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# The documentation site (mkdocs-material); fails on any warning.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The benchmark (tens of minutes; docs/performance.md) and a seconds-long run that keeps it working.
bench: install
	$(BIN)/python -m bench.run $(BENCH_ARGS)

bench-smoke: install
	$(BIN)/python -m bench.run --smoke

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage htmlcov site
