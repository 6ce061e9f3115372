"""GPU kernel time of a few training steps by kind (convolution/matmul, normalisation, attention, fused
Triton, elementwise, optimiser, communication): what a step is made of, from torch.profiler."""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

# First match wins; names are CUDA kernel names as the profiler reports them.
KINDS = (
    ("communication", ("nccl",)),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("optimizer", ("multi_tensor", "foreach", "radam", "adam")),
    ("conv/matmul", ("conv", "gemm", "cutlass", "xmma", "sm90", "sm80", "wgrad", "dgrad", "implicit", "cudnn",
                     "nvjet", "cublas")),
    ("normalisation", ("norm", "welford")),
    ("fused (Triton)", ("triton",)),
    ("reduction", ("reduce",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "copy", "fill", "cat", "index")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def kernel_breakdown(step: Callable[[], None], steps: int = 3, top: int = 12) -> dict:
    """Run `step` `steps` times under the profiler; device time per kind (ms per step) and the top kernels."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per_kind, per_kernel, launches = defaultdict(float), defaultdict(float), 0
    for event in prof.events():
        # Device-side copies of record_function ranges (e.g. "Optimizer.step#RAdam.step") are spans, not kernels.
        if event.device_type != torch.autograd.DeviceType.CUDA or getattr(event, "is_user_annotation", False):
            continue
        ms = event.device_time / 1e3  # microseconds -> ms
        per_kind[kernel_kind(event.name)] += ms / steps
        per_kernel[event.name] += ms / steps
        launches += 1
    kernels = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]
    return {"ms_per_step_by_kind": dict(sorted(per_kind.items(), key=lambda kv: -kv[1])),
            "kernel_ms_per_step": sum(per_kind.values()), "kernels_per_step": launches / steps,
            "top_kernels": [{"name": n[:120], "ms_per_step": ms} for n, ms in kernels]}
