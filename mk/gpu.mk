# `make gpu-check`: the gpu tests and the GPU benchmarks on one CUDA machine, written as one JSON summary,
# $(GPU_CHECK_OUT)/gpu-check.json (fields: docs/gpu-check.md). It runs from the source tree with the Python
# that has torch (the project's venv if there is one, else $(PYTHON)), creates no venv and downloads nothing.
# kvtier's small pure dependencies that the machine lacks may travel as wheels in $(GPU_WHEELS)/: they are
# installed into a temporary folder, and only when one is missing.
GPU_CHECK_OUT ?= out
GPU_WHEELS ?= .whl
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
GPU_CHECK_ARGS ?=
GPU_NEEDED := blake3 xxhash msgpack prometheus_client

.PHONY: gpu-check
gpu-check:
	@site=; missing=$$($(GPU_PYTHON) -c 'import importlib.util as u, sys; print(*[m for m in sys.argv[1:] if u.find_spec(m) is None])' $(GPU_NEEDED)); \
	if [ -n "$$missing" ]; then \
		if ls $(GPU_WHEELS)/*.whl >/dev/null 2>&1; then \
			site=$$(mktemp -d) && $(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --target "$$site" $(GPU_WHEELS)/*.whl || exit 1; \
		else echo "gpu-check: kvtier needs $$missing; install them or put their wheels in $(GPU_WHEELS)/"; exit 1; fi; \
	fi; \
	PYTHONPATH="$(CURDIR):$(CURDIR)/connectors$${site:+:$$site}$${PYTHONPATH:+:$$PYTHONPATH}" \
		$(GPU_PYTHON) -m kvtier.bench.gpu_check --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)
