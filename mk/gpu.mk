# `make gpu-check`: the gpu tests and the GPU benchmarks on one CUDA machine, written as one JSON summary,
# $(GPU_CHECK_OUT)/gpu-check.json (fields: docs/gpu-check.md). It runs from the source tree with the Python
# that has torch (the project's venv if there is one, else $(PYTHON)), creates no venv and downloads nothing.
# kvtier's small pure dependencies that the machine lacks travel as wheels in $(GPU_WHEELS)/ (fetched here
# beforehand with `make gpu-wheels`): the missing ones (only those) are installed into a temporary folder.
GPU_CHECK_OUT ?= out
GPU_WHEELS ?= .whl
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
GPU_CHECK_ARGS ?=
# Modules `make gpu-check` needs (import names): kvtier's own, the disk tier's (bench ttft, gpu tests), the daemon's.
GPU_NEEDED := blake3 xxhash msgpack prometheus_client lmdb zstandard platformdirs
# The same as distributions, for `make gpu-wheels`, built for the GPU machine's Python (see docs/gpu-check.md).
# Version ranges as in pyproject.toml.
GPU_WHEEL_PACKAGES := "blake3>=0.4,<2" "xxhash>=3.4,<4" "msgpack>=1.0,<2" "prometheus-client>=0.20,<1" \
	"lmdb>=1.4,<4" "zstandard>=0.22,<1" "platformdirs>=4,<5"
GPU_WHEEL_PYTHON ?= 3.12
GPU_WHEEL_PLATFORM ?= manylinux2014_x86_64

.PHONY: gpu-check gpu-wheels
gpu-check:
	@site=; missing=$$($(GPU_PYTHON) -c 'import importlib.util as u, sys; print(*[m for m in sys.argv[1:] if u.find_spec(m) is None])' $(GPU_NEEDED)); \
	if [ -n "$$missing" ]; then \
		wheels=$$(for m in $$missing; do ls $(GPU_WHEELS)/$$m-*.whl 2>/dev/null || echo "no-wheel-for-$$m"; done); \
		case "$$wheels" in *no-wheel-for-*) echo "gpu-check: kvtier needs $$missing; install them or put their wheels in $(GPU_WHEELS)/ (make gpu-wheels)"; exit 1;; esac; \
		site=$$(mktemp -d) && $(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --target "$$site" $$wheels || exit 1; \
	fi; \
	PYTHONPATH="$(CURDIR):$(CURDIR)/connectors$${site:+:$$site}$${PYTHONPATH:+:$$PYTHONPATH}" \
		$(GPU_PYTHON) -m kvtier.bench.gpu_check --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

# Binary wheels of $(GPU_WHEEL_PACKAGES) for CPython $(GPU_WHEEL_PYTHON) on $(GPU_WHEEL_PLATFORM), into $(GPU_WHEELS)/
# (ignored by git: carry it to the GPU machine with the working tree).
gpu-wheels:
	$(GPU_PYTHON) -m pip download --only-binary=:all: --no-deps --python-version $(GPU_WHEEL_PYTHON) \
		--platform $(GPU_WHEEL_PLATFORM) --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
		--dest $(GPU_WHEELS) $(GPU_WHEEL_PACKAGES)
