"""make_shards on tiny files in the official layouts: CIFAR-10 python tarball, Imagenet64 npz,
raw ImageNet-style JPEG folders (ADM preprocessing), plain image folders, and the synthetic set."""
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import identity, loader
from data_prep.make_shards import main as make_shards
from data_prep.preprocess import center_crop_arr
from ict_scale.data.manifest import Manifest
from ict_scale.data.samples import decode_image, parse_tar, read_label
from ict_scale.data.synthetic import synthetic_images

REPO = Path(__file__).resolve().parents[2]


def shard_samples(out: str, resolution: int, num_classes: int) -> Counter:
    """Counter of (image identity, label or None) over all shards in `out`."""
    found = Counter()
    for name in sorted(os.listdir(out)):
        if name.endswith(".tar"):
            with open(os.path.join(out, name), "rb") as f:
                for s in parse_tar(f.read()).samples:
                    found[identity(decode_image(s, resolution)), read_label(s, num_classes) if "cls" in s else None] += 1
    return found


def read_manifest(out: str) -> Manifest:
    with open(os.path.join(out, "manifest.json")) as f:
        return Manifest.from_json(f.read(), "manifest.json")


def build(*args: str) -> None:
    make_shards([*args, "--workers", "0", "--quiet", "--shard-size", "7"])


def write_cifar_tarball(path: str, per_batch: int, rng, evil: bool = False) -> dict:
    """A cifar-10-python.tar.gz with the official member names and pickled dict layout."""
    batches = {}
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
            if name == "batches.meta":
                body = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}
            else:
                data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
                body = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, per_batch).tolist(),
                        b"data": data, b"filenames": [b"x.png"] * per_batch}
                batches[name] = body
            raw = pickle.dumps(body, protocol=2)
            if evil and name == "data_batch_1":
                raw = b"cposix\nsystem\n(S'touch pwned'\ntR."  # a pickle that would run a shell command
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return batches


def expected_rows(rows: np.ndarray, labels, resolution: int) -> Counter:
    images = rows.reshape(-1, 3, resolution, resolution).transpose(0, 2, 3, 1)
    return Counter((identity(im), int(l)) for im, l in zip(images, labels))


def test_cifar10_tarball_train_and_test(tmp_path):
    batches = write_cifar_tarball(str(tmp_path / "cifar-10-python.tar.gz"), 6, np.random.default_rng(0))
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        out = str(tmp_path / split)
        build("--dataset", "cifar10", "--src", str(tmp_path / "cifar-10-python.tar.gz"), "--split", split,
              "--out", out)
        rows = np.concatenate([batches[n][b"data"] for n in names])
        labels = sum((batches[n][b"labels"] for n in names), [])
        assert shard_samples(out, 32, 10) == expected_rows(rows, labels, 32)
        manifest = read_manifest(out)
        assert (manifest.num_samples, manifest.image_shape, manifest.num_classes) == (len(rows), [3, 32, 32], 10)
        assert [s.num_samples for s in manifest.shards] == [7] * (len(rows) // 7) + ([len(rows) % 7] if len(rows) % 7 else [])
        with open(os.path.join(out, "classes.json")) as f:
            assert json.load(f)["classes"] == [f"class{i}" for i in range(10)]


def test_cifar10_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_cifar_tarball("cifar-10-python.tar.gz", 2, np.random.default_rng(0), evil=True)
    with pytest.raises(ValueError, match="refusing to unpickle posix.system"):
        build("--dataset", "cifar10", "--src", "cifar-10-python.tar.gz", "--out", "out")
    assert not os.path.exists("pwned")


def write_npz(path: str, n: int, rng, first_label: int = 1) -> tuple[np.ndarray, np.ndarray]:
    data = rng.integers(0, 256, (n, 12288), dtype=np.uint8)
    labels = rng.integers(first_label, first_label + 1000, n)
    labels[0] = first_label  # the lowest label always occurs
    np.savez(path, data=data, labels=labels, mean=np.zeros(12288))
    return data, labels


def test_imagenet64_npz_parts_and_val(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "npz"
    src.mkdir()
    # part10 sorts before part2 as text: parts must be taken in numeric order (it does not change the
    # sample set, but keeps the shard contents reproducible).
    parts = [write_npz(str(src / f"Imagenet64_train_part{i}.npz"), 5, rng) for i in (1, 2, 10)]
    val = write_npz(str(src / "val_data.npz"), 4, rng)
    build("--dataset", "imagenet64", "--src", str(src), "--out", str(tmp_path / "train"))
    rows, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    assert shard_samples(str(tmp_path / "train"), 64, 1000) == expected_rows(rows, labels - 1, 64)
    assert read_manifest(str(tmp_path / "train")).num_classes == 1000
    build("--dataset", "imagenet64", "--src", str(src), "--split", "val", "--out", str(tmp_path / "val"))
    assert shard_samples(str(tmp_path / "val"), 64, 1000) == expected_rows(val[0], val[1] - 1, 64)


def test_imagenet64_npz_with_zero_based_labels_is_an_error(tmp_path):
    write_npz(str(tmp_path / "val_data.npz"), 3, np.random.default_rng(2), first_label=0)
    with pytest.raises(ValueError, match=r"val_data.npz: 'labels' must be 1-based"):
        build("--dataset", "imagenet64", "--src", str(tmp_path), "--split", "val", "--out", str(tmp_path / "o"))


def official_npz(rng, n: int, val: bool = False) -> tuple[bytes, np.ndarray, np.ndarray]:
    """An npz as the official download has it: 'data' uint8 (n, 12288) channel-planar, 'labels' a list of
    1-based ints, 'mean' (train files only)."""
    data = rng.integers(0, 256, (n, 12288), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(1, 1001, n)]
    labels[0] = 1000
    buf = io.BytesIO()
    np.savez(buf, data=data, labels=labels, **({} if val else {"mean": data.mean(0)}))
    return buf.getvalue(), data, np.asarray(labels)


def zip_of(path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, body in members.items():
            z.writestr(name, body)


def pixels_and_labels(out: str) -> dict[bytes, tuple[np.ndarray, int]]:
    """{pixel bytes of the stored HWC image: (image, label)} over every shard in `out`."""
    found = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".tar"):
            with open(os.path.join(out, name), "rb") as f:
                for s in parse_tar(f.read()).samples:
                    image = decode_image(s, 64)
                    found[image.tobytes()] = (image, read_label(s, 1000))
    return found


def assert_official_round_trip(out: str, data: np.ndarray, labels: np.ndarray) -> None:
    """Every row is one stored image with pixel (y, x) of channel c at data[c * 4096 + y * 64 + x] and
    label official - 1."""
    found = pixels_and_labels(out)
    assert len(found) == len(data)
    y, x = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    for row, label in zip(data, labels):
        image = np.stack([row[c * 4096 + y * 64 + x] for c in range(3)], axis=-1)
        assert found[image.tobytes()][1] == label - 1
    assert max(found.values(), key=lambda v: v[1])[1] == 999


def test_imagenet64_official_download_zipped_unzipped_and_val(tmp_path):
    rng = np.random.default_rng(6)
    src = tmp_path / "downloads"
    (src / "Imagenet64_train_part2_npz").mkdir(parents=True)
    batches = {k: official_npz(rng, 3) for k in (1, 2, 6, 10)}
    # part 1 as the zip (members inside its folder); part 2 unzipped into its folder
    zip_of(src / "Imagenet64_train_part1_npz.zip",
           {f"Imagenet64_train_part1_npz/train_data_batch_{k}.npz": batches[k][0] for k in (1, 2)})
    for k in (6, 10):
        (src / "Imagenet64_train_part2_npz" / f"train_data_batch_{k}.npz").write_bytes(batches[k][0])
    # the part 2 zip kept beside its unzipped folder: the loose files win, nothing is read twice
    zip_of(src / "Imagenet64_train_part2_npz.zip", {f"train_data_batch_{k}.npz": batches[k][0] for k in (6, 10)})
    val_bytes, val_data, val_labels = official_npz(rng, 4, val=True)
    zip_of(src / "Imagenet64_val_npz.zip", {"val_data.npz": val_bytes})
    build("--dataset", "imagenet64", "--src", str(src), "--out", str(tmp_path / "train"))
    assert_official_round_trip(str(tmp_path / "train"), np.concatenate([batches[k][1] for k in (1, 2, 6, 10)]),
                               np.concatenate([batches[k][2] for k in (1, 2, 6, 10)]))
    build("--dataset", "imagenet64", "--src", str(src), "--split", "val", "--out", str(tmp_path / "val"))
    assert_official_round_trip(str(tmp_path / "val"), val_data, val_labels)
    # a zip named directly, and the unzipped val file inside its folder
    build("--dataset", "imagenet64", "--src", str(src / "Imagenet64_train_part1_npz.zip"), "--out",
          str(tmp_path / "part1"))
    assert_official_round_trip(str(tmp_path / "part1"), np.concatenate([batches[k][1] for k in (1, 2)]),
                               np.concatenate([batches[k][2] for k in (1, 2)]))
    (tmp_path / "v" / "Imagenet64_val_npz").mkdir(parents=True)
    (tmp_path / "v" / "Imagenet64_val_npz" / "val_data.npz").write_bytes(val_bytes)
    build("--dataset", "imagenet64", "--src", str(tmp_path / "v"), "--split", "val", "--out", str(tmp_path / "v2"))
    assert_official_round_trip(str(tmp_path / "v2"), val_data, val_labels)


def test_imagenet64_with_the_same_images_twice_is_an_error(tmp_path):
    """Two loose copies of one batch, or the official batches beside repacked parts, would duplicate samples."""
    body = official_npz(np.random.default_rng(7), 2)[0]
    (tmp_path / "a" / "Imagenet64_train_part1_npz").mkdir(parents=True)
    (tmp_path / "a" / "train_data_batch_1.npz").write_bytes(body)
    (tmp_path / "a" / "Imagenet64_train_part1_npz" / "train_data_batch_1.npz").write_bytes(body)
    with pytest.raises(ValueError, match=r"train_data_batch_1.npz found twice .*keep one"):
        build("--dataset", "imagenet64", "--src", str(tmp_path / "a"), "--out", str(tmp_path / "o"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "train_data_batch_1.npz").write_bytes(body)
    (tmp_path / "b" / "Imagenet64_train_part1.npz").write_bytes(body)
    with pytest.raises(ValueError, match=r"both train_data_batch_\*.npz and Imagenet64_train_part\*.npz"):
        build("--dataset", "imagenet64", "--src", str(tmp_path / "b"), "--out", str(tmp_path / "o"))


def test_imagenet64_without_its_files_names_the_expected_ones(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train_data_batch_1.npz.part").write_bytes(b"")  # an unfinished download
    for split, names in (("train", ["train_data_batch_1.npz", "Imagenet64_train_part1_npz.zip"]),
                         ("val", ["val_data.npz", "Imagenet64_val_npz.zip"])):
        out = subprocess.run([sys.executable, "-m", "data_prep.make_shards", "--dataset", "imagenet64", "--src",
                              str(tmp_path / "empty"), "--split", split, "--out", str(tmp_path / "o"), "--quiet"],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
        assert out.returncode != 0
        last = out.stderr.strip().splitlines()[-1]
        assert f"no Imagenet64 {split} files: expected" in last and all(n in last for n in names), out.stderr


def test_adm_center_crop_steps():
    """300x200 at target 64: one 2x box halving (short side 200 >= 128) to 150x100, bicubic to 96x64,
    centre crop columns 16..80."""
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    expected = np.asarray(image.resize((150, 100), Image.BOX).resize((96, 64), Image.BICUBIC))[:, 16:80]
    assert np.array_equal(center_crop_arr(image, 64), expected)
    tall = Image.fromarray(rng.integers(0, 256, (90, 70), dtype=np.uint8))  # grey, no halving
    expected = np.asarray(tall.convert("RGB").resize((64, 82), Image.BICUBIC))[9:73]  # 90 * 64 / 70 = 82.3
    assert np.array_equal(center_crop_arr(tall, 64), expected)


def test_raw_imagenet_folder_uses_adm_preprocessing_and_synset_classes(tmp_path):
    rng = np.random.default_rng(4)
    src = tmp_path / "train"
    expected = Counter()
    for label, synset in enumerate(["n01440764", "n01443537"]):
        (src / synset).mkdir(parents=True)
        for i, size in enumerate([(300, 200), (131, 180), (64, 64)]):
            path = str(src / synset / f"{synset}_{i}.JPEG")
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, "JPEG")
            expected[identity(center_crop_arr(Image.open(path), 64)), label] += 1
    build("--dataset", "imagenet64", "--src", str(src), "--out", str(tmp_path / "out"))
    assert shard_samples(str(tmp_path / "out"), 64, 2) == expected
    with open(tmp_path / "out" / "classes.json") as f:
        assert json.load(f)["classes"] == ["n01440764", "n01443537"]


def test_unlabelled_folder_gives_unconditional_shards(tmp_path):
    rng = np.random.default_rng(5)
    (tmp_path / "imgs").mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    out = str(tmp_path / "out")
    build("--dataset", "folder", "--src", str(tmp_path / "imgs"), "--resolution", "16", "--out", out)
    assert read_manifest(out).num_classes == 0
    assert set(label for _, label in shard_samples(out, 16, 0)) == {None}
    images, labels = next(loader(out, batch_per_rank=5, resolution=16, num_classes=0, hflip=False))
    assert labels.tolist() == [0] * 5 and images.shape == (5, 3, 16, 16)
    with pytest.raises(ValueError, match="data.num_classes=0"):
        loader(out, batch_per_rank=5, resolution=16, num_classes=10)


def test_synthetic_shards_hold_the_procedural_samples(tmp_path):
    out = str(tmp_path / "syn")
    build("--dataset", "synthetic", "--num", "20", "--resolution", "16", "--num-classes", "4", "--seed", "3",
          "--out", out)
    images, labels = synthetic_images(torch.arange(20), 3, 16, 4)
    assert shard_samples(out, 16, 4) == Counter((identity(im), int(l)) for im, l in zip(images, labels))
