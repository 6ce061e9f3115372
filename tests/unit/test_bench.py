"""The training benchmark drives the real step and reports consistent numbers (CPU, a tiny network)."""
import json

import pytest

from ict_scale.bench.__main__ import main
from ict_scale.bench.measure import datasheet_tflops, parse_mode, step_flops_per_image
from ict_scale.bench.profile import kernel_kind
from ict_scale.config import load_config

TINY = ["model.model_channels=8", "model.channel_mult=[1,2]", "data.resolution=8", "train.batch_per_gpu=4",
        "data.num_workers=0"]


def test_bench_writes_every_mode_and_loader(tmp_path):
    out = tmp_path / "bench.json"
    again = "again:" + " ".join(parse_mode("fp32_eager")[1])  # the same settings under another name
    assert main(["demo", *TINY, "--modes", "fp32_eager", "--mode", again, "--loaders", "device,real",
                 "--steps", "2", "--warmup", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["environment"]["torch"] and data["environment"]["world_size"] == 1
    runs = {(r["mode"], r["loader"]): r for r in data["results"]}
    assert set(runs) == {(m, l) for m in ("fp32_eager", "again") for l in ("device", "real")}
    for r in runs.values():
        assert r["img_s_per_gpu"] == pytest.approx(4 / (r["step_ms"] / 1e3))
        phases = r["phases_ms"]
        assert {"teacher_fwd", "student_fwd", "backward", "optimizer", "ema"} <= set(phases)
        parts = sum(v for k, v in phases.items() if k not in ("step", "other"))
        assert 0 < parts and phases["other"] >= 0  # the phases are spans inside the step
        assert r["mfu_datasheet"] is None  # no datasheet peak for a CPU
    # Every mode starts from the same weights and batches: the same settings give the same losses.
    for loader in ("device", "real"):
        assert runs[("again", loader)]["loss_mean"] == runs[("fp32_eager", loader)]["loss_mean"]
    assert runs[("fp32_eager", "device")]["loss_mean"] != runs[("fp32_eager", "real")]["loss_mean"]


def test_step_flops_are_four_forwards_of_the_recipe():
    cfg = load_config(["configs/cifar10.yaml"])
    assert step_flops_per_image(cfg) / 1e9 == pytest.approx(4 * 42.47, rel=0.01)  # 171 GFLOP per image


def test_modes_and_names():
    assert parse_mode("bf16_cl")[1][:3] == ["train.precision=bf16", "train.channels_last=true", "train.compile=false"]
    assert parse_mode("bf16_cl:train.batch_per_gpu=8 model.channel_mult=[1,2]")[1][-2:] == [
        "train.batch_per_gpu=8", "model.channel_mult=[1,2]"]
    with pytest.raises(ValueError, match="fast"):
        parse_mode("fast")
    with pytest.raises(ValueError, match="key=value"):
        parse_mode("x:train.compile model.dropout=0")
    assert datasheet_tflops("NVIDIA H100 80GB HBM3") == 989.4 and datasheet_tflops("NVIDIA H100 PCIe") == 756.0
    assert kernel_kind("ncclDevKernel_AllReduce_Sum_bf16") == "communication"
    assert kernel_kind("sm90_xmma_fprop_implicit_gemm_bf16") == "conv/matmul"
    assert kernel_kind("triton_per_fused_native_group_norm_silu_3") == "normalisation"
    assert kernel_kind("pytorch_flash::flash_fwd_kernel") == "attention"


def test_bad_arguments_exit_2(capsys):
    assert main(["no_such_recipe"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["demo", "--modes", "fast"]) == 2


def test_bench_times_the_ema_teacher_pass_when_the_run_has_one(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["demo", *TINY, "ict.teacher=ema", "--modes", "fp32_eager", "--steps", "1", "--warmup", "1",
                 "--out", str(out)]) == 0
    phases = json.loads(out.read_text())["results"][0]["phases_ms"]
    assert phases["teacher_fwd"] > 0 and phases["student_fwd"] > 0


def test_bench_times_a_teacher_pass_that_runs_with_autograd_on(tmp_path):
    # Under compile the teacher runs the student's graph with autograd on (train.teacher_pass=student_graph):
    # it must still be reported as the teacher's phase, not folded into the student's.
    out = tmp_path / "bench.json"
    assert main(["demo", *TINY, "train.teacher_pass=student_graph", "--modes", "fp32_eager", "--steps", "1",
                 "--warmup", "1", "--out", str(out)]) == 0
    phases = json.loads(out.read_text())["results"][0]["phases_ms"]
    assert phases["teacher_fwd"] > 0 and phases["student_fwd"] > 0
