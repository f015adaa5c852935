# make demo: the design-card sweep on the CPU default; make test: the whole test suite.
# Both create .venv and install ncsweep with its dev extras on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ncsweep-installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ncsweep -m head=etf,learned dim=K,512

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	PY=$(PY) tests/suite.sh

bench: $(STAMP)
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf outputs multirun .pytest_cache
