# The two commands a newcomer needs are `make run` and `make test`; everything else is a step of those.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# uv installs exactly what uv.lock holds (versions and hashes). It comes itself from PyPI,
# one release, hash-checked by pip, into a virtualenv of its own.
TOOLS := .tools
UV := $(TOOLS)/bin/uv
# The machine's Python, never one that uv would download.
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)
# --locked: refuse a uv.lock that no longer matches pyproject.toml instead of updating it.
SYNC := $(UV) sync --locked --python $(PYTHON)

.PHONY: install install-runtime run test lint lock bench bench-compare demo-exchange openapi clean

$(UV): tools/uv-requirements.txt
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --require-hashes --no-deps -r tools/uv-requirements.txt
	touch $(UV)

# Runtime and test tools: what `make test` runs with.
$(VENV)/.installed-test: $(UV) pyproject.toml uv.lock
	$(SYNC) --extra test
	touch $@

# The runtime alone. --inexact keeps the test tools of an earlier `make test`.
$(VENV)/.installed-run: $(UV) pyproject.toml uv.lock
	$(SYNC) --inexact
	touch $@

install: $(VENV)/.installed-test

install-runtime: $(VENV)/.installed-run

run: install-runtime
	$(BIN)/iex serve

lint: install
	$(BIN)/ruff check app tests bench tools
	$(BIN)/ruff format --check app tests bench tools
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/pytest -n 2 --dist loadgroup --durations=25

# After changing the dependencies in pyproject.toml: resolve them again into uv.lock.
lock: $(UV)
	$(UV) lock --python $(PYTHON)

# Two gateways on loopback pair, push a study and pull it back: docs/EXCHANGE.md in action.
demo-exchange: install-runtime
	$(BIN)/python tools/demo_exchange.py

bench: install
	$(BIN)/python bench/run_all.py

# Side by side with Orthanc (installed from Debian's packages when absent; needs root), on the
# real CT and MR of pydicom-data (a test dependency).
bench-compare: install
	$(BIN)/python bench/compare.py

clean:
	rm -rf $(VENV) $(TOOLS) var .pytest_cache .mypy_cache .ruff_cache .import_linter_cache .hypothesis

openapi: install
	$(BIN)/python -m app.openapi
