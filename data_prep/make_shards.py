"""Write a data set as WebDataset shards (<prefix>-NNNNNN.tar of <key>.png + <key>.cls) plus manifest.json.

    python -m data_prep.make_shards --dataset cifar10 --src=cifar-10-python.tar.gz --out data/cifar10/train
    python -m data_prep.make_shards --dataset imagenet64 --src=imagenet64_npz/ --out s3://bucket/imagenet64/train
    python -m data_prep.make_shards --dataset folder --src=my_images/ --resolution 64 --out data/mine
    python -m data_prep.make_shards --dataset synthetic --num 10000 --out data/synthetic

Samples are shuffled once (seeded) before sharding so that every shard is a random subset. Each shard
is published whole (temp file + rename, or one upload), the manifest last; a manifest-in-progress
lets a rerun skip shards whose stored sha256 still matches, and --overwrite starts clean.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from data_prep import datasets
from data_prep.shard_writer import ShardJob, build_shard
from ict_scale import cli
from ict_scale.data import storage
from ict_scale.data.manifest import MANIFEST_NAME, SHARD_PATTERN, Manifest, ShardEntry
from ict_scale.data.order import derive_seed, seeded_permutation
from ict_scale.errors import UserError

PARTIAL_NAME = "manifest.partial.json"
CLASSES_NAME = "classes.json"


# Starting a worker (a fresh interpreter importing torch, then pickled payloads) costs about a second;
# on 2 cores 2,000 samples encode about as fast in-process as with two workers, and 200 take half the time
# in-process. A pool of 128 workers (all CPUs of a big machine) for a small source is mostly start-up.
SAMPLES_PER_WORKER = 2000


def default_workers(num_samples: int, num_shards: int, cpus: int) -> int:
    """Encoder processes when --workers is not given: one per SAMPLES_PER_WORKER samples, at most one per
    shard and one per CPU; fewer than two means in-process (0), since one worker only adds its start-up."""
    workers = min(num_samples // SAMPLES_PER_WORKER, num_shards, cpus)
    return workers if workers >= 2 else 0


def available_cpus() -> int:
    """CPUs this process may run on (a container or taskset may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class SourceError(UserError, ValueError):
    """--src holds something other than what --dataset reads (the message names the file)."""


class SourceMissing(UserError, FileNotFoundError):
    """--src, or a file it needs, is absent or unreadable."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_prep.make_shards", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, choices=["cifar10", "imagenet64", "folder", "synthetic"])
    p.add_argument("--src", default="", help="cifar-10-python.tar.gz | imagenet64: the folder of the official "
                                             "download (Imagenet64_*_npz.zip files, or the train_data_batch_*.npz "
                                             "and val_data.npz they hold), one such zip or npz, or a raw ImageNet "
                                             "train folder | folder: an image folder (unused for synthetic)")
    p.add_argument("--out", required=True, help="output directory or s3:// prefix (one split per --out)")
    p.add_argument("--split", default="train", help="cifar10: train|test; imagenet64 npz: train|val; "
                                                    "synthetic: train|val (val: indices from 2**40 on, disjoint)")
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    p.add_argument("--workers", type=int, default=None,
                   help="encoder processes; 0 = encode in this process; default: from the source size "
                        f"(one per {SAMPLES_PER_WORKER:,} samples, at most one per shard and per CPU, none below two)")
    p.add_argument("--resolution", type=int, default=0, help="folder/synthetic image side (required for folder)")
    p.add_argument("--num", type=int, default=50000, help="synthetic: number of samples")
    p.add_argument("--num-classes", type=int, default=10, help="synthetic: number of classes (0 = unlabelled)")
    p.add_argument("--seed", type=int, default=0, help="synthetic data seed and the pre-shard shuffle seed")
    p.add_argument("--prefix", default="", help="shard name prefix (default: the split)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the source order (no pre-shard shuffle)")
    p.add_argument("--overwrite", action="store_true", help="delete this prefix's shards and manifests first")
    p.add_argument("--storage-options", default="{}", help="fsspec options as JSON (endpoint, profile, ...)")
    p.add_argument("--partial-every-s", type=float, default=5.0,
                   help="seconds between rewrites of the manifest-in-progress (what a rerun resumes from)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.shard_size <= 0:
        p.error(f"--shard-size must be positive, got {args.shard_size}")
    if args.workers is not None and args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    return args


def open_source(args) -> datasets.SampleSource:
    if args.dataset == "synthetic":
        return datasets.synthetic(args.num, args.num_classes, args.resolution or 32, args.seed, args.split)
    if not args.src:
        raise SystemExit(f"--dataset {args.dataset} needs --src")
    if args.dataset == "cifar10":
        return datasets.cifar10(args.src, args.split)
    if args.dataset == "imagenet64":
        return datasets.imagenet64(args.src, args.split)
    if args.resolution <= 0:
        raise SystemExit("--dataset folder needs --resolution (the image side, e.g. 64; "
                         "make shards: RESOLUTION=64)")
    return datasets.image_folder(args.src, args.resolution)


def build_settings(args, source: datasets.SampleSource) -> dict:
    """What must be identical for an earlier partial build's shards to be reused."""
    return {"dataset": source.dataset, "source": source.description, "split": args.split,
            "num_samples": source.num_samples, "resolution": source.resolution,
            "num_classes": source.num_classes, "shard_size": args.shard_size, "prefix": args.prefix,
            "shuffle": not args.no_shuffle, "seed": args.seed, "image_format": "png"}


def stored_names(out: str, options: dict) -> dict[str, int]:
    try:
        return storage.list_sizes(out, options)
    except storage.StorageError as e:
        if isinstance(e.__cause__, FileNotFoundError):
            return {}  # a fresh output location
        raise


def previous_entries(out: str, options: dict, settings: dict, names: dict) -> dict[str, ShardEntry]:
    """Shard entries recorded by an earlier run with the same settings (complete or in progress)."""
    for name in (MANIFEST_NAME, PARTIAL_NAME):
        if name not in names:
            continue
        url = storage.join(out, name)
        manifest = Manifest.from_json(storage.read_bytes(url, options).decode("utf-8"), url)
        if manifest.build != settings:
            changed = {k: (manifest.build.get(k), v) for k, v in settings.items() if manifest.build.get(k) != v}
            raise SystemExit(f"{url} was written with other settings {changed} (old, new); "
                             "pass --overwrite to replace it (make shards: OVERWRITE=1)")
        return {s.name: s for s in manifest.shards}
    return {}


def clean(out: str, options: dict, prefix: str, names: dict, overwrite: bool) -> None:
    """Remove temp files of interrupted runs; with --overwrite also this prefix's shards and manifests."""
    fs, path = storage.filesystem(out, options)
    for name in names:
        # storage.write_atomic's temp files are ".<final name>.tmp-<random>"
        temp_of = name[1:name.index(".tmp-")] if name.startswith(".") and ".tmp-" in name else None
        ours = temp_of is not None and (temp_of in (MANIFEST_NAME, PARTIAL_NAME, CLASSES_NAME)
                                        or temp_of.startswith(f"{prefix}-"))
        if overwrite:
            ours |= name in (MANIFEST_NAME, PARTIAL_NAME) or (name.startswith(f"{prefix}-") and name.endswith(".tar"))
        if ours:
            fs.rm(storage.join(path, name))


@dataclass
class ShardPlan:
    name: str
    keys: list[str]            # sample keys: the position in the written order
    indices: np.ndarray        # which source samples, in that order


def plan_shards(num_samples: int, shard_size: int, prefix: str, shuffle: bool, seed: int) -> list[ShardPlan]:
    """Shard i holds positions [i*size, (i+1)*size) of a seeded permutation of the source."""
    order = seeded_permutation(num_samples, derive_seed(seed, "make_shards")) if shuffle else np.arange(num_samples)
    return [ShardPlan(SHARD_PATTERN.format(prefix=prefix, index=index),
                      [f"{p:09d}" for p in range(first, min(first + shard_size, num_samples))],
                      order[first:first + shard_size])
            for index, first in enumerate(range(0, num_samples, shard_size))]


def run_jobs(plans: list[ShardPlan], make_job, workers: int, on_done, quiet: bool) -> None:
    """Build all shards with a bounded number in flight (payloads are cut only just before submission)."""
    columns = (TextColumn("[bold]shards"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=quiet, console=Console(stderr=True)) as progress:
        task = progress.add_task("shards", total=len(plans), rate="")
        start, samples = time.time(), 0
        # forkserver: a forked child of a process that has used torch's OpenMP pool or s3fs's event loop
        # can hang; one torch thread per worker since the workers already fill the cores.
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"),
                                   initializer=torch.set_num_threads, initargs=(1,)) if workers > 0 else None
        pending, todo = set(), iter(plans)
        try:
            while True:
                for plan in todo:
                    job = make_job(plan)
                    if pool is None:
                        on_done(*build_shard(job))
                        samples += len(job.keys)
                        progress.update(task, advance=1, rate=f"{samples / (time.time() - start):.0f} img/s")
                        continue
                    pending.add(pool.submit(build_shard, job))
                    if len(pending) >= 2 * workers:
                        break
                if not pending:
                    return
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    entry, reused = future.result()
                    on_done(entry, reused)
                    samples += entry.num_samples
                    progress.update(task, advance=1, rate=f"{samples / (time.time() - start):.0f} img/s")
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.prefix = args.prefix or args.split
    options = json.loads(args.storage_options)
    try:
        source = open_source(args)
    except ValueError as e:  # the source is not what --dataset reads; the message names the file
        raise SourceError(str(e)) from e
    except OSError as e:
        raise SourceMissing(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)) from e
    settings = build_settings(args, source)
    names = stored_names(args.out, options)
    previous = {} if args.overwrite else previous_entries(args.out, options, settings, names)
    clean(args.out, options, args.prefix, names, args.overwrite)
    if source.classes is not None:
        storage.write_atomic(storage.join(args.out, CLASSES_NAME), (json.dumps(
            {"dataset": source.dataset, "classes": source.classes}, indent=1) + "\n").encode(), options)
    manifest = Manifest(dataset=source.dataset, image_shape=[3, source.resolution, source.resolution],
                        num_classes=source.num_classes, source=source.description,
                        classes_file=CLASSES_NAME if source.classes is not None else None, build=settings)
    plans = plan_shards(source.num_samples, args.shard_size, args.prefix, not args.no_shuffle, args.seed)

    def make_job(plan: ShardPlan) -> ShardJob:
        return ShardJob(plan.name, plan.keys, source.payload(plan.indices), args.out, options,
                        previous.get(plan.name))
    done: dict[str, ShardEntry] = {}
    reused = [0]
    last_partial = [time.time()]

    def on_done(entry: ShardEntry, was_reused: bool) -> None:
        done[entry.name] = entry
        reused[0] += was_reused
        if time.time() - last_partial[0] >= args.partial_every_s:  # so an interrupted run can resume
            manifest.shards = [done[p.name] for p in plans if p.name in done]
            storage.write_atomic(storage.join(args.out, PARTIAL_NAME), manifest.to_json().encode(), options)
            last_partial[0] = time.time()

    workers = args.workers if args.workers is not None else \
        default_workers(source.num_samples, len(plans), available_cpus())
    run_jobs(plans, make_job, workers, on_done, args.quiet)
    manifest.shards = [done[p.name] for p in plans]
    storage.write_atomic(storage.join(args.out, MANIFEST_NAME), manifest.to_json().encode(), options)
    fs, path = storage.filesystem(args.out, options)
    if fs.exists(storage.join(path, PARTIAL_NAME)):
        fs.rm(storage.join(path, PARTIAL_NAME))
    total_mb = sum(s.bytes for s in manifest.shards) / 2**20
    print(f"{storage.join(args.out, MANIFEST_NAME)}: {len(plans)} shards ({reused[0]} reused), "
          f"{manifest.num_samples} samples, {total_mb:.1f} MiB", file=sys.stderr)
    return 0


def console() -> int:
    """The `ict-make-shards` command ([project.scripts] in pyproject.toml): main() with one-line errors."""
    return cli.run(main)


if __name__ == "__main__":
    sys.exit(console())
