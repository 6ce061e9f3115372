"""On CUDA, under the recipe's compile settings (bf16, channels_last, per-block torch.compile), the student and
the teacher pass of consistency_pair at equal sigma agree at (below) the bf16 rounding level of one forward,
and the conditioning keeps neighbouring sigmas apart. Committed figures: benchmarks/results/fidelity_*/.
"""
from __future__ import annotations

import pytest
import torch

from ict_scale.bench.fidelity import conditioning_difference, paired_difference, prepared_backend

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

RECIPE = ["configs/quality/base.yaml"]
FAST_PATH = ["data.source=synthetic", "train.precision=bf16", "train.channels_last=true", "train.compile=true"]


def test_compiled_teacher_and_student_agree_at_equal_sigma():
    cfg, backend = prepared_backend(RECIPE, FAST_PATH)
    assert backend.teacher_in_grad_mode()  # the default under compile
    d = paired_difference(cfg, backend, batch=64)
    print(f"compiled bf16 student - teacher at equal sigma: max {d['max_abs']:.3g}, bf16 level {d['bf16_level']:.3g}")
    assert d["max_abs_all_repeats"] <= d["bf16_level"], d


def test_conditioning_tells_neighbouring_sigmas_apart_on_cuda():
    cfg, backend = prepared_backend(RECIPE, [*FAST_PATH[:-1], "train.compile=false"])
    fractions = conditioning_difference(backend.teacher(), backend.module.net, cfg.data.resolution,
                                        backend.autocast, backend.device)
    assert min(fractions.values()) >= 0.99, fractions
