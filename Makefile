# visionstream: `make demo` runs the service on an embedded stack, `make test` runs the tests.
# Both create the virtual environment first (once; again when pyproject.toml changes).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# `slow`: the packaging checks that ask PyPI to resolve every extra and the longest fault tests
# (a scheduler restart, a lost Dask worker, SIGTERM mid-batch, commit order): about 6 minutes;
# CI runs them. `scaleout`: several stream workers churning, a worker-killing image (about 5
# minutes); not in CI while the churn test can still find the group stalled (README)
FAST := -m "not slow and not scaleout"

.PHONY: install demo test test-slow test-scaleout unit bench compose-check constraints clean

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements/constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/visionstream demo

test: $(STAMP)
	$(BIN)/python -m pytest $(FAST) $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-scaleout: $(STAMP)
	$(BIN)/python -m pytest -m scaleout $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(FAST) $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

compose-check: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit/test_compose.py tests/unit/test_monitoring.py

constraints: $(STAMP)
	{ echo "# Tested versions; 'make install' uses these as constraints so pip need not search."; \
	  echo "# Regenerate: make constraints"; \
	  $(BIN)/pip freeze --exclude-editable | grep -v '^visionstream'; } > requirements/constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .visionstream
