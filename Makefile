# make demo  : create .venv, install, run the embedded shift-benchmark demo on the CPU
# make test  : create .venv, install (with test extras), run the test suite
# make real-model : build (once) the SmolLM2-135M-Instruct HF folder in the cache and print its path
# make install-gpu / install-gpu-cuda13 / install-tpu : add JAX's CUDA 12 / CUDA 13 / TPU support
#                    at the pinned JAX (run on that host; then `make demo PLATFORM=cuda` or PLATFORM=tpu)
# make readme-table : after `make demo`, refresh docs/results/shift_demo.md and the README's demo table
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-test.txt requirements-real.txt setup.py | cksum | cut -d' ' -f1)

# JAX_PLATFORMS of `make demo`: cpu here and in CI; cuda or tpu on an accelerator host
PLATFORM ?= cpu

.PHONY: demo test install install-gpu install-gpu-cuda13 install-tpu readme-table clean real-model

$(STAMP): requirements.txt requirements-test.txt requirements-real.txt setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-test.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-real.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# On a GPU/TPU host: the runtime only (no test extras: their torch would bring its own CUDA
# libraries), with JAX's accelerator plugin pinned to requirements.txt's JAX (setup.py) and the
# experiment trackers. Then `make demo PLATFORM=cuda` (or tpu) skips the test install too.
ACCEL_INSTALL = test -x $(BIN)/python || $(PY) -m venv $(VENV); \
	$(BIN)/python -m pip install -q --upgrade pip && $(BIN)/python -m pip install -q -e
install-gpu:
	$(ACCEL_INSTALL) ".[cuda12,tracking]"

install-gpu-cuda13:
	$(ACCEL_INSTALL) ".[cuda13,tracking]"

install-tpu:
	$(ACCEL_INSTALL) ".[tpu,tracking]"

demo: $(if $(filter cpu,$(PLATFORM)),$(STAMP))
	JAX_PLATFORMS=$(PLATFORM) $(BIN)/python experiments/shift_demo.py --config experiments/configs/shift_demo.yaml --out results/shift_demo

# the converted folder lives outside the repo: $ALIGNSHIFT_CACHE/smollm2-135m-instruct or
# ~/.cache/alignshift/smollm2-135m-instruct; rebuilt only when missing or corrupt
real-model: $(STAMP)
	JAX_PLATFORMS=cpu $(BIN)/python -m alignshift.models.convert --smollm2

readme-table:
	$(BIN)/python scripts/readme_table.py --results results/shift_demo

test: $(STAMP)
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) results .pytest_cache
