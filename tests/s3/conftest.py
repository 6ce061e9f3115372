"""A real local S3 server (moto in server mode, its own process, 127.0.0.1, a free port) for storage tests.

Also: a second server that denies every request after the first (access-denied bucket), and an
in-process HTTP proxy in front of the main server that fails the first GETs of .tar objects with
HTTP 500 (transient errors). Credentials are fake; no region is set in client_kwargs.
"""
from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest

FAKE_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(extra_env: dict | None = None):
    port = free_port()
    env = {**os.environ, **FAKE_ENV, **(extra_env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            return proc, endpoint
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not start on {endpoint}")
            time.sleep(0.1)


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def moto_endpoint():
    proc, endpoint = start_moto()
    yield endpoint
    stop(proc)


@pytest.fixture(scope="module")
def s3_env(moto_endpoint):
    """Fake credentials and AWS_ENDPOINT_URL in the environment (inherited by worker processes)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {**FAKE_ENV, "AWS_ENDPOINT_URL": moto_endpoint}.items():
            patch.setenv(key, value)
        patch.delenv("AWS_PROFILE", raising=False)
        yield moto_endpoint


def new_bucket(endpoint: str) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def bucket(s3_env) -> str:
    """A fresh bucket on the local server."""
    return new_bucket(s3_env)


@pytest.fixture
def denying_endpoint(monkeypatch):
    """A second server with IAM checks on after one free request (used to create the bucket): any later
    request with our fake credentials is refused with 403."""
    proc, endpoint = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "1"})
    for key, value in FAKE_ENV.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="locked")
    yield endpoint
    stop(proc)


class FlakyProxy:
    """Forwards to `upstream`, answering the first `failures` GETs of .tar objects with HTTP 500."""

    def __init__(self, upstream: str, failures: int):
        self.failures, self.failed = failures, 0
        host, port = upstream.removeprefix("http://").split(":")
        lock, proxy = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def handle_any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    fail = self.command == "GET" and ".tar" in self.path and proxy.failed < proxy.failures
                    proxy.failed += fail
                if fail:
                    return self.reply(500, {"Content-Type": "application/xml"},
                                      b"<Error><Code>InternalError</Code><Message>injected</Message></Error>")
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                conn.request(self.command, self.path, body, headers=dict(self.headers))
                response = conn.getresponse()
                self.reply(response.status, dict(response.getheaders()), response.read())
                conn.close()

            def reply(self, status: int, headers: dict, data: bytes):
                self.send_response(status)
                for key, value in headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = handle_any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky_proxy(moto_endpoint):
    proxies = []

    def make(failures: int) -> FlakyProxy:
        proxies.append(FlakyProxy(moto_endpoint, failures))
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.close()
