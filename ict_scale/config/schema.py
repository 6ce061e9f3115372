"""The typed configuration of a run. YAML files hold values only; every field is declared here.

Each section is a dataclass; a field's comment is its documentation (shown by `--help-config`). A field with a
closed set of values is typed `Literal[...]`: OmegaConf refuses any other value as the file or override is
merged, and config.load turns that into one line naming the key and the allowed values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional

from ict_scale.data.config import DataConfig
from ict_scale.errors import ConfigError
from ict_scale.eval.config import EvalConfig
from ict_scale.ict.schedule import RHO, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN
from ict_scale.parallel.config import ParallelConfig, Precision, TeacherPass

Metric = Literal["pseudo_huber", "l2"]
IndexSampling = Literal["lognormal", "uniform"]
Curriculum = Literal["doubling", "sqrt"]
Teacher = Literal["student", "ema"]
LoggerName = Literal["jsonl", "tensorboard", "wandb"]  # the trackers of ict_scale.train.trackers


@dataclass
class ICTConfig:
    """The iCT method's constants (Song & Dhariwal 2023); the defaults are the paper's."""
    sigma_min: float = SIGMA_MIN      # smallest noise level; f(x, sigma_min) = x
    sigma_max: float = SIGMA_MAX      # largest noise level, where one-step sampling starts
    rho: float = RHO                  # Karras discretisation exponent
    sigma_data: float = SIGMA_DATA    # data standard deviation used by c_skip/c_out/c_in
    s0: int = 10                      # initial number of discretisation intervals
    s1: int = 1280                    # final number of discretisation intervals
    p_mean: float = -1.1              # mean of the lognormal noise-level distribution
    p_std: float = 2.0                # std of the lognormal noise-level distribution
    metric: Metric = "pseudo_huber"   # distance: pseudo_huber (iCT) | l2 (squared L2, original CT)
    index_sampling: IndexSampling = "lognormal"  # interval index distribution: lognormal (iCT) | uniform (CT)
    curriculum: Curriculum = "doubling"  # N(k): doubling (iCT eq. 6) | sqrt (original CT; set s0=2, s1=150 for CT's)
    teacher: Teacher = "student"      # theta^-: student (iCT: stopgrad(theta)) | ema (original CT: mu(k) EMA of theta)
    teacher_mu0: float = 0.9          # ema teacher: mu0 of mu(k) = exp(N(0) ln mu0 / N(k)) (CT Table 3: 0.9 on CIFAR-10)


@dataclass
class ModelConfig:
    """The backbone. Unset (null) fields take the named network's paper preset."""
    name: str = "ncsnpp"                          # a network of the registry (ict_scale.networks.NETWORKS): ncsnpp |
                                                  # ncsnpp_deep | adm | adm_deep
    model_channels: Optional[int] = None          # base channel count
    channel_mult: Optional[List[int]] = None      # per-resolution channel multipliers
    num_blocks: Optional[int] = None              # residual blocks per resolution
    attn_resolutions: Optional[List[int]] = None  # resolutions with self-attention
    head_channels: Optional[int] = None           # channels per attention head (ADM: 64); NCSN++ uses one head
    dropout: Optional[float] = None               # dropout probability (ADM: only at <= 16x16)
    fp32_conditioning: bool = True                # noise-level path (Fourier/sinusoidal features, mapping MLP, each
                                                  # block's embedding projection) in fp32 under bf16; off = all bf16


@dataclass
class OptimConfig:
    """RAdam as in the paper: lr 1e-4, betas (0.9, 0.999), no weight decay, no warm-up, no clipping."""
    lr: float = 1e-4                  # learning rate (constant)
    beta1: float = 0.9                # RAdam beta1
    beta2: float = 0.999              # RAdam beta2
    eps: float = 1e-8                 # RAdam epsilon
    weight_decay: float = 0.0         # decoupled weight decay (paper: 0)
    foreach: bool = True              # multi-tensor update kernels


@dataclass
class TrainConfig:
    """The training run: budget, batch, precision, EMA, schedule of logging and checkpoints."""
    run_dir: str = "runs/demo"        # local path or s3:// URL; holds config, metrics, grids, checkpoints
    storage_options: Dict[str, Any] = field(default_factory=dict)  # fsspec options of run_dir (as data.storage_options
                                      # for the data); unset: data.storage_options, as before (deprecated)
    total_steps: int = 400000         # K: total optimiser steps (sets the curriculum)
    batch_size: int = 1024            # global batch per optimiser step (all ranks, all micro-batches)
    batch_per_gpu: int = 128          # micro-batch per rank; accumulation = batch_size / (batch_per_gpu * world)
    seed: int = 0                     # base seed; step k on rank r draws from (seed, r, k)
    precision: Precision = "auto"     # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    ema_decay: float = 0.99993        # evaluation EMA decay per step
    channels_last: bool = True        # NHWC memory format on CUDA
    compile: bool = False             # torch.compile each block (per-block, so a graph break stays local)
    teacher_pass: TeacherPass = "auto"  # how the stop-gradient teacher runs: no_grad | student_graph (autograd on, output
                                      # detached: a compiled network reuses the student's graph, so both passes run the
                                      # same kernels) | auto (student_graph when compile is on, else no_grad)
    cudnn_benchmark: bool = False     # let cuDNN time its convolution algorithms per shape (CUDA): measured +-1%, and a
                                      # resumed process may then pick other algorithms (not bit-identical)
    log_every: int = 50               # steps between metrics.jsonl lines
    grid_every: int = 5000            # steps between sample grids (0 = only at the end)
    grid_num: int = 64                # images per sample grid
    ckpt_every: int = 5000            # steps between checkpoints (one is also written at the end)
    keep_last: int = 3                # complete checkpoints kept (older ones are deleted)
    max_nonfinite_steps: int = 20     # stop after this many consecutive non-finite losses/grad norms
    max_steps_this_run: int = 0       # stop (with a checkpoint) after this many steps in this process; 0 = no limit
    loggers: List[LoggerName] = field(default_factory=lambda: ["jsonl", "tensorboard"])  # from jsonl, tensorboard, wandb
    wandb_project: str = "ict_scale"  # Weights & Biases project of train.loggers=[...,wandb] (WANDB_* env applies)
    lease_timeout_s: float = 300.0    # a run dir's lease (run.lease, renewed by its run) older than this is taken over


def accumulation_steps(train: TrainConfig, world_size: int) -> int:
    """Micro-batches per step so that the global batch stays train.batch_size at any world size (the one place)."""
    batch, per_gpu = train.batch_size, train.batch_per_gpu
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


@dataclass
class Config:
    """A complete, resolved run description (written as config.yaml into every run directory)."""
    ict: ICTConfig = field(default_factory=ICTConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
