"""What the run prints: a rich progress bar on a terminal, plain lines otherwise (rank 0 only)."""
from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RunConsole:
    def __init__(self, total_steps: int, start_step: int, enabled: bool = True):
        self.enabled = enabled
        self.console = Console(soft_wrap=True)
        self.progress = None
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
            print(f"step {record['step']:>8d}  loss {record['loss']:.5f}  N {record['num_scales']:>5d}  "
                  f"gnorm {record['grad_norm']:.3f}  {record['img_per_s']:.0f} img/s  "
                  f"{record['seconds']:.0f}s", flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
