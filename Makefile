# Quick start: `make demo` (the main job) and `make test` (`make test-fast`: unit tests only). Both create or reuse .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast venv clean

venv: $(STAMP)

# If the base interpreter already has torch (GPU images), reuse it; else pin the CPU build.
$(STAMP): setup.py requirements.txt requirements-dev.txt
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	  $(VENV)/bin/pip install -q $$(grep -v '^torch==' requirements.txt | grep -v '^#') -r requirements-dev.txt; \
	else \
	  $(PYTHON) -m venv $(VENV); \
	  $(VENV)/bin/pip install -q -r requirements.txt -r requirements-dev.txt; \
	fi
	$(VENV)/bin/pip install -q --no-deps -e .
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m megatron_eagle.demo

# Unit tests (in-process, under 2 minutes), then integration (multi-process, Slurm, end to end).
test: test-fast
	$(PY) -m pytest -q --durations=15 tests/integration

test-fast: $(STAMP)
	$(PY) -m pytest -q tests/unit

clean:
	rm -rf $(VENV) runs/demo
