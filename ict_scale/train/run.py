"""Everything a run holds between steps, and how it is saved and restored."""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import torch
from omegaconf import OmegaConf

from ict_scale.checkpoint import (CheckpointManager, IncompleteCheckpoint, RunDirBusy, RunDirError, RunLease, Storage,
                                  torch_bytes)
from ict_scale.checkpoint.errors import out_of_space_as_error
from ict_scale.checkpoint.resume import apply_optim_settings, check_resume_config
from ict_scale.config import ConfigError, check_teacher, to_yaml
from ict_scale.data import StorageError, build_loader
from ict_scale.data import storage as data_storage
from ict_scale.data.samples import SKIP_REASONS
from ict_scale.ict import ICTLoss
from ict_scale.parallel import ckpt_files, comm
from ict_scale.parallel.backend import build_backend

from .ema import EMA, EMATeacher
from .model import build_model, count_parameters


class DivergenceError(RuntimeError):
    """Too many consecutive non-finite losses or gradient norms."""


@dataclass
class Run:
    cfg: object
    backend: object
    storage: Storage
    ckpts: CheckpointManager
    ema: EMA
    loader: object
    num_params: int
    objective: ICTLoss  # the loss of a step; N(k) and mu(k) are functions of `step`, nothing to save
    evaluator: object = None
    teacher: EMATeacher | None = None  # original CT's EMA teacher (ict.teacher=ema); None = iCT's, the student
    step: int = 0
    images_seen: int = 0
    nonfinite_total: int = 0
    nonfinite_run: int = 0
    pending_save: tuple | None = None  # (step, PendingSave, images_seen) of a save whose COMMIT is due
    lease: RunLease | None = None  # rank 0's hold on the run dir
    notes: list[str] = field(default_factory=list)  # what start-up found worth saying (rank 0 prints them)

    @property
    def accumulation(self) -> int:
        return self.cfg.train.batch_size // (self.cfg.train.batch_per_gpu * self.backend.world_size)


def accumulation_steps(cfg, world_size: int) -> int:
    """Micro-batches per step so that the global batch stays cfg.train.batch_size at any world size."""
    batch, per_gpu = cfg.train.batch_size, cfg.train.batch_per_gpu
    per_step = per_gpu * world_size
    if batch % per_step:
        lower = batch // per_step * per_step
        sizes = " or ".join(str(b) for b in (lower, lower + per_step) if b > 0)
        # The largest micro-batch no bigger than the asked one that keeps the global batch (if any does).
        fits = [b for b in range(per_gpu, 0, -1) if batch % (b * world_size) == 0]
        other = f", or train.batch_per_gpu={fits[0]}" if fits else ""
        raise ConfigError(f"train.batch_size={batch} is not a multiple of train.batch_per_gpu={per_gpu} x "
                          f"{world_size} processes = {per_step}; use train.batch_size={sizes}{other}")
    return batch // per_step


def make_optimizer(cfg):
    o = cfg.optim
    return lambda params: torch.optim.RAdam(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                            weight_decay=o.weight_decay, decoupled_weight_decay=True,
                                            foreach=o.foreach)


def build_run(cfg, storage: Storage | None, make_batches=None) -> Run:
    """Backend, model, optimiser, EMAs, evaluator and data: everything a step needs, nothing written yet.

    `make_batches(backend)` replaces the configured loader with another iterator of (uint8 images, labels),
    e.g. batches made on the device by the speed benchmark; `storage` None leaves the run without checkpoints.
    """
    backend = build_backend(cfg)
    accumulation_steps(cfg, backend.world_size)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg)
    num_params = count_parameters(model)
    backend.prepare(model, make_optimizer(cfg))
    batches = make_batches(backend) if make_batches else build_loader(
        cfg.data, batch_per_rank=cfg.train.batch_per_gpu, rank=backend.rank, world_size=backend.world_size,
        seed=cfg.train.seed)
    ckpts = CheckpointManager(storage, cfg.train.keep_last, verify=checkpoint_verifier(storage)) \
        if storage is not None else None
    return Run(cfg, backend, storage, ckpts, EMA(backend.ema_targets()), batches, num_params,
               ICTLoss(cfg.ict, cfg.train.total_steps), build_evaluator(cfg, backend),
               teacher=build_teacher(cfg, backend))


# Files the run writes into each checkpoint beside the backend's bytes.
RUN_FILES = ("trainer_state.pt", "config.yaml")


def checkpoint_verifier(storage: Storage):
    """What keeps a checkpoint URL from being complete: the run's files and every file its bytes need."""
    return lambda url: ckpt_files.checkpoint_problems(url, storage.storage_options, required=RUN_FILES)


def open_run_dir(cfg) -> Storage:
    """The run directory, reached once before anything is built, so that missing credentials, an unreachable
    endpoint or rejected storage options fail at once and name train.run_dir (bounded retries, as for data)."""
    url = cfg.train.run_dir
    try:
        storage = Storage(url, data_storage.resolve_options(url, cfg.data.storage_options))
        storage.listdir()
    except Exception as e:
        raise StorageError(f"train.run_dir={url}: {data_storage.describe(e)}") from e
    return storage


def setup(cfg) -> Run:
    """build_run, hold the run dir, resume from the newest good checkpoint if any, then write the config.

    config.yaml is written only once the resume check has passed, so a refused config never replaces the
    record of the run's checkpoints.
    """
    storage = open_run_dir(cfg)
    run = build_run(cfg, storage)
    try:
        hold_run_dir(run)
        restore_latest(run)
        if run.backend.rank == 0:
            storage.write_text("config.yaml", to_yaml(cfg))
    except BaseException:
        release_run_dir(run)
        run.loader.close()
        raise
    return run


def hold_run_dir(run: Run) -> None:
    """Rank 0 takes the run dir's lease (refusing a live run) and removes partial checkpoints; all ranks agree."""
    outcome = None
    if run.backend.rank == 0:
        run.storage.makedirs()
        lease, removed = RunLease(run.storage, run.cfg.train.lease_timeout_s), []
        try:
            note = lease.acquire(when_free=lambda: removed.extend(run.ckpts.remove_partial()))
        except Exception as e:
            comm.broadcast_object(("error", str(e)))
            raise
        run.lease = lease
        lease.start_heartbeat()
        run.notes += [note] if note else []
        if removed:
            run.notes.append(f"removed {len(removed)} partial checkpoint(s) (saves cut short, never marked "
                             f"complete): {', '.join(run.ckpts.url(s) for s in removed)}")
    outcome = comm.broadcast_object(outcome)
    if outcome is not None:  # only the other ranks get here with an error: rank 0 raised its own
        raise RunDirError(outcome[1])


def release_run_dir(run: Run) -> None:
    if run.lease is not None:
        run.lease.release()
        run.lease = None


def build_teacher(cfg, backend) -> EMATeacher | None:
    """Original CT's EMA teacher, initialised to the student's weights (after placement), or None for iCT's."""
    if cfg.ict.teacher != "ema":
        return None
    check_teacher(cfg)  # load_config ran it already; a config built in code may not have
    # backend.module is the unwrapped, placed network: DDP's wrapper (and its reducer) stays out of the copy.
    return EMATeacher(backend.module)


def build_evaluator(cfg, backend):
    """The FID stage, built at start-up so that missing weights or reference stats fail before training."""
    if cfg.eval.every_steps <= 0:
        return None
    from ict_scale.eval.fid import FIDEvaluator
    return FIDEvaluator(cfg.eval, backend.device, storage_options=dict(cfg.data.storage_options))


def evaluate(run: Run) -> dict:
    """FID of the EMA model on every rank; rank 0 records it beside the checkpoint of this step."""
    from ict_scale.eval.fid import sample_spec
    return run.evaluator.run(run.backend.eval_model(run.ema), sample_spec(run.cfg), step=run.step,
                             run_dir=run.cfg.train.run_dir, checkpoint=run.ckpts.name(run.step),
                             autocast=run.backend.autocast, storage_options=run.storage.storage_options)


def save_checkpoint(run: Run) -> str:
    """All ranks write their shards; rank 0 writes the trainer state; the COMMIT marker comes once every rank's
    bytes are durable (at once, or with parallel.async_save before the next save and at the end of the run)."""
    finish_pending_save(run)
    loader_state = run.loader.state_dict(skips=data_skips(run))  # a collective: before rank 0 goes its own way
    step = run.step
    lost = comm.broadcast_object(run.lease.check() if run.lease is not None else None)
    if lost:
        raise RunDirBusy(f"{lost}; this run stops without writing checkpoint step {step}")
    with out_of_space_as_error(run.storage.root, f"checkpoint step {step}"):
        url = run.ckpts.begin(step) if run.backend.rank == 0 else run.ckpts.url(step)
        comm.barrier()
        pending = run.backend.save(url, averaged_tensors(run), run.storage.storage_options,
                                   background=run.cfg.parallel.async_save)
        if run.backend.rank == 0:
            state = {"step": step, "images_seen": run.images_seen, "nonfinite_total": run.nonfinite_total,
                     "nonfinite_run": run.nonfinite_run,
                     "seed": run.cfg.train.seed, "world_size": run.backend.world_size,
                     "loader": loader_state}
            run.storage.write_bytes(f"{run.ckpts.name(step)}/trainer_state.pt", torch_bytes(state))
            run.storage.write_text(f"{run.ckpts.name(step)}/config.yaml", to_yaml(run.cfg))
    run.pending_save = (step, pending, run.images_seen)
    if not run.cfg.parallel.async_save:
        finish_pending_save(run)
    return url


def data_skips(run: Run) -> dict[str, int]:
    """Samples skipped since the run began, by reason, summed over ranks (every rank must call this)."""
    def summed(counts: dict[str, int]) -> dict[str, int]:
        local = torch.tensor([counts.get(r, 0) for r in SKIP_REASONS], dtype=torch.int64, device=run.backend.device)
        return dict(zip(SKIP_REASONS, comm.all_reduce_sum(local).tolist()))
    return run.loader.skip_counts(summed)


# Key prefix of the EMA teacher's tensors in the checkpoint's flat EMA dict; parameter names never start with it.
TEACHER_PREFIX = "teacher/"


def averaged_tensors(run: Run) -> dict[str, torch.Tensor]:
    """The flat name -> tensor dict saved beside model and optimiser: the evaluation EMA, then the EMA teacher.

    The tensors are the live ones (not copies), so a backend's load fills both in place.
    """
    tensors = dict(run.ema.state_dict())
    if run.teacher is not None:
        tensors.update({TEACHER_PREFIX + n: t for n, t in run.teacher.state_dict().items()})
    return tensors


def finish_pending_save(run: Run) -> None:
    """Wait until this rank's bytes of the last checkpoint are durable; then rank 0 marks it complete."""
    if run.pending_save is None:
        return
    (step, pending, images_seen), run.pending_save = run.pending_save, None
    with out_of_space_as_error(run.storage.root, f"checkpoint step {step}"):
        pending.wait()
    comm.barrier()
    problem = None
    if run.backend.rank == 0:
        try:
            run.ckpts.commit(step, {"images_seen": images_seen})  # verifies every file first
        except IncompleteCheckpoint as e:
            problem = str(e)
    problem = comm.broadcast_object(problem)  # also the barrier that keeps ranks from racing past the commit
    if problem:
        raise IncompleteCheckpoint(problem)


def restore_latest(run: Run) -> bool:
    """Resume from the newest good checkpoint, if any (every rank reads the same one).

    A checkpoint marked complete that lacks a file is skipped with a note; the resume check (recipe and
    data identity) runs before anything is loaded; the config's optimiser settings then replace the ones
    the optimiser state brings back.
    """
    step = comm.broadcast_object(run.ckpts.newest_good(report=run.notes.append) if run.backend.rank == 0 else None)
    if step is None:
        return False
    name, url = run.ckpts.name(step), run.ckpts.url(step)
    state = torch.load(io.BytesIO(run.storage.read_bytes(f"{name}/trainer_state.pt")), weights_only=True)
    run.notes += check_resume_config(run.cfg, run.storage.read_bytes(f"{name}/config.yaml").decode(), url,
                                     state["loader"].get("fingerprint"), getattr(run.loader, "fingerprint", None))
    run.backend.load(url, averaged_tensors(run), run.storage.storage_options)
    changed = apply_optim_settings(run.backend.optimizer_param_groups(), run.cfg.optim)
    if changed:
        run.notes.append(f"resuming with {'; '.join(changed)}: this config's values replace those restored "
                         "from the checkpoint's optimiser state")
    run.step, run.images_seen = int(state["step"]), int(state["images_seen"])
    run.nonfinite_total = int(state["nonfinite_total"])
    run.nonfinite_run = int(state.get("nonfinite_run", 0))
    run.loader.load_state_dict(state["loader"])
    return True


def run_complete_message(run: Run) -> str:
    """What a re-run of a finished run says instead of training: that it is done, and where its outputs are."""
    t, storage = run.cfg.train, run.storage
    outputs = [storage.url(rel) for rel in ("samples/latest_1step.png", "samples/latest_2step.png", "metrics.jsonl")
               if storage.exists(rel)]
    return (f"run complete: {t.run_dir} has finished all {t.total_steps} steps (nothing to resume). Outputs: "
            f"{', '.join(outputs)}; last checkpoint {run.ckpts.url(run.step)}. To train further, give a new "
            f"train.run_dir (train.total_steps is part of the recipe: it sets the curriculum N(k))")


def resolved(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
