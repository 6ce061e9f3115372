"""Single steps of real runs on 2 ranks: the divergence guard, the teacher pass, background saves.

One torchrun launch (workers/checks.py) drives every backend; each rank reports what it saw.
"""
from __future__ import annotations

import json
import math

import pytest

from workers.harness import TINY, run_ok, torchrun_cmd

pytestmark = pytest.mark.dist

ZERO3_TINY = "zero_optimization: {stage: 3, stage3_param_persistence_threshold: 0}\n"
BACKENDS = ["ddp", "fsdp", "zero2", "zero3", "zero2_bf16", "zero3_bf16"]


@pytest.fixture(scope="module")
def seen(tmp_path_factory):
    root = tmp_path_factory.mktemp("steps")
    (root / "zero3.yaml").write_text(ZERO3_TINY)
    base = [*TINY, "train.total_steps=100", "train.batch_size=4", "train.batch_per_gpu=1"]
    spec = {
        "ddp": [*base, "parallel.backend=ddp"],
        "fsdp": [*base, "parallel.backend=fsdp"],
        "zero2": [*base, "parallel.backend=deepspeed", "parallel.deepspeed_config=configs/deepspeed/zero2.yaml"],
        "zero3": [*base, "parallel.backend=deepspeed", f"parallel.deepspeed_config={root / 'zero3.yaml'}"],
    }
    # DeepSpeed's bf16 mode keeps bf16 weights in the module and fp32 masters in the optimiser.
    spec["zero2_bf16"] = [*spec["zero2"], "train.precision=bf16"]
    spec["zero3_bf16"] = [*spec["zero3"], "train.precision=bf16"]
    (root / "spec.json").write_text(json.dumps(spec))
    run_ok(torchrun_cmd(2, "checks.py", str(root), str(root / "spec.json")))
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_ema_starts_at_the_exact_fp32_initial_weights(seen, backend):
    for rank in seen:
        assert rank[backend]["ema_init_error"] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(seen, backend):
    rank0, rank1 = seen[0][backend], seen[1][backend]
    # Sharded backends see only their own shard move (in the first step only the parameters of the
    # zero-initialised output conv have gradients), so "the weights moved" is judged over all ranks.
    assert max(rank0["first_step_change"], rank1["first_step_change"]) > 1e-5
    assert rank0["poisoned_local_loss_finite"] and not rank1["poisoned_local_loss_finite"]
    for rank in (rank0, rank1):
        assert rank["skip_change"] == 0.0          # no rank applied the poisoned step
        assert rank["nonfinite_total"] == 1
        assert rank["after_skip_finite"]
    # The next step trains normally, and moves the weights exactly as DDP's does: the skipped step's
    # gradients were dropped everywhere, not carried into the next update.
    moved = max(rank0["after_skip_change"], rank1["after_skip_change"])
    assert moved > 1e-5
    rtol = 1e-2 if backend.endswith("bf16") else 1e-5  # bf16 compute rounds; fp32 differs by reduction order
    assert moved == pytest.approx(max(r["ddp"]["after_skip_change"] for r in seen), rel=rtol)


@pytest.mark.parametrize("backend", ["zero2", "zero2_bf16", "zero3_bf16"])
def test_deepspeed_student_forward_does_not_depend_on_an_outer_autocast(seen, backend):
    for rank in seen:
        assert rank[backend]["forward_without_outer_autocast"]


def test_fsdp_teacher_pass_leaves_no_gradients_and_reshards(seen):
    for rank in seen:
        assert rank["fsdp"]["teacher_grads"] == 0
        assert rank["fsdp"]["blocks_resharded"]


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_background_save_writes_the_state_at_the_time_of_the_call(seen, backend):
    for rank in seen:
        err = rank[backend]["async_roundtrip_error"]
        assert not math.isnan(err), "the step after the save did not move the weights"
        assert err == 0.0
