"""`python -m ict_scale.export RUN_DIR_OR_CKPT --out model.safetensors`: the EMA weights, one file, plus the config."""
from __future__ import annotations

import argparse
import sys

from omegaconf import OmegaConf
from safetensors.torch import save_file

from ict_scale import cli
from ict_scale.config import to_yaml
from ict_scale.train.export import load_ema_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ict_scale.export", description=__doc__)
    p.add_argument("path", help="run directory (newest complete checkpoint) or one checkpoint directory")
    p.add_argument("--out", required=True, help="output .safetensors file; the resolved config goes beside it")
    args = p.parse_args(argv)
    model, cfg, ckpt = load_ema_model(args.path)
    tensors = {n: t.detach().contiguous() for n, t in model.state_dict().items()}
    save_file(tensors, args.out, metadata={"config": OmegaConf.to_yaml(cfg), "checkpoint": ckpt})
    config_path = args.out.rsplit(".", 1)[0] + ".yaml"
    with open(config_path, "w") as f:
        f.write(to_yaml(cfg))
    print(f"wrote {args.out} ({sum(t.numel() for t in tensors.values()):,} EMA parameters) and {config_path}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
