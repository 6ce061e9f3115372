"""Shards written to and streamed from a real local S3 server."""
import hashlib
from collections import Counter

import boto3
import numpy as np
import pytest
import torch
import webdataset as wds

from data_prep.make_shards import main as make_shards
from ict_scale.data import DataConfig, StorageError, build_loader
from ict_scale.data.samples import decode_image, parse_tar

pytestmark = pytest.mark.s3
NUM, SHARD, RES = 200, 48, 8  # five shards: 4 x 48 + 8


def identity(image) -> bytes:
    array = image.permute(1, 2, 0).numpy() if isinstance(image, torch.Tensor) else image
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).digest()


def write_shards(bucket: str, workers: int = 0) -> str:
    out = f"s3://{bucket}/syn"
    make_shards(["--dataset", "synthetic", "--num", str(NUM), "--resolution", str(RES), "--shard-size",
                 str(SHARD), "--out", out, "--workers", str(workers), "--quiet"])
    return out


@pytest.fixture(scope="module")
def shared(s3_env) -> tuple[str, Counter]:
    """One shard set (and its stored samples) for the tests that only read."""
    from conftest import new_bucket
    bucket = new_bucket(s3_env)
    return write_shards(bucket), stored(s3_env, bucket)


def stored(endpoint: str, bucket: str) -> Counter:
    client = boto3.client("s3", endpoint_url=endpoint)
    found = Counter()
    for obj in client.list_objects_v2(Bucket=bucket, Prefix="syn/")["Contents"]:
        if obj["Key"].endswith(".tar"):
            data = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            found.update(identity(decode_image(s, RES)) for s in parse_tar(data).samples)
    return found


def s3_loader(source: str, rank: int = 0, world_size: int = 1, batch_per_rank: int = 25, **overrides):
    cfg = DataConfig(source=source, resolution=RES, **{"num_workers": 2, "pin_memory": False, "hflip": False,
                                                       **overrides})
    return build_loader(cfg, batch_per_rank=batch_per_rank, rank=rank, world_size=world_size, seed=0)


def test_make_shards_to_s3_then_stream_each_sample_once_over_ranks_and_workers(bucket, s3_env, capsys):
    out = write_shards(bucket, workers=2)  # a process pool uploading to S3
    expected = stored(s3_env, bucket)
    assert sum(expected.values()) == NUM and len(expected) == NUM
    seen = Counter()
    for rank in range(2):  # 2 ranks x 2 workers; one epoch is 4 global batches of 2 x 25
        stream = s3_loader(f"{out}/manifest.json", rank=rank, world_size=2)
        for _ in range(4):
            seen.update(identity(im) for im in next(stream)[0])
        stream.close()
    assert seen == expected
    capsys.readouterr()
    write_shards(bucket)  # a rerun verifies every stored shard by sha256 and rewrites none
    assert "(5 reused)" in capsys.readouterr().err


def test_forkserver_workers_register_the_s3_opener_at_import(shared):
    out, expected = shared
    images, _ = next(s3_loader(out, batch_per_rank=NUM, worker_start_method="forkserver"))  # a directory source
    assert Counter(identity(im) for im in images) == expected


def test_plain_webdataset_pipeline_reads_s3_in_dataloader_workers(shared):
    """Any webdataset pipeline in a process that imported ict_scale.data opens s3:// through fsspec."""
    out, _ = shared
    pipeline = wds.WebDataset(f"{out}/train-{{000000..000004}}.tar", shardshuffle=False, empty_check=False)
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=2)
    assert sum(1 for sample in loader if "png" in sample) == NUM


def test_missing_shard_and_missing_bucket_fail_fast_with_the_url(bucket, s3_env):
    out = write_shards(bucket)
    boto3.client("s3", endpoint_url=s3_env).delete_object(Bucket=bucket, Key="syn/train-000002.tar")
    with pytest.raises(StorageError, match=rf"s3://{bucket}/syn/train-000002.tar: shard not found"):
        s3_loader(out)
    with pytest.raises(StorageError, match=r"s3://no-such-bucket-x/syn/manifest.json: cannot read \(FileNotFound"):
        s3_loader("s3://no-such-bucket-x/syn/manifest.json")


def test_shard_swapped_for_another_of_the_same_size_is_refused_when_read(bucket, s3_env):
    out = write_shards(bucket)
    client = boto3.client("s3", endpoint_url=s3_env)
    first, second = (client.get_object(Bucket=bucket, Key=f"syn/train-00000{i}.tar")["Body"].read() for i in (0, 1))
    assert len(first) == len(second)  # so the start-up size check passes
    client.put_object(Bucket=bucket, Key="syn/train-000000.tar", Body=second)
    client.put_object(Bucket=bucket, Key="syn/train-000001.tar", Body=first)
    with pytest.raises(StorageError, match=rf"s3://{bucket}/syn/train-00000[01].tar: sha256 [0-9a-f]{{64}}, "
                                           r"manifest says [0-9a-f]{64}"):
        next(s3_loader(out, num_workers=0, batch_per_rank=NUM))


def test_unreachable_endpoint_fails_fast_with_the_url_and_cause(s3_env, monkeypatch):
    from conftest import free_port
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(StorageError, match=r"s3://b/p/manifest.json: giving up after 1 attempt "
                                           r"\(endpoint unreachable \(Could not connect"):
        s3_loader("s3://b/p/manifest.json")


def test_access_denied_bucket_fails_fast_with_the_url_and_cause(denying_endpoint):
    with pytest.raises(StorageError, match=r"s3://locked/p/manifest.json: cannot read \(PermissionError"):
        s3_loader("s3://locked/p/manifest.json", storage_options={"client_kwargs": {"endpoint_url": denying_endpoint}})


def test_transient_errors_are_retried_with_backoff(shared, flaky_proxy):
    out, expected = shared
    # botocore's own retries off, so that the loader's backoff is what recovers
    options = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}
    proxy = flaky_proxy(failures=3)
    images, _ = next(s3_loader(out, batch_per_rank=NUM, num_workers=0, io_retries=5, io_backoff_s=0.01,
                               storage_options={**options, "client_kwargs": {"endpoint_url": proxy.endpoint}}))
    assert proxy.failed == 3 and Counter(identity(im) for im in images) == expected
    proxy = flaky_proxy(failures=3)
    stream = s3_loader(out, batch_per_rank=NUM, num_workers=0, io_retries=2, io_backoff_s=0.01, prefetch_shards=1,
                       storage_options={**options, "client_kwargs": {"endpoint_url": proxy.endpoint}})
    with pytest.raises(StorageError, match=r"train-\d{6}.tar: giving up after 2 attempts \(OSError"):
        next(stream)
