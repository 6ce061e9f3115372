"""Helpers shared by the data tests: hand-made shard sets and sample identities."""
from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import torch
from PIL import Image

from data_prep.make_shards import main as make_shards
from data_prep.shard_writer import tar_bytes
from ict_scale.data import DataConfig, build_loader
from ict_scale.data.manifest import MANIFEST_NAME, Manifest, ShardEntry
from ict_scale.data.samples import decode_image, parse_tar


def png(image_hwc: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image_hwc).save(buf, format="PNG")
    return buf.getvalue()


def random_image(rng: np.random.Generator, resolution: int) -> np.ndarray:
    return rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)


def good_sample(rng, key: str, resolution: int = 8, label: int = 1) -> dict:
    return {"__key__": key, "png": png(random_image(rng, resolution)), "cls": str(label).encode()}


def shard_tar(samples: list[dict]) -> bytes:
    return tar_bytes([(f"{s['__key__']}.{ext}", data) for s in samples for ext, data in s.items()
                      if ext != "__key__"])


def write_shard_set(root: str, shards: list[bytes], counts: list[int], resolution: int = 8,
                    num_classes: int = 10) -> str:
    """Write raw tar bytes as train-NNNNNN.tar plus a manifest claiming `counts` samples each."""
    os.makedirs(root, exist_ok=True)
    manifest = Manifest(dataset="test", image_shape=[3, resolution, resolution], num_classes=num_classes,
                        source="test")
    for i, (data, count) in enumerate(zip(shards, counts)):
        name = f"train-{i:06d}.tar"
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
        manifest.shards.append(ShardEntry(name, count, len(data), hashlib.sha256(data).hexdigest()))
    with open(os.path.join(root, MANIFEST_NAME), "w") as f:
        f.write(manifest.to_json())
    return root


def make_synthetic_shards(out: str, num: int, shard_size: int, resolution: int = 8, num_classes: int = 10) -> str:
    make_shards(["--dataset", "synthetic", "--num", str(num), "--shard-size", str(shard_size),
                 "--resolution", str(resolution), "--num-classes", str(num_classes), "--out", out,
                 "--workers", "0", "--quiet"])
    return out


def identity(image: torch.Tensor | np.ndarray) -> bytes:
    """A sample's identity: the hash of its pixels (CHW tensor or HWC array)."""
    array = image.permute(1, 2, 0).numpy() if isinstance(image, torch.Tensor) else image
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).digest()


def stored_identities(root: str, resolution: int) -> list[bytes]:
    """Identities of every sample in the .tar files of `root` (as stored, unflipped)."""
    found = []
    for name in sorted(os.listdir(root)):
        if name.endswith(".tar"):
            with open(os.path.join(root, name), "rb") as f:
                found += [identity(decode_image(s, resolution)) for s in parse_tar(f.read()).samples]
    return found


def loader(source: str, *, batch_per_rank: int, rank: int = 0, world_size: int = 1, seed: int = 0,
           resolution: int = 8, **overrides):
    cfg = DataConfig(source=source, resolution=resolution, **{"num_workers": 0, "pin_memory": False, **overrides})
    return build_loader(cfg, batch_per_rank=batch_per_rank, rank=rank, world_size=world_size, seed=seed)


def take(stream, num_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    batches = [next(stream) for _ in range(num_batches)]
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
