"""Checkpoint policy: naming, the commit marker, keep-last-k, and finding the newest complete one.

The bytes are written by the parallel backend (DCP or the DeepSpeed engine); this module only decides
where, and when a checkpoint counts. A checkpoint is complete only once its COMMIT marker exists, and
the marker is written by rank 0 after every rank has finished writing, so an interrupted save is never
picked up by auto-resume.
"""
from __future__ import annotations

import json
import re
import time

from .storage import Storage

COMMIT = "COMMIT"
_NAME = re.compile(r"^step_(\d{9})$")


class CheckpointManager:
    def __init__(self, storage: Storage, keep_last: int = 3, subdir: str = "checkpoints"):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.storage = storage
        self.keep_last = keep_last
        self.subdir = subdir

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
