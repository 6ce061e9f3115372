"""Load a run's configuration: schema defaults <- YAML file(s) <- `key=value` overrides, all validated."""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import re
import typing
from typing import Iterable, Literal

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ict_scale.errors import ConfigError

from .schema import Config

def _is_section(node) -> bool:
    """A dataclass-typed node (closed key set), as opposed to a free-form dict like storage_options."""
    return OmegaConf.is_dict(node) and dataclasses.is_dataclass(OmegaConf.get_type(node))


def _all_keys(node, prefix="") -> list[str]:
    keys = []
    for k in node.keys():
        path = f"{prefix}{k}"
        child = OmegaConf.select(node, str(k), throw_on_missing=False)
        keys.append(path)
        if _is_section(child):
            keys += _all_keys(child, path + ".")
    return keys


def _check_keys(schema, values, source: str, prefix: str = "") -> None:
    """Reject keys the schema does not declare, naming the closest valid ones."""
    if not _is_section(schema):
        return
    for key, value in values.items():
        path = f"{prefix}{key}"
        valid = list(schema.keys())
        if key not in valid:
            close = difflib.get_close_matches(path, _all_keys(OmegaConf.structured(Config)), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"{source}: unknown config key '{path}'{hint} (valid keys under "
                              f"'{prefix.rstrip('.') or '<root>'}': {', '.join(map(str, valid))})")
        sub = schema[key]
        if isinstance(value, dict) and _is_section(sub):
            _check_keys(sub, value, source, path + ".")


# What a free-form mapping key expects, for the error when it gets something else.
_MAPPING_EXAMPLES = {f"{s}.storage_options": f"{s}.storage_options='{{client_kwargs: {{endpoint_url: http://host:9000}}}}'"
                     for s in ("data", "train")}


def _field_type(key: str):
    """The schema's type hint for a dotted key ('ict.teacher', 'train.loggers[1]'), or None."""
    hint = Config
    for part in key.split("[")[0].split("."):
        if not dataclasses.is_dataclass(hint):
            return None
        hint = typing.get_type_hints(hint).get(part)
    return hint


def _choices(key: str) -> tuple[tuple, bool] | None:
    """(allowed values, whether they are a list's entries) of a `Literal` field of the schema, else None."""
    hint = _field_type(key)
    if typing.get_origin(hint) in (list, typing.List) and typing.get_args(hint):
        inner = typing.get_args(hint)[0]
        return (typing.get_args(inner), True) if typing.get_origin(inner) is Literal else None
    return (typing.get_args(hint), False) if typing.get_origin(hint) is Literal else None


def _merge(base, values: dict, source: str):
    _check_keys(base, values, source)
    try:
        return OmegaConf.merge(base, values)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        choices = _choices(key)
        if choices is not None:  # a Literal field: name the key and the values the schema allows
            allowed, entries = choices
            field = key.split("[")[0]
            what = f"'{field}' entries must be from" if entries else f"'{field}' must be one of"
            names = ", ".join(str(a) if a != "" else '""' for a in allowed)
            raise ConfigError(f"{source}: {what} {names}; got {_offending(e)!r}") from None
        if key in _MAPPING_EXAMPLES:
            raise ConfigError(f"{source}: '{key}' must be a mapping, e.g. {_MAPPING_EXAMPLES[key]}") from None
        # OmegaConf's message continues with lines of its internals (full_key, object_type): keep the first.
        first = str(e.msg if hasattr(e, "msg") else e).strip().splitlines()[0]
        raise ConfigError(f"{source}: bad value for '{key}': {first}") from None


def _offending(e: OmegaConfBaseException):
    """The value OmegaConf refused (its exceptions keep it on the node they were raised for)."""
    value = getattr(e, "value", None)
    if value is not None:
        return value
    return getattr(getattr(e, "child_node", None), "_val", "?")


def _parse_override(item: str) -> dict:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value (for example train.total_steps=1000)")
    key, raw = item.split("=", 1)
    value = _yaml_scalar(raw)
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _yaml_scalar(raw: str):
    import yaml  # a dependency of omegaconf; gives YAML's typing of '1e-4', 'true', '[1,2]', 'null'
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def _read_yaml(path: str):
    import yaml  # a dependency of omegaconf, whose loader raises yaml's errors
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else path
        raise ConfigError(f"{where}: YAML syntax error: {getattr(e, 'problem', None) or e}") from None


def load_config(paths: Iterable[str] = (), overrides: Iterable[str] = ()) -> Config:
    """Merge YAML files then overrides over the schema defaults; validate enums and cross-field rules."""
    cfg = OmegaConf.structured(Config)
    for path in paths:
        values = _read_yaml(path)
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(values).__name__}")
        cfg = _merge(cfg, values, path)
    for item in overrides:
        cfg = _merge(cfg, _parse_override(item), f"override '{item}'")
    _validate(cfg)
    return cfg


def _validate(cfg) -> None:
    """Rules a field's type cannot express (Literal fields were checked as they were merged)."""
    positive = ["train.total_steps", "train.batch_size", "train.batch_per_gpu", "train.log_every",
                "train.ckpt_every", "train.keep_last", "ict.s0", "ict.s1"]
    for key in positive:
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"'{key}' must be > 0; got {OmegaConf.select(cfg, key)}")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"'train.ema_decay' must be in [0, 1); got {cfg.train.ema_decay}")
    if not 0 < cfg.ict.sigma_min < cfg.ict.sigma_max:
        raise ConfigError(f"need 0 < ict.sigma_min < ict.sigma_max; got {cfg.ict.sigma_min}, {cfg.ict.sigma_max}")
    check_teacher(cfg)
    check_loggers(cfg)
    check_model(cfg)


def check_loggers(cfg) -> None:
    """The package of the one tracker that is not a dependency of every install (names are a Literal field)."""
    if "wandb" in cfg.train.loggers and importlib.util.find_spec("wandb") is None:
        raise ConfigError("'train.loggers' includes wandb, but the wandb package is not installed "
                          "(pip install -e '.[wandb]')")


def check_model(cfg) -> None:
    """A registered network whose attention layers split into whole heads (caught here, not at model build)."""
    from ict_scale.networks import NETWORKS, attention_mismatches  # torch, only once a config is validated
    if cfg.model.name not in NETWORKS:
        raise ConfigError(f"'model.name' must be one of {', '.join(sorted(NETWORKS))}; got {cfg.model.name!r}")
    m = cfg.model
    if m.head_channels is not None and "head_channels" not in NETWORKS[m.name].defaults:
        raise ConfigError(f"model.head_channels={m.head_channels} does not apply to model.name={m.name} (one "
                          f"attention head over all channels); leave it null")
    overrides = {k: getattr(m, k) for k in ("model_channels", "channel_mult", "attn_resolutions", "head_channels")
                 if getattr(m, k) is not None}
    try:
        bad = attention_mismatches(m.name, cfg.data.resolution, **overrides)
    except ValueError as e:  # levels that do not fit the resolution, or attn_resolutions that match no level
        raise ConfigError(f"model.name={m.name}: {e}") from None
    if bad:
        level, resolution, channels, head = bad[0]
        raise ConfigError(
            f"model.name={m.name}: attention at {resolution}x{resolution} has model.model_channels * "
            f"model.channel_mult[{level}] = {channels} channels, not a multiple of model.head_channels={head}; "
            f"change one of them (or model.attn_resolutions)")


def check_teacher(cfg) -> None:
    """The EMA teacher's rate, and the backends that can hold its full copy of the network."""
    if not 0.0 <= cfg.ict.teacher_mu0 < 1.0:
        raise ConfigError(f"'ict.teacher_mu0' must be in [0, 1); got {cfg.ict.teacher_mu0}")
    # The teacher is a plain replica updated from the local parameters; sharded backends hold only a shard
    # of those (FSDP2 DTensors, DeepSpeed partitions), so they would need a sharded teacher of their own.
    if cfg.ict.teacher == "ema" and cfg.parallel.backend not in ("single", "ddp"):
        raise ConfigError(f"ict.teacher=ema needs parallel.backend single or ddp; got parallel.backend="
                          f"{cfg.parallel.backend} (use ict.teacher=student, iCT's teacher, with fsdp/deepspeed)")


_SECRET = re.compile(r"(key|secret|token|password|passwd|credential|session)", re.IGNORECASE)
REDACTED = "<redacted>"


def redact(node):
    """A copy with every value under a secret-looking key (key, secret, token, password...) replaced."""
    if isinstance(node, dict):
        return {k: REDACTED if _SECRET.search(str(k)) and not isinstance(v, (dict, list)) else redact(v)
                for k, v in node.items()}
    if isinstance(node, list):
        return [redact(v) for v in node]
    return node


def to_yaml(cfg) -> str:
    """The resolved config as YAML, for run directories and --dry-run: credentials never leave the process."""
    return OmegaConf.to_yaml(OmegaConf.create(redact(OmegaConf.to_container(cfg, resolve=True))))
