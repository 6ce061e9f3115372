"""`python -m ict_scale.evaluate RUN_DIR_OR_CKPT --ref REF [--num 50000] [--steps 1 2]`: FID of a trained model.

With `--features classifier --classifier-weights FILE` it computes the FCD (Frechet Classifier Distance: the
same distance on our trained classifier's features; result keys fcd_<k>step) against a reference made with
`python -m data_prep.ref_stats ... --features classifier --classifier-weights FILE`.

Runs on one process or under torchrun (each rank generates its own share of the samples; the result does
not depend on the number of processes). Writes metrics.jsonl, fid.json and best.json into the run
directory (or --out-dir) and prints the result as JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys

from ict_scale import cli
from ict_scale.errors import ConfigError
from ict_scale.eval import FEATURE_EXTRACTORS, EvalConfig, FIDEvaluator, build_features, sample_spec
from ict_scale.eval.runtime import init_distributed, sampling_autocast
from ict_scale.parallel import comm


def load_model_for_eval(path: str, device):
    """(EMA consistency model in eval mode on `device`, resolved run config, checkpoint URL) from a run
    directory (its newest complete checkpoint), a checkpoint directory or an exported .safetensors."""
    from ict_scale.checkpoint.load import load_ema_model
    model, cfg, checkpoint = load_ema_model(path, device)
    return model.eval().requires_grad_(False), cfg, checkpoint


def run_dir_of(path: str) -> str:
    """Where results go: the run dir itself, or the run dir that holds checkpoints/<name>."""
    path = path.rstrip("/")
    parent, _, name = path.rpartition("/")
    if name.endswith(".safetensors"):  # an exported model: results go beside it
        return parent or "."
    if parent.endswith("/checkpoints") or parent == "checkpoints":
        return parent.rpartition("/")[0] or "."
    return path if re.fullmatch(r"step_\d+", name) is None else (parent or ".")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m ict_scale.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="run directory (its latest checkpoint), a checkpoint directory, or an exported "
                                "NAME.safetensors (NAME.yaml beside it)")
    p.add_argument("--ref", help="reference statistics .npz (default: the run's eval.ref)")
    # Under torchrun write --num-samples: torchrun's parser takes '--num' for a prefix of its --numa-binding.
    p.add_argument("--num", "--num-samples", dest="num", type=int, help="samples (default: the run's eval.num)")
    p.add_argument("--steps", type=int, nargs="+", help="sampling step counts to score, from {1, 2}")
    p.add_argument("--sigma-mid", type=float, help="two-step intermediate level (default: the run's)")
    p.add_argument("--inception-weights", help="path/URL of pt_inception-2015-12-05-6726825d.pth "
                                               "(default: eval.inception_weights, then $ICT_INCEPTION_WEIGHTS)")
    p.add_argument("--features", choices=FEATURE_EXTRACTORS,
                   help="feature network (default: the run's eval.features): inception (FID) or classifier (FCD)")
    p.add_argument("--classifier-weights", help="classifier .safetensors (default: eval.classifier_weights)")
    p.add_argument("--batch-per-rank", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--precision-recall", action="store_true", help="also improved precision/recall (k=3)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="generator arithmetic")
    p.add_argument("--out-dir", help="where metrics.jsonl, fid.json, best.json go (default: the run directory)")
    p.add_argument("--step", type=int, help="training step to record (default: from the checkpoint name)")
    p.add_argument("--random-inception", type=int, metavar="SEED",
                   help="seeded random Inception weights: timing and smoke tests only, FIDs are meaningless")
    return p.parse_args(argv)


def eval_config(run_eval: EvalConfig, args) -> EvalConfig:
    """The run's eval section with the command line's values on top."""
    overrides = {"ref": args.ref, "num": args.num, "steps": args.steps, "sigma_mid": args.sigma_mid,
                 "inception_weights": args.inception_weights, "batch_per_rank": args.batch_per_rank,
                 "features": args.features, "classifier_weights": args.classifier_weights,
                 "seed": args.seed, "precision_recall": args.precision_recall or None}
    base = {f.name: getattr(run_eval, f.name) for f in dataclasses.fields(EvalConfig)}
    base.update({k: v for k, v in overrides.items() if v is not None})
    base["steps"] = list(base["steps"])
    return EvalConfig(**base)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = init_distributed()
    try:
        model, run_cfg, ckpt = load_model_for_eval(args.path, device)
        cfg = eval_config(run_cfg.eval, args)
        if not cfg.ref:
            raise ConfigError("no reference statistics: pass --ref or set eval.ref in the run config")
        if args.random_inception is not None and cfg.features != "inception":
            raise ConfigError("--random-inception applies to --features inception only")
        features = None if args.random_inception is None else \
            build_features(cfg, device, random_inception=args.random_inception)
        evaluator = FIDEvaluator(cfg, device, features=features)
        spec = sample_spec(run_cfg)
        if args.sigma_mid is not None:
            spec = dataclasses.replace(spec, sigma_mid=args.sigma_mid)
        ckpt = ckpt.rstrip("/")
        found = re.search(r"step_(\d+)$", ckpt)
        step = args.step if args.step is not None else (int(found.group(1)) if found else None)
        run_dir = run_dir_of(ckpt)
        # best.json names checkpoints relative to the run directory, as the trainer does.
        checkpoint = ckpt[len(run_dir) + 1:] if ckpt.startswith(run_dir + "/") else ckpt
        result = evaluator.run(model, spec, step=step, run_dir=args.out_dir or run_dir, checkpoint=checkpoint,
                               autocast=sampling_autocast(device, args.precision))
        if comm.get_rank() == 0:
            print(json.dumps(result, indent=2, sort_keys=True))
    finally:
        comm.destroy()
    return 0


def console() -> int:
    """The `ict-evaluate` command ([project.scripts] in pyproject.toml): main() with one-line errors."""
    return cli.run(main)


if __name__ == "__main__":
    sys.exit(console())
