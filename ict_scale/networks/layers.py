"""Building blocks shared by the NCSN++ and ADM backbones: norm, resampling, attention, embeddings.

Everything here is channels_last- and bf16-autocast-friendly: no host syncs, no `.item()`, and the
only tensors created in `forward` are built on the input's device. Randomly initialised buffers are
(re)filled by `reset_parameters()`, so a network built on the `meta` device and materialised with
`to_empty()` is made whole again by its `init_weights()`.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, eps: float, min_channels_per_group: int = 1) -> nn.GroupNorm:
    """GroupNorm with 32 groups (both papers), fewer where `channels` is small or not a multiple of 32.

    NCSN++ asks for at least 4 channels per group (score-SDE's and EDM's rule): with one channel per group the
    norm would subtract each channel's own mean, and with it the per-channel noise embedding that NCSN++ adds
    just before norm1, so a narrow network (under 128 channels) would lose its conditioning on sigma. ADM
    (guided-diffusion: always 32 groups) applies its conditioning after the norm and keeps the default.
    The paper recipes (128 channels and more) always get 32 groups.
    """
    groups = math.gcd(min(32, max(1, channels // min_channels_per_group)), channels)
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=eps)


class ZeroConv2d(nn.Conv2d):
    """A conv whose weight and bias start at zero: the last layer of a residual branch and the output
    layer (score-SDE init_scale=0, ADM zero_module), so every residual block starts as the identity."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def fir_taps(kernel: tuple[int, ...]) -> torch.Tensor:
    """The separable 2-D FIR filter outer(k, k) / sum(k)^2 (unit DC gain), shape (1, 1, K, K)."""
    k = torch.tensor(kernel, dtype=torch.float32)
    return (torch.outer(k, k) / k.sum() ** 2)[None, None]


class Resample2x(nn.Module):
    """Up- or down-sampling by 2 with a symmetric FIR filter (score-SDE upsample_2d / downsample_2d).

    Down: filter, then keep every other pixel. Up: zero-stuff, then filter with gain 4. The filter is
    applied per channel as a grouped conv. kernel (1, 1) is exactly nearest-neighbour up-sampling and
    2x2 average pooling (ADM's resampling), which run through the faster dedicated ops.
    """

    def __init__(self, mode: str, kernel: tuple[int, ...] = (1, 3, 3, 1)):
        super().__init__()
        if mode not in ("up", "down"):
            raise ValueError(f"Resample2x mode must be 'up' or 'down', got {mode!r}")
        kernel = tuple(int(v) for v in kernel)
        if len(kernel) % 2 or kernel != kernel[::-1]:
            raise ValueError(f"FIR kernel must be symmetric with an even length, got {kernel}")
        self.mode, self.kernel = mode, kernel
        # Derived from `kernel`, so it stays out of the state dict; reset_parameters refills it.
        self.register_buffer("taps", fir_taps(kernel), persistent=False)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.taps.copy_(fir_taps(self.kernel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == (1, 1):
            return F.interpolate(x, scale_factor=2.0, mode="nearest") if self.mode == "up" else F.avg_pool2d(x, 2)
        return fir_resample(x, self.taps, self.mode)


def fir_resample(x: torch.Tensor, taps: torch.Tensor, mode: str) -> torch.Tensor:
    """upfirdn2d by a factor of 2 (score-SDE's padding for an even, symmetric K) as a grouped conv.

    Under torch.compile the same filter runs as shifted slices (`fir_resample_separable`), which Inductor
    fuses with the neighbouring element-wise ops into one kernel; eager mode keeps the single grouped conv.
    """
    if torch.compiler.is_compiling():
        return fir_resample_separable(x, taps, mode)
    C, K = x.shape[1], taps.shape[-1]
    w = taps.to(dtype=x.dtype).expand(C, 1, K, K)
    if mode == "down":
        return F.conv2d(x, w, stride=2, padding=(K - 2) // 2, groups=C)
    # conv_transpose with stride 2 is zero-stuffing followed by the filter; padding K/2 - 1 gives
    # exactly upfirdn's pad (K/2, K/2 - 1) on the stuffed signal, and 4 restores unit gain.
    return F.conv_transpose2d(x, w * 4, stride=2, padding=K // 2 - 1, groups=C)


def _fir_1d(x: torch.Tensor, k: torch.Tensor, dim: int, mode: str) -> torch.Tensor:
    """One axis of the separable filter: 2x down (stride-2 correlation) or 2x up (zero-stuff, then filter)."""
    K, n = k.numel(), x.shape[dim]
    if mode == "up":
        # Zero-stuffing then correlating with gain-2 taps == conv_transpose(stride 2, padding K/2 - 1).
        x = torch.stack([x, torch.zeros_like(x)], dim=dim + 1).flatten(dim, dim + 1)
        k, lo, hi, out_len, stride = k * 2, K // 2, K // 2 - 1, 2 * n, 1
    else:
        lo = hi = (K - 2) // 2
        out_len, stride = n // 2, 2
    pad = [0, 0] * (x.ndim - 1 - dim) + [lo, hi]
    x = F.pad(x, pad)
    return sum(k[j] * x.narrow(dim, j, stride * (out_len - 1) + 1)[(slice(None),) * dim + (slice(None, None, stride),)]
               for j in range(K))


def fir_resample_separable(x: torch.Tensor, taps: torch.Tensor, mode: str) -> torch.Tensor:
    """fir_resample as two 1-D passes of shifted slices (taps = outer(k, k) / sum(k)^2 is separable)."""
    k = taps[0, 0].sum(dim=0).to(dtype=x.dtype)  # the row sums of outer(k, k)/s^2 are k/s: the 1-D taps
    return _fir_1d(_fir_1d(x, k, 2, mode), k, 3, mode)


class SelfAttention(nn.Module):
    """Residual multi-head self-attention over the pixels (DDPM AttnBlock, ADM AttentionBlock).

    qkv is split into q, k, v before heads (ADM's "new attention order"). Runs through
    scaled_dot_product_attention, so flash / memory-efficient kernels are used on GPU. The token
    layout (B, HW, ...) is a free view of a channels_last activation.
    """

    def __init__(self, channels: int, head_channels: int, eps: float, skip_scale: float = 1.0):
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"attention channels {channels} not divisible by head_channels {head_channels}")
        self.num_heads, self.skip_scale = channels // head_channels, skip_scale
        self.norm = group_norm(channels, eps)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj = ZeroConv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).permute(0, 2, 3, 1).reshape(B, H * W, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, HW, head_channels)
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_channels)) v
        a = a.transpose(1, 2).reshape(B, H, W, C).permute(0, 3, 1, 2)
        return (x + self.proj(a)) * self.skip_scale


def no_autocast(device_type: str):
    """A context that switches autocast off on `device_type` (a no-op where autocast does not exist)."""
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class ConditioningLinear(nn.Linear):
    """A Linear of the noise-level conditioning path that computes in float32 when `fp32` is set.

    At the finest discretisation (N = 1281) neighbouring sigmas differ by ~1e-5 relative at the mapping
    network and the per-block embedding projections, far below bf16's resolution (~4e-3): computed in
    bf16, most channels come out identical for sigma_i and sigma_{i+1}, so teacher and student would see
    the same conditioning. EDM and guided-diffusion keep this path in fp32 too. Here it runs outside
    autocast, with the weights upcast, so it is fp32 whatever the parameters' dtype (bf16 under a sharding
    backend's mixed precision); the output stays fp32 and promotes the sum it joins. The parameter names
    are those of nn.Linear, so checkpoints do not depend on the flag.
    """

    def __init__(self, in_features: int, out_features: int, fp32: bool = True):
        super().__init__(in_features, out_features)
        self.fp32 = fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fp32:
            return super().forward(x)
        with no_autocast(x.device.type):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias)


class FourierEmbedding(nn.Module):
    """Gaussian Fourier features [sin(2 pi f c), cos(2 pi f c)], f ~ N(0, scale^2) (score-SDE, iCT §2).

    The frequencies are frozen. They are drawn from a fixed-seed generator so that every rank and every
    run gets the same embedding whatever the global seed, and they live in the state dict so a checkpoint
    carries them.
    """

    def __init__(self, num_channels: int, scale: float, seed: int = 0):
        super().__init__()
        if num_channels % 2:
            raise ValueError(f"FourierEmbedding num_channels must be even, got {num_channels}")
        self.scale, self.seed = scale, seed
        self.register_buffer("freqs", torch.empty(num_channels // 2))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            self.freqs.copy_(torch.randn(self.freqs.shape, generator=g) * self.scale)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        # float32 whatever the autocast dtype: sin/cos of bf16 phases would lose the small freqs.
        phase = c_noise.to(torch.float32)[:, None] * (2 * math.pi * self.freqs.to(torch.float32))[None, :]
        return torch.cat([phase.sin(), phase.cos()], dim=1)


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding [cos(t w_i), sin(t w_i)], w_i = max_period^(-i/half) (ADM)."""

    def __init__(self, num_channels: int, max_period: float = 10000.0):
        super().__init__()
        if num_channels % 2:
            raise ValueError(f"PositionalEmbedding num_channels must be even, got {num_channels}")
        self.num_channels, self.max_period = num_channels, max_period

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        i = torch.arange(half, device=t.device, dtype=torch.float32)
        phase = t.to(torch.float32)[:, None] * torch.exp(-math.log(self.max_period) * i / half)[None, :]
        return torch.cat([phase.cos(), phase.sin()], dim=1)


def xavier_init_(module: nn.Module) -> None:
    """score-SDE's default_init: variance scaling, fan_avg, uniform (= Xavier uniform); zero bias."""
    nn.init.xavier_uniform_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def torch_default_init_(module: nn.Module) -> None:
    """PyTorch's own init (Kaiming uniform, a = sqrt(5)), which ADM keeps."""
    module.reset_parameters()


def init_weights_(net: nn.Module, layer_init: Callable[[nn.Module], None]) -> None:
    """(Re)initialise every parameter and buffer of `net`: `layer_init` for conv/linear layers, zero
    for ZeroConv2d, each module's own reset for the rest (norms, embeddings, FIR taps, frequencies)."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, ZeroConv2d):
            layer_init(m)
        elif hasattr(m, "reset_parameters"):
            m.reset_parameters()


def level_resolutions(img_resolution: int, channel_mult: tuple[int, ...],
                      attn_resolutions: tuple[int, ...]) -> list[int]:
    """The feature resolution of each UNet level, checking that the arguments make a valid UNet."""
    if not channel_mult or any(m < 1 for m in channel_mult):
        raise ValueError(f"channel_mult must be a non-empty sequence of positive ints, got {channel_mult}")
    levels = len(channel_mult)
    if img_resolution < 2 ** (levels - 1) or img_resolution % 2 ** (levels - 1):
        raise ValueError(f"img_resolution={img_resolution} must be divisible by 2^{levels - 1} "
                         f"for channel_mult={channel_mult}")
    resolutions = [img_resolution >> level for level in range(levels)]
    unknown = sorted(set(attn_resolutions) - set(resolutions))
    if unknown:
        raise ValueError(f"attn_resolutions {unknown} match no level resolution {resolutions}")
    return resolutions


def check_inputs(x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                 in_channels: int, img_resolution: int, label_dim: int) -> None:
    """Shape checks on the forward arguments (metadata only: no host sync)."""
    expected = (in_channels, img_resolution, img_resolution)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"x must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
    if noise_labels.shape != (x.shape[0],):
        raise ValueError(f"noise_labels must have shape ({x.shape[0]},), got {tuple(noise_labels.shape)}")
    if label_dim and class_labels is None:
        raise ValueError(f"this network is class-conditional (label_dim={label_dim}): class_labels are required")
    if not label_dim and class_labels is not None:
        raise ValueError("this network is unconditional (label_dim=0): pass class_labels=None")
    if class_labels is not None and class_labels.shape != (x.shape[0],):
        raise ValueError(f"class_labels must be int64 of shape ({x.shape[0]},), got {tuple(class_labels.shape)}")
