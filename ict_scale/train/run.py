"""Everything a run holds between steps, built from the config; its state is saved through a Checkpointer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from omegaconf import DictConfig

from ict_scale.checkpoint import Storage
from ict_scale.checkpoint.checkpointer import Checkpointer
from ict_scale.config import check_teacher, to_yaml
from ict_scale.config.schema import accumulation_steps
from ict_scale.data import StorageError, StreamingLoader, build_loader
from ict_scale.data import storage as data_storage
from ict_scale.data.samples import SKIP_REASONS
from ict_scale.ict import ICTLoss
from ict_scale.parallel import comm
from ict_scale.parallel.backend import Backend
from ict_scale.parallel.build import build_backend

from .ema import EMA, EMATeacher
from .evaluation import build_evaluator
from .model import build_model, count_parameters
from .state import LoaderPosition, Progress

if TYPE_CHECKING:
    from ict_scale.eval.fid import FIDEvaluator


class DivergenceError(RuntimeError):
    """Too many consecutive non-finite losses or gradient norms."""


@dataclass
class Run:
    cfg: DictConfig
    backend: Backend
    loader: StreamingLoader | Iterator[tuple[torch.Tensor, torch.Tensor]]  # or the benchmark's device batches
    ema: EMA
    num_params: int
    objective: ICTLoss  # the loss of a step; N(k) and mu(k) are functions of `step`, nothing to save
    progress: Progress = field(default_factory=Progress)
    teacher: EMATeacher | None = None  # original CT's EMA teacher (ict.teacher=ema); None = iCT's, the student
    evaluator: FIDEvaluator | None = None
    storage: Storage | None = None     # the run directory; None: a run without checkpoints (the benchmark)
    ckpt: Checkpointer | None = None
    notes: list[str] = field(default_factory=list)  # what start-up found worth saying (rank 0 prints them)

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def accumulation(self) -> int:
        return accumulation_steps(self.cfg.train, self.backend.world_size)


def make_optimizer(cfg):
    o = cfg.optim
    return lambda params: torch.optim.RAdam(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                            weight_decay=o.weight_decay, decoupled_weight_decay=True,
                                            foreach=o.foreach)


# `register(checkpointer, run)`: further pieces of run state, registered after the trainer's own.
Register = Callable[[Checkpointer, Run], None]


def build_run(cfg, storage: Storage | None, make_batches=None, register: Register | None = None) -> Run:
    """Backend, model, optimiser, EMAs, evaluator, data and checkpointer: everything a step needs, nothing
    written yet.

    `make_batches(backend)` replaces the configured loader with another iterator of (uint8 images, labels),
    e.g. batches made on the device by the speed benchmark; `storage` None leaves the run without checkpoints.
    """
    backend = build_backend(cfg)
    accumulation_steps(cfg.train, backend.world_size)  # refuses a batch that does not divide, before any work
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg)
    num_params = count_parameters(model)
    backend.prepare(model, make_optimizer(cfg))
    batches = make_batches(backend) if make_batches else build_loader(
        cfg.data, batch_per_rank=cfg.train.batch_per_gpu, rank=backend.rank, world_size=backend.world_size,
        seed=cfg.train.seed)
    run = Run(cfg, backend, batches, EMA(backend.ema_targets()), num_params,
              ICTLoss(cfg.ict, cfg.train.total_steps), teacher=build_teacher(cfg, backend),
              evaluator=build_evaluator(cfg, backend), storage=storage)
    if storage is not None:
        run.ckpt = build_checkpointer(run)
        if register is not None:
            register(run.ckpt, run)
    return run


def build_checkpointer(run: Run) -> Checkpointer:
    """The run's state, piece by piece: adding one is one `register` line here."""
    cfg, backend = run.cfg, run.backend
    ckpt = Checkpointer(run.storage, model=backend, rank=backend.rank, world_size=backend.world_size,
                        config_yaml=to_yaml(cfg), keep_last=cfg.train.keep_last, async_save=cfg.parallel.async_save,
                        lease_timeout_s=cfg.train.lease_timeout_s,
                        data_fingerprint=getattr(run.loader, "fingerprint", None))
    ckpt.register("progress", run.progress)
    ckpt.register("loader", LoaderPosition(run.loader, summed_over_ranks(backend)))
    ckpt.register("ema", run.ema, sharded=True)
    if run.teacher is not None:
        ckpt.register("teacher", run.teacher, sharded=True)
    return ckpt


def run_dir_options(cfg) -> tuple[dict, str | None]:
    """fsspec options of train.run_dir, and a deprecation note when they still come from data.storage_options.

    Runs configured before train.storage_options existed reached their run dir with the data's options;
    they keep doing so (with the note) while train.storage_options is unset.
    """
    own, data = dict(cfg.train.storage_options), dict(cfg.data.storage_options)
    if own or not data:
        return own, None
    return data, ("data.storage_options also configures train.run_dir, as it always has; that use is deprecated: "
                  "give the run dir's options as train.storage_options")


def open_run_dir(cfg) -> tuple[Storage, str | None]:
    """The run directory, reached once before anything is built, so that missing credentials, an unreachable
    endpoint or rejected storage options fail at once and name train.run_dir (bounded retries, as for data)."""
    url = cfg.train.run_dir
    options, note = run_dir_options(cfg)
    key = "data.storage_options" if note else "train.storage_options"
    try:
        storage = Storage(url, data_storage.resolve_options(url, options))
        storage.listdir()
    except Exception as e:
        raise StorageError(f"train.run_dir={url}: {data_storage.describe(e, key)}") from e
    return storage, note


def setup(cfg, register: Register | None = None) -> Run:
    """build_run, hold the run dir, resume from the newest good checkpoint if any, then write the config.

    config.yaml is written only once the resume check has passed, so a refused config never replaces the
    record of the run's checkpoints.
    """
    storage, note = open_run_dir(cfg)
    run = build_run(cfg, storage, register=register)
    run.notes += [note] if note else []
    try:
        run.notes += run.ckpt.hold()
        run.ckpt.restore(cfg, run.notes)
        if run.backend.rank == 0:
            storage.write_text("config.yaml", to_yaml(cfg))
    except BaseException:
        run.ckpt.release()
        run.loader.close()
        raise
    return run


def build_teacher(cfg, backend: Backend) -> EMATeacher | None:
    """Original CT's EMA teacher, initialised to the student's weights (after placement), or None for iCT's."""
    if cfg.ict.teacher != "ema":
        return None
    check_teacher(cfg)  # load_config ran it already; a config built in code may not have
    # backend.module is the unwrapped, placed network: DDP's wrapper (and its reducer) stays out of the copy.
    return EMATeacher(backend.module)


def summed_over_ranks(backend: Backend) -> Callable[[dict[str, int]], dict[str, int]]:
    """Skip counts by reason, summed over ranks (a collective)."""
    def summed(counts: dict[str, int]) -> dict[str, int]:
        local = torch.tensor([counts.get(r, 0) for r in SKIP_REASONS], dtype=torch.int64, device=backend.device)
        return dict(zip(SKIP_REASONS, comm.all_reduce_sum(local).tolist()))
    return summed


def data_skips(run: Run) -> dict[str, int]:
    """Samples skipped since the run began, by reason, summed over ranks (every rank must call this)."""
    return run.loader.skip_counts(summed_over_ranks(run.backend))


def run_complete_message(run: Run) -> str:
    """What a re-run of a finished run says instead of training: that it is done, and where its outputs are."""
    t, storage = run.cfg.train, run.storage
    outputs = [storage.url(rel) for rel in ("samples/latest_1step.png", "samples/latest_2step.png", "metrics.jsonl")
               if storage.exists(rel)]
    return (f"run complete: {t.run_dir} has finished all {t.total_steps} steps (nothing to resume). Outputs: "
            f"{', '.join(outputs)}; last checkpoint {run.ckpt.url(run.step)}. To train further, give a new "
            f"train.run_dir (train.total_steps is part of the recipe: it sets the curriculum N(k))")
