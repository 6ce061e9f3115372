"""Does the FCD (Frechet Classifier Distance) rank sample quality correctly? Checked on controlled degradations.

Recreate everything from nothing (about 6-10 minutes on 2 CPU cores, most of it training the classifier):

    python -m data_prep.make_shards --dataset synthetic --num 50000 --num-classes 32 --resolution 32 \\
        --out shards/synthetic32/train
    python -m data_prep.make_shards --dataset synthetic --split val --num 40000 --num-classes 32 --resolution 32 \\
        --out shards/synthetic32/val
    python -m data_prep.train_classifier --data shards/synthetic32/train/manifest.json \\
        --val shards/synthetic32/val/manifest.json --out benchmarks/results/quality/classifier_synthetic32.safetensors
    python benchmarks/quality/validate_metric.py --train shards/synthetic32/train/manifest.json \\
        --val shards/synthetic32/val/manifest.json --weights benchmarks/results/quality/classifier_synthetic32.safetensors

(The val split holds synthetic indices from 2**40 on: disjoint from the training shards.) Reference statistics
for training runs come from the same classifier and the same training shards:

    python -m data_prep.ref_stats --data shards/synthetic32/train/manifest.json --features classifier \\
        --classifier-weights benchmarks/results/quality/classifier_synthetic32.safetensors --num 20000 \\
        --out shards/synthetic32/fcd_ref.npz

This script computes the reference from the first --ref-num training images (the code path of
data_prep.ref_stats), then the FCD of equally sized sets of held-out images, clean and degraded in five
families of three increasing levels. A good metric is near zero on held-out data and rises monotonically with
each family's severity. Writes benchmarks/results/quality/metric_validation.{json,md}; exits 1 if a check fails.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from data_prep.train_classifier import labelled_loader  # noqa: E402
from ict_scale.checkpoint import Storage  # noqa: E402
from ict_scale.data import DataConfig, build_loader  # noqa: E402
from ict_scale.data.sources import resolve  # noqa: E402
from ict_scale.eval import FeatureMoments, build_classifier_features, frechet_distance  # noqa: E402
from ict_scale.eval.data_stats import dataset_statistics  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "quality")
# family -> (what a level means, its three levels from mild to severe)
FAMILIES = {
    "gaussian noise": ("pixel noise std, in uint8 levels", (4.0, 8.0, 16.0)),
    "gaussian blur": ("blur kernel std, in pixels", (0.5, 1.0, 1.5)),
    "dropped classes": ("share of the classes kept", (0.75, 0.5, 0.25)),
    "wrong colours": ("share of images with RGB channels rotated (shape kept, palette changed)", (0.25, 0.5, 1.0)),
    "duplicates": ("share of distinct images (the rest repeat them: low diversity)", (0.5, 0.125, 0.03125)),
}


def read_images(source: str, num: int, resolution: int, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `num` (uint8 images, labels) of labelled shards, in their stored order, unflipped."""
    loader, _, _ = labelled_loader(source, resolution=resolution, batch=500, workers=workers, seed=0, options={},
                                   train=False)
    if num > loader.epoch_size:
        raise SystemExit(f"error: {source} holds {loader.epoch_size} images, {num} requested")
    images, labels = [], []
    try:
        while sum(len(b) for b in labels) < num:
            x, y = next(loader)
            images.append(x)
            labels.append(y)
    finally:
        loader.close()
    return torch.cat(images)[:num], torch.cat(labels)[:num]


def _quantise(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp(0, 255).to(torch.uint8)  # back to the 256 levels both sides are compared in


def add_noise(images: torch.Tensor, std: float, g: torch.Generator) -> torch.Tensor:
    return _quantise(images.float() + std * torch.randn(images.shape, generator=g))


def blur(images: torch.Tensor, std: float) -> torch.Tensor:
    """Separable Gaussian blur (radius 3 std), reflected at the borders."""
    r = max(1, math.ceil(3 * std))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / std) ** 2)
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    x = F.pad(images.float(), (r, r, r, r), mode="reflect")
    x = F.conv2d(F.conv2d(x, k, groups=3), k.transpose(2, 3), groups=3)
    return _quantise(x)


def keep_classes(pool: torch.Tensor, labels: torch.Tensor, share: float, num: int, g: torch.Generator):
    """The first `num` pool images whose class is among a seeded random `share` of the classes."""
    classes = int(labels.max()) + 1
    kept = torch.randperm(classes, generator=g)[:round(share * classes)]
    chosen = torch.isin(labels, kept).nonzero().squeeze(1)
    if len(chosen) < num:
        raise SystemExit(f"error: only {len(chosen)} held-out images in {len(kept)} kept classes, need {num}: "
                         f"make a larger val split or lower --num")
    return pool[chosen[:num]]


def rotate_colours(images: torch.Tensor, share: float) -> torch.Tensor:
    """RGB -> GBR in the first `share` of the images: same shapes and layout, other colour families."""
    out = images.clone()
    n = round(share * len(images))
    out[:n] = images[:n, [1, 2, 0]]
    return out


def duplicate(images: torch.Tensor, share: float) -> torch.Tensor:
    """A set of the same size made of only the first `share` of the images, each repeated."""
    distinct = max(2, round(share * len(images)))
    return images[torch.arange(len(images)) % distinct]


def degraded_sets(pool, labels, num: int, seed: int):
    """(family, level, images) for the clean held-out set and every degradation, all of `num` images."""
    g = torch.Generator().manual_seed(seed)
    clean = pool[:num]
    yield "held-out", None, clean
    yield "held-out (second subset)", None, pool[num:2 * num]
    for level in FAMILIES["gaussian noise"][1]:
        yield "gaussian noise", level, add_noise(clean, level, g)
    for level in FAMILIES["gaussian blur"][1]:
        yield "gaussian blur", level, blur(clean, level)
    for level in FAMILIES["dropped classes"][1]:
        yield "dropped classes", level, keep_classes(pool, labels, level, num, g)
    for level in FAMILIES["wrong colours"][1]:
        yield "wrong colours", level, rotate_colours(clean, level)
    for level in FAMILIES["duplicates"][1]:
        yield "duplicates", level, duplicate(clean, level)


def moments_of(features, images: torch.Tensor, batch: int = 500):
    m = FeatureMoments(features.dim)
    for part in images.split(batch):
        m.add(features(part))
    return m.mean_cov()


def reference(args, features):
    """Reference (mu, sigma, meta) of the first --ref-num training images, as data_prep.ref_stats makes them."""
    cfg = DataConfig(source=args.train, resolution=args.resolution, num_classes=0, drop_labels=True, hflip=False,
                     shuffle=False, num_workers=args.workers)
    loader = build_loader(cfg, batch_per_rank=500, rank=0, world_size=1, seed=0)
    try:
        mu, sigma, meta, _ = dataset_statistics(loader, features, args.ref_num, {"data": args.train,
                                                "num": args.ref_num, "resolution": args.resolution})
    finally:
        loader.close()
    return mu, sigma, meta


def check(rows: list[dict]) -> dict:
    """Per family: FCDs by level, monotonic (strictly rising), mildest level above the held-out FCD."""
    base = next(r["fcd"] for r in rows if r["family"] == "held-out")
    out = {}
    for family in FAMILIES:
        values = [r["fcd"] for r in rows if r["family"] == family]
        out[family] = {"levels": list(FAMILIES[family][1]), "level_means": FAMILIES[family][0], "fcd": values,
                       "monotonic": all(a < b for a, b in zip(values, values[1:])),
                       "mildest_above_held_out": values[0] > base}
    return out


def write_reports(report: dict) -> None:
    storage = Storage(RESULTS)
    storage.makedirs()
    storage.write_text("metric_validation.json", json.dumps(report, indent=2) + "\n")
    c = report["classifier"]
    lines = [f"# FCD validation on synthetic 32x32, 32 classes ({report['date']})", "",
             f"Command: `{report['command']}`", "",
             f"Classifier `{os.path.basename(c['weights'])}`: sha256 `{c['sha256']}`, {c['bytes']:,} bytes, "
             f"held-out accuracy {c['held_out_accuracy']:.4f} on {c['held_out_images']} images.",
             f"Reference: first {report['ref']['count']} training images. Every scored set: {report['num']} images.",
             "", "| family | level | FCD | mean term | trace term |", "|---|---|---|---|---|"]
    for r in report["rows"]:
        level = "" if r["level"] is None else f"{r['level']:g}"
        lines.append(f"| {r['family']} | {level} | {r['fcd']:.4f} | {r['mean_term']:.4f} | {r['trace_term']:.4f} |")
    base = report["rows"][0]["fcd"]
    mildest = min(f["fcd"][0] for f in report["families"].values())
    lines += ["", f"Held-out FCD {base:.4f} is the finite-sample floor (both sets are real data); the mildest "
                  f"degradation of all scores {mildest / base:.1f}x that, the median family's severest level "
                  f"{sorted(f['fcd'][-1] for f in report['families'].values())[2] / base:.0f}x."]
    lines += ["", "| family | level means | monotonic | mildest above held-out |", "|---|---|---|---|"]
    for name, f in report["families"].items():
        lines.append(f"| {name} | {f['level_means']} | {f['monotonic']} | {f['mildest_above_held_out']} |")
    lines += ["", f"All checks passed: {report['passed']}. Wall time {report['seconds']:.0f} s "
                  f"({report['threads']} torch threads).", ""]
    storage.write_text("metric_validation.md", "\n".join(lines))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="training shards (manifest): the reference")
    p.add_argument("--val", required=True, help="held-out shards (manifest), disjoint from --train")
    p.add_argument("--weights", required=True, help="classifier .safetensors")
    p.add_argument("--ref-num", type=int, default=20000, help="training images in the reference")
    p.add_argument("--num", type=int, default=8000, help="images per scored set")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="noise, kept classes")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    features = build_classifier_features(args.weights)
    mu_ref, sigma_ref, ref_meta = reference(args, features)
    # The pool: enough held-out images for two clean subsets and for 25% of the classes to fill a set.
    pool, labels = read_images(args.val, min(sum(resolve(args.val).sizes), 5 * args.num), args.resolution, args.workers)
    rows = []
    for family, level, images in degraded_sets(pool, labels, args.num, args.seed):
        terms = frechet_distance(mu_ref, sigma_ref, *moments_of(features, images))
        rows.append({"family": family, "level": level, "fcd": terms.fid, "mean_term": terms.mean_term,
                     "trace_term": terms.trace_term})
        print(f"{family:26s} {'' if level is None else level:>8}  FCD {terms.fid:9.4f}", flush=True)
    families = check(rows)
    data = open(args.weights, "rb").read()
    report = {"command": "python benchmarks/quality/validate_metric.py " + " ".join(argv),
              "date": time.strftime("%Y-%m-%d"), "num": args.num, "seed": args.seed,
              "classifier": {"weights": args.weights, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                             "held_out_accuracy": features.protocol["held_out_accuracy"],
                             "held_out_images": features.protocol["held_out_images"],
                             "params": sum(p.numel() for p in features.network.parameters()),
                             "trained_on": features.protocol["trained_on"]},
              "ref": {"count": ref_meta["count"], "source": ref_meta["source"]},
              "rows": rows, "families": families,
              "passed": all(f["monotonic"] and f["mildest_above_held_out"] for f in families.values()),
              "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - started, 1)}
    write_reports(report)
    print(f"wrote {RESULTS}/metric_validation.json and .md; all checks passed: {report['passed']}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
