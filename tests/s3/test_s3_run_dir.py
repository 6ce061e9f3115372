"""A run dir on s3:// is held by one run too: the lease protocol against a real local S3 server."""
import json
import threading
import time

import pytest

from ict_scale.checkpoint import RunDirBusy, RunLease, Storage

pytestmark = pytest.mark.s3


def lease(url: str, host: str, **kwargs) -> RunLease:
    held = RunLease(Storage(url), timeout_s=30, settle_s=0.5, **kwargs)
    held.host = host  # as if started on another machine
    return held


def test_a_lease_on_s3_refuses_a_second_run_and_is_released(bucket):
    url = f"s3://{bucket}/run"
    first = lease(url, "node-1")
    assert first.acquire() is None
    with pytest.raises(RunDirBusy, match=f"run dir {url} is in use by another run: host node-1 pid {first.pid}"):
        lease(url, "node-2").acquire()
    first.release()
    assert lease(url, "node-2").acquire() is None


def test_of_two_runs_starting_together_on_s3_exactly_one_holds_the_run_dir(bucket):
    url = f"s3://{bucket}/run"
    contenders = [lease(url, f"node-{i}") for i in range(2)]
    outcomes = {}
    barrier = threading.Barrier(2)

    def start(held):
        barrier.wait()  # both read "free" before either writes
        try:
            held.acquire()
            outcomes[held.host] = "holds"
        except RunDirBusy:
            outcomes[held.host] = "refused"

    threads = [threading.Thread(target=start, args=(c,)) for c in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes.values()) == ["holds", "refused"]
    winner = next(c for c in contenders if outcomes[c.host] == "holds")
    loser = next(c for c in contenders if outcomes[c.host] == "refused")
    assert winner.check() is None and loser.check() is not None


def test_a_stale_lease_on_s3_is_taken_over_and_the_heartbeat_renews_ours(bucket):
    url = f"s3://{bucket}/run"
    storage = Storage(url)
    stale = {"host": "node-9", "pid": 7, "token": "t", "heartbeat": time.time() - 60}
    storage.write_text("run.lease", json.dumps(stale))
    ours = lease(url, "node-1")
    note = ours.acquire()
    assert "taking over the lease" in note and "host node-9 pid 7" in note
    before = json.loads(storage.read_bytes("run.lease"))["heartbeat"]
    ours.start_heartbeat(0.2)
    time.sleep(1.0)
    assert json.loads(storage.read_bytes("run.lease"))["heartbeat"] > before
    ours.release()
    assert not storage.exists("run.lease")
