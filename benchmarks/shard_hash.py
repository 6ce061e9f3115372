"""What checking each shard's sha256 as it is read costs next to decoding its samples.

    python benchmarks/shard_hash.py [--repeats 5] [--out benchmarks/results/shard_hash_vm.json]

One shard of 256 samples per (resolution, content), built as make_shards builds them (PNG + .cls in a
reproducible tar). Timed per shard, best of --repeats: hashing its bytes (what the loader adds), and
what the loader does anyway (parse the tar, decode every PNG to an R x R x 3 array). Single core.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script

from data_prep.shard_writer import encode_png, tar_bytes  # noqa: E402
from ict_scale.data.samples import decode_image, parse_tar  # noqa: E402
from ict_scale.data.synthetic import synthetic_images  # noqa: E402


def shard(resolution: int, content: str, n: int = 256) -> bytes:
    if content == "noise":  # incompressible: the largest PNGs, so the most bytes to hash per decode
        images = np.random.default_rng(0).integers(0, 256, (n, resolution, resolution, 3), dtype=np.uint8)
    else:
        images = synthetic_images(torch.arange(n), 0, resolution, 10)[0].permute(0, 2, 3, 1).numpy()
    return tar_bytes([m for i, im in enumerate(images)
                      for m in ((f"{i:09d}.png", encode_png(np.ascontiguousarray(im))), (f"{i:09d}.cls", b"1"))])


def best_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(resolution: int, content: str, repeats: int) -> dict:
    data = shard(resolution, content)
    hash_s = best_seconds(lambda: hashlib.sha256(data).hexdigest(), repeats)
    decode_s = best_seconds(lambda: [decode_image(s, resolution) for s in parse_tar(data).samples], repeats)
    return {"resolution": resolution, "content": content, "shard_bytes": len(data), "samples": 256,
            "sha256_ms": round(hash_s * 1e3, 3), "parse_decode_ms": round(decode_s * 1e3, 2),
            "sha256_MB_per_s": round(len(data) / hash_s / 1e6), "overhead_pct": round(100 * hash_s / decode_s, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = [measure(r, c, args.repeats) for r in (32, 64) for c in ("noise", "synthetic")]
    for row in rows:
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                       "load_avg_1min": os.getloadavg()[0], "rows": rows}, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
