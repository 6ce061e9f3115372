#!/usr/bin/env bash
# The fast-path A/B behind QUALITY.md's fidelity table: the iCT recipe of configs/quality/base.yaml trained in
# each precision / compile / backend configuration of configs/quality/fidelity/, with several seeds, scored by FCD.
#
#   bash benchmarks/quality/run_fidelity.sh SECONDS GPUS:VARIANT:SEED [GPUS:VARIANT:SEED ...]
#
# GPUS is one index ("0") or a comma list ("0,1"): torchrun starts one rank per GPU (also for one GPU, so
# that a sharded variant runs on one). Several runs may share a GPU. Each run stops after SECONDS with a
# checkpoint and resumes on the next call; a finished run exits at once. $OVERRIDES (space-separated
# key=value) are added to every run, e.g. a shorter budget. Work files go to $QUALITY_WORK (default
# /tmp/ict_quality): shards and reference statistics (made once), runs/, logs/.
set -euo pipefail
secs=${1:?seconds per call}; shift
export OMP_NUM_THREADS=2 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
source benchmarks/quality/prepare.sh
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$work/inductor}

port=29600
for spec in "$@"; do
  IFS=: read -r gpus variant seed <<<"$spec"
  name=${variant}_s${seed}
  args=(configs/quality/base.yaml "configs/quality/fidelity/$variant.yaml" "train.seed=$seed"
        "train.run_dir=$work/runs/$name" "data.source=$data/manifest.json" eval.features=classifier
        "eval.classifier_weights=$clf" "eval.ref=$ref" ${OVERRIDES:-})
  n=$(awk -F, '{print NF}' <<<"$gpus")
  port=$((port + 1))
  cmd=($PY -m torch.distributed.run --nproc-per-node="$n" --master-port=$port -m ict_scale.train "${args[@]}")
  CUDA_VISIBLE_DEVICES=$gpus timeout -s TERM -k 120 "$secs" "${cmd[@]}" >>"$work/logs/$name.log" 2>&1 &
done
wait || true  # a run stopped by the time limit has written a complete checkpoint first
