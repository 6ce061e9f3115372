"""One run per run directory: a lease file (host, pid, heartbeat) that rank 0 holds while the run lives.

Two runs writing into one run directory would interleave their checkpoints, and one could commit a
checkpoint whose files the other had just replaced. So a run first takes `run.lease`; a second run on the
same directory is refused with the holder's host and pid, and a lease whose heartbeat is older than
`timeout_s` (its holder was killed or lost its node) is taken over with a message.

Object stores have no atomic create-if-absent in general, so taking the lease is the same protocol on local
disks and on s3://: write our lease (a fresh random token) as one whole object, wait `settle_s`, read it
back. Of several runs that start together, each reads back the last write, so exactly one finds its own
token and the others are refused. The race that remains: a starter that stalls for longer than `settle_s`
between reading "free" and writing (a long GC pause, a PUT slower than `settle_s`) can overwrite a lease
that another run has already read back. Both then run for a while; the heartbeat, and the read made before
every COMMIT (`check`), show the earlier holder that its token is gone, so it stops before marking another
checkpoint complete. Heartbeats compare wall clocks of different hosts: keep `timeout_s` well above their
skew (minutes against NTP's milliseconds).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Callable

from .errors import RunDirBusy
from .storage import Storage

LEASE = "run.lease"


def job_identity() -> tuple[str, list[int]]:
    """(job id, restart attempt) given by the launcher, so a restarted job takes over its own lease at once.

    torchrun restarts a failed group and Slurm requeues a job under the same id, possibly with rank 0 on
    another host, where the old holder's pid cannot be checked: a later attempt of the same job knows that
    the launcher ended the earlier one.
    """
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    slurm = os.environ.get("SLURM_JOB_ID", "")
    job = "/".join(x for x in (f"slurm:{slurm}" if slurm else "",
                               f"torchrun:{run_id}" if run_id not in ("", "none") else "") if x)
    attempt = [int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
               int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)]
    return job, attempt


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0 or -1, ...) would address process groups, not a process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


class RunLease:
    def __init__(self, storage: Storage, timeout_s: float = 300.0, settle_s: float | None = None):
        self.storage, self.timeout_s = storage, float(timeout_s)
        # Local renames are visible at once; object stores get time for a racing PUT to land.
        self.settle_s = settle_s if settle_s is not None else (0.1 if storage.is_local else 2.0)
        self.token = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.job, self.attempt = job_identity()
        self.started = time.time()
        self.lost: str | None = None  # why the lease is no longer ours (another run took it over)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading and judging a lease ------------------------------------------------------------
    def read(self) -> dict | None:
        try:
            return json.loads(self.storage.read_bytes(LEASE))
        except FileNotFoundError:
            return None
        except ValueError:  # a torn or foreign file: treat as no lease rather than block every start
            return None

    def _mine(self, held: dict) -> bool:
        # The same process on the same host: an earlier run object of this process (no second trainer).
        return held.get("token") == self.token or (held.get("host") == self.host and held.get("pid") == self.pid)

    def stale_reason(self, held: dict) -> str | None:
        """Why `held` (another run's lease) may be taken over, or None while it is live."""
        age = time.time() - float(held.get("heartbeat", 0))
        if age > self.timeout_s:
            return f"its last heartbeat was {age:.0f} s ago (> {self.timeout_s:.0f} s)"
        if held.get("host") == self.host and not _pid_alive(int(held.get("pid", -1))):
            return f"process {held.get('pid')} no longer exists on this host"
        if self.job and held.get("job") == self.job and list(held.get("attempt", [])) < self.attempt:
            return f"it is an earlier attempt of this job ({self.job}), which the launcher ended"
        return None

    def describe(self, held: dict) -> str:
        age = time.time() - float(held.get("heartbeat", 0))
        return f"host {held.get('host')} pid {held.get('pid')} (last heartbeat {age:.0f} s ago)"

    # -- taking, keeping and giving back the lease ------------------------------------------------
    def _record(self) -> dict:
        return {"host": self.host, "pid": self.pid, "token": self.token, "job": self.job, "attempt": self.attempt,
                "started": self.started, "heartbeat": time.time(), "timeout_s": self.timeout_s}

    def _refuse(self, held: dict) -> RunDirBusy:
        return RunDirBusy(f"run dir {self.storage.root} is in use by another run: {self.describe(held)}; "
                          f"stop that run, or choose another train.run_dir (a lease without heartbeat for "
                          f"{self.timeout_s:.0f} s is taken over)")

    def acquire(self, when_free: Callable[[], None] | None = None) -> str | None:
        """Take the lease or raise RunDirBusy; returns a message when a stale lease was taken over.

        `when_free` runs once no live run holds the directory, before our lease is written: start-up
        clean-up that must not touch a live run's save, and that may be what frees the space to write.
        """
        held = self.read()
        note = None
        if held is not None and not self._mine(held):
            reason = self.stale_reason(held)
            if reason is None:
                raise self._refuse(held)
            note = f"taking over the lease of run dir {self.storage.root} from {self.describe(held)}: {reason}"
        if when_free is not None:
            when_free()
        self.storage.write_text(LEASE, json.dumps(self._record()))
        time.sleep(self.settle_s)
        now = self.read()
        if now is None or now.get("token") != self.token:
            raise self._refuse(now or {})
        return note

    def check(self) -> str | None:
        """None while the lease is ours; otherwise why not (another run took it over).

        Only another run's lease counts: an unreadable store (it may be down for a moment) or a removed lease
        file says nothing about a second run, and the next heartbeat writes ours again.
        """
        if self.lost is None:
            try:
                held = self.read()
            except Exception:
                return None
            if held is not None and held.get("token") != self.token:
                self.lost = f"run dir {self.storage.root} was taken over by another run: {self.describe(held)}"
        return self.lost

    def heartbeat(self) -> None:
        # Read, then write: a take-over landing between the two is overwritten, and that newer run's own
        # check before its next COMMIT then stops it; one run goes on either way.
        if self.check() is None:
            self.storage.write_text(LEASE, json.dumps(self._record()))

    def start_heartbeat(self, interval_s: float | None = None) -> None:
        """Renew the lease from a daemon thread (a step or a collective may block the main thread for long)."""
        interval_s = interval_s if interval_s is not None else max(self.timeout_s / 6, 0.05)

        def beat():
            while not self._stop.wait(interval_s) and self.lost is None:
                try:
                    self.heartbeat()
                except Exception:  # a transient storage error: the next beat retries; staleness needs many misses
                    pass

        self._thread = threading.Thread(target=beat, name="run-lease-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours (best effort: this runs while a run
        ends, possibly because its storage failed; a lease left behind goes stale and is taken over)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            held = self.read()
            if held is not None and held.get("token") == self.token:
                self.storage.remove(LEASE)
        except Exception:
            pass
