"""Checkpoint policy, the Checkpointer's catalogue: naming, the commit marker, keep-last-k (and the best),
and finding the newest complete one.

The bytes are written by the parallel backend (DCP or the DeepSpeed engine) and the Checkpointer; this module
only decides where, and when a checkpoint counts. A checkpoint is complete only once its COMMIT marker exists, and
the marker is written by rank 0 after every rank has finished writing, so an interrupted save is never
picked up by auto-resume. Before writing the marker the manager checks that every file the checkpoint
needs is there (`verify`: layout.checkpoint_verifier, which knows the byte formats), and at start-up it skips, with a
report, a marked checkpoint that fails the same check (written by an older version, or damaged since).
"""
from __future__ import annotations

import json
import re
import time
from typing import Callable

from .errors import IncompleteCheckpoint
from .storage import Storage

COMMIT = "COMMIT"
_NAME = re.compile(r"^step_(\d{9})$")


class CheckpointManager:
    def __init__(self, storage: Storage, keep_last: int = 3, subdir: str = "checkpoints",
                 verify: Callable[[str], list[str]] | None = None):
        """`verify(url)` lists what keeps the checkpoint at `url` from being complete (empty: complete)."""
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.storage = storage
        self.keep_last = keep_last
        self.subdir = subdir
        self.verify = verify or (lambda url: [])

    def name(self, step: int) -> str:
        return f"{self.subdir}/step_{step:09d}"

    def url(self, step: int) -> str:
        return self.storage.url(self.name(step))

    def begin(self, step: int) -> str:
        """Clear any leftover of an earlier, interrupted save of this step (rank 0 only); return its URL."""
        self.storage.remove(self.name(step))
        self.storage.makedirs(self.name(step))
        return self.url(step)

    def commit(self, step: int, meta: dict | None = None) -> None:
        """Mark `step` complete (call after a barrier that follows every rank's write), then prune."""
        problems = self.verify(self.url(step))
        if problems:
            raise IncompleteCheckpoint(f"checkpoint {self.url(step)} is not marked complete: "
                                       f"{'; '.join(problems[:5])}")
        record = {"step": step, "time": time.time(), **(meta or {})}
        self.storage.write_text(f"{self.name(step)}/{COMMIT}", json.dumps(record))
        self.prune()

    def complete_steps(self) -> list[int]:
        steps = []
        for entry in self.storage.listdir(self.subdir):
            m = _NAME.match(entry)
            if m and self.storage.exists(f"{self.subdir}/{entry}/{COMMIT}"):
                steps.append(int(m.group(1)))
        return sorted(steps)

    def latest(self) -> int | None:
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def newest_good(self, report: Callable[[str], None] = print) -> int | None:
        """The newest marked checkpoint that passes `verify`; each newer one that fails is reported and skipped."""
        for step in reversed(self.complete_steps()):
            problems = self.verify(self.url(step))
            if not problems:
                return step
            report(f"skipping checkpoint {self.url(step)}: marked complete, but {'; '.join(problems[:5])}")
        return None

    def partial_steps(self) -> list[int]:
        """Checkpoints without a COMMIT marker: saves that were cut short (or are in progress)."""
        complete = set(self.complete_steps())
        return sorted(int(m.group(1)) for e in self.storage.listdir(self.subdir)
                      if (m := _NAME.match(e)) and int(m.group(1)) not in complete)

    def remove_partial(self) -> list[int]:
        """Delete every unmarked checkpoint (at start-up, while no save is running); never a marked one.

        A save cut short (a full disk, a killed rank) may hold most of the space a new save needs.
        """
        removed = self.partial_steps()
        for step in removed:
            self.storage.remove(self.name(step))
        return removed

    def pinned(self) -> set[int]:
        """Steps that pruning never removes: the best checkpoint by FID, named in the run's best.json."""
        if not self.storage.exists("best.json"):
            return set()
        name = json.loads(self.storage.read_bytes("best.json")).get("checkpoint") or ""
        m = _NAME.match(name.rstrip("/").rsplit("/", 1)[-1])
        return {int(m.group(1))} if m else set()

    def prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints and the best one; incomplete older ones go too."""
        complete = self.complete_steps()
        keep = set(complete[-self.keep_last:]) | self.pinned()
        newest = max(complete[-self.keep_last:], default=-1)
        for entry in self.storage.listdir(self.subdir):
            m = _NAME.match(entry)
            if m and int(m.group(1)) not in keep and int(m.group(1)) < newest:
                self.storage.remove(f"{self.subdir}/{entry}")
