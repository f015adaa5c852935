# make demo: the design-card sweep on the CPU default; make test: the whole test suite;
# make bench: every benchmark, its figures written into docs/benchmarks.md.
# All three create .venv and install ncsweep with its dev extras on first use.
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
	$(PY) benchmarks/run_all.py

clean:
	rm -rf outputs multirun .pytest_cache
