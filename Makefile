# cadenza: every target bootstraps what it needs, idempotently.
#   make demo   - the main job: cadenza quickstart (data, pretrain, LoRA, fast decoding; CPU)
#   make bench  - every benchmark under bench/ (cadenza bench all; BENCH_ARGS=--quick)
#   make test   - the whole test suite
#   make ref-env - the Python 3.11 PyTorch/transformers reference env (parity tests;
#                  make test builds it too)
#   ACCEL=tpu|gpu|none picks the accelerator extra of .venv (default tpu)

SHELL := /bin/bash
PY312 ?= $(firstword $(wildcard $(shell pyenv root 2>/dev/null)/versions/3.12.1/bin/python3.12) $(shell command -v python3.12))
PY311 ?= $(firstword $(wildcard $(shell pyenv root 2>/dev/null)/versions/3.11.7/bin/python3.11) $(shell command -v python3.11))
FIND_LINKS ?= $(shell pip config get global.find-links 2>/dev/null || echo /opt/wheels)
UV_VERSION := 0.13.9
UV := .uv/bin/uv
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON := $(PY312)
# pytest-xdist workers for make test (whole test files per worker: module fixtures are
# built once); most tests are single-threaded compiles, so 2 workers use both cores.
TEST_WORKERS ?= 2

.PHONY: demo test ref-env bench clean FORCE

$(UV):
	@test -n "$(PY312)" || { echo "error: Python 3.12 not found; set PY312=/path/to/python3.12" >&2; exit 2; }
	$(PY312) -m venv .uv
	.uv/bin/pip install --quiet uv==$(UV_VERSION)

# Accelerator extra installed with the locked environment: tpu (libtpu; also compiles
# for TPU slices on any machine), gpu (CUDA 12 jaxlib plugin) or none (CPU only).
# Switching (make ACCEL=gpu demo) re-syncs .venv. Installed packages are byte-compiled once
# (--compile-bytecode): with PYTHONDONTWRITEBYTECODE set, every process would otherwise
# compile JAX (and torch in .venv-ref) from source on import.
ACCEL ?= tpu
ACCEL_EXTRA := $(if $(filter-out none,$(ACCEL)),--extra $(ACCEL))
.venv/.synced: $(UV) pyproject.toml uv.lock Makefile \
		$(if $(filter-out $(ACCEL),$(shell cat .venv/.accel 2>/dev/null)),FORCE)
	@case "$(ACCEL)" in tpu|gpu|none) ;; *) echo "error: ACCEL=$(ACCEL): use tpu, gpu or none" >&2; exit 2;; esac
	$(UV) sync --frozen --quiet --compile-bytecode $(ACCEL_EXTRA)
	echo $(ACCEL) > .venv/.accel
	touch $@

FORCE:

demo: .venv/.synced
	.venv/bin/cadenza quickstart

bench: .venv/.synced .venv-ref/.synced
	.venv/bin/cadenza bench all $(BENCH_ARGS)

test: .venv/.synced .venv-ref/.synced
	.venv/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

.venv-ref/.synced: $(UV) requirements-ref.txt
	@test -n "$(PY311)" || { echo "error: Python 3.11 not found; set PY311=/path/to/python3.11" >&2; exit 2; }
	$(UV) venv --quiet --allow-existing --python $(PY311) .venv-ref
	$(UV) pip sync --quiet --compile-bytecode --python .venv-ref/bin/python --find-links $(FIND_LINKS) requirements-ref.txt
	touch $@

ref-env: .venv-ref/.synced

clean:
	rm -rf .venv .venv-ref .uv

# --- The lent GPU machine (docs/kernels.md, "Running on a lent GPU") ---------------------
#   make gpu-bundle  - .gpu-wheels/: the wheels the GPU image lacks + the commit stamp; checks
#                      that they and the working tree fit the 64 MiB that travel
#   make test-jax011 - kernel, model and decode tests on JAX 0.11.2 (the GPU image's), CPU,
#                      in .venv-jax011 built like that image (not part of make test)
GPU_WHEELS := .gpu-wheels
GPU_PIP := .uv/bin/python -m pip
GPU_PLATFORM := --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
JAX011_TESTS ?= tests/test_kernels_attention.py tests/test_kernels_gpu.py tests/test_model.py \
	tests/test_decode_loop.py tests/test_decode_sampling.py tests/test_gpu_check.py \
	tests/test_kernels_upstream.py

.PHONY: gpu-wheels gpu-bundle gpu-check-dry-run jax011-env test-jax011

$(GPU_WHEELS)/.done: $(UV) scripts/gpu/wheels.txt scripts/gpu/wheels-sdist.txt
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(GPU_PIP) download --quiet --no-deps --require-hashes $(GPU_PLATFORM) -d $(GPU_WHEELS) \
		-r scripts/gpu/wheels.txt
	$(GPU_PIP) wheel --quiet --no-deps --require-hashes -w $(GPU_WHEELS) -r scripts/gpu/wheels-sdist.txt
	touch $@

gpu-wheels: $(GPU_WHEELS)/.done

gpu-bundle: gpu-wheels .venv/.synced
	.venv/bin/python scripts/gpu_check.py --bundle $(GPU_WHEELS)

gpu-check-dry-run: .venv/.synced
	.venv/bin/python scripts/gpu_check.py --dry-run

.venv-jax011/.synced: $(UV) scripts/gpu/requirements-jax011.txt $(GPU_WHEELS)/.done
	$(UV) venv --quiet --allow-existing --python $(PY312) .venv-jax011
	$(UV) pip sync --quiet --python .venv-jax011/bin/python scripts/gpu/requirements-jax011.txt
	$(UV) pip install --quiet --python .venv-jax011/bin/python --no-deps $(GPU_WHEELS)/*.whl
	$(UV) pip install --quiet --python .venv-jax011/bin/python --no-deps -e .
	touch $@

jax011-env: .venv-jax011/.synced

test-jax011: .venv-jax011/.synced
	.venv-jax011/bin/python -m pytest -p no:cacheprovider $(JAX011_TESTS)
