"""Measure the real training step: throughput, MFU, peak memory, a per-phase breakdown, data-loader stalls.

Everything runs through the trainer's own pieces (`build_run`: config, network, backend, EMAs; the loop's
`optimise_step` with its one host sync), so a number here is what `ict_scale.train`
gets. Only the data source differs: `device` feeds uint8 batches already on the GPU (I/O excluded),
`real` is the configured StreamingLoader.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from ict_scale.config import load_config
from ict_scale.data.synthetic import synthetic_images
from ict_scale.parallel.launch_env import read_launch_env
from ict_scale.train.loop import next_micro_batches, optimise_step
from ict_scale.train.model import build_model
from ict_scale.train.run import build_run
from ict_scale.train.signals import PreemptionFlag

from .phases import PhaseTimer
from .profile import kernel_breakdown


def _settings(precision: str, channels_last: bool, compile: bool, cudnn_benchmark: bool) -> list[str]:
    """The four speed settings a mode fixes, as config overrides (the rest of the recipe is unchanged)."""
    flag = {True: "true", False: "false"}
    return [f"train.precision={precision}", f"train.channels_last={flag[channels_last]}",
            f"train.compile={flag[compile]}", f"train.cudnn_benchmark={flag[cudnn_benchmark]}"]


# Modes: named sets of overrides. fp32_eager is what EDM/ECT-style code runs (torch defaults, NCHW, eager).
MODES = {
    "fp32_eager": _settings("fp32", channels_last=False, compile=False, cudnn_benchmark=False),
    "bf16": _settings("bf16", channels_last=False, compile=False, cudnn_benchmark=False),
    "bf16_cl": _settings("bf16", channels_last=True, compile=False, cudnn_benchmark=False),
    "bf16_cl_compile": _settings("bf16", channels_last=True, compile=True, cudnn_benchmark=False),
    "bf16_cl_cudnn": _settings("bf16", channels_last=True, compile=False, cudnn_benchmark=True),
    # The fastest settings measured: compile plus cuDNN autotuning (both opt-in in the recipes).
    "tuned": _settings("bf16", channels_last=True, compile=True, cudnn_benchmark=True),
}
# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s, no sparsity), matched by device name.
DATASHEET_BF16_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.1))


def parse_mode(spec: str) -> tuple[str, list[str]]:
    """`name` (one of MODES) or `name:key=value key=value` (a preset or a new name, plus overrides; values
    such as lists may hold commas, so overrides are separated by spaces)."""
    name, _, extra = spec.partition(":")
    extra_overrides = extra.split()
    if name not in MODES and not extra_overrides:
        raise ValueError(f"mode {name!r}: expected one of {', '.join(MODES)} or 'name:key=value ...'")
    bad = [kv for kv in extra_overrides if "=" not in kv]
    if bad:
        raise ValueError(f"mode {spec!r}: overrides must be key=value, got {bad}")
    return name, MODES.get(name, []) + extra_overrides


def step_flops_per_image(cfg) -> float:
    """FLOPs of one iCT step per image: teacher forward + student forward + backward (2x forward) = 4 forwards.

    The forward is counted by torch's FlopCounterMode on the meta device (convolutions, matmuls, attention).
    """
    with torch.device("meta"):
        model = build_model(cfg)
        res = cfg.data.resolution
        x, sigma = torch.randn(1, 3, res, res), torch.ones(1)
        labels = torch.zeros(1, dtype=torch.long) if model.net.label_dim else None
        with FlopCounterMode(display=False) as counter:
            model(x, sigma, labels)
    return 4.0 * counter.get_total_flops()


def matmul_peak_tflops(device: torch.device, n: int = 8192, iters: int = 10) -> float | None:
    """Measured bf16 matrix-product rate (n^3, random data), TFLOP/s; None off CUDA."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    end.synchronize()
    return 2 * n ** 3 * iters / (start.elapsed_time(end) / 1e3) / 1e12


def datasheet_tflops(device_name: str) -> float | None:
    for key, tflops in DATASHEET_BF16_TFLOPS:
        if key in device_name:
            return tflops
    return None


def device_batches(cfg, device: torch.device, pool: int = 4):
    """An endless cycle of `pool` uint8 batches (and labels) made once on the device: no I/O in the timing."""
    n = cfg.train.batch_per_gpu
    images, labels = synthetic_images(torch.arange(n * pool), seed=cfg.train.seed, resolution=cfg.data.resolution,
                                      num_classes=max(1, cfg.data.num_classes))
    images, labels = images.to(device), labels.to(device)
    return itertools.cycle([(images[i * n:(i + 1) * n], labels[i * n:(i + 1) * n]) for i in range(pool)])


@dataclass
class BenchResult:
    recipe: str
    mode: str
    loader: str
    backend: str
    world_size: int
    batch_per_gpu: int
    params: int
    steps: int
    step_ms: float
    img_s_per_gpu: float
    img_s_total: float
    first_steps_s: float              # wall time of the warm-up steps (compilation, autotuning, allocator)
    peak_mem_gib: float | None
    tflops_per_gpu: float
    mfu_measured: float | None        # against the bf16 matrix-product peak measured in this process
    mfu_datasheet: float | None
    data_wait_frac: float             # host time blocked on the loader / step time
    phases_ms: dict = field(default_factory=dict)
    loss_mean: float = 0.0            # over every step run: same initial weights and batches in every mode, so a
                                      # mode that changes the numerics beyond bf16 noise shows here
    overrides: list = field(default_factory=list)
    kernels: dict = field(default_factory=dict)  # profiler breakdown (CUDA, --profile)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Bench:
    """One process's benchmark context: it owns the backend's process group across modes."""

    def __init__(self, configs: list[str], overrides: list[str], peak_tflops: float | None = None):
        self.configs, self.overrides = configs, overrides
        self.peak = peak_tflops
        self.backend = None

    def build(self, mode_overrides: list[str], loader: str):
        """The run of one mode: the trainer's build_run, with device batches or the configured loader."""
        cfg = load_config(self.configs, [*self.overrides, *mode_overrides, "eval.every_steps=0"])
        # No accumulation: a benchmark step is one micro-batch per rank (set before a backend reads it).
        cfg.train.batch_size = cfg.train.batch_per_gpu * read_launch_env().world_size
        run = build_run(cfg, None, (lambda backend: device_batches(cfg, backend.device)) if loader == "device"
                        else None)
        self.backend = run.backend
        return run

    def measure(self, mode: str, mode_overrides: list[str], loader: str, steps: int, warmup: int,
                phase_steps: int = 5, profile: bool = False) -> BenchResult:
        run = self.build(mode_overrides, loader)
        try:
            return self._measure(mode, mode_overrides, loader, run, steps, warmup, phase_steps, profile)
        finally:  # stop the real loader's workers: they would otherwise keep prefetching during the next mode
            if hasattr(run.loader, "close"):
                run.loader.close()

    def _measure(self, mode, mode_overrides, loader, run, steps, warmup, phase_steps, profile):
        cfg, dev, backend, data = run.cfg, run.backend.device, run.backend, run.loader
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        flag = PreemptionFlag(signals=())  # never raised: a signal (Ctrl-C too) ends a benchmark at once
        losses, waits = [], []

        def one_step():
            t0 = time.perf_counter()
            batches = next_micro_batches(run, data)
            waits.append(time.perf_counter() - t0)
            result, _ = optimise_step(run, batches, flag)  # with the loop's one host sync per step
            losses.append(result.loss)
            run.progress.step += 1

        t0 = time.perf_counter()
        for _ in range(warmup):
            one_step()
        _sync(dev)
        first_steps_s = time.perf_counter() - t0
        waits.clear()
        t0 = time.perf_counter()
        for _ in range(steps):
            one_step()
        _sync(dev)
        elapsed = time.perf_counter() - t0
        peak_mem = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None
        timer = PhaseTimer(dev)
        with timer.attach(run):
            for _ in range(phase_steps):
                with timer.span("step"):
                    one_step()
        kernels = kernel_breakdown(one_step) if profile and dev.type == "cuda" else {}
        loss_values = torch.stack(losses).float().cpu().tolist()
        n = cfg.train.batch_per_gpu
        step_s = elapsed / steps
        flops = step_flops_per_image(cfg) * n / step_s / 1e12
        sheet = datasheet_tflops(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None
        return BenchResult(
            recipe=",".join(self.configs), mode=mode, loader=loader, backend=backend.name,
            world_size=backend.world_size, batch_per_gpu=n, params=run.num_params, steps=steps,
            step_ms=step_s * 1e3, img_s_per_gpu=n / step_s, img_s_total=n * backend.world_size / step_s,
            first_steps_s=first_steps_s, peak_mem_gib=peak_mem, tflops_per_gpu=flops,
            mfu_measured=flops / self.peak if self.peak else None, mfu_datasheet=flops / sheet if sheet else None,
            data_wait_frac=sum(waits[:steps]) / elapsed, phases_ms=timer.summary_ms(),
            loss_mean=sum(loss_values) / len(loss_values),
            overrides=[*self.overrides, *mode_overrides], kernels=kernels)
