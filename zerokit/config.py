"""Run configuration: a recipe's YAML file plus `key=value` overrides.

The YAML next to each recipe holds every default, each explained on its own line.
Overrides use dotted keys (`train.lr=3e-4`); values are parsed as YAML scalars.
Unknown keys, malformed YAML and values of the wrong type are `UsageError`s.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from zerokit.errors import UsageError


class Config(dict):
    """A nested dict with attribute access: `cfg.train.lr` is `cfg["train"]["lr"]`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Config) else v for k, v in self.items()}


def _wrap(d: dict) -> Config:
    return Config({k: _wrap(v) if isinstance(v, dict) else v for k, v in d.items()})


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file not found: {path}; pass an existing YAML file with --config")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UsageError(f"malformed YAML in {path}{where}: {getattr(e, 'problem', e)}; fix the file's syntax") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a YAML mapping of settings, not {type(data).__name__}")
    return data


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        keys.append(prefix + k)
        if isinstance(v, dict):
            keys += _flat_keys(v, prefix + k + ".")
    return keys


def _unknown_key(key: str, known: dict) -> UsageError:
    close = difflib.get_close_matches(key, _flat_keys(known), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see the recipe's YAML for the keys"
    return UsageError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check an override against the type of its default (None defaults take anything)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float) and not isinstance(value, bool):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            pass
    elif isinstance(default, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif isinstance(default, str):
        return str(value)
    elif isinstance(default, (list, dict)) and isinstance(value, type(default)):
        return value
    raise UsageError(f"config key '{key}' expects a {type(default).__name__} (default {default!r}), got {value!r}")


def merge(base: dict, updates: dict, prefix: str = "", root: dict | None = None) -> None:
    """Merge `updates` into `base` in place; every key must already exist in `base`."""
    root = base if root is None else root
    for k, v in updates.items():
        key = prefix + k
        if k not in base:
            raise _unknown_key(key, root)
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise UsageError(f"config key '{key}' is a section; set its fields, e.g. {key}.<field>=...")
            merge(base[k], v, key + ".", root)
        else:
            base[k] = _coerce(key, v, base[k])


def parse_overrides(args: list[str]) -> dict:
    """`["train.lr=1e-3", "run_dir=x"]` -> nested dict with YAML-parsed values."""
    nested: dict = {}
    for arg in args:
        if "=" not in arg:
            raise UsageError(f"cannot read argument '{arg}': overrides are key=value, e.g. train.max_steps=100")
        key, raw = arg.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        if value is None and raw.strip() not in ("", "null", "Null", "NULL", "~"):
            value = raw  # e.g. sample.prompt=#Person1#: -- YAML would read it as a comment
        node = nested
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def load_config(defaults_path: str | Path, overrides: list[str], config_path: str | Path | None = None) -> Config:
    """Defaults YAML <- optional user YAML (--config) <- key=value overrides."""
    cfg = load_yaml(defaults_path)
    if config_path:
        user = load_yaml(config_path)
        try:
            merge(cfg, user)
        except UsageError as e:
            raise UsageError(f"{config_path}: {e}") from None
    merge(cfg, parse_overrides(overrides))
    return _wrap(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
