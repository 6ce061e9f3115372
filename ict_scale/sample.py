"""`python -m ict_scale.sample MODEL --steps 1|2 --num N --out PATH`: EMA samples as PNG grid + .npz.

MODEL is a run directory, a checkpoint directory or an exported NAME.safetensors (NAME.yaml beside it).

The .npz holds `arr_0`: uint8 images, N x H x W x C, the layout ADM's evaluation suite reads.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from ict_scale import cli
from ict_scale.checkpoint.load import load_ema_model
from ict_scale.data.config import label_dim
from ict_scale.ict import sampling_noise
from ict_scale.parallel.launch_env import device_for
from ict_scale.train.grids import grid_png, sample_images


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ict_scale.sample", description=__doc__)
    p.add_argument("path", help="run directory (newest complete checkpoint), one checkpoint directory, or an "
                                "exported NAME.safetensors (NAME.yaml beside it)")
    p.add_argument("--steps", type=int, choices=(1, 2), default=1, help="sampling steps")
    p.add_argument("--num", type=int, default=64, help="number of samples")
    p.add_argument("--out", required=True, help="output prefix or .png/.npz path (both files are written)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--sigma-mid", type=float, default=None, help="two-step intermediate sigma (default: recipe's)")
    p.add_argument("--class-label", type=int, default=None, help="draw every sample from this class")
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args(argv)
    device = device_for()
    model, cfg, ckpt = load_ema_model(args.path, device)
    res, num_classes = cfg.data.resolution, label_dim(cfg.data)
    g = torch.Generator().manual_seed(args.seed)
    z, renoise = sampling_noise(args.num, (3, res, res), g)  # z, then the re-noise: 1- and 2-step share z
    z, renoise = z.to(device), [r.to(device) for r in renoise]
    labels = None
    if num_classes:
        labels = (torch.full((args.num,), args.class_label) if args.class_label is not None
                  else torch.randint(0, num_classes, (args.num,), generator=g)).to(device)
    sigma_mid = args.sigma_mid if args.sigma_mid is not None else cfg.eval.sigma_mid
    images = sample_images(model, z, renoise, labels, cfg.ict.sigma_max, sigma_mid, args.steps, cfg.ict.sigma_min,
                           batch=args.batch)
    prefix = args.out.rsplit(".", 1)[0] if args.out.endswith((".png", ".npz")) else args.out
    with open(prefix + ".png", "wb") as f:
        f.write(grid_png(images, upscale=max(1, 128 // res)))
    np.savez(prefix + ".npz", arr_0=images.permute(0, 2, 3, 1).numpy())
    print(f"{args.num} {args.steps}-step samples from {ckpt}: {prefix}.png, {prefix}.npz")
    return 0


def console() -> int:
    """The `ict-sample` command ([project.scripts] in pyproject.toml): main() with one-line errors."""
    return cli.run(main)


if __name__ == "__main__":
    sys.exit(console())
