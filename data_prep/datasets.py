"""Readers for the supported source layouts. Each returns a SampleSource: sizes, classes, and a way to
cut a picklable per-shard payload that a worker process turns into (HWC uint8 image, label) pairs."""
from __future__ import annotations

import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from data_prep.imagenet64_files import EXPECTED, NpzFile, find_npz
from data_prep.preprocess import list_labelled_images, load_and_crop
from ict_scale.data.synthetic import synthetic_images

Rendered = Iterator[tuple[np.ndarray, int | None]]


@dataclass
class ArrayPayload:
    """Channel-major rows (n, 3*R*R), as CIFAR-10 and downsampled ImageNet store them."""
    rows: np.ndarray
    labels: np.ndarray | None
    resolution: int

    def render(self) -> Rendered:
        images = self.rows.reshape(-1, 3, self.resolution, self.resolution).transpose(0, 2, 3, 1)
        for i, image in enumerate(images):
            yield np.ascontiguousarray(image), (None if self.labels is None else int(self.labels[i]))


@dataclass
class FilePayload:
    """Image files, decoded and ADM-cropped in the worker."""
    paths: list[str]
    labels: list[int] | None
    resolution: int

    def render(self) -> Rendered:
        for i, path in enumerate(self.paths):
            yield load_and_crop(path, self.resolution), (None if self.labels is None else self.labels[i])


@dataclass
class SyntheticPayload:
    """Global indices of the procedural data set."""
    indices: np.ndarray
    seed: int
    resolution: int
    num_classes: int

    def render(self) -> Rendered:
        images, labels = synthetic_images(torch.from_numpy(self.indices), self.seed, self.resolution,
                                          max(1, self.num_classes))
        for image, label in zip(images.permute(0, 2, 3, 1).numpy(), labels.tolist()):
            yield np.ascontiguousarray(image), (label if self.num_classes > 0 else None)


@dataclass
class SampleSource:
    dataset: str
    description: str
    num_samples: int
    resolution: int
    num_classes: int                 # 0 = unlabelled
    classes: list[str] | None        # class index -> name, written to classes.json
    payload: Callable[[np.ndarray], object]  # source indices -> payload with .render()


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches but refuses any class other than numpy arrays (pickle can run code)."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def _cifar_member(tar: tarfile.TarFile, src: str, name: str) -> dict:
    try:
        raw = tar.extractfile(f"cifar-10-batches-py/{name}").read()
        return _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except KeyError:
        raise ValueError(f"{src}: no member cifar-10-batches-py/{name}; expected the official "
                         "cifar-10-python.tar.gz") from None
    except pickle.UnpicklingError as e:
        raise ValueError(f"{src}: cifar-10-batches-py/{name}: {e}") from None


def cifar10(src: str, split: str) -> SampleSource:
    """The official cifar-10-python.tar.gz: pickled dicts with b'data' (N x 3072) and b'labels'."""
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    if split not in names:
        raise ValueError(f"cifar10 --split must be train or test, got {split!r}")
    rows, labels = [], []
    with tarfile.open(src, "r:gz") as tar:
        for name in names[split]:
            batch = _cifar_member(tar, src, name)
            data, lab = np.asarray(batch.get(b"data")), np.asarray(batch.get(b"labels"))
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or lab.shape != (len(data),):
                raise ValueError(f"{src}: {name}: expected b'data' uint8 (N, 3072) and N b'labels', got "
                                 f"{data.dtype} {data.shape} and {lab.shape}")
            if lab.min() < 0 or lab.max() > 9:
                raise ValueError(f"{src}: {name}: labels must lie in 0..9, found {lab.min()}..{lab.max()}")
            rows.append(data)
            labels.append(lab.astype(np.int64))
        meta = _cifar_member(tar, src, "batches.meta") if "cifar-10-batches-py/batches.meta" in tar.getnames() else {}
    rows_all, labels_all = np.concatenate(rows), np.concatenate(labels)
    classes = [n.decode() for n in meta.get(b"label_names", [])] or [str(i) for i in range(10)]
    return SampleSource("cifar10", f"{os.path.basename(src)}:{split}", len(rows_all), 32, 10, classes,
                        lambda idx: ArrayPayload(rows_all[idx], labels_all[idx], 32))


def imagenet64_npz(files: list[NpzFile], description: str) -> SampleSource:
    """Official downsampled ImageNet 64x64: npz with 'data' (N x 12288, channel-major) and 1-based 'labels'."""
    parts, labels = [], []
    for f in files:
        data, lab = f.load()
        lab = lab.astype(np.int64).reshape(-1)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 12288 or len(lab) != len(data):
            raise ValueError(f"{f.name}: expected 'data' uint8 (N, 12288) and N 'labels', got {data.dtype} "
                             f"{data.shape} and {lab.shape}")
        if lab.min() < 1 or lab.max() > 1000:
            raise ValueError(f"{f.name}: 'labels' must be 1-based in 1..1000, found {lab.min()}..{lab.max()}")
        parts.append(data)
        labels.append(lab - 1)  # shards store 0-based labels
    starts = np.cumsum([0] + [len(p) for p in parts])
    labels_all = np.concatenate(labels)

    def payload(idx: np.ndarray) -> ArrayPayload:
        part = np.searchsorted(starts, idx, side="right") - 1
        rows = np.empty((len(idx), 12288), dtype=np.uint8)
        for p in np.unique(part):
            rows[part == p] = parts[p][idx[part == p] - starts[p]]
        return ArrayPayload(rows, labels_all[idx], 64)

    classes = [f"official label {i + 1}" for i in range(1000)]
    return SampleSource("imagenet64", description, int(starts[-1]), 64, 1000, classes, payload)


def image_folder(src: str, resolution: int, dataset: str = "folder") -> SampleSource:
    """Class sub-folders of images (labels = sorted folder names), or a folder of unlabelled images."""
    paths, labels, classes = list_labelled_images(src)
    labelled = classes is not None
    return SampleSource(dataset, os.path.basename(os.path.normpath(src)), len(paths), resolution,
                        len(classes) if labelled else 0, classes,
                        lambda idx: FilePayload([paths[i] for i in idx],
                                                [labels[i] for i in idx] if labelled else None, resolution))


def imagenet64(src: str, split: str) -> SampleSource:
    """Downsampled-ImageNet npz files (zipped or not), or a raw ImageNet folder (class sub-folders of
    JPEGs) -> 64x64 (ADM preprocessing)."""
    files = find_npz(src, split)
    if files:
        return imagenet64_npz(files, f"{os.path.basename(os.path.normpath(src))}:{split}")
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src}: not found; expected a folder or file holding {EXPECTED[split]}")
    expected = f"{src}: no Imagenet64 {split} files: expected {EXPECTED[split]}"
    if not os.path.isdir(src):
        raise FileNotFoundError(expected)
    try:
        return image_folder(src, 64, dataset="imagenet64")
    except (FileNotFoundError, ValueError) as e:  # neither layout: name both
        raise FileNotFoundError(f"{expected}; nor is it a raw ImageNet folder ({e})") from None


# First global index of each synthetic split. Training on `source: synthetic` streams indices 0, 1, 2, ...
# (about 4e8 for a full 400k x 1024 run), so "val" starts far beyond anything a run reads: held-out images
# of the same distribution, never seen in training.
SYNTHETIC_SPLIT_FIRST = {"train": 0, "val": 1 << 40}


def synthetic(num: int, num_classes: int, resolution: int, seed: int, split: str = "train") -> SampleSource:
    """The built-in procedural data set (ict_scale.data.synthetic), indices first..first+num-1 of `split`."""
    if num <= 0:
        raise ValueError(f"synthetic needs --num > 0, got {num}")
    if split not in SYNTHETIC_SPLIT_FIRST:
        raise ValueError(f"synthetic --split must be one of {sorted(SYNTHETIC_SPLIT_FIRST)}, got {split!r}")
    first = SYNTHETIC_SPLIT_FIRST[split]
    # The train description is unchanged from before splits existed, so earlier manifests still resume.
    description = f"synthetic(seed={seed})" if split == "train" else \
        f"synthetic(seed={seed}, split={split}, first_index={first})"
    return SampleSource("synthetic", description, num, resolution, num_classes,
                        [str(i) for i in range(num_classes)] or None,
                        lambda idx: SyntheticPayload(np.asarray(idx, dtype=np.int64) + first, seed, resolution,
                                                     num_classes))
