#!/usr/bin/env bash
# Runs act_jax.main on a SLURM GPU allocation: one process per node.
#
# Usage (inside an allocation, or as the batch script's body):
#   sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=1 \
#     launch/slurm_gpu.sh --config=configs/merge.py --workdir=/shared/runs/m \
#     --config.mesh_shape=1,16,1 --config.models.base=... ...
# The coordinator is the first host of SLURM_JOB_NODELIST (port
# ACT_JAX_PORT, default 12355); each task gets ACT_JAX_COORDINATOR,
# ACT_JAX_NUM_PROCESSES=SLURM_NNODES and ACT_JAX_PROCESS_ID=SLURM_PROCID,
# which act_jax.distributed.maybe_initialize() reads. The workdir must be on
# a filesystem all nodes share. PYTHON overrides the interpreter.
#SBATCH --ntasks-per-node=1
set -euo pipefail
: "${SLURM_JOB_NODELIST:?run inside a SLURM allocation (sbatch/salloc)}"
head="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
port="${ACT_JAX_PORT:-12355}"
python="${PYTHON:-python3}"
exec srun --ntasks-per-node=1 --nodes="${SLURM_NNODES:-1}" bash -c \
  "ACT_JAX_COORDINATOR=$head:$port ACT_JAX_NUM_PROCESSES=\${SLURM_NNODES:-1} \
   ACT_JAX_PROCESS_ID=\$SLURM_PROCID HF_HUB_OFFLINE=1 \
   $python -m act_jax.main $(printf ' %q' "$@")"
