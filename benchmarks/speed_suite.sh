#!/usr/bin/env bash
# The training-speed measurements behind BENCHMARKS.md, on one host with 1-4 GPUs.
#
#   bash benchmarks/speed_suite.sh single  OUT_DIR [GPU]   # one GPU: every mode, both recipes, profiles
#   bash benchmarks/speed_suite.sh batch   OUT_DIR [GPU]   # one GPU: larger batches, the real loader
#   bash benchmarks/speed_suite.sh scaling OUT_DIR         # 2 and 4 GPUs: DDP, FSDP2, ZeRO-2 (weak scaling)
#
# Each line is a `python -m ict_scale.bench` run; its JSON lands in OUT_DIR. The real-loader runs read
# local shards of the procedural data set made first (make_shards), so decoding and the DataLoader
# workers are in the measurement.
set -euo pipefail
what=${1:?single|batch|scaling}
out=${2:?output directory}
gpu=${3:-0}
mkdir -p "$out"
PY=${PY:-python3}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4

bench1() {  # one GPU: bench1 NAME ARGS...
  local name=$1; shift
  CUDA_VISIBLE_DEVICES=$gpu $PY -m ict_scale.bench "$@" --out "$out/$name.json" >"$out/$name.log" 2>&1 \
    || echo "FAILED: $name (see $name.log)"
}

shards() {  # local shards of the procedural data: shards RESOLUTION CLASSES NUM DIR
  [ -f "$4/manifest.json" ] || $PY -m data_prep.make_shards --dataset synthetic --num "$3" --resolution "$1" \
    --num-classes "$2" --out "$4" --workers 8 >/dev/null
}

case $what in
single)
  bench1 ncsnpp_b256 cifar10 --batch-per-gpu 256 --steps 20 --warmup 6 --profile \
    --modes fp32_eager,bf16,bf16_cl,bf16_cl_cudnn,bf16_cl_compile,tuned
  bench1 adm_b64 imagenet64 --batch-per-gpu 64 --steps 15 --warmup 6 --profile \
    --modes fp32_eager,bf16,bf16_cl,bf16_cl_cudnn,bf16_cl_compile,tuned
  ;;
batch)
  shards 32 10 20480 /tmp/ict_shards32
  shards 64 1000 8192 /tmp/ict_shards64
  bench1 ncsnpp_b512 cifar10 --batch-per-gpu 512 --steps 15 --warmup 6 --modes bf16_cl_cudnn,tuned
  bench1 ncsnpp_real cifar10 data.source=/tmp/ict_shards32/manifest.json data.num_workers=6 \
    --batch-per-gpu 256 --steps 30 --warmup 6 --loaders real,device --modes tuned
  bench1 adm_b128 imagenet64 --batch-per-gpu 128 --steps 12 --warmup 6 --modes bf16_cl_cudnn,tuned
  bench1 adm_real imagenet64 data.source=/tmp/ict_shards64/manifest.json data.num_workers=6 \
    --batch-per-gpu 64 --steps 20 --warmup 6 --loaders real,device --modes tuned
  ;;
scaling)
  # Weak scaling (the same batch per GPU). Each backend's own 1-GPU run is the reference, measured in the
  # same session: sharding backends keep NCHW weights, so the plain single-GPU run is not comparable.
  for run in 1:cifar10:ddp 1:cifar10:fsdp 1:cifar10:zero2 1:imagenet64:ddp 1:imagenet64:fsdp 1:imagenet64:zero2 \
             4:cifar10:ddp 4:cifar10:fsdp 4:cifar10:zero2 4:imagenet64:ddp 4:imagenet64:fsdp 4:imagenet64:zero2 \
             2:cifar10:ddp 2:cifar10:fsdp 2:cifar10:zero2; do
    IFS=: read -r n recipe backend <<<"$run"
    batch=256; [ "$recipe" = imagenet64 ] && batch=64
    name=${recipe}_${backend}_${n}gpu
    torchrun --standalone --nproc_per_node="$n" -m ict_scale.bench "$recipe" "configs/parallel/$backend.yaml" \
      --batch-per-gpu $batch --steps 15 --warmup 5 --modes bf16_cl_cudnn --out "$out/$name.json" \
      >"$out/$name.log" 2>&1 || echo "FAILED: $name"
  done
  ;;
*) echo "unknown suite '$what' (single|batch|scaling)" >&2; exit 2 ;;
esac
