"""NCSN++ (Song et al. 2021, score-SDE), in the CIFAR-10 form the iCT paper uses (iCT §7).

A UNet of BigGAN-style residual blocks with FIR [1,3,3,1] resampling, a Gaussian Fourier noise
embedding, a "residual" progressive-input branch in the encoder (the input image, repeatedly
down-sampled, is added at every level), a standard decoder, and every residual sum scaled by 1/sqrt(2).

Initialisation (score-SDE's): Xavier-uniform weights and zero biases for every conv and linear layer,
except the last conv of every residual branch, the attention output projection and the output conv,
which start at zero. So each block starts as (a rescaled) identity and the network's output is 0.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (ConditioningLinear, FourierEmbedding, Resample2x, SelfAttention, ZeroConv2d, check_inputs,
                     fir_taps, group_norm, init_weights_, level_resolutions, no_autocast, xavier_init_)

SKIP_SCALE = 1 / math.sqrt(2)
NORM_MIN_CHANNELS = 4  # score-SDE's GroupNorm: min(channels // 4, 32) groups  # score-SDE skip_rescale: (x + h) / sqrt(2) keeps the variance of a sum


class NCSNppBlock(nn.Module):
    """score-SDE ResnetBlockBigGANpp, optionally followed by self-attention (AttnBlockpp).

    h = conv0(resample(silu(norm0(x)))) + W emb;  h = conv1(dropout(silu(norm1(h))));
    out = (skip(resample(x)) + h) / sqrt(2), where skip is a 1x1 conv when shape or channels change.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, dropout: float,
                 fir_kernel: tuple[int, ...], eps: float, resample: str | None = None, attention: bool = False,
                 fp32_conditioning: bool = True):
        super().__init__()
        self.norm0 = group_norm(in_channels, eps, NORM_MIN_CHANNELS)
        # One stateless module serves both branches: h and x are resampled by the same filter.
        self.resample = Resample2x(resample, fir_kernel) if resample else nn.Identity()
        self.conv0 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.emb_proj = ConditioningLinear(emb_channels, out_channels, fp32=fp32_conditioning)
        self.norm1 = group_norm(out_channels, eps, NORM_MIN_CHANNELS)
        self.dropout = nn.Dropout(dropout)  # draws from torch's global RNG: same state, same mask
        self.conv1 = ZeroConv2d(out_channels, out_channels, kernel_size=3, padding=1)
        needs_skip_conv = in_channels != out_channels or resample is not None
        self.skip = nn.Conv2d(in_channels, out_channels, kernel_size=1) if needs_skip_conv else None
        # One head over all channels, as score-SDE's AttnBlockpp.
        self.attn = SelfAttention(out_channels, out_channels, eps, SKIP_SCALE) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(self.resample(F.silu(self.norm0(x))))
        # The sum is formed in fp32 (the projection's dtype) and then rounded once to h's dtype: rounding the
        # projection first would make it identical for neighbouring sigmas in most channels again.
        h = (h + self.emb_proj(emb)[:, :, None, None]).to(h.dtype)
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        x = self.resample(x)
        x = (h + (self.skip(x) if self.skip is not None else x)) * SKIP_SCALE
        return self.attn(x) if self.attn is not None else x


class FIRDownConv(nn.Module):
    """score-SDE's fused FIR down-sampling conv (progressive input): FIR filter, then a stride-2 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int, fir_kernel: tuple[int, ...]):
        super().__init__()
        self.kernel = tuple(fir_kernel)
        self.register_buffer("taps", fir_taps(self.kernel), persistent=False)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=0)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.taps.copy_(fir_taps(self.kernel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C, K = x.shape[1], self.taps.shape[-1]
        # Pad K/2 each side (upfirdn's pad for K taps then a 3x3 stride-2 conv): H -> H + 1 -> H / 2.
        x = F.conv2d(x, self.taps.to(dtype=x.dtype).expand(C, 1, K, K), padding=K // 2, groups=C)
        return self.conv(x)


class NCSNpp(nn.Module):
    """NCSN++ backbone F(x, c_noise, class_labels) -> same shape as x (iCT §7, CIFAR-10 recipe)."""

    def __init__(self, *, img_resolution: int, in_channels: int, label_dim: int, model_channels: int,
                 channel_mult: tuple[int, ...], channel_mult_emb: int, channel_mult_noise: int,
                 num_blocks: int, attn_resolutions: tuple[int, ...], dropout: float, fourier_scale: float,
                 fir_kernel: tuple[int, ...], out_channels: int | None = None, eps: float = 1e-6,
                 fp32_conditioning: bool = True):
        super().__init__()
        resolutions = level_resolutions(img_resolution, channel_mult, attn_resolutions)
        self.img_resolution, self.in_channels, self.label_dim = img_resolution, in_channels, label_dim
        emb_ch, noise_ch = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        self.map_noise = FourierEmbedding(noise_ch, fourier_scale)
        self.map_label = nn.Embedding(label_dim, noise_ch) if label_dim else None
        self.fp32_conditioning = fp32_conditioning
        self.map_layer0 = ConditioningLinear(noise_ch, emb_ch, fp32=fp32_conditioning)
        self.map_layer1 = ConditioningLinear(emb_ch, emb_ch, fp32=fp32_conditioning)
        block = functools.partial(NCSNppBlock, emb_channels=emb_ch, dropout=dropout, fir_kernel=fir_kernel, eps=eps,
                                  fp32_conditioning=fp32_conditioning)

        self.conv_in = nn.Conv2d(in_channels, model_channels, kernel_size=3, padding=1)
        self.enc, self.aux_down, self._enc_is_down = nn.ModuleList(), nn.ModuleList(), []
        ch, aux_ch, skip_chs = model_channels, in_channels, [model_channels]
        for level, (mult, res) in enumerate(zip(channel_mult, resolutions)):
            if level > 0:
                self.enc.append(block(ch, ch, resample="down"))
                self.aux_down.append(FIRDownConv(aux_ch, ch, fir_kernel))
                self._enc_is_down.append(True)
                aux_ch = ch
                skip_chs.append(ch)
            for _ in range(num_blocks):
                self.enc.append(block(ch, model_channels * mult, attention=res in attn_resolutions))
                self._enc_is_down.append(False)
                ch = model_channels * mult
                skip_chs.append(ch)

        self.mid = nn.ModuleList([block(ch, ch, attention=True), block(ch, ch)])

        self.dec, self._dec_takes_skip = nn.ModuleList(), []
        for level in reversed(range(len(channel_mult))):
            mult, res = channel_mult[level], resolutions[level]
            for i in range(num_blocks + 1):
                # score-SDE attends once per decoder level, after its last block.
                attention = i == num_blocks and res in attn_resolutions
                self.dec.append(block(ch + skip_chs.pop(), model_channels * mult, attention=attention))
                self._dec_takes_skip.append(True)
                ch = model_channels * mult
            if level > 0:
                self.dec.append(block(ch, ch, resample="up"))
                self._dec_takes_skip.append(False)

        self.out_norm = group_norm(ch, eps, NORM_MIN_CHANNELS)
        self.out_conv = ZeroConv2d(ch, out_channels or in_channels, kernel_size=3, padding=1)
        self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise all weights and buffers, e.g. after building on `meta` and `to_empty()`."""
        init_weights_(self, xavier_init_)

    def shard_units(self) -> list[nn.Module]:
        """The residual(+attention) blocks in forward order, for per-block FSDP / checkpointing."""
        return [*self.enc, *self.mid, *self.dec]

    def conditioning_modules(self) -> list[nn.Module]:
        """The modules with parameters on the noise-level path (mapping network, per-block projections):
        float32 even under bf16 mixed precision when `fp32_conditioning` is set."""
        mapping = [m for m in (self.map_label, self.map_layer0, self.map_layer1) if m is not None]
        return [*mapping, *(block.emb_proj for block in self.shard_units())]

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        check_inputs(x, noise_labels, class_labels, self.in_channels, self.img_resolution, self.label_dim)
        emb = self.embed_noise(noise_labels, class_labels, x.device.type)
        aux, aux_down = x, iter(self.aux_down)
        h = self.conv_in(x)
        skips = [h]
        for block, is_down in zip(self.enc, self._enc_is_down):
            h = block(h, emb)
            if is_down:
                # Progressive input, 'residual': the image pyramid joins the features at every level.
                h = aux = (h + next(aux_down)(aux)) * SKIP_SCALE
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
        """The conditioning vector every block projects: Fourier features of c_noise (+ label), mapping MLP."""
        with no_autocast(device_type):
            emb = self.map_noise(noise_labels.float())
            if self.map_label is not None:
                emb = emb + self.map_label(class_labels).float()
            if not self.fp32_conditioning:
                # Without fp32 conditioning the MLP runs in the weights' own dtype (bf16 under FSDP2/ZeRO).
                emb = emb.to(self.map_layer0.weight.dtype)
            return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
