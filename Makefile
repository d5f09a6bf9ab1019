# make demo  : create .venv, install, run the embedded shift-benchmark demo on the CPU
# make test  : create .venv, install (with test extras), run the test suite
# make real-model : build (once) the SmolLM2-135M-Instruct HF folder in the cache and print its path
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-test.txt requirements-real.txt setup.py | cksum | cut -d' ' -f1)

.PHONY: demo test install clean real-model

$(STAMP): requirements.txt requirements-test.txt requirements-real.txt setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-test.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-real.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	JAX_PLATFORMS=cpu $(BIN)/python experiments/shift_demo.py --config experiments/configs/shift_demo.yaml --out results/shift_demo

# the converted folder lives outside the repo: $ALIGNSHIFT_CACHE/smollm2-135m-instruct or
# ~/.cache/alignshift/smollm2-135m-instruct; rebuilt only when missing or corrupt
real-model: $(STAMP)
	JAX_PLATFORMS=cpu $(BIN)/python -m alignshift.models.convert --smollm2

test: $(STAMP)
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) results .pytest_cache
