# Sourced by the quality runners: the work folder, the procedural training shards and their FCD reference
# statistics (each made once). Sets work, PY, clf, data and ref.
work=${QUALITY_WORK:-/tmp/ict_quality}
PY=${PY:-python3}
clf=benchmarks/results/quality/classifier_synthetic32.safetensors
data=$work/shards
ref=$work/ref_fcd_train.npz
mkdir -p "$work/logs"

# 50,000 training images (CIFAR-10's count), 32 classes, the generator's default seed.
[ -f "$data/manifest.json" ] || $PY -m data_prep.make_shards --dataset synthetic --split train --num 50000 \
  --resolution 32 --num-classes 32 --out "$data" --workers 8 >"$work/logs/shards.log" 2>&1
[ -f "$ref" ] || $PY -m data_prep.ref_stats --data "$data/manifest.json" --out "$ref" --resolution 32 \
  --features classifier --classifier-weights "$clf" >"$work/logs/ref_stats.log" 2>&1
