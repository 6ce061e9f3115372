"""The FID stage: generate, extract features, reduce once, compute the distance (one pass for 1- and 2-step).

The feature network is eval.features: Inception (the result keys are fid_<k>step) or our trained classifier
(a Frechet Classifier Distance, fcd_<k>step; see classifier.py). Every rank generates its own share of the
global sample indices, feeds each batch through the feature network and adds the features to float64
moments; after the loop ONE all-reduce sums every set of moments, and rank 0 computes the distances and
shares the result. The model is called rank-locally (no collectives inside its forward), so ranks may run
different numbers of batches: an FSDP-sharded model must be gathered into a full copy (for example the EMA
export) before it is evaluated.
"""
from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ict_scale.data.config import label_dim
from ict_scale.ict import SIGMA_MAX, SIGMA_MIN, generate_uint8, sampling_sigmas
from ict_scale.parallel import comm

from .config import EvalConfig, check_eval_config
from .features import build_features, extractor_of, feature_dim_of, metric_of
from .frechet import FeatureMoments, all_reduce_moments, frechet_distance, psd_sqrt
from .generate import rank_indices, sample_inputs
from .precision_recall import precision_recall
from .records import record_result
from .reference import RefStats, load_ref_stats


@dataclass
class SampleSpec:
    """What the evaluated model generates and how it is sampled."""
    shape: tuple[int, int, int]   # (C, H, W) of one sample
    num_classes: int              # 0 = unconditional
    sigma_mid: float              # two-step intermediate level (0.821 CIFAR-10, 1.526 ImageNet-64)
    sigma_max: float = SIGMA_MAX
    sigma_min: float = SIGMA_MIN


def sample_spec(cfg) -> SampleSpec:
    """The SampleSpec a resolved run configuration describes."""
    sigma_mid = cfg.eval.sigma_mid
    return SampleSpec((3, cfg.data.resolution, cfg.data.resolution), label_dim(cfg.data), float(sigma_mid),
                      float(cfg.ict.sigma_max), float(cfg.ict.sigma_min))


def check_compatible(ref: RefStats, protocol: dict, spec: SampleSpec | None = None) -> None:
    """Refuse reference statistics made with another feature network, weights, feature size or resolution."""
    ref_protocol = ref.meta.get("protocol", {})
    ours, theirs = extractor_of(protocol), extractor_of(ref_protocol)
    if theirs != ours:
        raise ValueError(f"{ref.source} holds {theirs} features, this evaluation uses {ours} features: make the "
                         f"reference with `python -m data_prep.ref_stats ... --features {ours}`")
    dim = feature_dim_of(protocol)
    if ref.mu.shape[0] != dim:
        raise ValueError(f"{ref.source}: {ref.mu.shape[0]}-d statistics, the {ours} features are {dim}-d")
    ref_sha = ref_protocol.get("weights_sha256")
    if ref_sha and ref_sha != protocol["weights_sha256"]:
        raise ValueError(f"{ref.source} was computed with {ours} weights sha256 {ref_sha}, this evaluation uses "
                         f"{protocol['weights_sha256']}: recompute the reference with the same weights")
    ref_res = ref.meta.get("resolution")
    if spec is not None and ref_res and int(ref_res) != spec.shape[-1]:
        raise ValueError(f"{ref.source} holds statistics of {ref_res}x{ref_res} images, the model makes "
                         f"{spec.shape[-1]}x{spec.shape[-1]}")
    net_res = protocol.get("resolution")  # the classifier sees images only at its training size
    if spec is not None and net_res and int(net_res) != spec.shape[-1]:
        raise ValueError(f"the {ours} feature network takes {net_res}x{net_res} images, the model makes "
                         f"{spec.shape[-1]}x{spec.shape[-1]}")


def _to_device(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return t.to(device, non_blocking=True) if t is not None else None  # from page-locked memory: asynchronous


class FIDEvaluator:
    """Holds the feature network and the reference statistics; `score` runs one evaluation on all ranks."""

    def __init__(self, cfg: EvalConfig, device: torch.device | str, *, features=None,
                 ref: RefStats | None = None, storage_options: dict | None = None):
        """`features`: a feature network (see features.py) that replaces the one eval.features names."""
        check_eval_config(cfg)
        self.cfg, self.device = cfg, torch.device(device)
        self.features = features or build_features(cfg, self.device, storage_options)
        self.dim, self.metric = feature_dim_of(self.features.protocol), metric_of(self.features.protocol)
        self.ref = ref or load_ref_stats(cfg.ref, storage_options, with_features=cfg.precision_recall)
        if cfg.precision_recall and self.ref.features is None:
            raise ValueError(f"eval.precision_recall needs reference features, {self.ref.source} has none: make it "
                             f"with `python -m data_prep.ref_stats ... --keep-features`")
        check_compatible(self.ref, self.features.protocol)
        self._ref_sqrt = None  # psd_sqrt(ref.sigma), computed on rank 0 at the first distance and kept

    def distance(self, mu, sigma) -> float:
        """FID (or FCD) of (mu, sigma) against the reference (float64 on this evaluator's device)."""
        if self._ref_sqrt is None:
            self._ref_sqrt = psd_sqrt(torch.as_tensor(self.ref.sigma, dtype=torch.float64, device=self.device))
        return frechet_distance(self.ref.mu, self.ref.sigma, mu, sigma, sigma1_sqrt=self._ref_sqrt,
                                device=self.device).fid

    def _inputs(self, indices: range, spec: SampleSpec):
        """One batch's (z, renoise, labels) on the host, page-locked for an asynchronous copy on CUDA."""
        tensors = sample_inputs(indices, spec.shape, self.cfg.seed, spec.num_classes, max(self.cfg.steps) - 1)
        if self.device.type != "cuda":
            return tensors
        z, renoise, labels = tensors
        return z.pin_memory(), [r.pin_memory() for r in renoise], labels.pin_memory() if labels is not None else None

    def _local_moments(self, model: Callable, spec: SampleSpec, autocast: Callable):
        """This rank's moments (and features on device, if kept) per step count.

        The next batch's noise is drawn on a host thread while the device works on this one; there is no
        host-device synchronisation inside the loop.
        """
        cfg, steps = self.cfg, list(self.cfg.steps)
        moments = {k: FeatureMoments(self.dim, self.device) for k in steps}
        kept = {k: [] for k in steps}
        indices = rank_indices(cfg.num, comm.get_rank(), comm.get_world_size())
        batches = [indices[s:s + cfg.batch_per_rank] for s in range(0, len(indices), cfg.batch_per_rank)]
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self._inputs, batches[0], spec) if batches else None
            for i in range(len(batches)):
                host = pending.result()
                if i + 1 < len(batches):
                    pending = pool.submit(self._inputs, batches[i + 1], spec)
                z, labels = _to_device(host[0], self.device), _to_device(host[2], self.device)
                renoise = [_to_device(r, self.device) for r in host[1]]
                for k in steps:
                    sigmas = sampling_sigmas(k, spec.sigma_max, spec.sigma_mid)
                    images = generate_uint8(model, z, renoise, labels, sigmas, spec.sigma_min, autocast)
                    f = self.features(images)
                    moments[k].add(f)
                    if cfg.precision_recall:
                        kept[k].append(f)
        return moments, kept

    def _precision_recall(self, kept: dict) -> dict:
        """Gather every rank's features (rank order = global index order) and score them on rank 0."""
        out = {}
        for k, parts in kept.items():
            local = torch.cat(parts).cpu() if parts else torch.empty(0, self.dim)
            gathered = comm.all_gather_object(local)
            if comm.get_rank() == 0:
                real = torch.from_numpy(self.ref.features).to(self.device)
                p, r = precision_recall(real, torch.cat(gathered).to(self.device))
                out[f"precision_{k}step"], out[f"recall_{k}step"] = p, r
        return out

    def _timing_only(self) -> bool:
        """Inception with other than the published weights gives FIDs comparable with nothing published; an FCD
        is meaningful whenever its reference was made with the same classifier (checked on construction)."""
        return self.metric == "fid" and not self.features.protocol["official_weights"]

    @torch.no_grad()
    def score(self, model: Callable, spec: SampleSpec, autocast: Callable = contextlib.nullcontext) -> dict:
        """<metric>_<k>step (fid or fcd; optionally precision/recall) for each of eval.steps; the same dict on
        every rank."""
        check_compatible(self.ref, self.features.protocol, spec)
        started = time.perf_counter()
        training = isinstance(model, nn.Module) and model.training
        if isinstance(model, nn.Module):
            model.eval()  # dropout off while sampling; the caller's mode is restored below
        try:
            moments, kept = self._local_moments(model, spec, autocast)
        finally:
            if training:
                model.train()
        all_reduce_moments(list(moments.values()))
        result = self._precision_recall(kept) if self.cfg.precision_recall else {}
        if comm.get_rank() == 0:
            t0 = time.perf_counter()
            for k, m in moments.items():
                mu, sigma = m.mean_cov()
                result[f"{self.metric}_{k}step"] = self.distance(mu, sigma)
            result.update(num=int(moments[self.cfg.steps[0]].count), seconds=time.perf_counter() - started,
                          seconds_distance=time.perf_counter() - t0,
                          world_size=comm.get_world_size(), sigma_mid=spec.sigma_mid, ref=self.ref.source,
                          ref_layout=self.ref.layout, protocol=self.features.protocol,
                          timing_only=self._timing_only())
        return comm.broadcast_object(result if comm.get_rank() == 0 else None)

    def run(self, model: Callable, spec: SampleSpec, *, step: int | None, run_dir: str, checkpoint: str | None = None,
            autocast: Callable = contextlib.nullcontext, storage_options: dict | None = None) -> dict:
        """The trainer's hook (every eval.every_steps; call on every rank): score, then rank 0 records
        the result in `run_dir` (metrics.jsonl, fid.json, best.json naming `checkpoint`)."""
        result = {"step": step, **self.score(model, spec, autocast)}
        if comm.get_rank() == 0:
            record_result(run_dir, result, checkpoint, storage_options)
        return result
