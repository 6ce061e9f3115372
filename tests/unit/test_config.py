"""Config loading: schema defaults, recipes, overrides, and the errors a user sees."""
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ict_scale.config import ConfigError, load_config
from ict_scale.train.__main__ import find_config, main


def test_defaults_are_the_papers_constants():
    cfg = load_config()
    assert (cfg.ict.sigma_min, cfg.ict.sigma_max, cfg.ict.rho, cfg.ict.sigma_data) == (0.002, 80.0, 7.0, 0.5)
    assert (cfg.ict.s0, cfg.ict.s1, cfg.ict.p_mean, cfg.ict.p_std) == (10, 1280, -1.1, 2.0)
    assert (cfg.optim.lr, cfg.optim.beta1, cfg.optim.beta2, cfg.optim.weight_decay) == (1e-4, 0.9, 0.999, 0.0)


def test_paper_recipes():
    c = load_config([find_config("cifar10")])
    assert (c.model.name, c.train.batch_size, c.train.total_steps, c.train.ema_decay) == ("ncsnpp", 1024, 400000, 0.99993)
    assert c.eval.sigma_mid == 0.821 and c.data.drop_labels
    i = load_config([find_config("imagenet64")])
    assert (i.model.name, i.train.batch_size, i.train.total_steps, i.train.ema_decay) == ("adm", 4096, 800000, 0.99997)
    assert i.eval.sigma_mid == 1.526 and i.data.num_classes == 1000


def test_storage_options_overrides_in_the_readme_parse_to_the_same_mapping():
    """The README's command lines, as a shell splits them: a YAML flow mapping, and dotted keys."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    commands = [c for c in readme.replace("\\\n", " ").splitlines() if "data.storage_options" in c
                and c.startswith("python -m ict_scale.train")]
    assert len(commands) == 2, commands
    parsed = []
    for command in commands:
        args = shlex.split(command)[3:]  # after `python -m ict_scale.train`
        cfg = load_config([], [a for a in args if a.startswith("data.")])
        parsed.append(dict(cfg.data.storage_options))
        assert cfg.data.storage_options.client_kwargs.endpoint_url == "http://10.0.0.5:9000"
    assert parsed[0]["profile"] == "research"


def test_overrides_are_typed():
    cfg = load_config([], ["train.total_steps=123", "optim.lr=3e-4", "model.channel_mult=[1,2]", "train.channels_last=false"])
    assert cfg.train.total_steps == 123 and cfg.optim.lr == 3e-4
    assert list(cfg.model.channel_mult) == [1, 2] and cfg.train.channels_last is False


def test_unknown_key_names_close_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config([], ["train.total_step=5"])
    assert "train.total_step" in str(e.value) and "train.total_steps" in str(e.value)
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config([], ["trian.seed=1"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="train.total_steps"):
        load_config([], ["train.total_steps=many"])


def test_bad_enum_and_range():
    with pytest.raises(ConfigError, match="ict.metric"):
        load_config([], ["ict.metric=lpips"])
    with pytest.raises(ConfigError, match="train.ema_decay"):
        load_config([], ["train.ema_decay=1.5"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config([], ["train.seed"])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config([str(f)])
    assert str(f) in str(e.value) and "train.batch_size" in str(e.value)


def test_dry_run_prints_config_and_parameter_count(capsys):
    assert main(["cifar10", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "total_steps: 400000" in out
    assert "56,395,523 parameters" in out


def test_cli_reports_bad_key_with_exit_code_2():
    proc = subprocess.run([sys.executable, "-m", "ict_scale.train", "demo", "train.totl_steps=3", "--dry-run"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "train.total_steps" in proc.stderr


def test_secrets_are_never_written_or_printed(capsys):
    from ict_scale.config import to_yaml
    cfg = load_config([], ["data.storage_options={key: AKIAEXAMPLE, secret: s3cr3t, client_kwargs: "
                           "{endpoint_url: 'http://127.0.0.1:9000', aws_session_token: tok}}"])
    assert cfg.data.storage_options.secret == "s3cr3t"  # the run itself still has them
    text = to_yaml(cfg)
    assert "AKIAEXAMPLE" not in text and "s3cr3t" not in text and "tok" not in text.replace("token", "")
    assert "http://127.0.0.1:9000" in text
    assert main(["demo", "data.storage_options={secret: s3cr3t}", "--dry-run"]) == 0
    assert "s3cr3t" not in capsys.readouterr().out


def closed_fields() -> list[tuple[str, tuple, bool]]:
    """(key, allowed values, whether a list's entries) of every Literal-typed field of the schema."""
    import dataclasses
    import typing
    from ict_scale.config import Config
    out = []
    sections = typing.get_type_hints(Config)
    for s in dataclasses.fields(Config):
        for name, hint in typing.get_type_hints(sections[s.name]).items():
            entries = typing.get_origin(hint) is list
            inner = typing.get_args(hint)[0] if entries else hint
            if typing.get_origin(inner) is typing.Literal:
                out.append((f"{s.name}.{name}", typing.get_args(inner), entries))
    return out


def test_closed_fields_are_typed_in_the_schema():
    keys = {key for key, _, _ in closed_fields()}
    assert {"ict.metric", "ict.index_sampling", "ict.curriculum", "ict.teacher", "train.precision",
            "train.teacher_pass", "train.loggers", "parallel.backend", "eval.features",
            "data.worker_start_method"} <= keys


@pytest.mark.parametrize("key, allowed, entries", closed_fields())
def test_every_closed_field_refuses_other_values_naming_key_and_values(key, allowed, entries):
    value = f"[{allowed[0]},nope]" if entries else "nope"
    with pytest.raises(ConfigError) as e:
        load_config([], [f"{key}={value}"])
    message = str(e.value)
    assert "\n" not in message and f"'{key}'" in message and "got 'nope'" in message, message
    assert all((a or '""') in message for a in allowed), message


def test_closed_field_error_from_a_file_names_the_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("eval:\n  features: lpips\n")
    with pytest.raises(ConfigError, match=rf"^{path}: 'eval.features' must be one of inception, classifier; "
                                          "got 'lpips'$"):
        load_config([str(path)], [])


def test_the_label_count_the_network_sees_is_the_datas():
    import torch
    from ict_scale.data.config import label_dim
    from ict_scale.train.model import build_model
    for overrides, expected in [(["data.num_classes=10", "data.drop_labels=false"], 10),
                                (["data.num_classes=10", "data.drop_labels=true"], 0),
                                (["data.num_classes=0", "data.drop_labels=false"], 0)]:
        cfg = load_config([], ["model.model_channels=16", *overrides])
        assert label_dim(cfg.data) == expected
        with torch.device("meta"):
            assert build_model(cfg).net.label_dim == expected
