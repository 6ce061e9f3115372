"""Finding downsampled ImageNet 64x64 (Chrabaszcz et al., 2017) as users have it: zips, unzipped or repacked.

The official download is three zips: Imagenet64_train_part1_npz.zip (train_data_batch_1..5.npz),
Imagenet64_train_part2_npz.zip (train_data_batch_6..10.npz) and Imagenet64_val_npz.zip (val_data.npz).
Unzipped, the npz files lie loose or in Imagenet64_train_part{1,2}_npz/ folders. Every npz holds 'data',
uint8 (N, 12288): the R plane, then G, then B, each 64x64 row-major; 'labels', 1..1000; train files also
'mean'. Older copies of this project's instructions used repacked Imagenet64_train_part<k>.npz files.
"""
from __future__ import annotations

import io
import os
import re
import zipfile
from dataclasses import dataclass

import numpy as np

TRAIN_BATCH = re.compile(r"^train_data_batch_(\d+)\.npz$")
REPACKED_PART = re.compile(r"^Imagenet64_train_part(\d+)\.npz$")
VAL_NAME = "val_data.npz"
EXPECTED = {
    "train": "train_data_batch_1.npz ... train_data_batch_10.npz (loose, in Imagenet64_train_part1_npz/ and "
             "Imagenet64_train_part2_npz/ folders, or inside Imagenet64_train_part1_npz.zip and "
             "Imagenet64_train_part2_npz.zip), or Imagenet64_train_part<k>.npz",
    "val": "val_data.npz (loose, in an Imagenet64_val_npz/ folder, or inside Imagenet64_val_npz.zip)",
}


@dataclass(frozen=True)
class NpzFile:
    """One npz: a file on disk, or a member of a zip."""
    path: str
    member: str | None = None

    @property
    def name(self) -> str:
        return f"{self.path}:{self.member}" if self.member else self.path

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """('data', 'labels') as stored; a zip member is read whole into memory first (np.load needs seeks)."""
        with zipfile.ZipFile(self.path) if self.member else open(self.path, "rb") as f:
            raw = io.BytesIO(f.read(self.member)) if self.member else f
            with np.load(raw, allow_pickle=False) as npz:
                if "data" not in npz or "labels" not in npz:
                    raise ValueError(f"{self.name}: expected keys 'data' and 'labels', found {sorted(npz.keys())}")
                return npz["data"], np.asarray(npz["labels"])


def _candidates(src: str) -> list[NpzFile]:
    """npz files and zip members at most one folder below `src` (or `src` itself when it is a file)."""
    if not os.path.exists(src):
        return []
    if os.path.isfile(src):
        files = [src]
    else:
        files = []
        for entry in sorted(os.listdir(src)):
            path = os.path.join(src, entry)
            files += [os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
    found = []
    for path in files:
        if path.endswith(".npz"):
            found.append(NpzFile(path))
        elif path.endswith(".zip") and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                found += [NpzFile(path, m) for m in z.namelist() if m.endswith(".npz")]
    return found


def _numbered(files: list[NpzFile], pattern: re.Pattern) -> dict[int, NpzFile]:
    """{number: file} for files whose base name matches `pattern`; a loose file wins over a zip member."""
    chosen: dict[int, NpzFile] = {}
    for f in sorted(files, key=lambda f: f.member is not None):  # loose files first
        match = pattern.match(os.path.basename(f.member or f.path))
        if not match:
            continue
        k = int(match.group(1))
        if k in chosen and (chosen[k].member is None) == (f.member is None):
            raise ValueError(f"{os.path.basename(f.member or f.path)} found twice ({chosen[k].name} and {f.name}); "
                             "keep one")
        chosen.setdefault(k, f)
    return chosen


def find_npz(src: str, split: str) -> list[NpzFile]:
    """The npz files of `split` under `src`, in numeric order; [] when there are none."""
    if split not in EXPECTED:
        raise ValueError(f"imagenet64 --split must be train or val, got {split!r}")
    if src.endswith(".npz") and os.path.isfile(src):
        return [NpzFile(src)]  # one file named explicitly, whatever its name
    candidates = _candidates(src)
    if split == "val":
        return _val(candidates)
    official, repacked = _numbered(candidates, TRAIN_BATCH), _numbered(candidates, REPACKED_PART)
    if official and repacked:
        raise ValueError(f"{src}: both train_data_batch_*.npz and Imagenet64_train_part*.npz files; they hold the "
                         "same images, keep one set")
    chosen = official or repacked
    return [chosen[k] for k in sorted(chosen)]


def _val(candidates: list[NpzFile]) -> list[NpzFile]:
    matches = sorted((f for f in candidates if os.path.basename(f.member or f.path) == VAL_NAME),
                     key=lambda f: f.member is not None)
    loose = [f for f in matches if f.member is None]
    if len(loose) > 1 or (not loose and len(matches) > 1):
        raise ValueError(f"{matches[0].name} and {matches[1].name}: two {VAL_NAME}; keep one")
    return matches[:1]
