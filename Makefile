# The two commands a newcomer needs are `make run` and `make test`; everything else is a step of those.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench bench-compare openapi clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/iex serve

lint: install
	$(BIN)/ruff check app tests bench
	$(BIN)/ruff format --check app tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/pytest

bench: install
	$(BIN)/python bench/run_all.py

# Side by side with Orthanc (installed from Debian's packages when absent; needs root). The
# real CT and MR come from pydicom-data, which only this benchmark needs.
bench-compare: install
	$(BIN)/pip install --quiet pydicom-data
	$(BIN)/python bench/compare.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache

openapi: install
	$(BIN)/python -m app.openapi
