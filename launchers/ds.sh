#!/usr/bin/env bash
# Training under the DeepSpeed launcher (hostfile, one process per GPU, pdsh/ssh to other nodes).
#
#   bash launchers/ds.sh configs/cifar10.yaml parallel.deepspeed_config=configs/deepspeed/zero3.yaml
#   HOSTFILE=hostfile bash launchers/ds.sh configs/imagenet64.yaml
#
# Start it with bash, not as `deepspeed launchers/ds.sh`: the deepspeed launcher runs its script
# argument with python (`python -u SCRIPT --local_rank=N ...`), which cannot execute a shell script.
# This script calls the launcher itself, as `deepspeed --module ict_scale.train`, and appends
# parallel.backend=deepspeed. The ranks read RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from the environment.
#
# Environment (all optional):
#   HOSTFILE     DeepSpeed hostfile ("node0 slots=8" per line); without it, this node only
#   NUM_GPUS     processes per node (default: all visible GPUs; on a CPU-only machine set it)
#   MASTER_PORT  rendezvous port on the first host (default 29500)
#   PYTHON       interpreter with ict_scale and deepspeed installed (default python)
set -euo pipefail

PYTHON=${PYTHON:-python}
args=(--master_port "${MASTER_PORT:-29500}")
[[ -n "${HOSTFILE:-}" ]] && args+=(--hostfile "$HOSTFILE")
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num_gpus "$NUM_GPUS")
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}

# --no_local_rank: ranks take LOCAL_RANK from the environment, so the trainer's command line stays ours.
exec "$PYTHON" -m deepspeed.launcher.runner "${args[@]}" --module --no_local_rank ict_scale.train "$@" \
  parallel.backend=deepspeed
