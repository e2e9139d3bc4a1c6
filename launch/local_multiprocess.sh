#!/usr/bin/env bash
# Starts N local processes of one python module, wired for jax.distributed.
#
# Usage: launch/local_multiprocess.sh N python.module [module flags...]
# Example (2 processes, 2 CPU devices each):
#   XLA_FLAGS=--xla_force_host_platform_device_count=2 \
#     launch/local_multiprocess.sh 2 act_jax.collect --models=A,B \
#     --probe=probe.jsonl --out=/tmp/stats
# Each process gets ACT_JAX_COORDINATOR=127.0.0.1:<free port>,
# ACT_JAX_NUM_PROCESSES=N and ACT_JAX_PROCESS_ID=i, which
# act_jax.distributed.maybe_initialize() reads. PYTHON overrides the
# interpreter; LOG_DIR, if set, receives proc<i>.log per process (else all
# output goes to this terminal). Exits non-zero if any process fails.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 NUM_PROCESSES python.module [flags...]" >&2
  exit 2
fi
num="$1"; module="$2"; shift 2
python="${PYTHON:-python}"
port="$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"

pids=()
for ((i = 0; i < num; i++)); do
  if [[ -n "${LOG_DIR:-}" ]]; then
    mkdir -p "$LOG_DIR"
    out="$LOG_DIR/proc$i.log"
  else
    out=/dev/stdout
  fi
  ACT_JAX_COORDINATOR="127.0.0.1:$port" ACT_JAX_NUM_PROCESSES="$num" \
    ACT_JAX_PROCESS_ID="$i" "$python" -m "$module" "$@" >"$out" 2>&1 &
  pids+=("$!")
done

status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
