"""`python -m data_prep.train_classifier --data TRAIN --val VAL --out classifier.safetensors`: the FCD feature network.

Trains ict_scale.eval.classifier.SmallClassifier to predict the class of the training shards' images, with the
project's streaming loader (shuffled shards, seeded horizontal flips: the same light augmentation as iCT
training), then measures accuracy on held-out shards and writes the weights atomically. For the synthetic
data set, make held-out shards whose indices are disjoint from the training shards' with

    python -m data_prep.make_shards --dataset synthetic --split val --num 20000 --num-classes 32 --out VAL_DIR

Its penultimate (256-d) features are what `eval.features=classifier` compares (the FCD). A run that does
not reach --min-accuracy on the held-out set writes nothing and exits with an error: a classifier that
cannot tell the classes apart is a poor judge of samples. Single process, CPU or one GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from data_prep.shard_resolution import pick_resolution
from ict_scale.data import DataConfig, build_loader
from ict_scale.data.sources import resolve
from ict_scale.eval.classifier import ClassifierSpec, SmallClassifier, save_classifier
from ict_scale.ict import from_uint8
from ict_scale.parallel.launch_env import device_for


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m data_prep.train_classifier", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="labelled training shards (manifest, pattern or directory)")
    p.add_argument("--val", required=True, help="labelled held-out shards, disjoint from --data")
    p.add_argument("--out", required=True, help="output .safetensors (local path or fsspec URL)")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side R (default: the shards' manifest); must match the manifest")
    p.add_argument("--widths", type=int, nargs="+", default=list(ClassifierSpec.widths), help="3x3 conv stage widths")
    p.add_argument("--strides", type=int, nargs="+", default=list(ClassifierSpec.strides), help="their strides")
    p.add_argument("--steps", type=int, default=2500, help="optimiser steps")
    p.add_argument("--batch", type=int, default=128, help="images per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (cosine decay to 0)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--val-num", type=int, default=10000, help="held-out images to score (0 = all)")
    p.add_argument("--min-accuracy", type=float, default=0.95, help="refuse to write below this held-out accuracy")
    p.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    p.add_argument("--workers", type=int, default=1, help="decoding worker processes")
    p.add_argument("--storage-options", default="{}", help="fsspec options as JSON (data and output)")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "resolution"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def labelled_loader(source: str, *, resolution: int | None, batch: int, workers: int, seed: int, options: dict,
                    train: bool):
    """(loader, num_classes, epoch size, resolution) of labelled shards: shuffled with flips for training, else
    in order; the resolution is the manifest's (an explicit one must agree)."""
    shards = resolve(source, options, False)
    num_classes, resolution = shards.num_classes, pick_resolution(shards, resolution, source)
    if not num_classes:
        raise SystemExit(f"error: {source}: the manifest records no classes; the classifier needs labelled shards "
                         f"(make_shards --num-classes > 0)")
    cfg = DataConfig(source=source, resolution=resolution, num_classes=num_classes, hflip=train, shuffle=train,
                     num_workers=workers, storage_options=options)
    loader = build_loader(cfg, batch_per_rank=batch, rank=0, world_size=1, seed=seed)
    return loader, num_classes, loader.epoch_size, resolution


def cosine_lr(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 0 (a pure function of the step)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(model: SmallClassifier, loader, args, device: torch.device) -> float:
    """Cross-entropy training for args.steps steps; returns the mean loss of the last 50 steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    recent, started = [], time.perf_counter()
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr, warmup=min(100, args.steps // 10))
        images, labels = next(loader)
        x = from_uint8(images.to(device)).contiguous(memory_format=torch.channels_last)
        _, logits = model(x)
        loss = F.cross_entropy(logits, labels.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        recent = (recent + [float(loss.detach())])[-50:]
        if step % 100 == 0 or step == args.steps - 1:
            rate = (step + 1) * args.batch / (time.perf_counter() - started)
            print(f"step {step:5d}  loss {sum(recent) / len(recent):.4f}  {rate:.0f} img/s", file=sys.stderr)
    return sum(recent) / len(recent)


@torch.no_grad()
def accuracy(model: SmallClassifier, loader, num: int, device: torch.device) -> tuple[float, int]:
    """(top-1 accuracy, images scored) on the first `num` images of an unshuffled loader."""
    model.eval()
    correct = seen = 0
    while seen < num:
        images, labels = next(loader)
        take = min(len(labels), num - seen)
        _, logits = model(from_uint8(images[:take].to(device)).contiguous(memory_format=torch.channels_last))
        correct += int((logits.argmax(1).cpu() == labels[:take]).sum())
        seen += take
    return correct / seen, seen


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    options = json.loads(args.storage_options)
    device = device_for()
    torch.manual_seed(args.seed)
    common = dict(resolution=args.resolution, batch=args.batch, workers=args.workers, seed=args.seed, options=options)
    train_loader, num_classes, train_size, resolution = labelled_loader(args.data, **common, train=True)
    val_loader, val_classes, val_size, val_resolution = labelled_loader(args.val, **common, train=False)
    if val_classes != num_classes:
        raise SystemExit(f"error: {args.val} has {val_classes} classes, {args.data} has {num_classes}")
    if val_resolution != resolution:
        raise SystemExit(f"error: {args.val} holds {val_resolution}x{val_resolution} images, {args.data} "
                         f"{resolution}x{resolution}")
    spec = ClassifierSpec(num_classes, resolution, tuple(args.widths), tuple(args.strides))
    model = SmallClassifier(spec).to(device, memory_format=torch.channels_last)
    started = time.perf_counter()
    try:
        final_loss = train(model, train_loader, args, device)
        acc, scored = accuracy(model, val_loader, min(args.val_num or val_size, val_size), device)
    finally:
        train_loader.close()
        val_loader.close()
    report = {"held_out_accuracy": round(acc, 5), "held_out_images": scored, "held_out": args.val,
              "trained_on": {"data": args.data, "images": train_size, "fingerprint": train_loader.fingerprint,
                             "steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed},
              "final_train_loss": round(final_loss, 5), "seconds": round(time.perf_counter() - started, 1)}
    if acc < args.min_accuracy:
        raise SystemExit(f"error: held-out accuracy {acc:.4f} < --min-accuracy {args.min_accuracy}: not written "
                         f"(train longer: --steps)")
    sha256 = save_classifier(args.out, model.cpu(), report, options)
    print(json.dumps({**report, "out": args.out, "sha256": sha256}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
