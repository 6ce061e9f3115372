"""Decoded samples/s of the shard loader, per worker and end to end, from local disk and a local S3 server.

    python benchmarks/data_throughput.py [--workers 1 2] [--resolutions 32 64] [--content noise synthetic]

Shards are written by make_shards from files in the official CIFAR-10 / Imagenet64 layouts, filled with
either uniform noise (incompressible PNGs: larger than real photos, a pessimistic bound) or the
procedural synthetic images (flat shapes: smaller PNGs, an optimistic bound). "per worker" drives one
producer in this process (no DataLoader): what one worker process delivers with one core. "loader, n
workers" is the whole DataLoader path into the main process. On a machine with fewer cores than
workers + main process, the end-to-end figure is core-bound; project from the per-worker rate.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import platform
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script

from data_prep.make_shards import main as make_shards  # noqa: E402
from ict_scale.data import DataConfig, build_loader  # noqa: E402
from ict_scale.data.synthetic import synthetic_images  # noqa: E402

TARGETS = {32: 2300, 64: 450}  # img/s per GPU the trainer needs (iCT NCSN++ at 32x32, ADM at 64x64)


def pixels(content: str, n: int, resolution: int, seed: int) -> np.ndarray:
    """(n, 3*R*R) channel-major uint8 rows, as both official formats store them."""
    if content == "noise":
        return np.random.default_rng(seed).integers(0, 256, (n, 3 * resolution * resolution), dtype=np.uint8)
    images, _ = synthetic_images(torch.arange(n), seed, resolution, 10)
    return images.reshape(n, -1).numpy()


def write_cifar_tarball(path: str, content: str, per_batch: int) -> None:
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for i in range(1, 6):
            body = {b"data": pixels(content, per_batch, 32, i), b"labels": [i % 10] * per_batch}
            raw = pickle.dumps(body, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/data_batch_{i}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


def source_args(workdir: str, resolution: int, content: str) -> list[str]:
    """Write source files, return make_shards arguments: 32x32 from a CIFAR-10-layout tarball (10240
    samples), 64x64 from an Imagenet64-layout npz (4096 samples)."""
    if resolution == 32:
        src = os.path.join(workdir, f"cifar-10-python-{content}.tar.gz")
        write_cifar_tarball(src, content, 2048)
        return ["--dataset", "cifar10", "--src", src]
    src = os.path.join(workdir, f"npz-{content}")
    os.makedirs(src, exist_ok=True)
    np.savez(os.path.join(src, "val_data.npz"), data=pixels(content, 4096, 64, 0), labels=np.ones(4096, np.int64))
    return ["--dataset", "imagenet64", "--src", src, "--split", "val"]


def best_rate(repeats: int, *args) -> tuple[float, float]:
    """The best of `repeats` measurements: other load on the machine only ever slows a run down."""
    runs = [rate(*args) for _ in range(repeats)]
    return max(r[0] for r in runs), max(r[1] for r in runs)


def rate(source: str, resolution: int, workers: int, seconds: float, options: dict) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second of this process) after one warm-up batch
    (worker start-up excluded), over at least `seconds`. With workers=0 this process does all the
    work, so the second figure is what one dedicated core delivers, however busy the machine is."""
    cfg = DataConfig(source=source, resolution=resolution, num_classes=10 if resolution == 32 else 1000,
                     num_workers=workers, storage_options=options, pin_memory=False)
    stream = build_loader(cfg, batch_per_rank=256, rank=0, world_size=1, seed=0)
    next(stream)
    start, cpu_start, samples = time.perf_counter(), time.process_time(), 0
    while time.perf_counter() - start < seconds or samples < 2048:
        samples += next(stream)[0].shape[0]
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    stream.close()
    return samples / elapsed, samples / cpu


def start_s3() -> tuple[subprocess.Popen, str]:
    """A moto S3 server on a free local port, with fake credentials in this process's environment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    import boto3
    for _ in range(300):
        try:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
            return proc, endpoint
        except Exception:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def host_info() -> dict:
    model = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    import PIL
    return {"host": socket.gethostname(), "cpu_model": model, "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "pillow": PIL.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "load_average_1m": round(os.getloadavg()[0], 2)}  # other work on the machine skews the figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader worker counts")
    p.add_argument("--resolutions", type=int, nargs="+", default=[32, 64], choices=[32, 64])
    p.add_argument("--content", nargs="+", default=["noise", "synthetic"], choices=["noise", "synthetic"])
    p.add_argument("--storage", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    p.add_argument("--seconds", type=float, default=4.0, help="timed seconds per measurement")
    p.add_argument("--repeats", type=int, default=2, help="measurements per cell; the best is kept")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    console, rows = Console(width=150), []
    torch.set_num_threads(1)  # "per worker" runs in this process: give it a DataLoader worker's single thread
    load_before = os.getloadavg()[0]
    server, endpoint = start_s3() if "s3" in args.storage else (None, "")
    try:
        with tempfile.TemporaryDirectory() as workdir:
            for resolution in args.resolutions:
                for content in args.content:
                    local = os.path.join(workdir, f"shards-{resolution}-{content}")
                    build = source_args(workdir, resolution, content) + ["--shard-size", "256", "--quiet"]
                    make_shards([*build, "--out", local])
                    with open(os.path.join(local, "manifest.json")) as f:
                        manifest = json.load(f)
                    bytes_per_sample = sum(s["bytes"] for s in manifest["shards"]) / manifest["num_samples"]
                    for storage in args.storage:
                        source, options = local, {}
                        if storage == "s3":  # the same shards (same files, same seed), uploaded
                            source = f"s3://bench/{resolution}-{content}"
                            options = {"client_kwargs": {"endpoint_url": endpoint}}
                            make_shards([*build, "--out", source, "--storage-options", json.dumps(options)])
                        wall, per_cpu_second = best_rate(args.repeats, source, resolution, 0, args.seconds, options)
                        row = {"resolution": resolution, "content": content, "storage": storage,
                               "bytes_per_sample": round(bytes_per_sample), "per_worker_wall": wall,
                               "per_worker_cpu": per_cpu_second}
                        for w in args.workers:
                            row[f"loader_{w}_workers"] = best_rate(args.repeats, source, resolution, w,
                                                                   args.seconds, options)[0]
                        row["projected_4_workers"] = 4 * per_cpu_second
                        rows.append(row)
                        console.print(f"{resolution}x{resolution} {content:9s} {storage:5s}: per worker "
                                      f"{wall:.0f} img/s wall, {per_cpu_second:.0f} img/s per CPU second")
    finally:
        if server is not None:
            server.terminate()
            server.wait()
    report(console, rows, args.workers)
    info = host_info()
    info["load_average_1m_at_start"] = round(load_before, 2)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"data_throughput_{info['host']}.json")
    with open(path, "w") as f:
        json.dump({"host": info, "batch_per_rank": 256, "shard_size": 256, "targets_per_gpu": TARGETS,
                   "seconds_per_measurement": args.seconds, "best_of": args.repeats,
                   "results": [{k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]},
                  f, indent=1)
    console.print(f"wrote {os.path.relpath(path)}")
    return 0


def report(console: Console, rows: list[dict], workers: list[int]) -> None:
    table = Table(title="decoded samples/s (batch 256 per rank, shards of 256, hflip on)")
    for column in ["res", "content", "storage", "B/sample", "1 worker (wall)", "1 worker (per CPU s)",
                   *[f"loader {w}w (wall)" for w in workers], "4 x per CPU s", "target/GPU"]:
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(f"{r['resolution']}", r["content"], r["storage"], f"{r['bytes_per_sample']}",
                      f"{r['per_worker_wall']:.0f}", f"{r['per_worker_cpu']:.0f}",
                      *[f"{r[f'loader_{w}_workers']:.0f}" for w in workers],
                      f"{r['projected_4_workers']:.0f}", f"{TARGETS[r['resolution']]}")
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
