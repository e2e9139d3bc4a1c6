#!/usr/bin/env bash
# Runs act_jax.main on every worker of a Cloud TPU pod slice.
#
# Usage: launch/tpu_pod.sh TPU_NAME ZONE [act_jax.main flags...]
# Example (Qwen2.5-7B recover on a v4-32, see configs/recover.py):
#   launch/tpu_pod.sh my-v4-32 us-central2-b --config=configs/recover.py \
#     --config.models.source=gs://.../base --config.models.target=... \
#     --config.mesh_shape=1,16,1 --workdir=/mnt/runs/recover
# Every worker runs the same command; ACT_JAX_AUTO_DISTRIBUTED=1 makes
# main.py call jax.distributed.initialize() with no arguments, which reads
# the TPU pod topology from the metadata server. The workdir must be on a
# filesystem all workers share. Env: REPO_DIR (checkout on the workers,
# default ~/act-jax), PYTHON (default python3), PROJECT (gcloud project).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 TPU_NAME ZONE [act_jax.main flags...]" >&2
  exit 2
fi
tpu="$1"; zone="$2"; shift 2
repo="${REPO_DIR:-~/act-jax}"
python="${PYTHON:-python3}"
args="$(printf ' %q' "$@")"
project=()
[[ -n "${PROJECT:-}" ]] && project=(--project="$PROJECT")
exec gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" "${project[@]}" \
  --worker=all \
  --command="cd $repo && ACT_JAX_AUTO_DISTRIBUTED=1 HF_HUB_OFFLINE=1 $python -m act_jax.main$args"
