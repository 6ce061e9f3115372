"""make_shards publishes whole shards only, resumes from a manifest (complete or in progress), and
--overwrite starts clean."""
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from data_prep.make_shards import default_workers, main as make_shards
from ict_scale.data.manifest import Manifest
from ict_scale.data.samples import parse_tar

REPO = Path(__file__).resolve().parents[2]


def synthetic(out: str, *extra: str) -> list[str]:
    return ["--dataset", "synthetic", "--num", "200", "--resolution", "8", "--out", out, "--workers", "0",
            "--quiet", *extra]


def tar_names(out: str) -> list[str]:
    return sorted(n for n in os.listdir(out) if n.endswith(".tar"))


def contents(out: str) -> dict[str, bytes]:
    return {n: Path(out, n).read_bytes() for n in tar_names(out)}


def manifest_matches_files(out: str) -> Manifest:
    manifest = Manifest.from_json(Path(out, "manifest.json").read_text(), "manifest.json")
    assert [s.name for s in manifest.shards] == tar_names(out)
    for s in manifest.shards:
        data = Path(out, s.name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (s.bytes, s.sha256)
        assert len(parse_tar(data).samples) == s.num_samples
    return manifest


def test_rerun_reuses_matching_shards_and_rebuilds_damaged_ones(tmp_path, capsys):
    out = str(tmp_path / "out")
    make_shards(synthetic(out, "--shard-size", "64"))
    original = contents(out)
    make_shards(synthetic(out, "--shard-size", "64"))
    assert "(4 reused)" in capsys.readouterr().err
    Path(out, "train-000001.tar").write_bytes(original["train-000001.tar"][:1000])  # damaged copy
    make_shards(synthetic(out, "--shard-size", "64"))
    assert "(3 reused)" in capsys.readouterr().err
    assert contents(out) == original  # shard bytes are reproducible
    manifest_matches_files(out)


def test_resume_from_manifest_in_progress(tmp_path, capsys):
    """An interrupted run leaves manifest.partial.json listing the shards it finished; a rerun keeps them."""
    out = str(tmp_path / "out")
    make_shards(synthetic(out, "--shard-size", "64"))
    os.rename(Path(out, "manifest.json"), Path(out, "manifest.partial.json"))
    os.remove(Path(out, "train-000003.tar"))
    capsys.readouterr()
    make_shards(synthetic(out, "--shard-size", "64"))
    assert "(3 reused)" in capsys.readouterr().err
    assert not Path(out, "manifest.partial.json").exists()
    manifest_matches_files(out)


def test_other_settings_need_overwrite_which_starts_clean(tmp_path):
    out = str(tmp_path / "out")
    make_shards(synthetic(out, "--shard-size", "64"))
    with pytest.raises(SystemExit, match=r"other settings \{'shard_size': \(64, 100\)\}.*--overwrite"):
        make_shards(synthetic(out, "--shard-size", "100"))
    make_shards(synthetic(out, "--shard-size", "100", "--overwrite"))
    assert tar_names(out) == ["train-000000.tar", "train-000001.tar"]  # no stale shards 2 and 3
    assert [s.num_samples for s in manifest_matches_files(out).shards] == [100, 100]


def test_failed_shard_leaves_no_file_and_no_manifest(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(4):
        Image.new("RGB", (10, 10), (i, 0, 0)).save(src / f"{i}.png")
    (src / "9.png").write_bytes(b"not a png")
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"9.png: cannot decode image"):
        make_shards(["--dataset", "folder", "--src", str(src), "--resolution", "8", "--out", out,
                     "--shard-size", "3", "--workers", "0", "--quiet", "--no-shuffle"])
    assert os.listdir(out) == ["train-000000.tar"]  # shard 1 (3.png, 9.png) failed: no file, no manifest


def test_killed_run_leaves_only_complete_shards_and_resumes(tmp_path):
    """SIGKILL the writer (and its worker processes) as soon as shards appear: every visible shard is a
    complete tar, there is no manifest.json, and a rerun finishes a set identical to a clean build."""
    out = str(tmp_path / "out")
    base = ["--dataset", "synthetic", "--num", "600", "--resolution", "16", "--shard-size", "20", "--quiet"]
    args = [*base, "--out", out]
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.make_shards", *args, "--workers", "2",
                             "--partial-every-s", "0"],  # the manifest-in-progress after every shard
                            cwd=REPO, start_new_session=True, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not (os.path.isdir(out) and tar_names(out)):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = proc.returncode == -signal.SIGKILL
    if killed:
        assert not Path(out, "manifest.json").exists()
    for name in tar_names(out):
        parsed = parse_tar(Path(out, name).read_bytes())
        assert parsed.error is None and len(parsed.samples) == 20, name
    finished = set(tar_names(out))
    partial = Path(out, "manifest.partial.json")
    recorded = Manifest.from_json(partial.read_text(), "partial").shards if partial.exists() else []
    assert {s.name for s in recorded} <= finished
    make_shards([*args, "--workers", "0"])
    assert not [n for n in os.listdir(out) if ".tmp-" in n]  # temp files of the killed run are gone
    assert len(manifest_matches_files(out).shards) == 30
    clean = str(tmp_path / "clean")
    make_shards([*base, "--out", clean, "--workers", "0"])
    assert contents(out) == contents(clean)


def test_temp_files_of_interrupted_runs_are_removed_and_others_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    ours = [".manifest.partial.json.tmp-1a2b", ".manifest.json.tmp-3c4d", ".classes.json.tmp-5e6f",
            ".train-000001.tar.tmp-7a8b"]
    others = [".val-000001.tar.tmp-9c0d", ".notes.tmp-1", "notes.txt"]
    for name in ours + others:
        (out / name).write_bytes(b"x")
    make_shards(synthetic(str(out), "--shard-size", "100"))
    assert sorted(n for n in os.listdir(out) if not n.endswith((".tar", ".json"))) == sorted(others)


@pytest.mark.parametrize("num_samples, num_shards, cpus, expected", [
    (200, 1, 128, 0),          # one shard: a pool only adds start-up
    (3_999, 16, 64, 0),        # one worker's worth of samples: in-process
    (4_000, 16, 64, 2),
    (50_000, 196, 128, 25),    # one worker per 2,000 samples, not one per CPU
    (1_281_167, 5005, 16, 16),  # ImageNet: every CPU
    (1_000_000, 3, 64, 3),     # never more workers than shards
    (1_000_000, 1000, 1, 0),   # one CPU: in-process
])
def test_default_worker_count_follows_the_source_size(num_samples, num_shards, cpus, expected):
    assert default_workers(num_samples, num_shards, cpus) == expected


def make(*args: str, dry_run: bool = False) -> subprocess.CompletedProcess:
    """`make shards` with this interpreter; -o install: the venv is the caller's, not .venv."""
    return subprocess.run(["make", "--no-print-directory", *(["-n"] if dry_run else []), "-o", "install", "shards",
                           f"PY={sys.executable}", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_make_variables_map_to_the_same_options(tmp_path):
    """WORKERS=0 is in-process as --workers 0 is; no WORKERS lets make_shards choose; OVERWRITE=1 is --overwrite."""
    command = make("DATASET=synthetic", "WORKERS=0", "OVERWRITE=1", f"OUT={tmp_path}", dry_run=True).stdout
    assert "--workers 0" in command and "--overwrite" in command
    command = make("DATASET=synthetic", "OVERWRITE=0", f"OUT={tmp_path}", dry_run=True).stdout
    assert "data_prep.make_shards" in command and "--workers" not in command and "--overwrite" not in command
    folder = make("DATASET=folder", f"SRC={tmp_path}", f"OUT={tmp_path / 'o'}")
    assert folder.returncode != 0 and "needs RESOLUTION=" in folder.stderr
    with pytest.raises(SystemExit, match="make shards: RESOLUTION="):
        make_shards(["--dataset", "folder", "--src", str(tmp_path), "--out", str(tmp_path / "o")])


def test_make_overwrite_replaces_a_set_built_with_other_settings(tmp_path):
    out = str(tmp_path / "out")
    make_shards(synthetic(out, "--shard-size", "64"))
    with pytest.raises(SystemExit, match=r"--overwrite to replace it \(make shards: OVERWRITE=1\)"):
        make_shards(synthetic(out, "--shard-size", "100"))
    run = make("DATASET=synthetic", "NUM=200", "RESOLUTION=8", "SHARD_SIZE=100", "WORKERS=0", "OVERWRITE=1",
               f"OUT={out}")
    assert run.returncode == 0, run.stderr
    assert [s.num_samples for s in manifest_matches_files(out).shards] == [100, 100]
