"""The run directory as a user meets it: held by one run, never left unusable, honest about what it holds.

Runs go through the command line's `main` on CPU (the tiny recipe of test_train), so the messages tested are
the ones printed.
"""
import json
import os
import pickle
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time

import pytest

from ict_scale.checkpoint import COMMIT, CheckpointManager, IncompleteCheckpoint, RunLease, Storage
from ict_scale.cli import run as cli_run
from ict_scale.train.__main__ import main

from test_train import TINY

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli(run_dir, *extra) -> int:
    return cli_run(main, [*TINY, f"train.run_dir={run_dir}", *extra])


def ckpt(run_dir, step) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step:09d}")


# -- nothing lost: the config of a refused resume, a finished run -------------------------------------
def test_a_refused_resume_leaves_config_yaml_as_it_was(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli(run_dir, "train.total_steps=2") == 0
    before = (run_dir / "config.yaml").read_text()
    capsys.readouterr()
    assert cli(run_dir, "train.total_steps=2", "ict.s1=80") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot resume") and "ict:" in err and len(err.splitlines()) == 1
    assert (run_dir / "config.yaml").read_text() == before  # still describes the checkpoints


def test_rerunning_a_finished_run_says_it_is_complete_and_where_the_outputs_are(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli(run_dir, "train.total_steps=2") == 0
    capsys.readouterr()
    assert cli(run_dir, "train.total_steps=2") == 0
    out = capsys.readouterr().out
    assert "run complete" in out and "resuming at" not in out
    for where in ("samples/latest_1step.png", "samples/latest_2step.png", "metrics.jsonl",
                  "checkpoints/step_000000002"):
        assert f"{run_dir}/{where}" in out


# -- one run per run dir -------------------------------------------------------------------------------
HOLD = """
import sys, time
from ict_scale.checkpoint import RunLease, Storage
lease = RunLease(Storage(sys.argv[1]), timeout_s=60)
lease.acquire()
lease.start_heartbeat(0.2)
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_a_held_run_dir_is_refused_with_host_and_pid(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli(run_dir, "train.total_steps=2") == 2
        err = capsys.readouterr().err.strip()
        assert err == err.splitlines()[0]  # one line
        assert f"run dir {run_dir} is in use by another run: host {socket.gethostname()} pid {holder.pid}" in err
        assert not (run_dir / "config.yaml").exists() and not (run_dir / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    # Its process is gone: the lease it left is taken over at once (same host, no such pid).
    capsys.readouterr()
    assert cli(run_dir, "train.total_steps=2") == 0
    out = capsys.readouterr().out
    assert f"taking over the lease of run dir {run_dir} from host {socket.gethostname()} pid {holder.pid}" in out
    assert not (run_dir / "run.lease").exists()  # released at the end


def test_a_stale_lease_of_another_host_is_taken_over_with_a_message(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.lease").write_text(json.dumps({"host": "node-7", "pid": 4242, "token": "x",
                                                    "heartbeat": time.time() - 3600}))
    assert cli(run_dir, "train.total_steps=1") == 0
    out = capsys.readouterr().out
    assert "taking over the lease" in out and "host node-7 pid 4242" in out
    assert re.search(r"its last heartbeat was 36\d\d s ago \(> 300 s\)", out)


def test_a_live_lease_of_another_host_is_refused(tmp_path):
    storage = Storage(str(tmp_path))
    storage.write_text("run.lease", json.dumps({"host": "node-7", "pid": 4242, "token": "x", "heartbeat": time.time()}))
    with pytest.raises(RuntimeError, match="in use by another run: host node-7 pid 4242"):
        RunLease(storage, timeout_s=60).acquire()


def test_a_lease_taken_over_is_noticed_by_its_old_holder(tmp_path):
    storage = Storage(str(tmp_path))
    first = RunLease(storage, timeout_s=60)
    first.acquire()
    assert first.check() is None
    other = {"host": "node-7", "pid": 1, "token": "other", "heartbeat": time.time()}
    storage.write_text("run.lease", json.dumps(other))
    assert "taken over by another run: host node-7 pid 1" in first.check()
    first.release()
    assert storage.exists("run.lease")  # not ours any more: left alone


# -- a checkpoint is complete only with all its files ---------------------------------------------------
def test_a_marked_checkpoint_with_a_file_missing_is_skipped_and_reported(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ("train.total_steps=4", "train.ckpt_every=1", "train.keep_last=3")
    assert cli(run_dir, *args, "train.max_steps_this_run=3") == 0
    os.remove(os.path.join(ckpt(run_dir, 3), ".metadata"))  # a COMMIT marker on a checkpoint without metadata
    capsys.readouterr()
    assert cli(run_dir, *args) == 0
    out = capsys.readouterr().out
    assert f"skipping checkpoint {ckpt(run_dir, 3)}: marked complete, but .metadata is missing" in out
    assert "resuming at step 2" in out


def test_commit_is_refused_when_a_file_of_the_checkpoint_is_missing(tmp_path, capsys, monkeypatch):
    from ict_scale.parallel.backend import Backend
    save = Backend.save

    def save_then_lose_a_shard(self, url, *args, **kwargs):
        pending = save(self, url, *args, **kwargs)
        os.remove(os.path.join(url, "__0_0.distcp"))
        return pending

    monkeypatch.setattr(Backend, "save", save_then_lose_a_shard)
    run_dir = tmp_path / "run"
    assert cli(run_dir, "train.total_steps=1") == 2
    err = capsys.readouterr().err
    assert f"checkpoint {ckpt(run_dir, 1)} is not marked complete: __0_0.distcp (listed in .metadata) is missing" in err
    assert not os.path.exists(os.path.join(ckpt(run_dir, 1), COMMIT))


def test_manager_refuses_to_commit_an_unverified_checkpoint(tmp_path):
    manager = CheckpointManager(Storage(str(tmp_path)), verify=lambda url: [".metadata is missing"])
    manager.begin(5)
    with pytest.raises(IncompleteCheckpoint, match="step_000000005 is not marked complete: .metadata is missing"):
        manager.commit(5)
    assert manager.complete_steps() == []


# -- checkpoints are data, not code ----------------------------------------------------------------------
class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_metadata_that_would_run_code_is_refused(tmp_path, capsys):
    from ict_scale.parallel import dcp_io
    from ict_scale.checkpoint.load import load_ema_model
    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    args = ("train.total_steps=3", "train.ckpt_every=1")
    assert cli(run_dir, *args, "train.max_steps_this_run=2") == 0
    with open(os.path.join(ckpt(run_dir, 2), ".metadata"), "wb") as f:
        pickle.dump(_RunsCode(marker), f)
    # DCP's own load path reads .metadata through the same allow-list (DCP wraps the error per rank).
    with pytest.raises(BaseException, match="refusing to unpickle posix.system"):
        dcp_io.load_ema(ckpt(run_dir, 2), {})
    with pytest.raises(FileNotFoundError, match="refusing to unpickle posix.system"):
        load_ema_model(ckpt(run_dir, 2))
    capsys.readouterr()
    assert cli(run_dir, *args) == 0  # the crafted checkpoint is skipped: resumed from step 1
    out = capsys.readouterr().out
    assert "refusing to unpickle posix.system" in out and "resuming at step 1" in out
    assert not marker.exists()


# -- the optimiser runs with what config.yaml records ------------------------------------------------------
def test_a_changed_lr_is_applied_on_resume_and_reported(tmp_path, capsys):
    from ict_scale.config import load_config
    from ict_scale.train.loop import train
    run_dir = tmp_path / "run"
    assert cli(run_dir, "train.total_steps=3", "optim.lr=1e-3", "train.max_steps_this_run=1") == 0
    capsys.readouterr()
    run = train(load_config([], [*TINY, f"train.run_dir={run_dir}", "train.total_steps=3", "optim.lr=5e-4",
                                 "optim.beta2=0.99"]))
    assert run.step == 3
    assert all(g["lr"] == 5e-4 and tuple(g["betas"]) == (0.9, 0.99) for g in run.backend.optimizer.param_groups)
    out = capsys.readouterr().out
    assert "optim.lr 0.001 -> 0.0005" in out and "optim.beta1/beta2" in out
    lrs = [json.loads(line)["lr"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lrs == [1e-3, 5e-4, 5e-4]
    assert "lr: 0.0005" in (run_dir / "config.yaml").read_text()


# -- the sample order cannot change under a resumed run -----------------------------------------------------
def test_resume_with_shuffle_flipped_is_refused_naming_the_key(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli(run_dir, "train.total_steps=2", "train.max_steps_this_run=1") == 0
    capsys.readouterr()
    assert cli(run_dir, "train.total_steps=2", "data.shuffle=false") == 2
    err = capsys.readouterr().err
    assert "error: cannot resume" in err and "data.shuffle: checkpoint True, now False" in err


def _shards(path, num):
    from data_prep.make_shards import main as make_shards
    make_shards(["--dataset", "synthetic", "--num", str(num), "--shard-size", "8", "--resolution", "8",
                 "--num-classes", "4", "--out", str(path), "--workers", "0", "--quiet"])
    return path


def test_a_moved_copy_of_the_shards_resumes_and_other_shards_are_refused(tmp_path, capsys):
    first, moved, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _shards(first, 24)
    shutil.copytree(first, moved)
    _shards(other, 32)
    run_dir = tmp_path / "run"
    args = ("train.total_steps=3", "data.hflip=false")
    assert cli(run_dir, *args, f"data.source={first}/manifest.json", "train.max_steps_this_run=1") == 0
    capsys.readouterr()
    assert cli(run_dir, *args, f"data.source={other}/manifest.json") == 2
    err = capsys.readouterr().err
    assert "error: cannot resume" in err and "data.source" in err and "the data differs" in err
    assert cli(run_dir, *args, f"data.source={moved}/manifest.json", "train.max_steps_this_run=1") == 0
    out = capsys.readouterr().out
    assert "data.source moved" in out and "resuming at step 1" in out
    # The identity is the data's, not the path's: other shards where the checkpoint's were are refused.
    shutil.rmtree(moved)
    shutil.copytree(other, moved)
    assert cli(run_dir, *args, f"data.source={moved}/manifest.json") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error: cannot resume" in err
    assert f"the data differs: data.source='{moved}/manifest.json' holds other samples" in err


# -- metrics.jsonl is strict JSON ------------------------------------------------------------------------------
def _strict(line: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(line, parse_constant=refuse)


def test_metrics_of_a_diverging_run_are_strict_json(tmp_path):
    from ict_scale.config import load_config
    from ict_scale.train.loop import train
    from ict_scale.train.run import DivergenceError
    run_dir = tmp_path / "run"
    with pytest.raises(DivergenceError):
        train(load_config([], [*TINY, f"train.run_dir={run_dir}", "optim.lr=1e30", "train.total_steps=50",
                               "train.max_nonfinite_steps=3", "train.ckpt_every=1"]))
    records = [_strict(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r["loss"] is None for r in records)  # a non-finite loss is written as null


# -- a full disk -------------------------------------------------------------------------------------------------
FULL_DISK = r"""
import contextlib, io, json, os, sys
from ict_scale.cli import run
from ict_scale.train.__main__ import main
mount, args = sys.argv[1], json.loads(sys.argv[2])
run_dir = os.path.join(mount, "run")
def train(*extra):  # the command line's main, in this process (one torch import for all four runs)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = run(main, [*args, f"train.run_dir={run_dir}", *extra])
    return {"rc": rc, "out": out.getvalue(), "err": err.getvalue()}
steps = {"first": train("train.max_steps_this_run=1")}
st = os.statvfs(mount)
with open(os.path.join(mount, "filler"), "wb") as f:  # leaves 1 MiB: less than a checkpoint
    f.write(b"\0" * (st.f_bavail * st.f_frsize - (1 << 20)))
steps["full"] = train("train.max_steps_this_run=1")
steps["still_full"] = train("train.max_steps_this_run=1")
steps["ckpts"] = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
steps["marked"] = sorted(n for n in steps["ckpts"] if os.path.exists(os.path.join(run_dir, "checkpoints", n, "COMMIT")))
print(json.dumps(steps))
"""


def test_a_full_disk_is_named_and_its_partial_checkpoint_removed_at_the_next_start(tmp_path):
    """A 10 MiB tmpfs (own user and mount namespace) holds two tiny checkpoints; a filler leaves too little."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("needs unshare with user namespaces to mount a small tmpfs")
    args = [*TINY, "train.total_steps=3", "train.ckpt_every=1", "train.keep_last=1"]
    script = " ".join(["mount -t tmpfs -o size=10m tmpfs", shlex.quote(str(mount)), "&& exec",
                       *map(shlex.quote, [sys.executable, "-c", FULL_DISK, str(mount), json.dumps(args)])])
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = json.loads(done.stdout.strip().splitlines()[-1])
    assert steps["first"]["rc"] == 0, steps["first"]["err"][-3000:]
    full = steps["full"]
    assert full["rc"] == 2, full["err"][-3000:]
    line = full["err"].strip().splitlines()[-1]
    assert line.startswith(f"error: no space left on {mount}/run") and "checkpoint step 2 was not written" in line
    # The partial save filled the disk; the next start removes it before writing anything, and fails only
    # where the disk is still too small: at the checkpoint, with the same one line.
    again = steps["still_full"]
    assert f"removed 1 partial checkpoint(s)" in again["out"] and "resuming at step 1" in again["out"]
    assert again["rc"] == 2 and "error: no space left on" in again["err"]
    assert steps["ckpts"] == ["step_000000001", "step_000000002"]  # the committed one is kept, the new partial too
    assert steps["marked"] == ["step_000000001"]


def test_a_full_disk_outside_a_checkpoint_is_one_line_too(tmp_path, capsys, monkeypatch):
    import errno

    def full(self, rel, record):
        raise OSError(errno.ENOSPC, "No space left on device", f"{self.root}/{rel}")

    monkeypatch.setattr(Storage, "append_record", full)  # the first metrics line meets a full disk
    run_dir = tmp_path / "run"
    assert cli(run_dir, "train.total_steps=1") == 2
    assert capsys.readouterr().err.strip() == f"error: no space left on device writing {run_dir}/metrics.jsonl"
    assert not (run_dir / "run.lease").exists()  # released on the way out
