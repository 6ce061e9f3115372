"""A torchrun worker: how many channels of every block's noise-level conditioning tell neighbouring sigmas
apart at the finest discretisation (ict_scale.bench.fidelity), with each backend's bf16 mixed precision.

    conditioning.py OUT_DIR SPEC_JSON      SPEC_JSON: {"name": [override, ...], ...}; one run per entry

Writes {name: {interval: fraction of channels (all blocks) whose projection differs}} per rank as JSON.
"""
import torch

from checks import run_spec
from ict_scale.bench.fidelity import conditioning_difference
from ict_scale.config import load_config
from ict_scale.train.run import setup


def conditioning(name: str, overrides: list, out_dir: str) -> dict:
    cfg = load_config([], [*overrides, f"train.run_dir={out_dir}/{name}"])
    run = setup(cfg)
    torch.manual_seed(1)
    result = conditioning_difference(run.backend.teacher(), run.backend.module.net, cfg.data.resolution,
                                     run.backend.autocast)
    run.loader.close()
    return result


if __name__ == "__main__":
    run_spec(conditioning)
