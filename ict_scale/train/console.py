"""What the run prints: a rich progress bar on a terminal, plain lines otherwise (rank 0 only)."""
from __future__ import annotations

import sys
import time
from collections import deque

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


SPEED_WINDOW_S = 30.0  # the plain lines' ETA: steps per second over about this window, as the progress bar's


def clock(seconds: float) -> str:
    """h:mm:ss, as the progress bar shows elapsed and remaining time."""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class RunConsole:
    def __init__(self, total_steps: int, start_step: int, enabled: bool = True):
        self.enabled = enabled
        self.total_steps = total_steps
        self.console = Console(soft_wrap=True)
        self.progress = None
        self._marks = deque([(time.perf_counter(), start_step)])  # (time, step) of recent log lines
        if enabled and sys.stdout.isatty():
            self.progress = Progress(TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                     TimeRemainingColumn(), console=self.console, transient=False)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
            self.progress.start()

    def print(self, message: str) -> None:
        if self.enabled:
            (self.progress.console if self.progress else self.console).print(message, highlight=False)

    def update(self, step: int, record: dict | None) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            info = "" if record is None else (f"loss {record['loss']:.4f}  N {record['num_scales']}  "
                                              f"{record['img_per_s']:.0f} img/s")
            self.progress.update(self.task, completed=step, **({"info": info} if record else {}))
        elif record is not None:
            print(f"step {record['step']:>8d}/{self.total_steps}  loss {record['loss']:.5f}  "
                  f"N {record['num_scales']:>5d}  gnorm {record['grad_norm']:.3f}  {record['img_per_s']:.0f} img/s  "
                  f"{clock(record['seconds'])}  ETA {self._eta(record['step'])}", flush=True)

    def _eta(self, step: int) -> str:
        now = time.perf_counter()
        self._marks.append((now, step))
        while now - self._marks[1][0] >= SPEED_WINDOW_S:  # the oldest mark kept is the last one before the window
            self._marks.popleft()
        then, step_then = self._marks[0]
        if step >= self.total_steps:
            return clock(0)
        if step <= step_then or now <= then:
            return "-:--:--"
        return clock((self.total_steps - step) * (now - then) / (step - step_then))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
