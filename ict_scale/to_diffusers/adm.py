"""ADM as diffusers' `UNet2DModel`: the config and the weight names of OpenAI's ImageNet-64 CM conversions.

The two networks are the same function: guided-diffusion ResBlocks with scale-shift norm are `ResnetBlock2D`
(time_embedding_norm="scale_shift"), its residual up/down-sampling blocks are `ResnetBlock2D(up/down=True)`
(`upsample_type`/`downsample_type` "resnet"), its attention is diffusers' `Attention` with q, k, v split before
the heads, and the sinusoidal embedding of c_noise = 1000 * 0.25 ln(sigma) is `Timesteps(flip_sin_to_cos=True)`.
Nothing here imports diffusers: the mapping is plain torch, checked against the diffusers model by the export.
"""
from __future__ import annotations

import torch
from torch import nn

from ict_scale.networks.adm import ADM, ADMBlock
from ict_scale.networks.layers import Resample2x


class NotExpressible(ValueError):
    """The network has a feature that the diffusers model cannot express exactly."""


def _levels(blocks, mode: str) -> list[tuple[list[ADMBlock], ADMBlock | None]]:
    """Split a block list into UNet levels: (the level's blocks, the resampling block that closes it or None)."""
    levels, current = [], []
    for block in blocks:
        if isinstance(block.resample, Resample2x) and block.resample.mode == mode:
            levels.append((current, block))
            current = []
        else:
            current.append(block)
    levels.append((current, None))
    return levels


def _block_type(blocks: list[ADMBlock], attn: str, plain: str, where: str) -> str:
    has = {b.attn is not None for b in blocks}
    if len(has) != 1:
        raise NotExpressible(f"{where} mixes blocks with and without attention; UNet2DModel attends in all or none")
    return attn if has.pop() else plain


def _one(values: set, what: str):
    if len(values) != 1:
        raise NotExpressible(f"UNet2DModel has one {what} for the whole network; this ADM uses {sorted(values)}")
    return values.pop()


def unet2d_config(net: ADM) -> dict:
    """UNet2DModel's constructor arguments for `net`; NotExpressible names the first feature it lacks."""
    down, up = _levels(net.enc, "down"), _levels(net.dec, "up")
    block_out_channels = [blocks[-1].conv0.out_channels for blocks, _ in down]
    layers_per_block = _one({len(blocks) for blocks, _ in down}, "blocks-per-level count")
    if net.map_layer0.in_features != block_out_channels[0]:
        raise NotExpressible(f"UNet2DModel's timestep embedding has the first level's width ({block_out_channels[0]} "
                             f"channels); this ADM's has {net.map_layer0.in_features} (channel_mult[0] must be 1)")
    if net.mid[0].attn is None:
        raise NotExpressible("UNet2DModel's middle block attends; this ADM's does not")
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    heads = [m for m in net.modules() if hasattr(m, "num_heads")]
    return dict(
        sample_size=net.img_resolution, in_channels=net.in_channels, out_channels=net.out_conv.out_channels,
        block_out_channels=block_out_channels, layers_per_block=layers_per_block,
        down_block_types=[_block_type(b, "AttnDownBlock2D", "ResnetDownsampleBlock2D", f"encoder level {i}")
                          for i, (b, _) in enumerate(down)],
        up_block_types=[_block_type(b, "AttnUpBlock2D", "ResnetUpsampleBlock2D", f"decoder level {i}")
                        for i, (b, _) in enumerate(up)],
        time_embedding_type="positional", flip_sin_to_cos=True, freq_shift=0,
        time_embedding_dim=net.map_layer0.out_features,
        num_class_embeds=net.map_label.num_embeddings if net.map_label is not None else None,
        resnet_time_scale_shift="scale_shift", downsample_type="resnet", upsample_type="resnet",
        attention_head_dim=_one({m.norm.num_channels // m.num_heads for m in heads}, "attention head width")
        if heads else None,
        norm_num_groups=_one({m.num_groups for m in norms}, "GroupNorm group count"),
        attn_norm_num_groups=_one({m.num_groups for m in norms}, "GroupNorm group count"),
        norm_eps=_one({m.eps for m in norms}, "GroupNorm epsilon"), act_fn="silu", dropout=0.0,
    )


def _block_weights(block: ADMBlock, resnet: str, attention: str | None) -> dict[str, torch.Tensor]:
    """One ADMBlock's tensors under the names of a ResnetBlock2D (and the Attention that follows it)."""
    names = {"norm0": "norm1", "conv0": "conv1", "emb_proj": "time_emb_proj", "norm1": "norm2", "conv1": "conv2",
             "skip": "conv_shortcut"}
    out = {}
    for ours, theirs in names.items():
        module = getattr(block, ours)
        if module is not None:
            out.update({f"{resnet}.{theirs}.{k}": v for k, v in module.state_dict().items()})
    if block.attn is not None:
        a = block.attn
        q, k, v = a.qkv.weight[:, :, 0, 0].chunk(3, dim=0)  # q, k, v are split before the heads in both
        qb, kb, vb = a.qkv.bias.chunk(3, dim=0)
        out.update({f"{attention}.group_norm.weight": a.norm.weight, f"{attention}.group_norm.bias": a.norm.bias,
                    f"{attention}.to_q.weight": q, f"{attention}.to_q.bias": qb,
                    f"{attention}.to_k.weight": k, f"{attention}.to_k.bias": kb,
                    f"{attention}.to_v.weight": v, f"{attention}.to_v.bias": vb,
                    f"{attention}.to_out.0.weight": a.proj.weight[:, :, 0, 0],
                    f"{attention}.to_out.0.bias": a.proj.bias})
    return out


def unet2d_state_dict(net: ADM) -> dict[str, torch.Tensor]:
    """`net`'s tensors under UNet2DModel's parameter names (the config of `unet2d_config`)."""
    sd = {f"time_embedding.linear_1.{k}": v for k, v in net.map_layer0.state_dict().items()}
    sd.update({f"time_embedding.linear_2.{k}": v for k, v in net.map_layer1.state_dict().items()})
    if net.map_label is not None:
        sd["class_embedding.weight"] = net.map_label.weight
    sd.update({f"conv_in.{k}": v for k, v in net.conv_in.state_dict().items()})
    for kind, blocks in (("down", net.enc), ("up", net.dec)):
        for i, (level, resample) in enumerate(_levels(blocks, kind)):
            for j, block in enumerate(level):
                sd.update(_block_weights(block, f"{kind}_blocks.{i}.resnets.{j}", f"{kind}_blocks.{i}.attentions.{j}"))
            if resample is not None:
                sd.update(_block_weights(resample, f"{kind}_blocks.{i}.{kind}samplers.0", None))
    sd.update(_block_weights(net.mid[0], "mid_block.resnets.0", "mid_block.attentions.0"))
    sd.update(_block_weights(net.mid[1], "mid_block.resnets.1", None))
    sd.update({f"conv_norm_out.{k}": v for k, v in net.out_norm.state_dict().items()})
    sd.update({f"conv_out.{k}": v for k, v in net.out_conv.state_dict().items()})
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def to_unet2d(net: ADM):
    """A diffusers UNet2DModel computing exactly `net` (every tensor of both is matched by name and shape)."""
    from diffusers import UNet2DModel
    unet = UNet2DModel(**unet2d_config(net))
    unet.load_state_dict(unet2d_state_dict(net), strict=True)
    return unet.eval()
