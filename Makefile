# Every target sets itself up on a fresh machine: it creates .venv and installs chartx when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= /tmp/chartx_quickstart

.PHONY: demo test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,tpu]'
	touch $@

# Trains the quickstart model (validation bpc printed as it falls), then samples from it.
demo: $(VENV)/.installed
	$(PY) -m chartx.main --config=configs/quickstart.py --workdir=$(DEMO_DIR)
	$(PY) -m chartx.main --config=configs/quickstart.py --workdir=$(DEMO_DIR) --mode=sample

# Two pytest workers (pytest-xdist), a file to each in turn: most of the suite's time is
# single-threaded compilation, so on 2 cores two workers take about 70% of one's time.
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

clean:
	rm -rf $(VENV) .pytest_cache
