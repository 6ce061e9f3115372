"""A torchrun worker: how many channels of every block's noise-level conditioning tell neighbouring sigmas
apart at the finest discretisation (ict_scale.bench.fidelity), with each backend's bf16 mixed precision.

    conditioning.py OUT_DIR SPEC_JSON      SPEC_JSON: {"name": [override, ...], ...}; one run per entry

Writes {name: {interval: fraction of channels (all blocks) whose projection differs}} per rank as JSON.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

from ict_scale.bench.fidelity import conditioning_difference
from ict_scale.config import load_config
from ict_scale.train.run import setup


def main() -> None:
    out_dir, spec_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    results = {}
    for name, overrides in spec.items():
        cfg = load_config([], [*overrides, f"train.run_dir={out_dir}/{name}"])
        run = setup(cfg)
        torch.manual_seed(1)
        results[name] = conditioning_difference(run.backend.teacher(), run.backend.module.net, cfg.data.resolution,
                                                run.backend.autocast)
        run.loader.close()
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
