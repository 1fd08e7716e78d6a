# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv and installs on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Without a GPU, the CPU build of torch (a small wheel); with one, torch's default (CUDA) build and the CuPy
# wheel of torch's CUDA major version (extra cuda12 or cuda13: a CuPy of another major fails to load).
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch>=2.4$(comma)<2.15,torch==2.13.0)
EXTRAS ?= test,transformers,plots
TORCH_CUDA_MAJOR = $$($(BIN)/python -c 'import torch; print((torch.version.cuda or "12").split(".")[0])')
comma := ,

.PHONY: demo test lint bench native-check clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)$(if $(HAS_GPU),$(comma)cuda$(TORCH_CUDA_MAJOR))]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kvtier demo

lint: $(STAMP)
	$(BIN)/ruff check kvtier connectors tests bench setup.py
	$(BIN)/mypy

test: $(STAMP) lint native-check redis-server
	$(BIN)/pytest

# Compile-check the CUDA kernels where nvcc exists, so a syntax error cannot land.
native-check:
	@if command -v nvcc >/dev/null 2>&1; then \
		for src in native/*.cu; do [ -e "$$src" ] || continue; \
			nvcc -c -std=c++17 -o /dev/null "$$src" || exit 1; echo "nvcc ok: $$src"; done; \
	else echo "nvcc not found: CUDA kernels not compile-checked"; fi

bench: $(STAMP)
	$(BIN)/kvtier bench host --json

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(VLLM_ENGINE_VENV) $(SGLANG_VENV) .pytest_cache .mypy_cache .ruff_cache

include mk/vllm.mk
include mk/vllm-engine.mk
include mk/gpu.mk
include mk/remote.mk
include mk/sglang.mk
include mk/peers.mk
