"""Where a training step's time goes: device-side spans for each phase of the real step.

The spans are recorded by hooks on the trainer's own objects (no copy of the step): forward hooks on the
unwrapped model tell the teacher pass from the student pass (by call order), and the backend's backward, grad
norm and optimiser step and the EMA update are wrapped for the few instrumented steps only. On CUDA the
spans are pairs of CUDA events (no synchronisation inside the step); on CPU, wall-clock time.
"""
from __future__ import annotations

import contextlib
import itertools
import time
from collections import defaultdict

import torch

PHASES = ("teacher_fwd", "student_fwd", "backward", "grad_norm", "optimizer", "ema")


class PhaseTimer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[str, object, object]] = []

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @contextlib.contextmanager
    def span(self, name: str):
        start = self._mark()
        try:
            yield
        finally:
            self.spans.append((name, start, self._mark()))

    def _wrap(self, obj, attr: str, name: str, restore: list):
        original = getattr(obj, attr)

        def timed(*args, **kwargs):
            with self.span(name):
                return original(*args, **kwargs)

        setattr(obj, attr, timed)  # an instance attribute shadows the method until restored
        restore.append((obj, attr))

    @contextlib.contextmanager
    def attach(self, run):
        backend, restore, open_spans = run.backend, [], []
        # The student's network, and original CT's EMA teacher where the run has one (ict.teacher=ema).
        modules = [backend.module] + ([run.teacher.module] if run.teacher is not None else [])

        # iCT's teacher is the student's own module, called first in each consistency pair; it runs with
        # autograd on under compile (train.teacher_pass), so the call order, not the grad mode, tells it apart.
        pair_calls = itertools.count()

        def pre_hook(module, _args, _kwargs):
            if module is not backend.module:
                name = "teacher_fwd"
            elif run.teacher is None:
                name = "teacher_fwd" if next(pair_calls) % 2 == 0 else "student_fwd"
            else:
                name = "student_fwd"
            open_spans.append((name, self._mark()))

        def post_hook(_module, _args, _kwargs, _output):
            name, start = open_spans.pop()
            self.spans.append((name, start, self._mark()))

        handles = [h for m in modules for h in (m.register_forward_pre_hook(pre_hook, with_kwargs=True),
                                                m.register_forward_hook(post_hook, with_kwargs=True))]
        for attr, name in (("backward", "backward"), ("grad_norm", "grad_norm"), ("optimizer_step", "optimizer")):
            self._wrap(backend, attr, name, restore)
        for ema in (run.ema, run.teacher):
            if ema is not None:
                self._wrap(ema, "update", "ema", restore)
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            for obj, attr in restore:
                delattr(obj, attr)

    def summary_ms(self) -> dict[str, float]:
        """Mean milliseconds per step of each phase; `other` = step minus the phases (sync, sampling, data)."""
        if self.cuda:
            torch.cuda.synchronize()
        totals, steps = defaultdict(float), 0
        for name, start, end in self.spans:
            ms = start.elapsed_time(end) if self.cuda else (end - start) * 1e3
            totals[name] += ms
            steps += name == "step"
        if not steps:
            return {}
        out = {name: totals[name] / steps for name in PHASES if name in totals}
        out["step"] = totals["step"] / steps
        out["other"] = out["step"] - sum(out[name] for name in PHASES if name in out)
        return out
