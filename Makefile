# cadnode: `make demo` and `make test` work on a fresh clone with only Python and the registries.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# glibc page faults dominate large torch activations on the CPU without these.
export MALLOC_MMAP_MAX_ ?= 0
export MALLOC_TRIM_THRESHOLD_ ?= 68719476736

.PHONY: demo test lint typecheck test-deps serve-env test-env model clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The serving environment: no torch.
$(VENV)/.serve-stamp: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# Tests also train and export the model: torch, timm (pinned in pyproject's `train` extra).
$(VENV)/.test-stamp: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev,train]'
	touch $@ $(VENV)/.serve-stamp

demo: $(VENV)/.serve-stamp
	$(BIN)/cadnode demo

# DCMTK, dicom3tools and Orthanc are the real peers the tests talk to; Chromium (headless, driven
# by Selenium through chromedriver) is the browser the dashboard is tested in.
test-deps:
	@missing=""; \
	for pair in storescu:dcmtk dciodvfy:dicom3tools Orthanc:orthanc chromium:chromium \
	            chromedriver:chromium-driver; do \
	  cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || [ -x /usr/sbin/$$cmd ] || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing from apt"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi

test: test-deps $(VENV)/.test-stamp
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: $(VENV)/.test-stamp
	$(BIN)/ruff check cadnode tests train trt_engines
	$(BIN)/mypy cadnode train trt_engines

# Retrain the committed default package (cadnode/models/demo) by its documented command.
model: $(VENV)/.test-stamp
	$(BIN)/python -m train train --config train/configs/demo-synthetic.json --out runs/demo

clean:
	rm -rf $(VENV) var .pytest_cache
