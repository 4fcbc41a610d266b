# tfl_fuse: every target sets up .venv itself, so each works on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
BUILD  := build
PYTEST_WORKERS ?= 2

.PHONY: demo test test-converters bench fuzz bench-quant bench-cle mediapipe-models lint recipes install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@ $(VENV)/.installed

# The package byte-compiled: pip does not compile an editable install, and where
# PYTHONDONTWRITEBYTECODE is set (CI runners and container images often set it) Python would
# otherwise compile tfl_fuse's sources again at every start: 177 -> 120 ms for
# `python -m tfl_fuse --version` here. A source newer than its .pyc is still compiled afresh.
SOURCES := $(wildcard tfl_fuse/*.py tfl_fuse/*/*.py)
$(VENV)/.compiled: $(SOURCES) | $(BIN)/python
	$(BIN)/python -m compileall -q tfl_fuse
	touch $@

install: $(VENV)/.installed $(VENV)/.compiled
install-test: $(VENV)/.installed-test $(VENV)/.compiled

## make demo: build the bundled example (a pre-activation residual block) and optimize it;
## prints what changed and the summary; the JSON report goes to build/demo/report.json
demo: $(VENV)/.installed $(VENV)/.compiled
	@mkdir -p $(BUILD)/demo
	@$(BIN)/python tools/chef.py recipes/Demo_Residual_Preact_BN -o $(BUILD)/demo/example.tflite
	@echo "optimizing $(BUILD)/demo/example.tflite (a pre-activation residual block) into $(BUILD)/demo/example.opt.tflite:"
	@$(BIN)/python -m tfl_fuse $(BUILD)/demo/example.tflite $(BUILD)/demo/example.opt.tflite \
	  --verify -v --report $(BUILD)/demo/report.json
	@echo "the JSON report: $(BUILD)/demo/report.json"

## make test: the whole suite (recipes, unit tests, Keras models converted with tensorflow-cpu)
test: $(VENV)/.installed-test $(VENV)/.compiled
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q

## make test-converters: small PyTorch nets converted by litert-torch (not part of make test);
## installs torch 2.13.0 (the CPU wheel) and litert-torch into .venv, caches models in build/cache
$(VENV)/.installed-converters: setup.cfg pyproject.toml $(VENV)/.installed-test
	$(BIN)/pip install -q -e '.[test,converters]'
	touch $@

test-converters: $(VENV)/.installed-converters
	TFL_FUSE_CONVERTERS=1 $(BIN)/python -m pytest -q tests/test_converters.py

## make bench: tool cost, inference latency and fold coverage on Keras models, then quantization
bench: $(VENV)/.installed-test $(VENV)/.compiled
	$(BIN)/python tools/bench.py
	$(BIN)/python tools/quantbench.py

## make bench-cle: equalize_cross_layer's criterion against measured int8 errors, group by group
bench-cle: $(VENV)/.installed-test
	$(BIN)/python tools/cle_study.py

## make bench-quant: the quantization section alone (ai-edge-quantizer on (a) untouched, (b) default, (c) --target int8)
bench-quant: $(VENV)/.installed-test $(VENV)/.compiled
	$(BIN)/python tools/quantbench.py

## make mediapipe-models: fetch the mediapipe 0.10.21 wheel and unzip its trained models into build/cache/mediapipe
mediapipe-models: $(VENV)/.installed-test
	$(BIN)/python tools/quantbench.py --fetch-only

## make fuzz: 100,000 mutated recipe models through tfl_fuse.optimize; crash signatures and
## reproducers in build/fuzz (FUZZ_COUNT=... to change the count)
FUZZ_COUNT ?= 100000
fuzz: $(VENV)/.installed-test $(VENV)/.compiled
	$(BIN)/python tools/fuzz.py --count $(FUZZ_COUNT) --jobs $(PYTEST_WORKERS) --out $(BUILD)/fuzz

## make recipes: build every recipe model into build/recipes-models
recipes: $(VENV)/.installed $(VENV)/.compiled
	@mkdir -p $(BUILD)/recipes-models
	@for d in recipes/*/; do n=$$(basename $$d); \
	  $(BIN)/python tools/chef.py $$d -o $(BUILD)/recipes-models/$$n || exit 1; done
	@ls $(BUILD)/recipes-models | wc -l | xargs echo "recipe models built:"

lint: $(VENV)/.installed-test
	$(BIN)/ruff check tfl_fuse tools tests
	$(BIN)/ruff format --check tfl_fuse tools tests

clean:
	rm -rf $(BUILD) .pytest_cache
