#!/usr/bin/env bash
# The prepared GPU check (docs/kernels.md, "Running on a lent GPU").
#   Here, first:          make gpu-bundle     (wheels the GPU image lacks + commit stamp)
#   On the GPU machine:   bash scripts/gpu_check.sh "$OUT"   (repo root; .gpu-wheels carried)
#   Here, no GPU:         bash scripts/gpu_check.sh --dry-run
# Installs the carried wheels and cadenza (--no-deps) into /tmp/cadenza-site, then runs
# scripts/gpu_check.py: every step with its own time limit, results under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == --dry-run ]]; then
    exec "${PYTHON:-.venv/bin/python}" scripts/gpu_check.py --dry-run "${@:2}"
fi
out=${1:?usage: scripts/gpu_check.sh OUT_DIR [gpu_check.py flags] | --dry-run}
wheels=${GPU_WHEELS:-.gpu-wheels}
if [[ ! -f $wheels/COMMIT ]]; then
    echo "error: $wheels/COMMIT missing: run 'make gpu-bundle' here and carry $wheels" >&2
    exit 2
fi
python=${PYTHON:-python3}
site=/tmp/cadenza-site
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; } \
    | tee "$out/gpu_check.log"
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$wheels"/*.whl
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
"$python" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
    --upgrade --target "$site" .
# the commit the bundle was stamped with, unless git can say (the .git folder may not travel)
CADENZA_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || cat "$wheels/COMMIT")
export CADENZA_COMMIT
exec "$python" scripts/gpu_check.py --out "$out" "${@:2}"
