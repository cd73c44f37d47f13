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
# Switching (make ACCEL=gpu demo) re-syncs .venv.
ACCEL ?= tpu
ACCEL_EXTRA := $(if $(filter-out none,$(ACCEL)),--extra $(ACCEL))
.venv/.synced: $(UV) pyproject.toml uv.lock Makefile \
		$(if $(filter-out $(ACCEL),$(shell cat .venv/.accel 2>/dev/null)),FORCE)
	@case "$(ACCEL)" in tpu|gpu|none) ;; *) echo "error: ACCEL=$(ACCEL): use tpu, gpu or none" >&2; exit 2;; esac
	$(UV) sync --frozen --quiet $(ACCEL_EXTRA)
	echo $(ACCEL) > .venv/.accel
	touch $@

FORCE:

demo: .venv/.synced
	.venv/bin/cadenza quickstart

bench: .venv/.synced .venv-ref/.synced
	.venv/bin/cadenza bench all $(BENCH_ARGS)

test: .venv/.synced .venv-ref/.synced
	.venv/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile

.venv-ref/.synced: $(UV) requirements-ref.txt
	@test -n "$(PY311)" || { echo "error: Python 3.11 not found; set PY311=/path/to/python3.11" >&2; exit 2; }
	$(UV) venv --quiet --allow-existing --python $(PY311) .venv-ref
	$(UV) pip sync --quiet --python .venv-ref/bin/python --find-links $(FIND_LINKS) requirements-ref.txt
	touch $@

ref-env: .venv-ref/.synced

clean:
	rm -rf .venv .venv-ref .uv
