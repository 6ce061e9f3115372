"""Fixtures of the multi-process CPU (gloo) tests; the helpers live in workers/harness.py."""
from __future__ import annotations

import pytest

from workers.harness import free_port


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 with bucket 'ckpt'; yields the fsspec storage options."""
    from moto.server import ThreadedMotoServer
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
    import s3fs
    s3fs.S3FileSystem(**opts).mkdir("ckpt")
    yield opts
    server.stop()
