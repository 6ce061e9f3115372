"""One owner for a run's state on storage: the pieces registered by name, and when and how they are saved,
committed, pruned and restored (torchtitan's CheckpointManager, EDM2's CheckpointIO).

    ckpt = Checkpointer(storage, model=backend, rank=r, world_size=w, config_yaml=to_yaml(cfg))
    ckpt.register("progress", progress)              # host state: trainer_state.pt
    ckpt.register("ema", ema, sharded=True)          # tensors written with the model's bytes
    notes = ckpt.hold()                              # the run dir's lease; partial saves removed
    step = ckpt.restore(cfg)                         # newest good checkpoint, after the resume check
    ckpt.save(step); ckpt.finish_pending()           # COMMIT only once every rank's bytes are verified

Adding a piece of run state is one `register` call. Every rank calls every method (they hold collectives);
rank 0 alone writes the run's own files and the COMMIT marker.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ict_scale.parallel import comm

from .errors import IncompleteCheckpoint, RunDirBusy, RunDirError, out_of_space_as_error
from .layout import CONFIG, TRAINER_STATE, TrainerState, checkpoint_verifier, read_trainer_state, tensor_prefix
from .lease import RunLease
from .manager import CheckpointManager
from .resume import apply_optim_settings, check_resume_config
from .stateful import PendingWrite, ShardedModel, Stateful
from .storage import Storage


@dataclass
class PendingSave:
    """A checkpoint whose bytes may still be in flight; its COMMIT is due once `write` is durable."""
    step: int
    write: PendingWrite
    meta: dict


class Checkpointer:
    def __init__(self, storage: Storage, *, model: ShardedModel, rank: int, world_size: int, config_yaml: str,
                 keep_last: int = 3, async_save: bool = False, lease_timeout_s: float = 300.0,
                 data_fingerprint: str | None = None):
        """`config_yaml`: the run's resolved config, written into each checkpoint; `data_fingerprint`: the
        identity of the training data (shard names and counts), which a resume must match."""
        self.storage, self.model, self.rank, self.world_size = storage, model, rank, world_size
        self.config_yaml, self.async_save, self.lease_timeout_s = config_yaml, async_save, lease_timeout_s
        self.data_fingerprint = data_fingerprint
        self.catalog = CheckpointManager(storage, keep_last, verify=checkpoint_verifier(storage))
        self.host: dict[str, Stateful] = {}
        self.sharded: dict[str, Stateful] = {}
        self.pending: PendingSave | None = None
        self.lease: RunLease | None = None

    def register(self, name: str, piece: Stateful, *, sharded: bool = False) -> None:
        """Save and restore `piece` under `name` from now on (see stateful.py for the two kinds)."""
        if name in self.host or name in self.sharded or "/" in name:
            raise ValueError(f"cannot register run state {name!r}: the name is taken or holds a '/'")
        (self.sharded if sharded else self.host)[name] = piece

    # -- where checkpoints are --------------------------------------------------------------------
    def name(self, step: int) -> str:
        """The checkpoint's path relative to the run dir (checkpoints/step_000000123)."""
        return self.catalog.name(step)

    def url(self, step: int) -> str:
        return self.catalog.url(step)

    def latest(self) -> int | None:
        return self.catalog.latest()

    def tensors(self, live: dict[str, dict] | None = None) -> dict[str, torch.Tensor]:
        """The sharded pieces' live tensors under their flat keys (layout.py): a load fills them in place."""
        live = live if live is not None else {name: piece.state_dict() for name, piece in self.sharded.items()}
        return {tensor_prefix(name) + key: t for name, state in live.items() for key, t in state.items()}

    # -- the run directory ------------------------------------------------------------------------
    def hold(self) -> list[str]:
        """Rank 0 takes the run dir's lease (refusing a live run) and removes partial checkpoints; all ranks
        agree on the outcome. Returns what is worth saying."""
        outcome, notes = None, []
        if self.rank == 0:
            self.storage.makedirs()
            lease, removed = RunLease(self.storage, self.lease_timeout_s), []
            try:
                note = lease.acquire(when_free=lambda: removed.extend(self.catalog.remove_partial()))
            except Exception as e:
                comm.broadcast_object(("error", str(e)))
                raise
            self.lease = lease
            lease.start_heartbeat()
            notes += [note] if note else []
            if removed:
                notes.append(f"removed {len(removed)} partial checkpoint(s) (saves cut short, never marked "
                             f"complete): {', '.join(self.url(s) for s in removed)}")
        outcome = comm.broadcast_object(outcome)
        if outcome is not None:  # only the other ranks get here with an error: rank 0 raised its own
            raise RunDirError(outcome[1])
        return notes

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    # -- saving -----------------------------------------------------------------------------------
    def save(self, step: int, meta: dict | None = None) -> str:
        """All ranks write their shards; rank 0 writes the host pieces and the config; COMMIT follows once
        every rank's bytes are durable (at once, or with async_save before the next save and at the end).
        `meta` goes into the COMMIT record."""
        self.finish_pending()
        host = {name: piece.state_dict() for name, piece in self.host.items()}  # may be collectives: all ranks
        lost = comm.broadcast_object(self.lease.check() if self.lease is not None else None)
        if lost:
            raise RunDirBusy(f"{lost}; this run stops without writing checkpoint step {step}")
        with out_of_space_as_error(self.storage.root, f"checkpoint step {step}"):
            url = self.catalog.begin(step) if self.rank == 0 else self.url(step)
            comm.barrier()
            write = self.model.save(url, self.tensors(), self.storage.storage_options, background=self.async_save)
            if self.rank == 0:
                name = self.catalog.name(step)
                state = TrainerState(host, self.data_fingerprint, self.world_size)
                self.storage.write_bytes(f"{name}/{TRAINER_STATE}", state.to_bytes())
                self.storage.write_text(f"{name}/{CONFIG}", self.config_yaml)
        self.pending = PendingSave(step, write, dict(meta or {}))
        if not self.async_save:
            self.finish_pending()
        return url

    def finish_pending(self) -> None:
        """Wait until this rank's bytes of the last checkpoint are durable; then rank 0 verifies and commits."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        with out_of_space_as_error(self.storage.root, f"checkpoint step {pending.step}"):
            pending.write.wait()
        comm.barrier()
        problem = None
        if self.rank == 0:
            try:
                self.catalog.commit(pending.step, pending.meta)  # verifies every file first, then prunes
            except IncompleteCheckpoint as e:
                problem = str(e)
        problem = comm.broadcast_object(problem)  # also the barrier that keeps ranks from racing past the commit
        if problem:
            raise IncompleteCheckpoint(problem)

    # -- restoring --------------------------------------------------------------------------------
    def restore(self, cfg, notes: list[str]) -> int | None:
        """Load the newest good checkpoint into every piece (every rank reads the same one); its step, or None.

        A checkpoint marked complete that lacks a file is skipped with a note; the resume check (recipe and
        data identity) runs before anything is loaded; the config's optimiser settings then replace the
        ones the optimiser state brings back.
        """
        step = comm.broadcast_object(self.catalog.newest_good(report=notes.append) if self.rank == 0 else None)
        if step is None:
            return None
        name, url = self.catalog.name(step), self.url(step)
        state = read_trainer_state(self.storage, name)
        notes += check_resume_config(cfg, self.storage.read_bytes(f"{name}/{CONFIG}").decode(), url,
                                     state.data_fingerprint, self.data_fingerprint)
        live = {piece_name: piece.state_dict() for piece_name, piece in self.sharded.items()}
        self.model.load(url, self.tensors(live), self.storage.storage_options)
        for piece_name, piece in self.sharded.items():
            piece.load_state_dict(live[piece_name])
        changed = apply_optim_settings(self.model.optimizer_param_groups(), cfg.optim)
        if changed:
            notes.append(f"resuming with {'; '.join(changed)}: this config's values replace those restored "
                         "from the checkpoint's optimiser state")
        for piece_name, piece in self.host.items():
            if piece_name in state.pieces:
                piece.load_state_dict(state.pieces[piece_name])
            else:
                notes.append(f"{url} holds no state for {piece_name!r} (written before it was saved): "
                             "it starts afresh")
        return step
