#!/usr/bin/env bash
# Launch an experiment on a Cloud TPU slice: a thin wrapper around `cadenza launch tpu`.
#
#   scripts/launch_tpu.sh NAME ZONE ACCELERATOR EXPERIMENT [section.field=value ...] [--create] [--dry-run]
#   scripts/launch_tpu.sh my-pod us-east5-a v5p-32 configs/experiments/tiny_pretrain.yaml --dry-run
#
# Needs gcloud (authenticated) and this checkout's environment (make .venv/.synced).
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,7p' "$0" >&2
  exit 2
fi
name=$1 zone=$2 accelerator=$3
shift 3
root=$(cd "$(dirname "$0")/.." && pwd)
exec "$root/.venv/bin/cadenza" launch tpu --name "$name" --zone "$zone" \
  --accelerator "$accelerator" "$@"
