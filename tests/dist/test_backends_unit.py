"""In-process checks of the parallel layer: HSDP mesh layout at 32 ranks, activation checkpointing,
DeepSpeed config assembly, the backend registry."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from ict_scale.config import load_config
from ict_scale.parallel.blocks import apply_activation_checkpointing
from ict_scale.parallel.deepspeed_config import build_ds_config
from ict_scale.train.model import build_model
from workers.harness import REPO, TINY, worker_env

HSDP_PROBE = r"""
import torch, torch.distributed as dist
from torch.distributed.tensor import Replicate, Shard
from torch.testing._internal.distributed.fake_pg import FakeStore
from ict_scale.config import load_config
from ict_scale.parallel.fsdp import build_mesh, shard_model
from ict_scale.train.model import build_model
RANK = 13
dist.init_process_group("fake", store=FakeStore(), rank=RANK, world_size=32)
mesh = build_mesh("cpu", 32, 8)                      # 4 nodes x 8 GPUs
assert mesh.mesh_dim_names == ("replicate", "shard"), mesh.mesh_dim_names
assert dist.get_process_group_ranks(mesh.get_group("shard")) == list(range(8, 16))
assert dist.get_process_group_ranks(mesh.get_group("replicate")) == [5, 13, 21, 29]
cfg = load_config([], {overrides!r})
with torch.device("meta"):
    model = build_model(cfg)
full = {{n: p.shape for n, p in model.named_parameters()}}
shard_model(model, mesh, bf16=True, reshard_after_forward=True, cpu_offload=False)
for n, p in model.named_parameters():
    assert p.placements == (Replicate(), Shard(0)), (n, p.placements)
    assert p.shape == full[n], n                       # the logical shape is the full parameter's
    rows = full[n][0]
    chunk = -(-rows // 8)                              # torch.chunk: ceil-sized shards, the tail shorter
    assert p.to_local().shape[0] == max(0, min(chunk, rows - 5 * chunk)), (n, p.to_local().shape)
flat = build_mesh("cpu", 32, 0)
assert flat.mesh_dim_names == ("shard",) and flat.size() == 32
try:
    build_mesh("cpu", 32, 6)
    raise SystemExit("no error for a shard size that does not divide 32")
except ValueError as e:
    assert "fsdp_shard_size=6" in str(e), e
dist.destroy_process_group()
print("ok")
"""


def test_hsdp_mesh_places_shards_inside_a_node_and_replicas_across_nodes():
    """4 nodes x 8 GPUs with torch's fake process group: groups, placements and local shard sizes."""
    code = HSDP_PROBE.format(overrides=TINY)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=worker_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def tiny_model():
    torch.manual_seed(0)
    return build_model(load_config([], TINY))


def loss_and_grads(model, seed: int):
    """A consistency pair as the step computes it: teacher under no_grad, student, same dropout masks."""
    from ict_scale.ict import consistency_pair
    torch.manual_seed(seed)
    x, z = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    labels = torch.tensor([1, 2, 3])
    pred, target = consistency_pair(model, model, x, z, torch.tensor([0.5, 1.0, 2.0]),
                                    torch.tensor([0.6, 1.3, 2.9]), labels)
    loss = (pred - target).pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_recomputes_the_same_dropout_masks():
    model = tiny_model().train()
    checkpointed = copy.deepcopy(model)
    apply_activation_checkpointing(checkpointed)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in checkpointed.named_parameters()]
    loss, grads = loss_and_grads(model, seed=1)
    loss_ac, grads_ac = loss_and_grads(checkpointed, seed=1)
    assert torch.equal(loss, loss_ac)
    for n in grads:
        # Recomputation replays the same kernels on the same inputs and RNG state: bitwise equal.
        assert torch.equal(grads[n], grads_ac[n]), n
    _, other = loss_and_grads(tiny_model().train(), seed=2)  # the masks do matter: another seed differs
    assert any(not torch.equal(grads[n], other[n]) for n in grads)


def ds(tmp_path, text: str, **kw):
    path = tmp_path / "ds.yaml"
    path.write_text(text)
    args = dict(batch_per_gpu=2, accumulation=2, world_size=3, precision="bf16", on_gpu=False)
    args.update(kw)
    return build_ds_config(str(path), **args)


def test_deepspeed_config_takes_batch_geometry_from_the_run(tmp_path):
    cfg = ds(tmp_path, "bf16: {enabled: auto}\nzero_optimization: {stage: 2}\n")
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) \
        == (12, 2, 2)
    assert cfg["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert cfg["zero_allow_untested_optimizer"] and cfg["gradient_clipping"] == 0.0
    assert ds(tmp_path, "bf16: {enabled: auto}\nzero_optimization: {stage: 1}\n", precision="fp32")["bf16"] \
        == {"enabled": False}


@pytest.mark.parametrize("text, message", [
    ("zero_optimization: {stage: 2}\ntrain_batch_size: 64\n", "train_batch_size"),
    ("zero_optimization: {stage: 0}\n", "zero_optimization.stage=0"),
    ("fp16: {enabled: true}\nzero_optimization: {stage: 2}\n", "needs a GPU"),
    ("- 1\n", "expected a mapping"),
])
def test_deepspeed_config_errors_name_the_file_and_key(tmp_path, text, message):
    with pytest.raises(ValueError, match=message) as e:
        ds(tmp_path, text)
    assert "ds.yaml" in str(e.value)


def test_deepspeed_config_missing_file_is_named():
    with pytest.raises(FileNotFoundError, match="parallel.deepspeed_config='nope.yaml'"):
        build_ds_config("nope.yaml", batch_per_gpu=1, accumulation=8, world_size=1, precision="fp32", on_gpu=False)


def test_shipped_deepspeed_configs_are_valid():
    for stage in (1, 2, 3):
        cfg = build_ds_config(f"configs/deepspeed/zero{stage}.yaml", batch_per_gpu=2, accumulation=2, world_size=2,
                              precision="bf16", on_gpu=True)
        assert cfg["zero_optimization"]["stage"] == stage and cfg["bf16"]["enabled"]
    fp16 = build_ds_config("configs/deepspeed/zero2_fp16.yaml", batch_per_gpu=2, accumulation=2, world_size=2,
                           precision="bf16", on_gpu=True)
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0 and not fp16["bf16"].get("enabled")


def test_unknown_backend_is_rejected_with_the_valid_names():
    from omegaconf import OmegaConf
    from ict_scale.parallel.build import build_backend
    cfg = OmegaConf.to_object(load_config([], TINY))  # plain dataclasses: no Literal check on assignment
    cfg.parallel.backend = "horovod"   # bypasses the config enum on purpose: the registry must still refuse
    with pytest.raises(ValueError, match="single, ddp, fsdp, deepspeed"):
        build_backend(cfg)


def test_parallel_presets_are_valid_configs():
    import glob
    from ict_scale.parallel.config import BACKENDS
    presets = sorted(glob.glob(f"{REPO}/configs/parallel/*.yaml"))
    assert presets
    for path in presets:
        assert load_config([path], []).parallel.backend in BACKENDS, path


def test_a_backend_sees_only_its_own_settings():
    from ict_scale.parallel.backend import Backend
    from ict_scale.parallel.config import ExecutionConfig, ParallelConfig
    cfg = load_config([], [*TINY, "train.compile=false", "train.teacher_pass=student_graph",
                           "train.cudnn_benchmark=true"])
    execution = ExecutionConfig.from_train(cfg.train)
    assert execution == ExecutionConfig(precision="fp32", channels_last=cfg.train.channels_last, compile=False,
                                        cudnn_benchmark=True, teacher_pass="student_graph")
    backend = Backend(ParallelConfig(), ExecutionConfig(), torch.device("cpu"))
    assert not hasattr(backend, "cfg") and backend.precision == "fp32"  # auto: fp32 on CPU
    assert not backend.teacher_in_grad_mode()
    assert Backend(ParallelConfig(), execution, torch.device("cpu")).teacher_in_grad_mode()


def test_backend_modules_import_no_registry():
    """The base class knows no subclass and no module imports the registry back (no import circle)."""
    import ast
    import pathlib
    root = pathlib.Path(REPO) / "ict_scale" / "parallel"

    def relative_imports(name: str) -> set[str]:
        tree = ast.parse((root / f"{name}.py").read_text())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}

    assert not relative_imports("backend") & {"ddp", "fsdp", "deepspeed_backend", "build"}
    for name in ("ddp", "fsdp", "deepspeed_backend"):
        assert "build" not in relative_imports(name), name
