"""Preemption: SIGTERM / SIGUSR1 set a flag that the loop reads once per step (never acts mid-step).

The loop all-reduces the flag, so every rank stops after the same step, writes one checkpoint and
returns. Schedulers kill for good after a grace period (Slurm's --signal lead time, torchrun's
--shutdown-timeout, Kubernetes' terminationGracePeriodSeconds); if the step and the save have not
finished within `grace_s` the process exits on its own with status 128 + signal, before the SIGKILL,
so the end is orderly in the logs. A checkpoint cut short that way has no COMMIT marker and is never
resumed from. Repeated signals (torchrun forwards SIGTERM and Slurm also signals every task) do not
shorten the grace period.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time


class PreemptionFlag:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1), grace_s: float | None = None):
        self.requested = False
        self.signum = None
        self.received_at: float | None = None  # time.monotonic() of the first signal
        self.grace_s = grace_s
        self._watchdog: threading.Timer | None = None
        if threading.current_thread() is threading.main_thread():
            for s in signals:
                signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            return
        self.requested = True
        self.signum = signum
        self.received_at = time.monotonic()
        if self.grace_s is not None:
            # A daemon timer: it never keeps a finished process alive, and it fires even while the
            # main thread is blocked in a collective waiting for a rank that is already gone.
            self._watchdog = threading.Timer(self.grace_s, self._expire)
            self._watchdog.daemon = True
            self._watchdog.start()

    def remaining_s(self) -> float | None:
        """Seconds of grace left since the first signal (None: no signal, or no grace period)."""
        if self.received_at is None or self.grace_s is None:
            return None
        return self.grace_s - (time.monotonic() - self.received_at)

    def _expire(self) -> None:
        print(f"preemption: signal {self.signum} was {self.grace_s:.0f} s ago and the checkpoint is not complete; "
              "exiting now (the last complete checkpoint will be resumed)", file=sys.stderr, flush=True)
        os._exit(128 + int(self.signum))

    def cancel(self) -> None:
        """Stop the grace timer (call once the checkpoint is written and the run is returning)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
