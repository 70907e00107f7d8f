"""Experiment files: load a typed config from `experiments/<algo>/<name>.py`, apply `--set` overrides, dump.

An experiment file defines `config()` returning a (nested, frozen) dataclass. Overrides address fields
by dotted path (`train.steps=200`, `optim.lr=3e-4`, `lora=null`, `lora.rank=16`); values are parsed as
JSON where possible and coerced to the field's annotated type. Errors name the key and the options.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import types
import typing
from typing import Any

from polmjax.errors import UserError


class ConfigError(UserError, ValueError):
    """An experiment file or override that cannot be applied."""


def load_experiment(path: str, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """`config()` of the experiment file at `path`, with overrides applied and validated."""
    if not os.path.exists(path):
        raise ConfigError(f"experiment file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"polmjax_experiment_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "config"):
        raise ConfigError(f"{path}: an experiment file must define config() returning its config dataclass")
    cfg = module.config()
    for item in overrides:
        cfg = apply_override(cfg, item)
    validate(cfg)
    return cfg


def apply_override(cfg: Any, item: str) -> Any:
    """`cfg` with one `a.b.c=value` override applied (a new object; cfg is not modified)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=100")
    key, raw = item.split("=", 1)
    return _set(cfg, key.strip().split("."), raw.strip(), key.strip())


def validate(cfg: Any) -> None:
    """Call `validate()` on every dataclass in the tree that defines one."""
    if dataclasses.is_dataclass(cfg):
        for f in dataclasses.fields(cfg):
            validate(getattr(cfg, f.name))
        if hasattr(cfg, "validate"):
            try:
                cfg.validate()
            except ConfigError:
                raise
            except ValueError as e:  # the dataclasses' own checks: same message, as a user error
                raise ConfigError(str(e)) from e


def to_dict(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump(cfg: Any, path: str) -> None:
    """Write the resolved config as JSON, with its class under "_type" so `load_run_config` can rebuild it."""
    out = {"_type": f"{type(cfg).__module__}:{type(cfg).__qualname__}", **to_dict(cfg)}
    with open(path, "w") as f:
        json.dump(out, f, indent=2, sort_keys=True)


def load_run_config(run_dir: str) -> Any:
    """The experiment config a run was started with (its run_dir/config.json), as a typed object."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"{run_dir}: no config.json (not a polmjax run directory)")
    with open(path) as f:
        d = json.load(f)
    module, name = d.pop("_type").split(":")
    return from_dict(getattr(importlib.import_module(module), name), d)


def from_dict(cls, d: dict) -> Any:
    """Rebuild a (nested) dataclass from `to_dict` output."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in d:
            kwargs[f.name] = _from_value(d[f.name], hints[f.name])
    return cls(**kwargs)


def _from_value(value, hint):
    if value is None:
        return None
    for t in _args(hint):
        origin = typing.get_origin(t) or t
        if dataclasses.is_dataclass(origin) and isinstance(value, dict):
            return from_dict(origin, value)
        if origin is tuple and isinstance(value, list):
            (item_t, *_) = typing.get_args(t) or (Any,)
            return tuple(v if item_t in (Any, Ellipsis) else _from_value(v, item_t) for v in value)
    return value


def _set(obj: Any, keys: list[str], raw: str, full: str) -> Any:
    if not dataclasses.is_dataclass(obj):
        raise ConfigError(f"override {full}: {type(obj).__name__} has no field {keys[0]!r}")
    names = [f.name for f in dataclasses.fields(obj)]
    if keys[0] not in names:
        raise ConfigError(f"override {full}: unknown key {keys[0]!r}; known: {', '.join(names)}")
    hint = typing.get_type_hints(type(obj))[keys[0]]
    if len(keys) == 1:
        value = _coerce(_parse(raw), hint, full)
    else:
        child = getattr(obj, keys[0])
        if child is None:  # e.g. lora.rank=16 on a config without lora: start from the defaults
            cls = next((t for t in _args(hint) if dataclasses.is_dataclass(t)), None)
            if cls is None:
                raise ConfigError(f"override {full}: {keys[0]} is None and has no dataclass type")
            child = cls()
        value = _set(child, keys[1:], raw, full)
    try:
        return dataclasses.replace(obj, **{keys[0]: value})
    except (ValueError, TypeError) as e:
        raise ConfigError(f"override {full}: {e}") from e


def _parse(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _args(hint) -> tuple:
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _coerce(value: Any, hint, full: str) -> Any:
    options = _args(hint)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"override {full}: null is not allowed here (type {hint})")
    errors = []
    for t in options:
        if t is type(None):
            continue
        origin = typing.get_origin(t) or t
        try:
            if origin is bool:
                if isinstance(value, bool):
                    return value
                if isinstance(value, str) and value.lower() in ("true", "false"):
                    return value.lower() == "true"
                raise TypeError("expected true/false")
            if origin is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise TypeError("expected an integer")
                return int(value)
            if origin is float:
                if isinstance(value, bool):
                    raise TypeError("expected a number")
                return float(value)
            if origin is str:
                return value if isinstance(value, str) else json.dumps(value)
            if origin in (tuple, list):
                items = value if isinstance(value, list) else [v for v in str(value).split(",") if v]
                (item_t, *_) = typing.get_args(t) or (Any,)
                coerced = [v if item_t is Any else _coerce(v, item_t, full) for v in items]
                return tuple(coerced) if origin is tuple else coerced
            if origin is dict and isinstance(value, dict):
                return value
            if dataclasses.is_dataclass(origin) and isinstance(value, dict):
                return origin(**value)
            raise TypeError(f"cannot make a {t} from {value!r}")
        except (TypeError, ValueError) as e:
            errors.append(str(e))
    raise ConfigError(f"override {full}={value!r}: expected {hint} ({'; '.join(errors)})")
