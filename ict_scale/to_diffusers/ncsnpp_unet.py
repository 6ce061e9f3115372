"""NCSN++ as a diffusers model: `ConsistencyModelPipeline.from_pretrained` loads it after `import` of this module.

diffusers' UNet2DModel cannot express the iCT NCSN++ exactly, so the export ships this class instead:
- noise embedding: UNet2DModel's "fourier" embedding takes log(timestep) and divides the network's output by the
  timestep (score-SDE's scale_by_sigma); NCSN++ feeds c_noise = 0.25 ln(sigma) to the Fourier features as it is
  and does not rescale its output. The scheduler's timestep, 1000 * 0.25 ln(sigma), is negative below sigma = 1.
- progressive input: UNet2DModel's SkipDownBlock2D is score-SDE's "input_skip" (the FIR-downsampled image
  through a 1x1 conv, added to the features); NCSN++ uses "residual" (a FIR + 3x3 stride-2 conv of the last
  level's sum, added and scaled by 1/sqrt(2), the sum carried on to the next level).
- decoder attention: AttnUpBlock2D attends after every residual block of a level; NCSN++ after its last one.

The class wraps ict_scale's own NCSNpp, so the weights are the training run's tensors under a `net.` prefix.
"""
from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin  # noqa: F401  (ModelMixin here tells diffusers how to load the class)
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput

from ict_scale.networks.ncsnpp import NCSNpp


class NCSNppUNet(ModelMixin, ConfigMixin):
    """NCSN++ called the way ConsistencyModelPipeline calls a UNet: (c_in x, timestep, class_labels)."""

    @register_to_config
    def __init__(self, sample_size: int = 32, in_channels: int = 3, out_channels: int = 3,
                 num_class_embeds: int | None = None, model_channels: int = 128, channel_mult=(2, 2, 2),
                 channel_mult_emb: int = 4, channel_mult_noise: int = 2, num_blocks: int = 4,
                 attn_resolutions=(16,), dropout: float = 0.0, fourier_scale: float = 0.02,
                 fir_kernel=(1, 3, 3, 1), eps: float = 1e-6, fp32_conditioning: bool = True):
        super().__init__()
        self.net = NCSNpp(img_resolution=sample_size, in_channels=in_channels, out_channels=out_channels,
                          label_dim=num_class_embeds or 0, model_channels=model_channels,
                          channel_mult=tuple(channel_mult), channel_mult_emb=channel_mult_emb,
                          channel_mult_noise=channel_mult_noise, num_blocks=num_blocks,
                          attn_resolutions=tuple(attn_resolutions), dropout=dropout, fourier_scale=fourier_scale,
                          fir_kernel=tuple(fir_kernel), eps=eps, fp32_conditioning=fp32_conditioning)

    @classmethod
    def from_network_args(cls, kwargs: dict) -> "NCSNppUNet":
        """The model for NCSNpp(**kwargs), in diffusers' names for the arguments the pipeline reads."""
        kwargs = dict(kwargs)
        label_dim = kwargs.pop("label_dim")
        return cls(sample_size=kwargs.pop("img_resolution"), num_class_embeds=label_dim or None,
                   out_channels=kwargs.pop("out_channels", None) or kwargs["in_channels"],
                   **{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()})

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                return_dict: bool = True):
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        # The scheduler's timestep is ADM's c_noise, 1000 * 0.25 ln(sigma + 1e-44); NCSN++ reads 0.25 ln(sigma).
        c_noise = (timestep.to(torch.float64) / 1000).to(torch.float32)
        out = self.net(sample, c_noise, class_labels)
        return UNet2DOutput(sample=out) if return_dict else (out,)
