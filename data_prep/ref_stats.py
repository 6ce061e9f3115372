"""`python -m data_prep.ref_stats --data SOURCE --out FILE`: FID (or FCD) reference statistics of a data set.

SOURCE is anything `data.source` accepts (a manifest, a shard pattern or directory, local or s3://, or
`synthetic`). The images pass through the same uint8 -> features pipeline and float64 reduction as the
generated samples: Inception by default, or with `--features classifier --classifier-weights FILE` our
trained classifier (for the FCD; the file's sha256 is recorded and evaluations with other weights refuse it).
Works on one process or under torchrun (each rank reads its share of the images).
The output .npz holds mu, sigma, and meta (a JSON string: protocol, source, count); --keep-features
also stores the features, which precision/recall needs.
"""
from __future__ import annotations

import argparse
import json
import sys

from data_prep.shard_resolution import pick_resolution
from ict_scale.data import DataConfig, build_loader
from ict_scale.data.sources import resolve
from ict_scale.eval import FEATURE_EXTRACTORS, EvalConfig, build_features, save_ref_stats
from ict_scale.eval.inception import WEIGHTS_SHA256
from ict_scale.eval.data_stats import dataset_statistics
from ict_scale.eval.runtime import init_distributed
from ict_scale.parallel import comm


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m data_prep.ref_stats", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True,
                   help="data source: shards (manifest, pattern or directory; local or s3://) or synthetic")
    p.add_argument("--out", required=True, help="output .npz (local path or fsspec URL)")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side R (default: the shards' manifest; synthetic: 32); must match the manifest")
    # Under torchrun write --num-samples: torchrun's parser takes '--num' for a prefix of its --numa-binding.
    p.add_argument("--num", "--num-samples", dest="num", type=int,
                   help="images to use: the first NUM of the unshuffled order (default: all; required for synthetic)")
    p.add_argument("--num-classes", type=int, default=10, help="synthetic only: class count (changes the images)")
    p.add_argument("--synthetic-seed", type=int, default=0, help="synthetic only: identity of the data set")
    p.add_argument("--batch-per-rank", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="decoding worker processes per rank")
    p.add_argument("--inception-weights", default="", help="path/URL of pt_inception-2015-12-05-6726825d.pth "
                                                           "(default: $ICT_INCEPTION_WEIGHTS)")
    p.add_argument("--inception-sha256", default=WEIGHTS_SHA256,
                   help="expected sha256 of the weights file; '' accepts other weights (FIDs then not comparable)")
    p.add_argument("--random-inception", type=int, metavar="SEED",
                   help="seeded random Inception weights: for tests and timing only")
    p.add_argument("--features", choices=FEATURE_EXTRACTORS, default="inception",
                   help="feature network: inception (FID) or classifier (FCD, needs --classifier-weights)")
    p.add_argument("--classifier-weights", default="", help="classifier .safetensors (data_prep.train_classifier)")
    p.add_argument("--keep-features", action="store_true", help="also store the (N, D) features")
    p.add_argument("--storage-options", default="{}", help="fsspec options as JSON (data and output)")
    args = p.parse_args(argv)
    if args.random_inception is not None and args.features != "inception":
        p.error("--random-inception applies to --features inception only")
    return args


def data_config(args, storage_options: dict) -> DataConfig:
    """The training loader's config in evaluation order: no shuffle, no flip, no labels needed."""
    synthetic = args.data == "synthetic"
    resolution = (args.resolution or 32) if synthetic else \
        pick_resolution(resolve(args.data, storage_options), args.resolution, args.data)
    return DataConfig(source=args.data, resolution=resolution, num_classes=args.num_classes if synthetic else 0,
                      drop_labels=True, hflip=False, shuffle=False, num_workers=args.workers,
                      storage_options=storage_options, synthetic_seed=args.synthetic_seed)


def feature_config(args) -> EvalConfig:
    """The evaluation's feature settings from the command line (the same network an evaluation builds)."""
    return EvalConfig(features=args.features, inception_weights=args.inception_weights,
                      inception_sha256=args.inception_sha256, classifier_weights=args.classifier_weights)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    storage_options = json.loads(args.storage_options)
    device = init_distributed()
    try:
        data_cfg = data_config(args, storage_options)
        loader = build_loader(data_cfg, batch_per_rank=args.batch_per_rank,
                              rank=comm.get_rank(), world_size=comm.get_world_size(), seed=0)
        num = args.num if args.num is not None else loader.epoch_size
        if num < 2 or (loader.epoch_size and num > loader.epoch_size):
            raise SystemExit(f"error: --num {num}: expected 2..{loader.epoch_size or 'any'} images of {args.data} "
                             f"(synthetic data needs --num)")
        features = build_features(feature_config(args), device, storage_options, args.random_inception)
        source = {"data": args.data, "num": num, "resolution": data_cfg.resolution, "fingerprint": loader.fingerprint,
                  "order": "unshuffled, no flip"}
        try:
            mu, sigma, meta, feats = dataset_statistics(loader, features, num, source, args.keep_features)
        finally:
            loader.close()
        if comm.get_rank() == 0:
            save_ref_stats(args.out, mu, sigma, meta, feats, storage_options)
            print(f"wrote {args.out}: {num} images of {args.data}, {meta['seconds']:.1f} s, "
                  f"{args.features} weights {features.protocol['weights']}")
        comm.barrier()  # the file exists before any rank exits
    finally:
        comm.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
