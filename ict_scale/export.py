"""`python -m ict_scale.export RUN_DIR_OR_CKPT --out PATH [--format safetensors|diffusers]`: the EMA weights.

safetensors (default): one file plus the resolved config beside it (`model.safetensors` + `model.yaml`), which
`python -m ict_scale.sample` and `evaluate` read. diffusers: a folder that
`diffusers.ConsistencyModelPipeline.from_pretrained(PATH)` loads (needs `pip install -e '.[diffusers]'`).
"""
from __future__ import annotations

import argparse
import os
import sys

from safetensors.torch import save_file

from ict_scale import cli
from ict_scale.config import to_yaml
from ict_scale.checkpoint.load import load_ema_model
from ict_scale.train.model import network_args


def write_safetensors(model, cfg, ckpt: str, out: str) -> None:
    tensors = {n: t.detach().contiguous() for n, t in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    # to_yaml, not the raw config: an exported file is made to be shared, and credentials stay home.
    save_file(tensors, out, metadata={"config": to_yaml(cfg), "checkpoint": ckpt})
    config_path = out.rsplit(".", 1)[0] + ".yaml"
    with open(config_path, "w") as f:
        f.write(to_yaml(cfg))
    print(f"wrote {out} ({sum(t.numel() for t in tensors.values()):,} EMA parameters) and {config_path}")


def write_diffusers(model, cfg, ckpt: str, out: str) -> None:
    from ict_scale.to_diffusers import NCSNPP_MODULE, export_pipeline
    info = export_pipeline(model, cfg, network_args(cfg), out, ckpt)
    print(f"wrote the ConsistencyModelPipeline folder {out} (exported network matches to "
          f"{info['max_difference']:.1e}); two steps: pipe(timesteps={info['timesteps']}) = sigma_mid "
          f"{info['sigma_mid']:.4f}" + (f"; import {NCSNPP_MODULE} before from_pretrained"
                                      if cfg.model.name.startswith("ncsnpp") else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ict_scale.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="run directory (newest complete checkpoint), one checkpoint directory, or an "
                                "exported .safetensors")
    p.add_argument("--out", required=True, help="output .safetensors file (the resolved config goes beside it), "
                                                "or the folder for --format diffusers")
    p.add_argument("--format", choices=("safetensors", "diffusers"), default="safetensors")
    args = p.parse_args(argv)
    if args.format == "diffusers":
        from ict_scale.to_diffusers import require_diffusers
        require_diffusers()  # before loading a checkpoint that may take minutes (DiffusersMissing: one line)
    model, cfg, ckpt = load_ema_model(args.path)
    (write_diffusers if args.format == "diffusers" else write_safetensors)(model, cfg, ckpt, args.out)
    return 0


def console() -> int:
    """The `ict-export` command ([project.scripts] in pyproject.toml): main() with one-line errors."""
    return cli.run(main)


if __name__ == "__main__":
    sys.exit(console())
