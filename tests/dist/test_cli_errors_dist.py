"""Under torchrun, bad input prints one `error: ...` line (rank 0's), before torchrun's own failure report,
which names the same message for every rank; the other rank prints nothing and also fails."""
import re
import subprocess
import sys

import pytest

from workers.harness import REPO, TINY, worker_env

pytestmark = pytest.mark.dist


def test_two_ranks_one_line(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0",
           "-m", "ict_scale.train", *TINY, f"train.run_dir={tmp_path}/run", "parallel.backend=ddp",
           "train.batch_size=5", "train.batch_per_gpu=1"]
    done = subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=180)
    message = ("error: train.batch_size=5 is not a multiple of train.batch_per_gpu=1 x 2 processes = 2; "
               "use train.batch_size=4 or 6")
    lines = done.stderr.splitlines()
    assert done.returncode != 0, done.stderr[-3000:]
    ours = [line for line in lines if line.startswith("error: ")]
    assert ours == [message] and lines[0] == message, done.stderr[-3000:]  # once (rank 0), before the report
    assert done.stdout.strip() == ""
    # torchrun's report shows the message for each rank (from its error file) in place of a link to its docs.
    for rank in (0, 1):
        failure = re.search(rf"rank      : {rank} \(local_rank: {rank}\)\n  exitcode  : (-?\d+)[^\n]*\n"
                            rf"  error_file: [^\n]*\n  traceback : ([^\n]*)", done.stderr)
        assert failure and int(failure.group(1)) != 0 and failure.group(2) == message, done.stderr[-3000:]
