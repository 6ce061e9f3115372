"""The resumable per-rank loader: a position in the global order, DataLoader workers, flips, counters.

The loader's state is the number of samples of the global order consumed by all ranks together (global
batches x global batch size), plus the skip counters of the whole run. Every rank holds the same values
(the trainer sums the counters over ranks), so rank 0's state is sufficient and may be loaded on any
number of ranks with any number of workers.
"""
from __future__ import annotations

import atexit
import itertools
import signal
import weakref
from collections import Counter, deque

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ict_scale.data.order import flip_mask, rank_positions

STATE_VERSION = 1

# The DataLoader worker processes this module started. Workers ignore SIGTERM, and both the
# DataLoader's own shutdown (a collected iterator) and multiprocessing's exit hook rely on SIGTERM: the
# first leaves a worker that did not finish in time alive, the second then joins it forever. So a process
# that exits with a loader open (an exception in the trainer) or after one was dropped would never end.
_started_workers: "weakref.WeakSet" = weakref.WeakSet()  # multiprocessing holds them until joined


def _kill(workers) -> None:
    for w in list(workers):
        if w.is_alive():
            w.kill()
            w.join(timeout=5)


def _stop_workers(iterator) -> None:
    """Ask the iterator's workers to finish and join them (the DataLoader's own shutdown), then kill any
    still alive."""
    workers = list(getattr(iterator, "_workers", ()))
    if hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()  # also stops watching them for SIGCHLD, so killing them raises nothing
    _kill(workers)


def _kill_all_workers() -> None:
    """At exit: kill every worker still alive. Nothing is lost (workers only read), and the DataLoader's
    SIGCHLD handler, which raises when a watched worker dies, has nothing left to report to."""
    if _started_workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _kill(_started_workers)


# atexit runs its hooks last-registered first, so this runs before multiprocessing's (registered when
# torch imported multiprocessing, before this module).
atexit.register(_kill_all_workers)


def ignore_preemption_signals(_worker_id: int) -> None:
    """Workers leave SIGTERM/SIGUSR1/SIGINT to the trainer, which saves a checkpoint and then stops them.

    Slurm, `timeout` and container runtimes signal the whole process group, and so do a terminal's Ctrl-C
    and torchrun's shutdown of its workers. A worker that died of the signal would make the DataLoader raise
    in the trainer before it could write its checkpoint. The loader's shutdown kills a worker that is still
    alive after the DataLoader joined it.
    """
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class RankStream(IterableDataset):
    """This rank's batches from `start` on; worker w of n makes the rank's batches w, w+n, w+2n, ...

    DataLoader returns worker outputs round-robin in worker order, so the main process sees the
    rank's batches in sequence whatever the number of workers.
    """

    def __init__(self, producer, start: int, batch_per_rank: int, rank: int, world_size: int,
                 seed: int, hflip: bool):
        self.producer, self.start, self.batch_per_rank = producer, start, batch_per_rank
        self.rank, self.world_size, self.seed, self.hflip = rank, world_size, seed, hflip

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        plans = _Remembering(rank_positions(self.start, j, self.batch_per_rank, self.rank, self.world_size)
                             for j in itertools.count(worker, num_workers))
        # The producer reads plans ahead (prefetch) but yields batches in plan order.
        for images, labels in self.producer.run(plans):
            positions = plans.handed.popleft()
            if self.hflip:
                # In numpy, in place: torch's indexed flip is slow on small uint8 batches.
                pixels, flip = images.numpy(), flip_mask(positions, self.seed).numpy()
                pixels[flip] = pixels[flip][..., ::-1]
            # Cumulative counters ride along with every batch; the main process keeps the latest.
            yield images, labels, dict(self.producer.skips), worker


class _Remembering:
    """An iterator of position arrays that remembers what it handed out and is not yet matched to a batch."""

    def __init__(self, it):
        self.it, self.handed = it, deque()

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.it)
        self.handed.append(item)
        return item


class StreamingLoader:
    """Infinite iterator of (uint8 images (B, 3, R, R), int64 labels (B,)) for one rank, resumable exactly."""

    def __init__(self, producer, *, batch_per_rank: int, rank: int, world_size: int, seed: int,
                 epoch_size: int, fingerprint: str, hflip: bool, num_workers: int,
                 prefetch_batches: int = 2, worker_start_method: str = "", pin_memory: bool = False):
        if not 0 <= rank < world_size or batch_per_rank <= 0:
            raise ValueError(f"need 0 <= rank < world_size and batch_per_rank > 0, got rank={rank}, "
                             f"world_size={world_size}, batch_per_rank={batch_per_rank}")
        self.producer, self.batch_per_rank, self.rank, self.world_size = producer, batch_per_rank, rank, world_size
        self.seed, self.epoch_size, self.fingerprint, self.hflip = seed, epoch_size, fingerprint, hflip
        self.num_workers, self.prefetch_batches = num_workers, prefetch_batches
        self.worker_start_method, self.pin_memory = worker_start_method, pin_memory
        self.position = 0                      # samples of the global order consumed by all ranks
        self._iterator = None
        self._worker_skips: dict[int, dict] = {}
        self._past_skips: Counter = Counter()  # counters of iterators already shut down
        self._resumed_skips: Counter = Counter()  # the whole run's counters in the state last loaded

    @property
    def global_batch(self) -> int:
        return self.batch_per_rank * self.world_size

    def _start(self):
        stream = RankStream(self.producer, self.position, self.batch_per_rank, self.rank, self.world_size,
                            self.seed, self.hflip)
        kwargs = {}
        if self.num_workers > 0:
            kwargs = dict(prefetch_factor=self.prefetch_batches,
                          multiprocessing_context=self.worker_start_method or None)
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory and torch.cuda.is_available(),
                            worker_init_fn=ignore_preemption_signals if self.num_workers > 0 else None, **kwargs)
        iterator = iter(loader)  # starts the workers
        if self.num_workers > 0:
            _started_workers.update(iterator._workers)
        return iterator

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            self._iterator = self._start()
        images, labels, skips, worker = next(self._iterator)
        self._worker_skips[worker] = skips
        self.position += self.global_batch
        return images, labels

    def state_dict(self, skips: dict[str, int] | None = None) -> dict:
        """Identical on every rank: rank 0's copy is enough to resume any world size.

        `skips`: the run's skip counters, summed over ranks (skip_counts(sum_over_ranks)); by default this
        loader's own, which are the run's in a single process."""
        return {"version": STATE_VERSION, "position": self.position, "seed": self.seed,
                "epoch_size": self.epoch_size, "fingerprint": self.fingerprint,
                "skips": dict(self.skip_counts() if skips is None else skips)}

    def load_state_dict(self, state: dict) -> None:
        """Continue right after the last batch consumed when `state` was taken (any world size)."""
        mine = self.state_dict()
        for key in ("version", "seed", "epoch_size", "fingerprint"):
            if state.get(key) != mine[key]:
                raise ValueError(f"data loader state has {key}={state.get(key)!r} but this loader has "
                                 f"{mine[key]!r}: the data source or seed changed since the checkpoint, "
                                 "so the sample order cannot continue")
        self._shutdown()
        self.position = int(state["position"])
        # The counters continue from the run's totals (states written before they were saved hold none).
        self._resumed_skips, self._past_skips = Counter(state.get("skips", {})), Counter()

    def skip_counts(self, sum_over_ranks=None) -> dict[str, int]:
        """Skipped samples by reason since the run began: the totals of the state last loaded plus this rank's
        since then, or every rank's with `sum_over_ranks` (dict -> dict summed over ranks, a collective the
        trainer supplies: then every rank must call this)."""
        mine = Counter(self._past_skips)
        for skips in self._worker_skips.values():
            mine.update(skips)
        mine = {k: int(v) for k, v in mine.items()}
        total = Counter(self._resumed_skips)
        total.update(mine if sum_over_ranks is None else sum_over_ranks(mine))
        return {k: int(v) for k, v in total.items()}

    def _shutdown(self) -> None:
        for skips in self._worker_skips.values():
            self._past_skips.update(skips)
        self._worker_skips = {}
        iterator, self._iterator = self._iterator, None
        if iterator is not None:
            _stop_workers(iterator)

    def close(self) -> None:
        self._shutdown()
