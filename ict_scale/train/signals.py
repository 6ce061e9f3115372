"""Stop requests: SIGTERM / SIGUSR1 (preemption) and SIGINT (Ctrl-C) set a flag that the loop reads once per step.

The loop all-reduces the flag, so every rank stops after the same step, writes one checkpoint and
returns: a first Ctrl-C loses nothing, exactly like a preemption. A second Ctrl-C aborts at once,
without that checkpoint (the last complete one stays).

Schedulers kill for good after a grace period (Slurm's --signal lead time, torchrun's
--shutdown-timeout, Kubernetes' terminationGracePeriodSeconds); if the step and the save have not
finished within `grace_s` the process exits on its own with status 128 + signal, before the SIGKILL,
so the end is orderly in the logs. A checkpoint cut short that way has no COMMIT marker and is never
resumed from. Repeated signals (torchrun forwards SIGTERM and Slurm also signals every task) do not
shorten the grace period.

Python runs signal handlers in the main thread only, between bytecodes: a main thread blocked in a
collective, waiting for a peer that is frozen or gone, runs none until the collective returns (its
timeout is typically 30 minutes). So the C-level handler also writes each signal's number to a socket
(`signal.set_wakeup_fd`) that a watcher thread reads: the grace timer and the second Ctrl-C act from
there, whatever the main thread is doing.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

_installed: "PreemptionFlag | None" = None  # the flag whose handlers are installed: handlers are per process


class PreemptionFlag:
    """Install the stop handlers (main thread only; `signals=()` installs none); `close()` restores them."""

    def __init__(self, signals=STOP_SIGNALS, grace_s: float | None = None, announce: bool = True):
        self.requested = False
        self.signum = None
        self.grace_s = grace_s
        self.announce = announce  # print the Ctrl-C messages (rank 0 only)
        self._lock = threading.RLock()  # RLock: the main thread's handler may interrupt close()
        self._interrupts = 0
        self._watchdog: threading.Timer | None = None
        self._previous: dict = {}
        self._wakeup: tuple | None = None  # (writer socket, the wakeup fd it replaced)
        if signals and threading.current_thread() is threading.main_thread():
            self._install(signals)

    def _install(self, signals) -> None:
        reader, writer = socket.socketpair()
        writer.setblocking(False)  # set_wakeup_fd requires it: the C handler must never block
        self._wakeup = (writer, signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False))
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)
        global _installed
        _installed = self
        threading.Thread(target=self._watch, args=(reader, {int(s) for s in signals}), daemon=True,
                         name="stop-signals").start()

    def _handle(self, signum, frame) -> None:
        # The main thread, once it is between bytecodes: the flag is set at once, even before the watcher ran.
        self._note(signum)

    def _watch(self, reader: socket.socket, signals: set[int]) -> None:
        """One byte per delivered signal (the Python handler may run once for several): count Ctrl-Cs here."""
        with reader:
            while data := reader.recv(64):
                for signum in data:
                    if signum in signals:
                        self._note(signum)
                        if signum == signal.SIGINT:
                            self._interrupted()

    def _note(self, signum: int) -> None:
        with self._lock:
            if self.requested:
                return
            self.requested, self.signum = True, signum
            if self.grace_s is not None:
                # A daemon timer: it never keeps a finished process alive, and it fires even while the
                # main thread is blocked in a collective waiting for a rank that is already gone.
                self._watchdog = threading.Timer(self.grace_s, self._expire)
                self._watchdog.daemon = True
                self._watchdog.start()

    def _interrupted(self) -> None:
        self._interrupts += 1
        if self._interrupts == 1:
            if self.announce:
                print("Ctrl-C: finishing this step and writing a checkpoint, then stopping "
                      "(press Ctrl-C again to abort without it)", file=sys.stderr, flush=True)
            return
        if self.announce:
            print("second Ctrl-C: aborting now, without a checkpoint of this step "
                  "(the last complete checkpoint will be resumed)", file=sys.stderr, flush=True)
        _exit_now(128 + signal.SIGINT)

    def _expire(self) -> None:
        print(f"{signal.Signals(self.signum).name} was {self.grace_s:.0f} s ago and the checkpoint is not complete; "
              "exiting now (the last complete checkpoint will be resumed)", file=sys.stderr, flush=True)
        _exit_now(128 + int(self.signum))

    def close(self) -> None:
        """Stop the grace timer and give the signals back (call once the run is returning)."""
        with self._lock:
            if self._watchdog is not None:
                self._watchdog.cancel()
            self._uninstall()

    def _uninstall(self) -> None:
        global _installed
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}
        if self._wakeup is not None:
            writer, previous_fd = self._wakeup
            signal.set_wakeup_fd(previous_fd)
            writer.close()  # in the trainer, the watcher reads end-of-file and ends
            self._wakeup = None
        if _installed is self:
            _installed = None


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) inherits the handlers and the wakeup socket: the child's own
    signals must not count as the trainer's (two workers' Ctrl-C would read as a second Ctrl-C)."""
    if _installed is not None:
        try:
            _installed._uninstall()  # no lock: another thread may have held it at the fork
        except ValueError:  # forked from a thread other than the main one: the signal module refuses there
            pass


os.register_at_fork(after_in_child=_forget_in_child)


def _exit_now(code: int) -> None:
    """Leave at once from any thread: no cleanup runs, so end our DataLoader workers first (they ignore the
    stop signals and would otherwise linger until they notice that their parent is gone)."""
    for child in multiprocessing.active_children():
        child.kill()
    os._exit(code)
