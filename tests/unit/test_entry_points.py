"""Every command is declared in pyproject's [project.scripts], installed, and answers --help; each one is the
same function as its `python -m` form."""
import importlib
import os
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
# The `python -m` module of each command (what the Makefile, launchers and docs run).
MODULES = {"ict-train": "ict_scale.train", "ict-sample": "ict_scale.sample", "ict-evaluate": "ict_scale.evaluate",
           "ict-export": "ict_scale.export", "ict-bench": "ict_scale.bench", "ict-bench-fidelity":
           "ict_scale.bench.fidelity", "ict-bench-report": "ict_scale.bench.report",
           "ict-make-shards": "data_prep.make_shards", "ict-ref-stats": "data_prep.ref_stats",
           "ict-train-classifier": "data_prep.train_classifier"}


def test_every_command_is_declared_and_installed():
    assert set(SCRIPTS) == set(MODULES)
    installed = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")
                 if ep.name.startswith("ict-")}
    assert installed == SCRIPTS, "reinstall the package (make install) after changing [project.scripts]"
    for name, target in SCRIPTS.items():
        module, func = target.split(":")
        # The script runs code of the module that `python -m MODULES[name]` runs (its __main__ for a package).
        assert module in (MODULES[name], MODULES[name] + ".__main__"), name
        assert callable(getattr(importlib.import_module(module), func)), target


def test_every_installed_command_answers_help():
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    # Started together: each pays the interpreter and torch import once, side by side.
    procs = {name: subprocess.Popen([os.path.join(bin_dir, name), "--help"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env, cwd=REPO) for name in SCRIPTS}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, err[-2000:])
        assert out.startswith("usage: "), (name, out[:200])
