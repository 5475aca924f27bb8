"""Experiment configs: YAML files in ``configs/`` plus ``--set key.path=value`` overrides.

A config is a plain nested ``dict`` (no global state). Pipelines and sweeps read it and
name the key path in every error, e.g. ``configs/clip_vit_b32.yaml: train.lr must be > 0``.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from bcjax.errors import BcjaxError

__all__ = ["ANY", "ConfigError", "apply_overrides", "check_keys", "get", "load_config", "require"]


class ConfigError(BcjaxError):
    """A config file is missing, malformed, or lacks / mistypes a key."""


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> dict:
    """Read a YAML mapping from ``path`` and apply ``key.path=value`` overrides.

    The source path is kept under ``_source`` so error messages can name the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            cfg = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(cfg).__name__}")
    cfg = apply_overrides(cfg, overrides)
    cfg["_source"] = path
    return cfg


def apply_overrides(cfg: Mapping, overrides: Iterable[str]) -> dict:
    """Return a copy of ``cfg`` with each ``"a.b.c=value"`` set (value parsed as YAML)."""
    out = _deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r} has an empty key")
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a mapping")
            node = nxt
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from None
    return out


_MISSING = object()


def get(cfg: Mapping, key: str, default: Any = _MISSING, *, types: type | tuple = object) -> Any:
    """``cfg["a"]["b"]`` for ``key="a.b"``; ``default`` when absent (error if no default).
    Raises :class:`ConfigError` naming the file and key when the value has the wrong type."""
    node: Any = cfg
    for p in key.split("."):
        if not isinstance(node, Mapping) or p not in node:
            if default is _MISSING:
                raise ConfigError(f"{_where(cfg)}missing required key {key!r}")
            return default
        node = node[p]
    if not isinstance(node, types):
        names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise ConfigError(f"{_where(cfg)}{key} must be {names}, got {node!r}")
    return node


#: In a :func:`check_keys` schema: any value (a leaf, or a section whose keys are free).
ANY = None


def check_keys(cfg: Mapping, schema: Mapping, *, source: str | None = None, prefix: str = "") -> None:
    """Reject, before any work starts, a key of ``cfg`` that ``schema`` does not know:
    :class:`ConfigError` naming the config file and the dotted key (and the accepted ones).

    ``schema`` maps each accepted key to :data:`ANY` (any value) or to a nested schema, which
    the value must match when it is a mapping (``null`` stands for an empty section). Keys set
    by ``--set`` are checked like those of the file (both end up in ``cfg``)."""
    source = source if source is not None else (cfg.get("_source") if not prefix else None)
    where = f"{source}: " if source else ""
    for key, value in cfg.items():
        if not prefix and key == "_source":
            continue
        dotted = f"{prefix}{key}"
        if key not in schema:
            within = f" in {prefix[:-1]}" if prefix else ""
            raise ConfigError(f"{where}unknown key {dotted!r}; accepted{within}: {sorted(schema)}")
        sub = schema[key]
        if sub is not ANY and value is not None:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}{dotted} must be a mapping, got {value!r}")
            check_keys(value, sub, source=source or "", prefix=f"{dotted}.")


def require(condition: bool, cfg: Mapping, message: str) -> None:
    """Raise :class:`ConfigError` with the config's file name unless ``condition``."""
    if not condition:
        raise ConfigError(f"{_where(cfg)}{message}")


def _where(cfg: Mapping) -> str:
    src = cfg.get("_source") if isinstance(cfg, Mapping) else None
    return f"{src}: " if src else ""


def _deepcopy(x):
    if isinstance(x, Mapping):
        return {k: _deepcopy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deepcopy(v) for v in x]
    return x
