"""The FID stage of a training run: built at start-up, run on the EMA model every eval.every_steps."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ict_scale.parallel.backend import Backend

if TYPE_CHECKING:
    from ict_scale.eval.fid import FIDEvaluator

    from .run import Run


def build_evaluator(cfg, backend: Backend) -> FIDEvaluator | None:
    """Built at start-up so that missing weights or reference stats fail before training.

    The evaluation's inputs (Inception weights, reference statistics) are read with data.storage_options:
    they usually live beside the data; its results go into the run directory.
    """
    if cfg.eval.every_steps <= 0:
        return None
    from ict_scale.eval.fid import FIDEvaluator
    return FIDEvaluator(cfg.eval, backend.device, storage_options=dict(cfg.data.storage_options))


def evaluate(run: Run) -> dict:
    """FID of the EMA model on every rank; rank 0 records it beside the checkpoint of this step."""
    from ict_scale.eval.fid import sample_spec
    return run.evaluator.run(run.backend.eval_model(run.ema), sample_spec(run.cfg), step=run.step,
                             run_dir=run.cfg.train.run_dir, checkpoint=run.ckpt.name(run.step),
                             autocast=run.backend.autocast, storage_options=run.storage.storage_options)
