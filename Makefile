# Two entry points a newcomer needs: `make demo` and `make test`.
# TORCH picks the torch build installed first; the constraints file keeps pip from swapping it.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
CONSTRAINTS ?= constraints.txt
BIN := $(VENV)/bin
PIP := PIP_CONSTRAINT=$(abspath $(CONSTRAINTS)) $(BIN)/python -m pip

.PHONY: demo test install install-test models benchmarks clean chromium triton-ssd

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/diffmamba-interp snr --out reports/snr.html --json reports/snr.json

# Debian's chromium for the report test (skipped with a reason where it cannot be installed).
chromium:
	@command -v chromium >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: report browser test will be skipped"; }

# triton + mamba-ssm/causal-conv1d without CUDA, for the real Triton SSD kernel on CPU
# (tests/test_triton_ssd.py; skipped with the reason where it cannot be installed).
triton-ssd: install-test
	@PIP_CONSTRAINT=$(abspath $(CONSTRAINTS)) bash scripts/install_triton_ssd.sh $(VENV)

test: install-test chromium triton-ssd
	$(BIN)/python -m pytest -n 2 -q

# The shipped models: 4000 steps from scratch, then 6000 more (see each model card). About 25 + 35
# minutes per model on 2 cores; the two run one after the other here.
models: install
	for a in mamba2 diffmamba2; do \
	  $(BIN)/diffmamba-interp train --arch $$a --out models/$$a-babi --steps 4000 && \
	  $(BIN)/diffmamba-interp train --arch $$a --init models/$$a-babi --out models/$$a-babi --steps 6000 --lr 2e-3 || exit 1; \
	done

benchmarks: install
	$(BIN)/python benchmarks/forward.py
	$(BIN)/python benchmarks/scan.py
	$(BIN)/python benchmarks/attention.py
	$(BIN)/python benchmarks/ssd.py
	$(BIN)/python benchmarks/long_context.py
	$(BIN)/python benchmarks/long_context.py --decode
	$(BIN)/python benchmarks/patching.py
	$(BIN)/python benchmarks/batching.py

clean:
	rm -rf $(VENV) .pytest_cache
