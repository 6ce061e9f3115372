"""A run dir on s3:// is held by one run too: the lease protocol against a real local S3 server."""
import json
import os
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


# -- the run dir's own storage options ---------------------------------------------------------------------
TINY = ["model.name=ncsnpp", "model.model_channels=8", "model.channel_mult=[1]", "model.num_blocks=1",
        "model.attn_resolutions=[]", "data.source=synthetic", "data.resolution=8", "data.num_classes=0",
        "data.num_workers=0", "train.batch_size=4", "train.batch_per_gpu=4", "train.total_steps=2",
        "train.grid_every=0", "train.loggers=[jsonl]", "ict.s1=40"]


def test_the_run_dir_is_reached_with_train_storage_options_and_still_with_the_data_key(bucket, monkeypatch, capsys):
    from ict_scale.cli import run as cli_run
    from ict_scale.train.__main__ import main
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the options alone say where the run dir is
    url = f"s3://{bucket}/run"
    reach = f"{{client_kwargs: {{endpoint_url: '{endpoint}'}}}}"
    nowhere = "{client_kwargs: {endpoint_url: 'http://127.0.0.1:9'}}"  # nothing listens there
    # train.storage_options reaches the run dir; data.storage_options (unused by synthetic data) does not.
    args = [*TINY, f"train.run_dir={url}", "train.max_steps_this_run=1"]
    assert cli_run(main, [*args, f"train.storage_options={reach}", f"data.storage_options={nowhere}"]) == 0
    out = capsys.readouterr().out
    assert "deprecated" not in out and f"last checkpoint: {url}/checkpoints/step_000000001" in out
    # Only data.storage_options: as before it also reaches the run dir, with a note that this use is deprecated.
    assert cli_run(main, [*TINY, f"train.run_dir={url}", f"data.storage_options={reach}"]) == 0
    out = capsys.readouterr().out
    assert out.count("data.storage_options also configures train.run_dir") == 1 and "resuming at step 1" in out
    assert Storage(url, {"client_kwargs": {"endpoint_url": endpoint}}).exists("checkpoints/step_000000002/COMMIT")
