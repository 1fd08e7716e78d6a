# `make test-sglang`: the SGLang HiCache backend's tests against the pinned SGLang release, in their own
# environment. SGLang's wheel pins a CUDA torch and many GPU-only packages; on a CPU-only machine we keep the
# CPU build of torch, install SGLang without its dependencies, then only what importing its storage interface
# and host pool classes needs (requirements-cpu.txt). torchvision's wheel is a CUDA build that cannot load
# its compiled ops over CPU torch: it is installed without dependencies for its Python modules, which
# SGLang's model configs import (tests/connectors/sglang_pools.py says how the tests import it).
SGLANG_VERSION ?= 0.5.23
SGLANG_TORCH ?= torch==2.13.0
SGLANG_TORCHVISION ?= torchvision==0.28.0
SGLANG_VENV ?= .venv-sglang
SGLANG_BIN := $(SGLANG_VENV)/bin
SGLANG_REQS := connectors/kvtier_connectors/sglang/requirements-cpu.txt
SGLANG_STAMP := $(SGLANG_VENV)/.installed

$(SGLANG_STAMP): $(SGLANG_REQS) pyproject.toml mk/sglang.mk
	$(PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_BIN)/pip install -q --upgrade pip
	$(SGLANG_BIN)/pip install -q "$(SGLANG_TORCH)"
	$(SGLANG_BIN)/pip install -q --no-deps "sglang==$(SGLANG_VERSION)" "$(SGLANG_TORCHVISION)"
	echo "$(SGLANG_TORCH)" > $(SGLANG_VENV)/torch-constraint.txt
	$(SGLANG_BIN)/pip install -q -c $(SGLANG_VENV)/torch-constraint.txt -r $(SGLANG_REQS)
	$(SGLANG_BIN)/pip install -q -c $(SGLANG_VENV)/torch-constraint.txt -e ".[test]"
	touch $@

.PHONY: test-sglang
test-sglang: $(SGLANG_STAMP)
	$(SGLANG_BIN)/pytest -m sglang tests/connectors
