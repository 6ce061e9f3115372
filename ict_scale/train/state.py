"""The trainer's own pieces of run state, each saved and restored by the Checkpointer under its name."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ict_scale.data import StreamingLoader


@dataclass
class Progress:
    """Where the run is: the step k (which sets the curriculum N(k)), images seen, the non-finite step counts.

    The randomness needs no state of its own: every micro-batch seeds from (train.seed, k, its position).
    """
    step: int = 0
    images_seen: int = 0
    nonfinite_total: int = 0
    nonfinite_run: int = 0  # consecutive non-finite steps so far (the divergence guard)

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "images_seen": self.images_seen, "nonfinite_total": self.nonfinite_total,
                "nonfinite_run": self.nonfinite_run}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.images_seen = int(state["step"]), int(state["images_seen"])
        self.nonfinite_total, self.nonfinite_run = int(state["nonfinite_total"]), int(state.get("nonfinite_run", 0))


class LoaderPosition:
    """The data loader's place in the global sample order, with the run's skip counters summed over ranks.

    `sum_over_ranks` (dict -> dict) is a collective: state_dict() must run on every rank, as the
    Checkpointer does.
    """

    def __init__(self, loader: StreamingLoader, sum_over_ranks: Callable[[dict[str, int]], dict[str, int]]):
        self.loader, self.sum_over_ranks = loader, sum_over_ranks

    def state_dict(self) -> dict:
        return self.loader.state_dict(skips=self.loader.skip_counts(self.sum_over_ranks))

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
