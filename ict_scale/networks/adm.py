"""ADM (Dhariwal & Nichol 2021, guided-diffusion), in the ImageNet-64 form the iCT paper uses (iCT §7).

A UNet of residual blocks with scale-shift (adaptive GroupNorm) conditioning, residual up/down-sampling
blocks (nearest / 2x2 average, BigGAN style), multi-head attention (64 channels per head) at the listed
resolutions, a sinusoidal timestep embedding of c_noise = 1000 * 0.25 ln(sigma), and a class embedding
added to it. The output has the input's channel count (no learned variance).

Dropout is applied only in blocks whose output resolution is <= `dropout_max_resolution` (iCT
reproductions: 16 on ImageNet-64); other blocks hold no Dropout module at all.

Initialisation (guided-diffusion's): PyTorch's default init everywhere, except the last conv of every
residual branch, the attention output projection and the output conv, which start at zero.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (ConditioningLinear, PositionalEmbedding, Resample2x, SelfAttention, ZeroConv2d, check_inputs,
                     group_norm, init_weights_, level_resolutions, no_autocast, torch_default_init_)

NEAREST_AND_AVG_POOL = (1, 1)  # the FIR kernel that is exactly nearest up-sampling / 2x2 average pooling


class ADMBlock(nn.Module):
    """guided-diffusion ResBlock with use_scale_shift_norm, optionally followed by an AttentionBlock.

    h = conv0(resample(silu(norm0(x))));  (scale, shift) = W silu(emb);
    h = conv1(dropout(silu(norm1(h) * (1 + scale) + shift)));  out = skip(resample(x)) + h.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, dropout: float,
                 head_channels: int, eps: float, resample: str | None = None, attention: bool = False,
                 fp32_conditioning: bool = True):
        super().__init__()
        self.norm0 = group_norm(in_channels, eps)
        self.resample = Resample2x(resample, NEAREST_AND_AVG_POOL) if resample else nn.Identity()
        self.conv0 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.emb_proj = ConditioningLinear(emb_channels, 2 * out_channels, fp32=fp32_conditioning)
        self.norm1 = group_norm(out_channels, eps)
        # No module at all where dropout is off, so "no dropout above 16x16" is visible in the tree.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv1 = ZeroConv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        self.attn = SelfAttention(out_channels, head_channels, eps) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(self.resample(F.silu(self.norm0(x))))
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm1(h) * (1 + scale) + shift)
        h = self.conv1(self.dropout(h))
        x = self.resample(x)
        x = h + (self.skip(x) if self.skip is not None else x)
        return self.attn(x) if self.attn is not None else x


def attention_channels(img_resolution: int, model_channels: int, channel_mult: tuple[int, ...],
                       attn_resolutions: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(level, resolution, channels) of each level whose blocks attend, as ADM below builds them: the levels
    at attn_resolutions, and the lowest level, where the middle block always attends."""
    resolutions = level_resolutions(img_resolution, channel_mult, attn_resolutions)
    levels = sorted({i for i, r in enumerate(resolutions) if r in attn_resolutions} | {len(resolutions) - 1})
    return [(i, resolutions[i], model_channels * channel_mult[i]) for i in levels]


class ADM(nn.Module):
    """ADM backbone F(x, c_noise, class_labels) -> same shape as x (iCT §7, ImageNet-64 recipe)."""

    def __init__(self, *, img_resolution: int, in_channels: int, label_dim: int, model_channels: int,
                 channel_mult: tuple[int, ...], channel_mult_emb: int, num_blocks: int,
                 attn_resolutions: tuple[int, ...], head_channels: int, dropout: float,
                 dropout_max_resolution: int | None, out_channels: int | None = None, eps: float = 1e-5,
                 fp32_conditioning: bool = True):
        super().__init__()
        resolutions = level_resolutions(img_resolution, channel_mult, attn_resolutions)
        self.img_resolution, self.in_channels, self.label_dim = img_resolution, in_channels, label_dim
        emb_ch = model_channels * channel_mult_emb
        self.map_noise = PositionalEmbedding(model_channels)
        self.fp32_conditioning = fp32_conditioning
        self.map_layer0 = ConditioningLinear(model_channels, emb_ch, fp32=fp32_conditioning)
        self.map_layer1 = ConditioningLinear(emb_ch, emb_ch, fp32=fp32_conditioning)
        self.map_label = nn.Embedding(label_dim, emb_ch) if label_dim else None

        def block(cin: int, cout: int, out_res: int, **kwargs) -> ADMBlock:
            on = dropout_max_resolution is None or out_res <= dropout_max_resolution
            return ADMBlock(cin, cout, emb_ch, dropout=dropout if on else 0.0, head_channels=head_channels,
                            eps=eps, fp32_conditioning=fp32_conditioning, **kwargs)

        ch = model_channels * channel_mult[0]
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)
        self.enc, skip_chs = nn.ModuleList(), [ch]
        for level, (mult, res) in enumerate(zip(channel_mult, resolutions)):
            for _ in range(num_blocks):
                self.enc.append(block(ch, model_channels * mult, res, attention=res in attn_resolutions))
                ch = model_channels * mult
                skip_chs.append(ch)
            if level < len(channel_mult) - 1:
                self.enc.append(block(ch, ch, res // 2, resample="down"))
                skip_chs.append(ch)

        self.mid = nn.ModuleList([block(ch, ch, resolutions[-1], attention=True), block(ch, ch, resolutions[-1])])

        self.dec, self._dec_takes_skip = nn.ModuleList(), []
        for level in reversed(range(len(channel_mult))):
            mult, res = channel_mult[level], resolutions[level]
            for _ in range(num_blocks + 1):
                attention = res in attn_resolutions
                self.dec.append(block(ch + skip_chs.pop(), model_channels * mult, res, attention=attention))
                self._dec_takes_skip.append(True)
                ch = model_channels * mult
            if level > 0:
                self.dec.append(block(ch, ch, res * 2, resample="up"))
                self._dec_takes_skip.append(False)

        self.out_norm = group_norm(ch, eps)
        self.out_conv = ZeroConv2d(ch, out_channels or in_channels, kernel_size=3, padding=1)

    def init_weights(self) -> None:
        """(Re)initialise all weights and buffers, e.g. after building on `meta` and `to_empty()`.

        Not called by the constructor: PyTorch layers already start with this init, and a second pass
        over 300-500M parameters would only cost time.
        """
        init_weights_(self, torch_default_init_)

    def shard_units(self) -> list[nn.Module]:
        """The residual(+attention) blocks in forward order, for per-block FSDP / checkpointing."""
        return [*self.enc, *self.mid, *self.dec]

    def conditioning_modules(self) -> list[nn.Module]:
        """The modules with parameters on the noise-level path (mapping network, label embedding, per-block
        scale/shift projections): float32 even under bf16 mixed precision when `fp32_conditioning` is set."""
        mapping = [m for m in (self.map_layer0, self.map_layer1, self.map_label) if m is not None]
        return [*mapping, *(block.emb_proj for block in self.shard_units())]

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        check_inputs(x, noise_labels, class_labels, self.in_channels, self.img_resolution, self.label_dim)
        emb = self.embed_noise(noise_labels, class_labels, x.device.type)

        h = self.conv_in(x)
        skips = [h]
        for block in self.enc:
            h = block(h, emb)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        for block, takes_skip in zip(self.dec, self._dec_takes_skip):
            if takes_skip:
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb)
        return self.out_conv(F.silu(self.out_norm(h)))

    def embed_noise(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                    device_type: str) -> torch.Tensor:
        """silu(MLP(sinusoidal(c_noise)) + label embedding): what every block's scale/shift projection reads."""
        with no_autocast(device_type) if self.fp32_conditioning else contextlib.nullcontext():
            emb = self.map_layer1(F.silu(self.map_layer0(self.map_noise(noise_labels))))
            if self.map_label is not None:
                emb = emb + self.map_label(class_labels)
            # Every block reads silu(emb) (guided-diffusion's emb_layers start with SiLU): compute it once.
            return F.silu(emb)
