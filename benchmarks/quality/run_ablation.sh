#!/usr/bin/env bash
# The ablation runs behind QUALITY.md: iCT and each baseline option trained on the same procedural data,
# seeds and budget, scored during training by FCD (Frechet distance on the features of the classifier in
# benchmarks/results/quality/, validated in metric_validation.md).
#
#   bash benchmarks/quality/run_ablation.sh SECONDS GPU:VARIANT [GPU:VARIANT ...]
#
# VARIANT is `ict` (configs/quality/base.yaml alone) or the name of an override file in configs/quality/.
# Several variants may share a GPU. Each run stops after SECONDS with a checkpoint (SIGTERM is the
# trainer's preemption signal); running the same command again resumes every run where it stopped, and a
# finished run exits at once. Work files go to $QUALITY_WORK (default /tmp/ict_quality): the shards (made
# once), the reference statistics (made once), runs/<variant>/ and logs/.
set -euo pipefail
secs=${1:?seconds per call}; shift
export OMP_NUM_THREADS=4
source benchmarks/quality/prepare.sh

for spec in "$@"; do
  gpu=${spec%%:*}; variant=${spec#*:}
  extra=()
  [ "$variant" = ict ] || extra=("configs/quality/$variant.yaml")
  CUDA_VISIBLE_DEVICES=$gpu timeout -s TERM -k 120 "$secs" $PY -m ict_scale.train configs/quality/base.yaml \
    "${extra[@]}" "train.run_dir=$work/runs/$variant" "data.source=$data/manifest.json" \
    eval.features=classifier "eval.classifier_weights=$clf" "eval.ref=$ref" \
    >>"$work/logs/$variant.log" 2>&1 &
done
wait  # a run stopped by the time limit has written a complete checkpoint first
