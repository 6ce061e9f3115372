"""Bad input: each kind of broken sample is skipped and counted; too many, or missing shards, fail clearly."""
import io
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_helpers import good_sample, identity, loader, png, shard_tar, take, write_shard_set
from ict_scale.data import DataError, StorageError
from ict_scale.data.manifest import Manifest
from ict_scale.data.samples import decode_image, parse_tar

GOOD = 10
REPO = Path(__file__).resolve().parents[2]


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height (a decompression bomb is refused on the header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_sample(reason: str, rng) -> dict:
    sample = good_sample(rng, "bad")
    if reason == "no_image":
        del sample["png"]
        sample["txt"] = b"not an image"
    elif reason == "undecodable":
        sample["png"] = b"\x89PNG\r\n\x1a\n" + b"garbage" * 10
    elif reason == "wrong_size":
        sample["png"] = png(np.zeros((16, 8, 3), np.uint8))
    elif reason == "bomb":
        sample["png"] = png_claiming(100_000, 100_000)
    elif reason == "bad_label":
        sample["cls"] = b"10"  # num_classes is 10
    elif reason == "missing_label":
        del sample["cls"]
    return sample


@pytest.mark.parametrize("reason", ["no_image", "undecodable", "wrong_size", "bomb", "bad_label", "missing_label"])
def test_bad_sample_is_skipped_counted_and_replaced(tmp_path, reason):
    rng = np.random.default_rng(0)
    samples = [good_sample(rng, f"{i:03d}") for i in range(GOOD)] + [bad_sample(reason, rng)]
    root = write_shard_set(str(tmp_path), [shard_tar(samples)], [GOOD + 1])
    stream = loader(root, batch_per_rank=GOOD + 1, hflip=False, max_skip_rate=0.5)
    images, _ = next(stream)  # one epoch
    counted = "wrong_size" if reason == "bomb" else reason
    assert stream.skip_counts()[counted] == 1 and sum(stream.skip_counts().values()) == 1
    assert images.shape[0] == GOOD + 1  # the slot is filled by another sample of the same shard
    assert set(identity(im) for im in images) == set(identity(decode_image(s, 8)) for s in samples[:GOOD])


@pytest.mark.parametrize("damage", ["truncated", "bad_header"])
def test_corrupt_tar_counts_lost_samples(tmp_path, damage):
    rng = np.random.default_rng(1)
    data = bytearray(shard_tar([good_sample(rng, f"{i:03d}") for i in range(GOOD)]))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        offset = tar.getmember("006.png").offset_data  # where sample 6's image bytes start
    if damage == "truncated":
        data = data[: offset + 100]  # cut inside sample 6's image
    else:
        data[offset - 512: offset] = b"\xff" * 512  # smash sample 6's image header
    kept = len(parse_tar(bytes(data)).samples)
    assert kept == 6
    root = write_shard_set(str(tmp_path), [bytes(data)], [GOOD])
    stream = loader(root, batch_per_rank=GOOD, max_skip_rate=0.9)
    images, _ = next(stream)
    assert images.shape[0] == GOOD
    assert stream.skip_counts()["corrupt_tar"] == GOOD - kept


@pytest.mark.parametrize("num_workers", [0, 2])
def test_counters_add_up_over_workers_and_restarts(tmp_path, num_workers):
    """The bad sample is met once per epoch (one epoch per batch here), by whichever worker reads it;
    the rank's counter sums workers and carries over a restart from a state."""
    rng = np.random.default_rng(2)
    samples = [good_sample(rng, f"{i:03d}") for i in range(GOOD)] + [bad_sample("bad_label", rng)]
    root = write_shard_set(str(tmp_path), [shard_tar(samples)], [GOOD + 1])
    stream = loader(root, batch_per_rank=GOOD + 1, num_workers=num_workers, max_skip_rate=0.5)
    take(stream, 4)
    assert stream.skip_counts()["bad_label"] == 4
    stream.load_state_dict(stream.state_dict())  # restarts the stream at the same position
    take(stream, 1)
    assert stream.skip_counts()["bad_label"] == 5


def test_counters_continue_in_a_new_loader_from_a_state_summed_over_ranks(tmp_path):
    """A resumed run's loaders start from the counters in the state: the whole run's, as the trainer
    sums them over ranks (here two ranks that met the same samples) and saves them."""
    rng = np.random.default_rng(2)
    samples = [good_sample(rng, f"{i:03d}") for i in range(GOOD)] + [bad_sample("bad_label", rng)]
    root = write_shard_set(str(tmp_path), [shard_tar(samples)], [GOOD + 1])
    first = loader(root, batch_per_rank=GOOD + 1, max_skip_rate=0.5)
    take(first, 3)
    two_ranks = lambda counts: {k: 2 * v for k, v in counts.items()}  # noqa: E731
    state = first.state_dict(skips=first.skip_counts(two_ranks))
    assert state["skips"]["bad_label"] == 6
    first.close()
    resumed = loader(root, batch_per_rank=GOOD + 1, max_skip_rate=0.5)
    resumed.load_state_dict(state)
    take(resumed, 1)
    assert resumed.skip_counts()["bad_label"] == 7  # this rank's one more
    assert resumed.skip_counts(two_ranks)["bad_label"] == 8  # the saved totals are not counted twice
    assert resumed.state_dict()["skips"]["bad_label"] == 7


def test_skip_rate_applies_after_one_epoch_of_a_small_data_set(tmp_path):
    """5 bad samples in 100: the default limit (1%) must stop a run that reads 100 samples per worker,
    although that is fewer than data.min_samples_for_skip_rate (1,000)."""
    rng = np.random.default_rng(10)
    samples = [good_sample(rng, f"{i:03d}") for i in range(95)]
    samples += [{**bad_sample("undecodable", rng), "__key__": f"bad{i}"} for i in range(5)]
    root = write_shard_set(str(tmp_path), [shard_tar(samples[:50]), shard_tar(samples[50:])], [50, 50])
    stream = loader(root, batch_per_rank=20)
    with pytest.raises(DataError, match=r"skipped 5 of 100 samples .*max_skip_rate=1.00%"):
        take(stream, 6)


def test_skip_rate_above_limit_raises_a_clear_error(tmp_path):
    rng = np.random.default_rng(3)
    samples = [good_sample(rng, f"{i:03d}") for i in range(GOOD)] + [bad_sample("undecodable", rng)] * 3
    for i, s in enumerate(samples[GOOD:]):
        samples[GOOD + i] = {**s, "__key__": f"bad{i}"}
    root = write_shard_set(str(tmp_path), [shard_tar(samples)], [len(samples)])
    stream = loader(root, batch_per_rank=13, num_workers=2, max_skip_rate=0.1, min_samples_for_skip_rate=13)
    with pytest.raises(DataError, match=r"skipped 3 of 13 samples .*max_skip_rate.*undecodable: 3"):
        next(stream)


def test_unusable_shard_names_itself(tmp_path):
    rng = np.random.default_rng(4)
    samples = [{**bad_sample("wrong_size", rng), "__key__": f"{i}"} for i in range(3)]
    root = write_shard_set(str(tmp_path), [shard_tar(samples)], [3])
    with pytest.raises(DataError, match=r"train-000000.tar: no usable sample"):
        next(loader(root, batch_per_rank=3, max_skip_rate=1.0))


def test_missing_shard_fails_fast_with_its_url(tmp_path):
    rng = np.random.default_rng(5)
    tars = [shard_tar([good_sample(rng, f"{s}{i}") for i in range(4)]) for s in range(2)]
    root = write_shard_set(str(tmp_path), tars, [4, 4])
    os.remove(os.path.join(root, "train-000001.tar"))
    with pytest.raises(StorageError, match=r"train-000001.tar: shard not found"):
        loader(root, batch_per_rank=4)
    # Without the start-up listing, the first read names the URL (from inside a DataLoader worker).
    stream = loader(root, batch_per_rank=8, check_shards=False, num_workers=1, io_retries=1)
    with pytest.raises(StorageError, match=r"train-000001.tar: cannot read \(FileNotFoundError"):
        next(stream)


def test_shard_changed_since_manifest_fails_fast(tmp_path):
    rng = np.random.default_rng(6)
    root = write_shard_set(str(tmp_path), [shard_tar([good_sample(rng, "a")])], [1])
    with open(os.path.join(root, "train-000000.tar"), "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(StorageError, match="manifest says"):
        loader(root, batch_per_rank=1)


def same_size_shards(tmp_path) -> str:
    """Two shards of equal byte size (every 8x8 PNG fits one 512-byte tar block)."""
    rng = np.random.default_rng(9)
    tars = [shard_tar([good_sample(rng, f"{s}{i}") for i in range(4)]) for s in range(2)]
    assert len(tars[0]) == len(tars[1])
    return write_shard_set(str(tmp_path), tars, [4, 4])


def test_shard_swapped_for_another_of_the_same_size_is_refused_when_read(tmp_path):
    root = same_size_shards(tmp_path)
    manifest = Manifest.from_json(open(os.path.join(root, "manifest.json")).read(), "manifest.json")
    first, second = (os.path.join(root, s.name) for s in manifest.shards)
    os.rename(first, first + ".x")
    os.rename(second, first)
    os.rename(first + ".x", second)
    stream = loader(root, batch_per_rank=8)  # the sizes still match the manifest
    expected = {s.name: s.sha256 for s in manifest.shards}
    with pytest.raises(StorageError, match=rf"train-00000[01].tar: sha256 ({expected['train-000001.tar']}|"
                                           rf"{expected['train-000000.tar']}), manifest says "):
        next(stream)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_wrong_sha256_in_the_manifest_names_the_shard_and_both_digests(tmp_path, num_workers):
    root = same_size_shards(tmp_path)
    path = os.path.join(root, "manifest.json")
    manifest = Manifest.from_json(open(path).read(), path)
    actual = manifest.shards[1].sha256
    manifest.shards[1].sha256 = "0" * 64
    with open(path, "w") as f:
        f.write(manifest.to_json())
    stream = loader(root, batch_per_rank=8, num_workers=num_workers)
    with pytest.raises(StorageError, match=rf"train-000001.tar: sha256 {actual}, manifest says {'0' * 64} "):
        next(stream)


def test_pipe_urls_are_refused_unless_allowed(tmp_path):
    rng = np.random.default_rng(7)
    root = write_shard_set(str(tmp_path / "s"), [shard_tar([good_sample(rng, f"{i}") for i in range(4)])], [4])
    marker = tmp_path / "ran"
    for source in (f"pipe:touch {marker}; cat {root}/train-000000.tar", f"pipe:touch {marker}{{0..1}}"):
        with pytest.raises(StorageError, match="refused a 'pipe:' URL"):
            loader(source, batch_per_rank=4)
    assert not any(p.name.startswith("ran") for p in tmp_path.iterdir())
    # allow_pipe opts in (no manifest beside a pipe: the samples are counted by reading the shard)
    images, _ = next(loader(f"pipe:cat {root}/train-000000.tar", batch_per_rank=4, allow_pipe=True))
    assert images.shape == (4, 3, 8, 8)


PIPE_SPELLINGS = ["PIPE:", "Pipe:", " pipe:", "pi\tpe:"]  # webdataset opens each of these as a shell pipe

REFUSE_UNDER_O = """
import sys
from ict_scale.data import DataConfig, StorageError, build_loader
for source in sys.argv[1:]:
    try:
        next(build_loader(DataConfig(source=source, resolution=8, num_workers=0, pin_memory=False),
                          batch_per_rank=4, rank=0, world_size=1, seed=0))
        print("opened", repr(source))
    except StorageError as e:
        print("refused" if "refused a 'pipe:' URL" in str(e) else f"other error {e}")
"""


def test_pipe_urls_in_any_spelling_are_refused_also_under_python_O(tmp_path):
    """Upper case and blanks pass a plain startswith('pipe:') but still reach webdataset's pipe handler,
    whose only guard is an assert: gone under `python -O`."""
    rng = np.random.default_rng(7)
    root = write_shard_set(str(tmp_path / "s"), [shard_tar([good_sample(rng, f"{i}") for i in range(4)])], [4])
    sources = [f"{p}touch {tmp_path}/ran{i}; cat {root}/train-000000.tar" for i, p in enumerate(PIPE_SPELLINGS)]
    for source in sources:
        with pytest.raises(StorageError, match="refused a 'pipe:' URL"):
            loader(source, batch_per_rank=4)
    out = subprocess.run([sys.executable, "-O", "-c", REFUSE_UNDER_O, *sources], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.stdout.split("\n")[:-1] == ["refused"] * len(sources), out.stdout + out.stderr[-2000:]
    assert not any(p.name.startswith("ran") for p in tmp_path.iterdir())


def test_config_that_does_not_match_the_shards_is_an_error(tmp_path):
    rng = np.random.default_rng(8)
    root = write_shard_set(str(tmp_path), [shard_tar([good_sample(rng, "a")])], [1], num_classes=10)
    with pytest.raises(ValueError, match="data.resolution=32"):
        loader(root, batch_per_rank=1, resolution=32)
    with pytest.raises(ValueError, match="shards have 10 classes but data.num_classes=1000"):
        loader(root, batch_per_rank=1, num_classes=1000)
    labels = next(loader(root, batch_per_rank=2, num_classes=0))[1]  # unconditional on labelled shards
    assert labels.tolist() == [0, 0]
    assert next(loader(root, batch_per_rank=2, drop_labels=True))[1].tolist() == [0, 0]
    assert Counter(next(loader(root, batch_per_rank=2))[1].tolist()) == {1: 2}
