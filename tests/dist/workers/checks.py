"""A torchrun worker that drives single steps of real runs and records what it saw, per rank, as JSON.

    checks.py OUT_DIR SPEC_JSON      SPEC_JSON: {"name": [override, ...], ...}; one run per entry

For every run: the EMA starts at the exact fp32 initial weights (also when DeepSpeed computes in
bf16); a normal step; a step in which only rank 1's batch is NaN (every rank must skip it:
the loop all-reduces the non-finite flag); a normal step after the skip (the backend must have
dropped the poisoned gradients); FSDP's teacher pass (no gradients, parameters resharded after it);
and, for the DCP backends, a background save whose bytes are the state at the time of the call.
"""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ict_scale.config import load_config
from ict_scale.train.loop import apply_or_skip, next_micro_batches
from ict_scale.train.model import build_model
from ict_scale.train.run import setup
from ict_scale.train.signals import PreemptionFlag
from ict_scale.train.step import train_step


def snapshot(run) -> dict:
    """This rank's live weights (local shards / fragments), copied."""
    out = {}
    for name, t in run.backend.ema_targets().items():
        t = t.to_local() if isinstance(t, DTensor) else t
        out[name] = t.detach().float().clone()
    return out


def max_change(a: dict, b: dict) -> float:
    return max(((a[n] - b[n]).abs().max().item() if a[n].numel() else 0.0) for n in a)


def ema_init_error(run, cfg) -> float:
    """Largest difference between the EMA (as sampling sees it) and the fp32 initial weights."""
    torch.manual_seed(cfg.train.seed)  # what setup() does before building the model
    init = dict(build_model(cfg).named_parameters())
    ema = dict(run.backend.eval_model(run.ema).named_parameters())
    return max((ema[n].cpu() - init[n]).abs().max().item() for n in init)


def forward_without_outer_autocast(run, data) -> bool:
    """The student forward inside DeepSpeed's engine, with autocast switched off outside (as the engine
    itself does on CUDA unless its torch_autocast section is set): the backend must still run it."""
    x, y = next_micro_batches(run, data)[0]
    with torch.autocast(run.backend.device.type, enabled=False):
        out = run.backend.model(x, torch.ones(x.shape[0]), y)
    return bool(out.dtype == torch.float32 and torch.isfinite(out).all())


def step(run, data, poison_rank: int | None = None):
    batches = next_micro_batches(run, data)
    if run.backend.rank == poison_rank:
        x, y = batches[0]
        batches[0] = (torch.full_like(x, float("nan")), y)
    result = train_step(run.backend, run.objective, batches, run.step, run.cfg.train.seed)
    apply_or_skip(run, result, PreemptionFlag(signals=()))
    run.progress.step += 1
    return result


def teacher_check(run, data) -> dict:
    """After a no_grad teacher forward: no gradients anywhere, and (reshard_after_forward) sharded params."""
    x, y = next_micro_batches(run, data)[0]
    sigma = torch.full((x.shape[0],), 1.0)
    with torch.no_grad():
        run.backend.teacher()(x, sigma, y)
    blocks = run.backend.module.net.shard_units()
    return {"teacher_grads": sum(p.grad is not None for p in run.backend.module.parameters()),
            "blocks_resharded": all(isinstance(p, DTensor) for b in blocks for p in b.parameters())}


def async_save_check(run, data, url: str) -> float:
    """Save in the background, take a step, then load: the state must be the one at save time."""
    before = snapshot(run)
    pending = run.backend.save(url, run.ema.state_dict(), None, background=True)
    step(run, data)
    moved = max_change(before, snapshot(run))
    pending.wait()
    dist.barrier()
    run.backend.load(url, run.ema.state_dict(), None)
    return max_change(before, snapshot(run)) if moved > 0 else float("nan")


def check(name: str, overrides: list, out_dir: str) -> dict:
    cfg = load_config([], [*overrides, f"train.run_dir={out_dir}/{name}"])
    run = setup(cfg)
    data = iter(run.loader)
    rec = {"ema_init_error": ema_init_error(run, cfg)}
    w0 = snapshot(run)
    step(run, data)
    w1 = snapshot(run)
    rec["first_step_change"] = max_change(w0, w1)
    result = step(run, data, poison_rank=1)
    rec["poisoned_local_loss_finite"] = bool(torch.isfinite(result.loss))
    rec["skip_change"] = max_change(w1, snapshot(run))
    rec["nonfinite_total"] = run.progress.nonfinite_total
    step(run, data)
    w3 = snapshot(run)
    rec["after_skip_change"] = max_change(w1, w3)
    rec["after_skip_finite"] = all(bool(torch.isfinite(t).all()) for t in w3.values())
    if run.backend.name == "deepspeed":
        rec["forward_without_outer_autocast"] = forward_without_outer_autocast(run, data)
    if run.backend.name in ("ddp", "fsdp"):
        rec["async_roundtrip_error"] = async_save_check(run, data, f"{out_dir}/{name}/async_ckpt")
    if run.backend.name == "fsdp":
        rec.update(teacher_check(run, data))  # last: the root stays gathered until the next backward
    run.loader.close()
    return rec


def run_spec(check_one) -> None:
    """check_one(name, overrides, out_dir) for every entry of SPEC_JSON; write this rank's results and leave."""
    out_dir, spec_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    results = {name: check_one(name, overrides, out_dir) for name, overrides in spec.items()}
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    run_spec(check)

if __name__ == "__main__":
    main()
