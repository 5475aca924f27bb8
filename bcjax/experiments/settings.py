"""Typed experiment configs: each experiment declares a dataclass for its section of a sweep
config; :func:`parse_section` fills it, rejecting unknown keys and wrong types with the file
and key path (``configs/grid.yaml: alphas must be a list of numbers``).

Method entries (``methods: [{name: dare, keep: 0.1, alpha: 0.3, seed: 0}]``) become
:class:`MethodSpec`: the name is checked against the registry, every other key against the
method's hyper-parameters; ``seed`` is accepted when the method requires a PRNG key
(``requires=("key",)``, :data:`bcjax.merging.REQUIREMENTS`).
"""
from __future__ import annotations

import dataclasses
import inspect
import itertools
import types
import typing
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from bcjax.config import ConfigError, get

__all__ = ["COMMON_KEYS", "MethodSpec", "check_method_hparams", "parse_section", "parse_methods", "sweep_mesh", "where"]

#: Top-level sweep keys that are not an experiment's own (read by the runner / suite).
COMMON_KEYS = ("experiment", "suite", "results", "models_per_call", "mesh", "cache_dir", "_source")


def where(config: Mapping) -> str:
    return str(config.get("_source", "<config>")) if isinstance(config, Mapping) else "<config>"


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One merge method of a config: its name and hyper-parameters (``seed``: the integer the
    PRNG key of a ``requires=("key",)`` method is made from; default 0)."""

    name: str
    hparams: Mapping[str, Any]
    grid: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)
    settings: Sequence[Mapping[str, Any]] = ()  # explicit candidate settings (instead of a product)

    def points(self) -> list[dict]:
        """The hyper-parameter settings of this entry: ``settings`` when given, else ``hparams``
        alone, or combined with every point of ``grid`` (Cartesian product, keys in written order)."""
        if self.settings:
            return [{**self.hparams, **dict(s)} for s in self.settings]
        if not self.grid:
            return [dict(self.hparams)]
        keys = list(self.grid)
        return [{**self.hparams, **dict(zip(keys, combo))} for combo in itertools.product(*self.grid.values())]


def parse_methods(config: Mapping, key: str = "methods", default: Sequence[Mapping] | None = None) -> list[MethodSpec]:
    """The ``methods`` list of a config as :class:`MethodSpec` (names and keys checked)."""
    from bcjax.merging import methods as registered

    raw = get(config, key, list(default or []), types=list)
    known = registered()
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, Mapping) or "name" not in m:
            raise ConfigError(f"{where(config)}: {key}[{i}] must be a mapping with a 'name'")
        name = str(m["name"])
        if name not in known:
            raise ConfigError(f"{where(config)}: {key}[{i}].name: unknown merge method {name!r}; "
                              f"registered: {sorted(known)}")
        accepted = set(known[name].tunable) | ({"seed"} if "key" in known[name].requires else set())
        grid = m.get("grid") or {}
        if not isinstance(grid, Mapping) or not all(isinstance(v, list) and v for v in grid.values()):
            raise ConfigError(f"{where(config)}: {key}[{i}].grid must map hyper-parameters to non-empty lists")
        for k in [*m, *grid]:
            if k not in ("name", "grid") and k not in accepted:
                raise ConfigError(f"{where(config)}: {key}[{i}].{k}: {name} has no hyper-parameter {k!r}; "
                                  f"accepted: {sorted(accepted)}")
        spec = MethodSpec(name, {k: v for k, v in m.items() if k not in ("name", "grid")}, dict(grid))
        check_method_hparams(config, f"{key}[{i}]", name, spec.hparams, spec.grid)
        out.append(spec)
    return out


def check_method_hparams(config: Mapping, path: str, method: str, values: Mapping[str, Any],
                         grid: Mapping[str, Sequence[Any]] | None = None) -> None:
    """Check a config entry's hyper-parameters of ``method`` with the specs it was registered
    with (:mod:`bcjax.hparams`) before any work starts: each value and each grid value, then
    every combination (β ≤ γ); ``seed`` must be an integer. A string such as YAML 1.1's
    ``9e-1``, a bool, null or an out-of-range value raises :class:`ConfigError` naming the file
    and key path (``configs/x.yaml: methods[0].beta: ...``)."""
    from bcjax import hparams
    from bcjax.errors import UnknownMethodError
    from bcjax.merging import get_method

    try:
        m = get_method(method)
    except UnknownMethodError as e:
        raise ConfigError(f"{where(config)}: {path}: {e}") from None

    def checked(vals: Mapping, where_key: str):
        try:
            if "seed" in vals:
                hparams.integer(vals["seed"], "seed", method=method)
            m.normalize({k: v for k, v in vals.items() if k != "seed"})
        except hparams.HyperparameterError as e:
            raise ConfigError(f"{where(config)}: {where_key}: {e}") from None

    for k, v in values.items():
        checked({k: v}, f"{path}.{k}")
    for k, vs in (grid or {}).items():
        for j, v in enumerate(vs):
            checked({k: v}, f"{path}.grid.{k}[{j}]")
    keys = list(grid or {})
    defaults = {k: v for k, v in m.tunable.items() if v is not inspect.Parameter.empty}
    for combo in itertools.product(*(grid or {}).values()):  # every point with the defaults: β ≤ γ
        checked({**defaults, **values, **dict(zip(keys, combo))}, path)


def _check_type(value, hint, config, key):
    """Coerce/check ``value`` against a simple annotation (float, int, str, bool, list[float], optional)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], config, key)
    if hint is Any:
        return value
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where(config)}: {key} must be a list, got {value!r}")
        if args and args[0] is not Any:
            return [_check_type(v, args[0], config, f"{key}[{i}]") for i, v in enumerate(value)]
        return list(value)
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where(config)}: {key} must be a mapping, got {value!r}")
        return dict(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where(config)}: {key} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where(config)}: {key} must be int, got {value!r}")
        return value
    if hint in (str, bool) and not isinstance(value, hint):
        raise ConfigError(f"{where(config)}: {key} must be {hint.__name__}, got {value!r}")
    return value


def parse_section(cls, config: Mapping, *, extra_known: Sequence[str] = COMMON_KEYS):
    """An instance of the dataclass ``cls`` from the top-level keys of ``config``: each field
    from the key of its name (its default when absent); any key that is neither a field nor in
    ``extra_known`` raises :class:`ConfigError` naming the file and key. A field typed
    ``list[MethodSpec]`` is parsed by :func:`parse_methods`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in config if k not in fields and k not in extra_known)
    if unknown:
        raise ConfigError(f"{where(config)}: unknown key {unknown[0]!r} for experiment "
                          f"{config.get('experiment', '?')!r}; accepted: {sorted(fields)} (and {list(extra_known[:-1])})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name not in config:
            continue
        if hints[name] == list[MethodSpec]:
            values[name] = parse_methods(config, name)
        else:
            values[name] = _check_type(config[name], hints[name], config, name)
    out = cls(**values)
    if hasattr(out, "check"):  # cross-field checks: ValueError naming the key → ConfigError naming the file
        try:
            out.check()
        except ValueError as e:
            raise ConfigError(f"{where(config)}: {e}") from None
    return out


def sweep_mesh(config: Mapping) -> Mesh | None:
    """The one-axis device mesh of ``config["mesh"]`` (``{axis: models, devices: 8}``;
    ``devices`` defaults to all of ``jax.devices()``), or None when the key is absent."""
    spec = get(config, "mesh", None, types=(dict, type(None)))
    if spec is None:
        return None
    unknown = sorted(set(spec) - {"axis", "devices"})
    if unknown:
        raise ConfigError(f"{where(config)}: unknown key mesh.{unknown[0]}; accepted: axis, devices")
    devices = jax.devices()
    n = get(spec, "devices", len(devices), types=int)
    if not 1 <= n <= len(devices):
        raise ConfigError(f"{where(config)}: mesh.devices must be in 1..{len(devices)}, got {n}")
    return Mesh(np.array(devices[:n]), (get(spec, "axis", "models", types=str),))
