# The two commands a newcomer needs: `make run` (example app) and `make test` (whole suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install system-deps js-deps run test test-lowest lint typecheck check bench bench-smoke bench-cluster docs clean

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

# The lowest versions pyproject.toml allows for every direct dependency, in a venv of their
# own (uv's lowest-direct resolution), running the core of the suite: service, router, wire,
# resume, settings, backends, the Redis service, the example app and the docs' examples
# (the docs site, the benchmark and the browser tests need the dev tools). About six minutes.
# The test tools' floors are the dev extra's.
LOWEST_VENV ?= build/venv-lowest
LOWEST_TESTS ?= tests/test_service.py tests/test_router.py tests/test_wire.py tests/test_resume.py \
	tests/test_stream.py tests/test_limits.py tests/test_lifecycle.py tests/test_shutdown.py \
	tests/test_middleware.py tests/test_settings.py tests/test_startup_checks.py tests/test_metrics.py \
	tests/test_backend_contract.py tests/test_redis_service.py tests/test_deployment_docs.py \
	tests/test_redis_faults.py tests/test_core_remote.py tests/test_writer.py tests/test_public_api.py \
	tests/test_example_app.py tests/test_example_app_page.py tests/test_api_examples.py tests/test_examples_standalone.py \
	tests/test_own_endpoint.py tests/test_refusals.py

test-lowest: system-deps js-deps
	rm -rf $(LOWEST_VENV)
	$(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/pip install --quiet uv
	$(LOWEST_VENV)/bin/uv pip install --quiet --python $(LOWEST_VENV)/bin/python --resolution lowest-direct \
		".[redis,metrics,testing]" "pytest>=8" "anyio>=4.12" "gunicorn>=23" "uvicorn-worker>=0.4"
	$(LOWEST_VENV)/bin/uv pip list --python $(LOWEST_VENV)/bin/python
	# The installed distribution itself, away from the checkout's sources.
	cd $(LOWEST_VENV) && bin/python -c "import importlib.metadata as m, fastapi_sse; \
		assert 'site-packages' in fastapi_sse.__file__; print('fastapi-sse-channels', m.version('fastapi-sse-channels'))"
	$(LOWEST_VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not browser" $(LOWEST_TESTS)

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

# One Redis against a local Redis Cluster (3 masters, a replica each), two workers each:
# about a minute (docs/performance.md, "Redis Cluster").
bench-cluster: install
	$(BIN)/python -m bench.cluster $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(LOWEST_VENV) .pytest_cache .mypy_cache .ruff_cache .coverage htmlcov site
