"""Per-block transforms applied before any wrapping, in torchtitan's order: checkpointing, then compile.

Both act on the blocks the network lists in `net.shard_units()` and keep every parameter name, so
checkpoints and EMA names do not depend on them.
"""
from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The blocks of a ConsistencyModel's backbone (per-block FSDP units, checkpointing units)."""
    net = getattr(module, "net", module)
    if not hasattr(net, "shard_units"):
        raise TypeError(f"{type(net).__name__} has no shard_units(): the parallel backends need the list of blocks")
    return list(net.shard_units())


def fp32_conditioning_modules(module: nn.Module) -> list[nn.Module]:
    """The noise-level path's modules that stay float32 under bf16 mixed precision (empty when the network
    computes its conditioning in the parameters' dtype)."""
    net = getattr(module, "net", module)
    if not getattr(net, "fp32_conditioning", False):
        return []
    return list(net.conditioning_modules())


def _checkpointed_forward(forward, *args, **kwargs):
    # Non-reentrant checkpointing works under no_grad (the teacher pass) and with FSDP2 hooks;
    # preserve_rng_state replays the CPU and CUDA generators, so recomputed dropout masks match.
    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


def apply_activation_checkpointing(module: nn.Module) -> None:
    """Recompute each block's activations during backward instead of storing them."""
    for block in shard_units(module):
        # Replacing the instance's forward (not wrapping the module) keeps parameter names unchanged,
        # and hooks that wrappers such as FSDP2 put on the block's __call__ still run outside the checkpoint.
        block.forward = functools.partial(_checkpointed_forward, block.forward)


def apply_compile(module: nn.Module) -> None:
    """torch.compile each block in place (Module.compile keeps names; static shapes per block).

    The blocks share a few code objects, so Dynamo counts their variants against one recompile limit; past
    it a block silently runs eager, and a teacher pass compiled while the student pass runs eager draws
    different dropout masks. The limit is raised to cover every block's grad and no-grad variants.
    """
    import torch._dynamo
    units = shard_units(module)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(units))
    for block in units:
        block.compile(dynamic=False)
