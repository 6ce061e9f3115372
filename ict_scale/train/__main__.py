"""`python -m ict_scale.train [CONFIG] [key=value ...] [--dry-run | --help-config]`: train (or resume) a consistency
model. Bad input ends with one line `error: ...` (ICT_DEBUG=1 shows the traceback)."""
from __future__ import annotations

import argparse
import os
import sys

from ict_scale import cli
from ict_scale.parallel import comm
from ict_scale.config import ConfigError, config_reference, load_config, to_yaml

DEFAULT_CONFIG = "demo"


def find_config(name: str) -> str:
    """A YAML path, or a recipe name looked up in ./configs and in the source tree's configs/."""
    if os.path.exists(name):
        return name
    here = os.path.dirname(os.path.abspath(__file__))
    for root in ("configs", os.path.join(here, "..", "..", "configs")):
        for candidate in (os.path.join(root, name), os.path.join(root, f"{name}.yaml")):
            if os.path.exists(candidate):
                return os.path.normpath(candidate)
    raise ConfigError(f"config '{name}' not found (give a YAML path, or one of the recipe names in configs/)")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m ict_scale.train", description=__doc__)
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help="YAML file or recipe name (default: demo)")
    p.add_argument("overrides", nargs="*", help="more YAML files (e.g. configs/parallel/fsdp.yaml), then key=value "
                                                "overrides, e.g. train.total_steps=1000")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and parameter count, then exit")
    p.add_argument("--help-config", action="store_true",
                   help="list every config key with its type, default and meaning, then exit")
    args = p.parse_args(argv)
    if args.config and "=" in args.config:  # `python -m ict_scale.train key=value` with the default recipe
        args.overrides.insert(0, args.config)
        args.config = DEFAULT_CONFIG
    # Further YAML files (e.g. a parallel preset) merge after the recipe, before the key=value overrides.
    args.configs = [args.config, *(o for o in args.overrides if "=" not in o and o.endswith((".yaml", ".yml")))]
    args.overrides = [o for o in args.overrides if o not in args.configs]
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.help_config:
        print(config_reference())
        return 0
    cfg = load_config([find_config(c) for c in args.configs], args.overrides)
    if args.dry_run:
        from .model import build_model, count_parameters
        import torch
        print(to_yaml(cfg))
        with torch.device("meta"):
            n = count_parameters(build_model(cfg))
        print(f"model {cfg.model.name}: {n:,} parameters ({n / 1e6:.2f}M)")
        return 0
    from ict_scale.checkpoint.errors import NoSpaceLeft, is_out_of_space
    from .loop import train
    try:
        run = train(cfg)  # a refused resume or a busy or full run dir is a UserError: cli.run prints one line
    except OSError as e:
        if not is_out_of_space(e):
            raise
        # Checkpoints name their own failure; this is any other write (metrics, grids).
        raise NoSpaceLeft(f"no space left on device writing {e.filename or 'into ' + cfg.train.run_dir}") from e
    code = 0 if run.step >= 0 else 1
    distributed = run.backend.name != "single"
    comm.destroy()  # leave the process group in order
    if distributed:
        # Collective threads torn down during interpreter exit can abort the process ("terminate called
        # without an active exception") after a finished run; after the orderly shutdown, leave at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def console() -> int:
    """The `ict-train` command ([project.scripts] in pyproject.toml): main() with one-line errors."""
    return cli.run(main)


if __name__ == "__main__":
    sys.exit(console())
