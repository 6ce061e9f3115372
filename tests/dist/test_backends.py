"""Every backend computes what one process computes, and resumes at another world size exactly.

A step is the same computation at any world size and accumulation (samples, noise and dropout masks
are seeded by position in the global batch), so the only admissible difference between backends is
float32 reduction order. Each scenario trains 3 steps at one world size, and is compared (losses,
gradient norms, EMA) with a single-process reference; it then resumes from that checkpoint at
another world size for 3 more steps (RAdam's variance rectification is active from step 6 on, so
the restored second moments matter) and is compared again: model, optimiser, EMA, step and data
position all have to survive the change of world size.

To keep the suite fast, the runs that share a world size share one torchrun launch (5 in all).
"""
from __future__ import annotations

import os

import pytest
import torch

from workers.harness import checkpoint, ema_of, max_abs_diff, metrics, started, train_many

pytestmark = pytest.mark.dist

RUN = ["train.total_steps=6", "train.ckpt_every=3", "train.ema_decay=0.9", "optim.eps=1e-4"]
# float32 reductions in another order: relative loss error ~1e-7, weight error ~1e-10. RAdam divides
# by sqrt(v) once it rectifies (step 6 on); with the default eps=1e-8 a parameter whose gradient is at
# float32 noise level (blocks behind the zero-initialised output conv) would take a full-size step in
# a noise direction, so these runs use eps=1e-4, far below real gradients but far above that noise.
# Errors of resuming or resharding are of the order of lr = 1e-3.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-7

ZERO3_TINY = "bf16: {enabled: auto}\nzero_optimization: {stage: 3, stage3_param_persistence_threshold: 0}\n"

# name: (backend overrides, first world, resumed world, overrides of the resumed half only)
SCENARIOS = {
    "ddp_2_to_3": (["parallel.backend=ddp"], 2, 3, []),
    # HSDP (2 replicas x 2 shards) first, then plain FSDP with the other options: the mesh changes too.
    "fsdp_4_to_2": (["parallel.backend=fsdp"], 4, 2,
                    ["parallel.fsdp_shard_size=0", "parallel.activation_checkpointing=true",
                     "parallel.fsdp_reshard_after_forward=false", "parallel.fsdp_cpu_offload=true"]),
    "zero1_2_to_1": (["parallel.backend=deepspeed", "parallel.deepspeed_config=configs/deepspeed/zero1.yaml"],
                     2, 1, []),
    "zero2_4_to_2": (["parallel.backend=deepspeed", "parallel.deepspeed_config=configs/deepspeed/zero2.yaml"],
                     4, 2, []),
    # The shipped zero3.yaml keeps layers under 1e5 parameters gathered: all of a tiny net would be.
    "zero3_2_to_3": (["parallel.backend=deepspeed", "parallel.deepspeed_config={zero3}"], 2, 3, []),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run every scenario's two halves and the reference; returns (run dirs by name, stdout by world)."""
    root = tmp_path_factory.mktemp("backends")
    zero3 = root / "zero3.yaml"
    zero3.write_text(ZERO3_TINY)
    dirs = {name: str(root / name) for name in [*SCENARIOS, "reference"]}
    first, second = {}, {}
    for name, (backend, w1, w2, resumed) in SCENARIOS.items():
        backend = [o.format(zero3=zero3) for o in backend]
        hsdp = ["parallel.fsdp_shard_size=2"] if name.startswith("fsdp") else []
        first.setdefault(w1, []).append([*backend, *RUN, *hsdp, f"train.run_dir={dirs[name]}",
                                         "train.max_steps_this_run=3"])
        second.setdefault(w2, []).append([*backend, *RUN, *resumed, f"train.run_dir={dirs[name]}"])
    second.setdefault(1, []).insert(0, ["parallel.backend=single", *RUN, f"train.run_dir={dirs['reference']}"])
    out = {}
    for phase, plan in (("first", first), ("second", second)):
        for world, group in sorted(plan.items()):
            done = train_many(world, group, str(root / f"{phase}_{world}.json"))
            out[phase, world] = done.stdout
    return dirs, out


def assert_steps_match(run_dir: str, ref_dir: str, steps) -> None:
    got, want = metrics(run_dir), metrics(ref_dir)
    for s in steps:
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=LOSS_RTOL), f"loss at step {s}"
        assert got[s]["grad_norm"] == pytest.approx(want[s]["grad_norm"], rel=LOSS_RTOL), f"grad norm at step {s}"
        assert got[s]["images_seen"] == want[s]["images_seen"]


def assert_ema_matches(run_dir: str, ref_dir: str, step: int) -> None:
    diff = max_abs_diff(ema_of(checkpoint(run_dir, step)), ema_of(checkpoint(ref_dir, step)))
    assert diff < WEIGHT_ATOL, f"EMA at step {step} differs by {diff}"


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_backend_matches_single_process_and_resumes_at_another_world_size(scenario, runs):
    dirs, stdout = runs
    run_dir, reference = dirs[scenario], dirs["reference"]
    backend, world, world2, _ = SCENARIOS[scenario]
    name = backend[0].split("=")[1]
    assert started(stdout["first", world], name, world, 0, run_dir)
    assert_steps_match(run_dir, reference, [1, 2, 3])
    assert_ema_matches(run_dir, reference, 3)

    assert started(stdout["second", world2], name, world2, 3, run_dir)
    assert_steps_match(run_dir, reference, [4, 5, 6])
    assert_ema_matches(run_dir, reference, 6)
    if name != "deepspeed":  # DeepSpeed's weights live in its engine files; its EMA is checked above
        from ict_scale.parallel import dcp_io
        weights = {n: torch.zeros_like(t) for n, t in ema_of(checkpoint(reference, 6)).items()}
        ref_weights = {n: torch.zeros_like(t) for n, t in weights.items()}
        dcp_io.load_model_weights(checkpoint(run_dir, 6), weights)
        dcp_io.load_model_weights(checkpoint(reference, 6), ref_weights)
        assert max_abs_diff(weights, ref_weights) < WEIGHT_ATOL
    assert os.path.exists(os.path.join(run_dir, "samples", "latest_1step.png"))  # eval_model ran on every rank
