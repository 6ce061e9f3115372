"""The training loop: it only decides when to step, log, draw grids, checkpoint and stop."""
from __future__ import annotations

import time

import torch

from ict_scale.data.config import label_dim
from ict_scale.ict import from_uint8
from ict_scale.parallel import comm

from .console import RunConsole
from .grids import fixed_noise, grid_png, sample_images
from .evaluation import evaluate
from .run import DivergenceError, Register, Run, data_skips, run_complete_message, setup
from .signals import PreemptionFlag
from .summary import end_of_run
from .step import train_step
from .trackers import Trackers, build_trackers


def next_micro_batches(run: Run, data_iter):
    dev = run.backend.device
    fmt = torch.channels_last if run.cfg.train.channels_last and dev.type == "cuda" else torch.contiguous_format
    batches = []
    for _ in range(run.accumulation):
        images, labels = next(data_iter)
        x = from_uint8(images.to(dev, non_blocking=True))
        y = labels.to(dev, non_blocking=True) if label_dim(run.cfg.data) else None
        batches.append((x.contiguous(memory_format=fmt), y))
    return batches


def apply_or_skip(run: Run, result, preempt: PreemptionFlag) -> bool:
    """Step the optimiser if every rank's loss and grad norm are finite; return whether to stop for preemption."""
    bad = (~torch.isfinite(result.loss) | ~torch.isfinite(result.grad_norm)).float()
    flags = comm.all_reduce_max(torch.stack([bad, torch.tensor(float(preempt.requested), device=bad.device)]))
    bad_any, stop = flags.tolist()  # the one host sync per step: every rank agrees on skip and stop
    progress = run.progress
    if bad_any:
        run.backend.zero_grad()
        progress.nonfinite_total += 1
        progress.nonfinite_run += 1
        if progress.nonfinite_run >= run.cfg.train.max_nonfinite_steps:
            raise DivergenceError(f"{progress.nonfinite_run} consecutive non-finite steps at step {run.step}; "
                                  f"the last complete checkpoint is kept in {run.ckpt.url(run.ckpt.latest() or 0)}")
    else:
        run.backend.optimizer_step()
        run.backend.zero_grad()
        targets = run.backend.ema_targets()
        run.ema.update(targets, run.cfg.train.ema_decay)
        if run.teacher is not None:  # original CT: theta^- follows theta at mu(k), after every applied step
            run.teacher.update(targets, run.objective.teacher_decay(run.step))
        progress.nonfinite_run = 0
    return bool(stop)


def optimise_step(run: Run, micro_batches, preempt: PreemptionFlag):
    """One step as the loop runs it: forward/backward on the micro-batches, then apply_or_skip.

    Returns (StepResult, whether to stop for preemption); the caller advances run.progress.
    """
    teacher = run.teacher.module if run.teacher is not None else None
    result = train_step(run.backend, run.objective, micro_batches, run.step, run.cfg.train.seed, teacher=teacher)
    return result, apply_or_skip(run, result, preempt)


def write_grids(run: Run, trackers: Trackers) -> None:
    cfg = run.cfg
    model = run.backend.eval_model(run.ema)
    if run.backend.rank != 0:  # eval_model above is collective; sampling from its full copy is not
        return
    shape = (3, cfg.data.resolution, cfg.data.resolution)
    z, renoise, labels = fixed_noise(cfg.train.grid_num, shape, cfg.train.seed,
                                     label_dim(cfg.data), run.backend.device)
    for steps in (1, 2):
        with run.backend.autocast():
            images = sample_images(model, z, renoise, labels, cfg.ict.sigma_max, cfg.eval.sigma_mid, steps,
                                   cfg.ict.sigma_min)
        png = grid_png(images, upscale=max(1, 128 // cfg.data.resolution))
        run.storage.write_bytes(f"samples/step_{run.step:09d}_{steps}step.png", png)
        run.storage.write_bytes(f"samples/latest_{steps}step.png", png)
        trackers.image(f"samples/{steps}step", png, run.step)


def train(cfg, register: Register | None = None) -> Run:
    """Train (or resume) the run `cfg` describes; `register` adds pieces of run state (see run.build_run)."""
    run = setup(cfg, register)
    t = cfg.train
    rank0 = run.backend.rank == 0
    if run.step >= t.total_steps:
        if rank0:
            for note in run.notes:
                print(note, flush=True)
            print(run_complete_message(run), flush=True)
        run.ckpt.release()
        run.loader.close()
        return run
    console = RunConsole(t.total_steps, run.step, enabled=rank0)
    for note in run.notes:
        console.print(note)
    console.print(f"ict_scale: {run.num_params:,} parameters, backend {run.backend.name} x{run.backend.world_size} "
                  f"on {run.backend.device}, "
                  f"{'resuming at' if run.step else 'starting at'} step {run.step}, run dir {t.run_dir}")
    preempt, data_iter = PreemptionFlag(grace_s=cfg.parallel.preempt_grace_s, announce=rank0), iter(run.loader)
    trackers = build_trackers(cfg, run.storage, enabled=rank0)
    progress = run.progress
    start_step, window_loss, window_t, window_steps = run.step, 0.0, time.perf_counter(), 0
    started, last_record, stop = time.perf_counter(), None, False
    try:
        while run.step < t.total_steps:
            result, stop = optimise_step(run, next_micro_batches(run, data_iter), preempt)
            progress.step += 1
            progress.images_seen += t.batch_size
            window_loss, window_steps = window_loss + result.loss.detach(), window_steps + 1
            record = None
            if run.step % t.log_every == 0 or run.step == t.total_steps:
                loss = comm.all_reduce_sum((window_loss / window_steps).to(torch.float64))
                now = time.perf_counter()
                record = last_record = {
                    "step": run.step, "images_seen": progress.images_seen,
                    "loss": float(loss) / run.backend.world_size, "num_scales": result.num_scales,
                    "grad_norm": float(result.grad_norm), "lr": run.backend.optimizer.param_groups[0]["lr"],
                    "img_per_s": window_steps * t.batch_size / max(now - window_t, 1e-9),
                    "seconds": now - started, "nonfinite_total": progress.nonfinite_total,
                    "data_skips": data_skips(run)}
                trackers.scalars(record)
                window_loss, window_t, window_steps = 0.0, now, 0
            console.update(run.step, record)
            done = run.step == t.total_steps or (t.max_steps_this_run and run.step - start_step >= t.max_steps_this_run)
            if t.grid_every and run.step % t.grid_every == 0 or done:
                write_grids(run, trackers)
            eval_due = run.evaluator is not None and run.step % cfg.eval.every_steps == 0
            if run.step % t.ckpt_every == 0 or done or stop or eval_due:
                # an evaluated step always has a checkpoint, so best.json can name it
                run.ckpt.save(run.step, {"images_seen": progress.images_seen})
            if eval_due and not stop:
                result = evaluate(run)
                console.print("  ".join(f"{k} {v:.3f}" for k, v in result.items() if k.startswith(("fid_", "fcd_"))))
            if done or stop:
                break
        run.ckpt.finish_pending()
    finally:
        preempt.close()
        console.close()
        trackers.close()
        run.loader.close()
        run.ckpt.release()
    if rank0:
        for line in end_of_run(run, start_step, time.perf_counter() - started, last_record, stop, preempt.signum):
            console.print(line)
    return run
