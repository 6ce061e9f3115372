"""Everything a run holds between steps, and how it is saved and restored."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from ict_scale.checkpoint import CheckpointManager, Storage, torch_bytes
from ict_scale.config import Config, ConfigError, check_teacher, to_yaml
from ict_scale.data import StorageError, build_loader
from ict_scale.data import storage as data_storage
from ict_scale.parallel import comm
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
    evaluator: object = None
    teacher: EMATeacher | None = None  # original CT's EMA teacher (ict.teacher=ema); None = iCT's, the student
    step: int = 0
    images_seen: int = 0
    nonfinite_total: int = 0
    nonfinite_run: int = 0
    pending_save: tuple | None = None  # (step, PendingSave, images_seen) of a save whose COMMIT is due

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
    ckpts = CheckpointManager(storage, cfg.train.keep_last) if storage is not None else None
    return Run(cfg, backend, storage, ckpts, EMA(backend.ema_targets()), batches, num_params,
               build_evaluator(cfg, backend), teacher=build_teacher(cfg, backend))


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
    """build_run, then write the resolved config and resume from the newest complete checkpoint if any."""
    storage = open_run_dir(cfg)
    run = build_run(cfg, storage)
    if run.backend.rank == 0:
        storage.makedirs()
        storage.write_text("config.yaml", to_yaml(cfg))
    restore_latest(run)
    return run


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
    step = run.step
    url = run.ckpts.begin(step) if run.backend.rank == 0 else run.ckpts.url(step)
    comm.barrier()
    pending = run.backend.save(url, averaged_tensors(run), run.storage.storage_options,
                               background=run.cfg.parallel.async_save)
    if run.backend.rank == 0:
        state = {"step": step, "images_seen": run.images_seen, "nonfinite_total": run.nonfinite_total,
                 "nonfinite_run": run.nonfinite_run,
                 "seed": run.cfg.train.seed, "world_size": run.backend.world_size,
                 "loader": run.loader.state_dict()}
        run.storage.write_bytes(f"{run.ckpts.name(step)}/trainer_state.pt", torch_bytes(state))
        run.storage.write_text(f"{run.ckpts.name(step)}/config.yaml", to_yaml(run.cfg))
    run.pending_save = (step, pending, run.images_seen)
    if not run.cfg.parallel.async_save:
        finish_pending_save(run)
    return url


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
    pending.wait()
    comm.barrier()
    if run.backend.rank == 0:
        run.ckpts.commit(step, {"images_seen": images_seen})
    comm.barrier()


# What a resumed run must share with the run that wrote the checkpoint: these set the model, N(k), the
# randomness and the data order. Everything else (logging, parallelism, batch per GPU) may change.
RESUME_INVARIANTS = ("ict", "model", "train.total_steps", "train.batch_size", "train.seed", "data.source",
                     "data.resolution", "data.num_classes", "data.drop_labels", "data.synthetic_seed")


def check_resume_config(cfg, saved_yaml: str, ckpt_url: str) -> None:
    """Refuse to continue a checkpoint under a config that would silently change the run."""
    saved, defaults = OmegaConf.create(saved_yaml), OmegaConf.structured(Config)
    diffs = []
    for key in RESUME_INVARIANTS:
        old, new = OmegaConf.select(saved, key), OmegaConf.select(cfg, key)
        old = OmegaConf.to_container(old) if OmegaConf.is_config(old) else old
        new = OmegaConf.to_container(new) if OmegaConf.is_config(new) else new
        if isinstance(old, dict) and isinstance(new, dict):
            # A key added to a section after the checkpoint was written (e.g. ict.teacher) reads as its
            # default, which is what that run used: old checkpoints stay resumable.
            old = {**OmegaConf.to_container(OmegaConf.select(defaults, key)), **old}
        if old != new:
            diffs.append(f"{key}: checkpoint {old!r}, now {new!r}")
    if diffs:
        raise ConfigError(f"cannot resume {ckpt_url}: the config changed ({'; '.join(diffs)}); set those values "
                          f"back, or give this run a new train.run_dir")


def restore_latest(run: Run) -> bool:
    """Resume from the newest complete checkpoint, if any (every rank reads the same one)."""
    step = comm.broadcast_object(run.ckpts.latest())
    if step is None:
        return False
    raw = run.storage.read_bytes(f"{run.ckpts.name(step)}/trainer_state.pt")
    state = torch.load(io.BytesIO(raw), weights_only=True)
    check_resume_config(run.cfg, run.storage.read_bytes(f"{run.ckpts.name(step)}/config.yaml").decode(),
                        run.ckpts.url(step))
    run.backend.load(run.ckpts.url(step), averaged_tensors(run), run.storage.storage_options)
    run.step, run.images_seen = int(state["step"]), int(state["images_seen"])
    run.nonfinite_total = int(state["nonfinite_total"])
    run.nonfinite_run = int(state.get("nonfinite_run", 0))
    run.loader.load_state_dict(state["loader"])
    return True


def log_record(run: Run, record: dict) -> None:
    if run.backend.rank == 0:
        run.storage.append_line("metrics.jsonl", json.dumps(record))


def resolved(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
