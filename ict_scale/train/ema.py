"""Evaluation-time EMA of the student (iCT §3.2: the EMA is for sampling only, never the teacher)."""
from __future__ import annotations

import torch


class EMA:
    """theta_ema <- decay * theta_ema + (1 - decay) * theta, on tensors shaped (and sharded) like the params.

    Kept in float32 whatever the parameters' dtype, so that a decay of 0.99997 is not rounded away.
    """

    def __init__(self, targets: dict[str, torch.Tensor]):
        self.names = list(targets)
        self.shadow = {n: t.detach().to(torch.float32, copy=True) for n, t in targets.items()}

    @torch.no_grad()
    def update(self, targets: dict[str, torch.Tensor], decay: float) -> None:
        shadow = [self.shadow[n] for n in self.names]
        live = [targets[n].detach() for n in self.names]
        if any(t.dtype != torch.float32 for t in live):
            live = [t.float() for t in live]
        # lerp(shadow, live, 1 - decay) == decay * shadow + (1 - decay) * live: the live weights move the EMA.
        torch._foreach_lerp_(shadow, live, 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    @torch.no_grad()
    def copy_to(self, targets: dict[str, torch.Tensor]) -> None:
        """Write the EMA weights into `targets` (e.g. a model used for sampling)."""
        for n in self.names:
            targets[n].copy_(self.shadow[n])
