"""`python -m ict_scale.train --help-config` lists every key of the schema with its type, default and meaning."""
import dataclasses
import re
import subprocess
import sys
import typing

from ict_scale.config import Config
from ict_scale.config.reference import field_docs
from ict_scale.config.schema import TrainConfig
from ict_scale.train.__main__ import main


def schema_keys() -> list[tuple[str, dataclasses.Field]]:
    sections = typing.get_type_hints(Config)
    return [(f"{s.name}.{f.name}", f) for s in dataclasses.fields(Config) for f in dataclasses.fields(sections[s.name])]


def test_every_key_with_type_default_and_doc(capsys):
    assert main(["--help-config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for key, f in schema_keys():
        at = [i for i, line in enumerate(lines) if line.startswith(f"  {key}: ")]
        assert len(at) == 1, key
        assert re.fullmatch(rf"  {re.escape(key)}: [a-z][a-z ]* = \S.*", lines[at[0]]), lines[at[0]]
        doc = lines[at[0] + 1]
        assert doc.startswith("      ") and doc.strip(), f"{key} has no documentation comment"
    listed = [line.split(":")[0].strip() for line in lines if re.match(r"  \w+\.\w+: ", line)]
    assert listed == [key for key, _ in schema_keys()]  # nothing else, in schema order


def test_types_defaults_and_continued_comments(capsys):
    assert main(["--help-config"]) == 0
    out = capsys.readouterr().out
    assert "  train.batch_size: int = 1024\n      global batch per optimiser step" in out
    assert "  model.channel_mult: list of int or null = null\n" in out
    assert "  data.storage_options: mapping = {}\n" in out
    assert '  ict.metric: str = "pseudo_huber"\n' in out
    assert "  eval.steps: list of int = [1, 2]\n" in out
    # A comment continued on the next comment-only line belongs to the field above it.
    assert field_docs(TrainConfig)["cudnn_benchmark"].endswith("may then pick other algorithms (not bit-identical)")


def test_help_config_from_the_command_line():
    done = subprocess.run([sys.executable, "-m", "ict_scale.train", "--help-config"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "  parallel.backend: str = \"single\"" in done.stdout
