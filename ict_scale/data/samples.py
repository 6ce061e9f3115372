"""Reading tar shards into samples and decoding one sample, with a named reason for every rejection."""
from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
PIL_FORMATS = ["PNG", "JPEG", "WEBP"]  # only these decoders ever see shard bytes
SKIP_REASONS = ("corrupt_tar", "no_image", "undecodable", "wrong_size", "missing_label", "bad_label")


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class ParsedShard:
    """The samples of one tar (webdataset layout: files sharing a key form a sample), in tar order."""
    samples: list[dict[str, bytes]] = field(default_factory=list)
    error: str | None = None   # why reading stopped early (truncated or corrupt tar), else None


def split_name(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the base name."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def parse_tar(data: bytes) -> ParsedShard:
    """Group a tar's regular files into samples; stop at the first unreadable header or member."""
    parsed = ParsedShard()
    current = None
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_name(info.name)
                if key != current:
                    parsed.samples.append({"__key__": key})
                    current = key
                parsed.samples[-1][ext] = tar.extractfile(info).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        parsed.error = f"{type(e).__name__}: {e}"
        if parsed.samples:  # the sample being read when the tar broke lacks some of its files
            parsed.samples.pop()
    return parsed


def read_label(sample: dict[str, bytes], num_classes: int) -> int:
    """The integer in `<key>.cls`, checked to lie in [0, num_classes)."""
    if "cls" not in sample:
        raise SkipSample("missing_label", f"no .cls file (has {sorted(k for k in sample if k != '__key__')})")
    try:
        label = int(sample["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise SkipSample("bad_label", f".cls is not an integer: {sample['cls'][:20]!r}") from None
    if not 0 <= label < num_classes:
        raise SkipSample("bad_label", f"label {label} outside [0, {num_classes})")
    return label


def decode_image(sample: dict[str, bytes], resolution: int) -> np.ndarray:
    """The sample's image as uint8 (R, R, 3); the size is checked before any pixel is decoded."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise SkipSample("no_image", f"no image file (has {sorted(k for k in sample if k != '__key__')})")
    try:
        image = Image.open(io.BytesIO(sample[ext]), formats=PIL_FORMATS)
    except Image.DecompressionBombError as e:
        raise SkipSample("wrong_size", str(e)) from None
    except Exception as e:
        raise SkipSample("undecodable", f".{ext}: {type(e).__name__}: {e}") from None
    if image.size != (resolution, resolution):  # rejects decompression bombs before decoding them
        raise SkipSample("wrong_size", f"{image.size[0]}x{image.size[1]}, expected {resolution}x{resolution}")
    try:
        image.load()  # decodes the pixels
        if image.mode != "RGB":
            image = image.convert("RGB")  # L / P / RGBA / CMYK -> 3 channels
        return np.asarray(image, dtype=np.uint8)
    except Exception as e:
        raise SkipSample("undecodable", f".{ext}: {type(e).__name__}: {e}") from None
