"""The trainer-facing contract, shown on the synthetic source: batch slices, flips, labels, state."""
import io
import os
import pickle
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from data_helpers import loader, shard_tar, take, write_shard_set
from ict_scale.data.synthetic import synthetic_images


def test_synthetic_global_batch_slices_per_rank():
    """Global batch k = indices [k*B, (k+1)*B); rank r gets its contiguous slice."""
    for rank in range(3):
        images, labels = take(loader("synthetic", batch_per_rank=4, rank=rank, world_size=3, hflip=False,
                                     num_workers=2, synthetic_seed=9), 2)
        indices = torch.cat([torch.arange(k * 12 + rank * 4, k * 12 + rank * 4 + 4) for k in range(2)])
        expected_images, expected_labels = synthetic_images(indices, 9, 8, 10)
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)


def test_hflip_is_a_seeded_coin_per_global_position():
    plain = take(loader("synthetic", batch_per_rank=64, hflip=False), 2)[0]
    flipped = take(loader("synthetic", batch_per_rank=64, seed=1), 2)[0]
    again = take(loader("synthetic", batch_per_rank=32, world_size=2, rank=0, seed=1, num_workers=2), 2)[0]
    is_flipped = torch.tensor([torch.equal(f, p.flip(-1)) and not torch.equal(f, p) for f, p in zip(flipped, plain)])
    is_plain = torch.tensor([torch.equal(f, p) for f, p in zip(flipped, plain)])
    assert (is_flipped | is_plain).all() and 40 < is_flipped.sum() < 88  # about half of 128
    assert torch.equal(again[:32], flipped[:32]) and torch.equal(again[32:], flipped[64:96])  # rank 0's slices
    other_seed = take(loader("synthetic", batch_per_rank=64, seed=2), 2)[0]
    assert not torch.equal(other_seed, flipped)


def test_labels_dropped_or_unconditional_are_zero():
    assert take(loader("synthetic", batch_per_rank=8, drop_labels=True), 1)[1].tolist() == [0] * 8
    assert take(loader("synthetic", batch_per_rank=8, num_classes=0), 1)[1].tolist() == [0] * 8


def test_state_is_small_plain_and_resumes_exactly():
    reference = take(loader("synthetic", batch_per_rank=6, num_workers=2), 5)[0]
    first = loader("synthetic", batch_per_rank=6, num_workers=2)
    head = take(first, 2)[0]
    state = pickle.loads(pickle.dumps(first.state_dict()))
    assert state["position"] == 12 and first.skip_counts() == {}
    first.close()
    second = loader("synthetic", batch_per_rank=6, num_workers=1)
    second.load_state_dict(state)
    assert torch.equal(torch.cat([head, take(second, 3)[0]]), reference)


def test_png_jpeg_webp_and_non_rgb_members_decode_to_rgb_uint8(tmp_path):
    def encoded(image: Image.Image, fmt: str) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        return buf.getvalue()

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    samples = [{"__key__": "a", "png": encoded(rgb, "PNG"), "cls": b"1"},
               {"__key__": "b", "webp": encoded(rgb, "WEBP"), "cls": b"2"},
               {"__key__": "c", "jpg": encoded(rgb, "JPEG"), "cls": b"3"},
               {"__key__": "d", "png": encoded(rgb.convert("L"), "PNG"), "cls": b"4"},
               {"__key__": "e", "png": encoded(rgb.convert("P"), "PNG"), "cls": b"5"}]
    root = write_shard_set(str(tmp_path), [shard_tar(samples)], [5])
    images, labels = next(loader(root, batch_per_rank=5, hflip=False, shuffle=False))
    def chw(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)

    assert images.dtype == torch.uint8 and images.shape == (5, 3, 8, 8) and labels.tolist() == [1, 2, 3, 4, 5]
    assert torch.equal(images[0], chw(rgb)) and torch.equal(images[1], chw(rgb))  # lossless
    assert torch.equal(images[2], chw(Image.open(io.BytesIO(samples[2]["jpg"]))))
    assert torch.equal(images[3], chw(rgb.convert("L")))  # grey replicated to 3 channels
    assert torch.equal(images[4], chw(rgb.convert("P")))  # palette expanded



def test_a_process_exits_with_loaders_open_or_failed(tmp_path):
    """Workers ignore SIGTERM, and the DataLoader's shutdown and multiprocessing's exit hook both end workers
    with SIGTERM: neither a loader still open nor one whose worker failed and was dropped may hang the exit."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = ("import gc, os, sys; sys.path.insert(0, sys.argv[1])\n"
            "import numpy as np\n"
            "from data_helpers import good_sample, loader, shard_tar, take, write_shard_set\n"
            "stream = loader('synthetic', batch_per_rank=4, num_workers=2)\n"
            "take(stream, 1)\n"
            "kept = [stream._iterator]  # still referenced at exit, as after an exception in the trainer\n"
            "rng = np.random.default_rng(5)\n"
            "tars = [shard_tar([good_sample(rng, f'{s}{i}') for i in range(4)]) for s in range(2)]\n"
            "root = write_shard_set(sys.argv[2], tars, [4, 4])\n"
            "os.remove(os.path.join(root, 'train-000001.tar'))\n"
            "failed = loader(root, batch_per_rank=8, check_shards=False, num_workers=1, io_retries=1)\n"
            "try:\n"
            "    next(failed)\n"
            "except Exception as e:\n"
            "    print('failed as expected:', type(e).__name__, flush=True)\n"
            "del failed\n"
            "gc.collect()  # the DataLoader's own shutdown leaves the failed worker alive (it ignores SIGTERM)\n")
    proc = subprocess.run([sys.executable, "-c", code, here, str(tmp_path)], capture_output=True, text=True,
                          timeout=90, cwd=os.path.dirname(os.path.dirname(here)))
    assert proc.returncode == 0 and "failed as expected: StorageError" in proc.stdout, proc.stderr[-2000:]
