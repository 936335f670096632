# make setup: create ./.venv with the package (editable) and its test extras.
# make test : setup if needed, then run the test suite.
SHELL := /bin/bash
VENV  := .venv
# A Python >= 3.12: first python3.12/python3.13/python3 on PATH, then pyenv's newest 3.12.
PYTHON ?= $(shell for c in python3.12 python3.13 python3; do \
    if command -v $$c >/dev/null 2>&1 && $$c -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then echo $$c; exit; fi; done; \
    if command -v pyenv >/dev/null 2>&1; then \
      v=$$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$$' | sort -V | tail -n1); \
      [ -n "$$v" ] && echo "$$(pyenv root)/versions/$$v/bin/python3"; fi)
PYTEST_ARGS ?=

.PHONY: setup test clean

$(VENV)/.installed: setup.cfg pyproject.toml
	@if [ -z "$(PYTHON)" ]; then echo "error: no Python >= 3.12 found (python3.12 on PATH or pyenv 3.12)"; exit 1; fi
	@echo "using $(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# Tests marked `serial` run after the parallel run, alone (see setup.cfg).
test: setup
	$(VENV)/bin/python -m pytest -n 2 --dist worksteal -q -m "not serial" $(PYTEST_ARGS)
	$(VENV)/bin/python -m pytest -q -m serial $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
