# make demo  : create .venv, install, run the embedded shift-benchmark demo on the CPU
# make test  : create .venv, install (with test extras), run the test suite
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-test.txt setup.py | cksum | cut -d' ' -f1)

.PHONY: demo test install clean

$(STAMP): requirements.txt requirements-test.txt setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-test.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	JAX_PLATFORMS=cpu $(BIN)/python experiments/shift_demo.py --config experiments/configs/shift_demo.yaml --out results/shift_demo

test: $(STAMP)
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) results .pytest_cache
