# `make test-vllm`: the vLLM connector's tests against the pinned vLLM release, in their own environment.
# vLLM's wheel pins a CUDA torch; on a CPU-only machine we keep the CPU build of torch and install vLLM
# without its dependencies, then only the requirements it needs to import (requirements-cpu.txt: vLLM's
# declared requirements minus torch, torchvision, torchaudio and the GPU-only packages).
VLLM_VERSION ?= 0.33.0
VLLM_TORCH ?= torch==2.13.0
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_REQS := connectors/kvtier_connectors/vllm/requirements-cpu.txt
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): $(VLLM_REQS) pyproject.toml mk/vllm.mk
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q --upgrade pip
	$(VLLM_BIN)/pip install -q "$(VLLM_TORCH)"
	$(VLLM_BIN)/pip install -q --no-deps "vllm==$(VLLM_VERSION)"
	echo "$(VLLM_TORCH)" > $(VLLM_VENV)/torch-constraint.txt
	$(VLLM_BIN)/pip install -q -c $(VLLM_VENV)/torch-constraint.txt -r $(VLLM_REQS)
	$(VLLM_BIN)/pip install -q -c $(VLLM_VENV)/torch-constraint.txt -e ".[test]"
	touch $@

.PHONY: test-vllm
# VLLM_TARGET_DEVICE=cpu: without it vLLM cannot infer a device type and refuses to build its config.
test-vllm: $(VLLM_STAMP)
	VLLM_TARGET_DEVICE=cpu $(VLLM_BIN)/pytest -m vllm tests/connectors
