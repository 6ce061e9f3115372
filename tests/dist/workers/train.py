"""A torchrun worker: train through ict_scale.train.loop.train with key=value overrides from argv.

`--runs FILE` instead trains several runs one after the other in the same process group: FILE holds
a JSON list of override lists (the process start, the imports and the rendezvous are paid once).

ICT_TEST_DIE_IN_SAVE=STEP:RANK (first attempt only, i.e. TORCHELASTIC_RESTART_COUNT=0) kills that rank
with SIGKILL right after it wrote its shards of checkpoint STEP, before the COMMIT marker: a crash in
the middle of a checkpoint, to be survived by torchrun's restart and auto-resume.

ICT_TEST_SLOW_SAVE=SECONDS makes every checkpoint save sleep that long first: a save still running
when a second Ctrl-C comes.
"""
import json
import os
import signal
import sys
import time

import torch.distributed as dist

from ict_scale.config import load_config
from ict_scale.parallel.backend import Backend
from ict_scale.train.loop import train


def die_in_save(step: int, rank: int) -> None:
    real_save = Backend.save

    def save(self, ckpt_dir, *args, **kwargs):
        pending = real_save(self, ckpt_dir, *args, **kwargs)
        if self.rank == rank and ckpt_dir.rstrip("/").endswith(f"step_{step:09d}"):
            pending.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return pending

    Backend.save = save


def slow_save(seconds: float) -> None:
    real_save = Backend.save

    def save(self, *args, **kwargs):
        time.sleep(seconds)
        return real_save(self, *args, **kwargs)

    Backend.save = save


def main() -> None:
    spec = os.environ.get("ICT_TEST_DIE_IN_SAVE")
    if spec and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        die_in_save(*map(int, spec.split(":")))
    if os.environ.get("ICT_TEST_SLOW_SAVE"):
        slow_save(float(os.environ["ICT_TEST_SLOW_SAVE"]))
    if sys.argv[1:2] == ["--runs"]:
        with open(sys.argv[2]) as f:
            runs = json.load(f)
    else:
        runs = [sys.argv[1:]]
    for overrides in runs:
        train(load_config([], overrides))
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # see STACK_NOTES: avoids rare aborts in collective threads at interpreter exit


if __name__ == "__main__":
    main()
