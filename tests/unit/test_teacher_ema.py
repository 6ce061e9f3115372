"""Original CT's EMA teacher (ict.teacher=ema): mu(k), one update, no gradients, exact resume, config errors."""
import json
import math

import pytest
import torch

from ict_scale.config import ConfigError, load_config
from ict_scale.ict import ICTLoss, ct_teacher_decay
from ict_scale.parallel import dcp_io
from ict_scale.train.loop import apply_or_skip, next_micro_batches, train
from ict_scale.checkpoint.layout import TEACHER_PREFIX
from ict_scale.checkpoint.resume import check_resume_config
from ict_scale.train.run import setup
from ict_scale.train.signals import PreemptionFlag
from ict_scale.train.step import train_step

TINY = ["model.name=ncsnpp", "model.model_channels=16", "model.channel_mult=[1,2]", "model.num_blocks=1",
        "model.attn_resolutions=[4]", "model.dropout=0.2", "data.source=synthetic", "data.resolution=8",
        "data.num_classes=4", "data.num_workers=0", "data.drop_labels=true", "train.batch_size=8",
        "train.batch_per_gpu=4", "train.total_steps=6", "train.log_every=1", "train.grid_every=0",
        "train.grid_num=4", "train.ckpt_every=100", "train.keep_last=2", "ict.s1=40", "eval.sigma_mid=0.821",
        "optim.lr=1e-3"]


def tiny_cfg(run_dir, *extra):
    return load_config([], TINY + [f"train.run_dir={run_dir}", *extra])


def losses(run_dir):
    with open(f"{run_dir}/metrics.jsonl") as f:
        return [json.loads(line)["loss"] for line in f]


def saved_teacher(ckpt: str, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The EMA teacher's tensors of a checkpoint, read by name the way the trainer's resume reads them."""
    tensors = {TEACHER_PREFIX + n: torch.zeros_like(t) for n, t in like.items()}
    dcp_io.load_ema(ckpt, tensors)
    return {n.removeprefix(TEACHER_PREFIX): t for n, t in tensors.items()}


# -- mu(k) ---------------------------------------------------------------------------------------------
def test_ct_teacher_decay_values():
    assert ct_teacher_decay(2, 2, 0.9) == pytest.approx(0.9, abs=1e-15)  # mu(0) = mu0
    assert ct_teacher_decay(150, 2, 0.9) == pytest.approx(math.exp(2 * math.log(0.9) / 150), abs=1e-15)
    assert ct_teacher_decay(150, 2, 0.9) == pytest.approx(0.998596, abs=1e-6)
    assert ct_teacher_decay(40, 2, 0.0) == 0.0  # mu0 = 0 is iCT's teacher: theta^- = theta
    mus = [ct_teacher_decay(n, 2, 0.9) for n in (2, 10, 50, 150)]
    assert mus == sorted(mus) and all(m < 1 for m in mus)  # the teacher slows down as N(k) grows
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="mu0"):
            ct_teacher_decay(10, 2, bad)


def test_teacher_decay_starts_at_mu0_under_both_curricula(tmp_path):
    doubling = ICTLoss(tiny_cfg(tmp_path).ict, 6)  # N(0) = s0 + 1 = 11 boundaries; K' = 2 steps per stage
    assert [doubling.num_scales(k) for k in (0, 2)] == [11, 21]
    assert doubling.teacher_decay(0) == pytest.approx(0.9, abs=1e-15)
    assert doubling.teacher_decay(2) == pytest.approx(math.exp(11 * math.log(0.9) / 21), abs=1e-15)
    sqrt = ICTLoss(tiny_cfg(tmp_path, "ict.curriculum=sqrt", "ict.s0=2", "ict.s1=150").ict, 6)  # CT's: N(0) = s0 = 2
    assert [sqrt.num_scales(k) for k in (0, 6)] == [2, 151]
    assert sqrt.teacher_decay(0) == pytest.approx(0.9, abs=1e-15)
    assert sqrt.teacher_decay(6) == pytest.approx(math.exp(2 * math.log(0.9) / 151), abs=1e-15)


# -- one step ------------------------------------------------------------------------------------------
def test_one_step_moves_the_teacher_by_exactly_one_minus_mu_and_no_gradient_reaches_it(tmp_path):
    run = setup(tiny_cfg(tmp_path / "run", "ict.teacher=ema"))
    try:
        teacher, student = run.teacher.module, run.backend.module
        assert teacher is not student and teacher.training
        params = dict(teacher.named_parameters())
        assert all(torch.equal(params[n], p) for n, p in student.named_parameters())  # initialised to theta
        old = {n: p.detach().clone() for n, p in params.items()}
        result = train_step(run.backend, run.objective, next_micro_batches(run, iter(run.loader)), 0,
                            run.cfg.train.seed, teacher=teacher)
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
        assert any(p.grad is not None for p in student.parameters())
        assert all(torch.equal(params[n], old[n]) for n in old)  # the step itself leaves theta^- alone
        apply_or_skip(run, result, PreemptionFlag(signals=()))  # no handlers in the test process
        mu = run.objective.teacher_decay(0)
        assert mu == pytest.approx(0.9)
        moved = 0
        for n, p in student.named_parameters():
            want = old[n] + (1 - mu) * (p.detach() - old[n])
            # Equal here bit for bit; the tolerance admits a fused multiply-add in other CPUs' lerp kernels. A
            # swapped mu / 1 - mu would miss by about 0.8 of the student's move, which is over 1e-5 below.
            torch.testing.assert_close(params[n], want, rtol=0, atol=1e-7)
            moved = max(moved, (params[n] - old[n]).abs().max().item())
            assert params[n].data_ptr() != p.data_ptr()  # a copy of theta, not theta itself
        assert moved > 1e-5  # the student moved, so the teacher did (by a tenth of it)
    finally:
        run.loader.close()


def test_ema_teacher_with_mu0_zero_is_the_student_bit_for_bit(tmp_path):
    # mu = 0 makes theta^- = theta after every step: the separate teacher module, in train mode with the
    # forked RNG, must then compute exactly what iCT's teacher (the student itself) computes.
    # Four steps: the blocks' dropout feeds zero-initialised convolutions, which reach the loss from step 4 on.
    train(tiny_cfg(tmp_path / "student", "train.total_steps=4"))
    train(tiny_cfg(tmp_path / "ema0", "train.total_steps=4", "ict.teacher=ema", "ict.teacher_mu0=0.0"))
    assert losses(tmp_path / "student") == losses(tmp_path / "ema0")
    train(tiny_cfg(tmp_path / "ema", "train.total_steps=4", "ict.teacher=ema"))
    assert losses(tmp_path / "ema")[0] == losses(tmp_path / "student")[0]  # theta^- = theta at step 0
    assert losses(tmp_path / "ema")[1:] != losses(tmp_path / "student")[1:]


# -- checkpoints and resume ----------------------------------------------------------------------------
def test_stop_and_resume_with_ema_teacher_is_bit_identical(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    run_full = train(tiny_cfg(full, "ict.teacher=ema"))
    run = train(tiny_cfg(split, "ict.teacher=ema", "train.max_steps_this_run=3"))
    assert run.step == 3
    run = train(tiny_cfg(split, "ict.teacher=ema"))
    assert run.step == 6
    assert losses(full) == losses(split)
    live, resumed = dict(run_full.teacher.module.named_parameters()), dict(run.teacher.module.named_parameters())
    assert all(torch.equal(live[n], resumed[n]) for n in live)
    saved = saved_teacher(f"{full}/checkpoints/step_000000006", live)
    assert all(torch.equal(saved[n], live[n]) for n in live)  # the checkpoint holds theta^- itself
    student = dict(run_full.backend.module.named_parameters())
    assert any(not torch.equal(live[n], student[n]) for n in live)  # and it is not theta
    a = (full / "checkpoints/step_000000006/__0_0.distcp").read_bytes()
    b = (split / "checkpoints/step_000000006/__0_0.distcp").read_bytes()
    assert a == b


def test_resume_refuses_to_switch_the_teacher(tmp_path):
    student_dir, ema_dir = tmp_path / "student", tmp_path / "ema"
    train(tiny_cfg(student_dir, "train.total_steps=2"))
    with pytest.raises(ConfigError, match="cannot resume .*ict: checkpoint .*'teacher': 'student'.* now .*'teacher': 'ema'"):
        train(tiny_cfg(student_dir, "train.total_steps=2", "ict.teacher=ema"))
    train(tiny_cfg(ema_dir, "train.total_steps=2", "ict.teacher=ema"))
    with pytest.raises(ConfigError, match="cannot resume .*ict: checkpoint"):
        train(tiny_cfg(ema_dir, "train.total_steps=2"))
    with pytest.raises(ConfigError, match="teacher_mu0"):
        train(tiny_cfg(ema_dir, "train.total_steps=2", "ict.teacher=ema", "ict.teacher_mu0=0.5"))
    assert train(tiny_cfg(student_dir, "train.total_steps=2")).step == 2  # unchanged recipes still resume


def test_a_checkpoint_config_from_before_the_teacher_keys_still_resumes(tmp_path):
    from ict_scale.config import to_yaml
    from omegaconf import OmegaConf
    cfg = tiny_cfg(tmp_path)
    old = OmegaConf.to_container(OmegaConf.create(to_yaml(cfg)))
    del old["ict"]["teacher"], old["ict"]["teacher_mu0"]
    check_resume_config(cfg, OmegaConf.to_yaml(old), "ckpt")  # read as the defaults: iCT's teacher
    with pytest.raises(ConfigError, match="ict"):
        check_resume_config(tiny_cfg(tmp_path, "ict.teacher=ema"), OmegaConf.to_yaml(old), "ckpt")


# -- config errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("ict.teacher=frozen", "'ict.teacher' must be one of student, ema; got 'frozen'"),
    ("ict.teacher_mu0=1.0", "'ict.teacher_mu0' must be in \\[0, 1\\); got 1.0"),
    ("ict.teacher_mu0=-0.1", "'ict.teacher_mu0' must be in \\[0, 1\\); got -0.1"),
])
def test_bad_teacher_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], [override])


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_ema_teacher_needs_a_replicating_backend(backend):
    with pytest.raises(ValueError, match=f"ict.teacher=ema needs parallel.backend single or ddp; "
                                         f"got parallel.backend={backend}"):
        load_config([], ["ict.teacher=ema", f"parallel.backend={backend}"])
    load_config([], ["ict.teacher=ema", "parallel.backend=ddp"])
    load_config([], ["ict.teacher=student", f"parallel.backend={backend}"])
