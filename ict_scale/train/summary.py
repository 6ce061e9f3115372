"""The end-of-run summary: how far the run got, what this process did, and where the outputs are."""
from __future__ import annotations

import signal

from .console import clock


def end_of_run(run, start_step: int, wall_s: float, last_record: dict | None, stopped: bool,
               signum: int | None) -> list[str]:
    """Lines for rank 0 to print once the loop has returned and the last checkpoint is complete.

    `stopped`: every rank stopped for a signal; `signum`: the one this rank received, if any (another
    rank's signal stops all of them).
    """
    t = run.cfg.train
    where = f"step {run.step} of {t.total_steps}"
    if run.step >= t.total_steps:
        lines = [f"run complete: {where}"]  # (a finished run started again stops before the loop: run_complete_message)
    elif stopped:
        why = {None: "a stop signal on another rank", signal.SIGINT: "Ctrl-C"}.get(signum, f"preemption signal {signum}")
        lines = [f"{why}: checkpoint written at {where}; run the same command to resume"]
    else:
        lines = [f"paused at {where} (train.max_steps_this_run={t.max_steps_this_run}); "
                 "run the same command to continue"]
    if run.step > start_step:
        steps = run.step - start_step
        done = f"  this run: {steps} step{'s' if steps > 1 else ''}, {steps * t.batch_size:,} images " \
               f"in {clock(wall_s)}; {run.progress.images_seen:,} images since the start"
        if last_record is not None:
            done += f"; last loss {last_record['loss']:.5f} (step {last_record['step']})"
        lines.append(done)
    storage = run.storage
    if storage.exists("samples/latest_1step.png"):
        lines.append(f"  sample grids: {storage.url('samples', 'latest_1step.png')} and latest_2step.png")
    if storage.exists("metrics.jsonl"):
        lines.append(f"  metrics: {storage.url('metrics.jsonl')}")
    latest = run.ckpt.latest()
    lines.append(f"  last checkpoint: {run.ckpt.url(latest) if latest is not None else 'none'}")
    return lines
