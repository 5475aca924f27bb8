"""An append-only JSONL store of evaluated points, keyed by a hash of their configuration.

Every evaluated point (a merged model's scores, a sweep cell) is one line
``{"key": <sha256 of the canonical JSON config>, "config": {...}, "value": {...}}``, written
and flushed as soon as it is computed. A killed sweep, rerun, finds its finished points and
computes only the rest. A corrupt line (a write cut off by a crash, or a value that is not
a finite number of the expected shape — ``null``, NaN, a bare string, see
:func:`invalid_value`) is skipped with a warning naming file and line, and the point is
recomputed; :meth:`ResultsStore.put` refuses such values in the first place.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import warnings
from typing import Any, Callable, Mapping

import numpy as np

from bcjax.errors import CacheWarning

__all__ = ["config_key", "finite_number", "invalid_value", "numbers_for", "ResultsStore"]


def config_key(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``config`` (sorted keys, floats as JSON numbers)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def finite_number(value) -> str | None:
    """A ``check`` for :meth:`ResultsStore.expect`: None for a finite real number."""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value):
        return None
    return f"value {json.dumps(value, default=str)[:40]} is not a finite number"


def numbers_for(keys) -> Callable[[Any], str | None]:
    """A ``check`` for :meth:`ResultsStore.expect`: a mapping with a finite number for each of ``keys``."""
    def check(value):
        if not isinstance(value, Mapping):
            return f"value {json.dumps(value, default=str)[:40]} is not a mapping of {list(keys)}"
        missing = [k for k in keys if k not in value]
        if missing:
            return f"value has no entry for {missing[0]!r}"
        return next((f"{k!r}: {p}" for k in keys if (p := finite_number(value[k]))), None)

    return check


def invalid_value(value, where: str = "value") -> str | None:
    """Why ``value`` is not a storable result, or None. A result is a finite number, or a
    non-empty mapping / list of results, whose leaves may also be strings inside a mapping
    (e.g. packed correctness ``{"n": 40, "bits": "ff..."}``): ``null``, NaN, ±Inf, booleans,
    empty containers and a bare string are not results (a sweep would crash on them or
    carry NaN into its summary)."""
    if isinstance(value, (bool, np.bool_)) or value is None:
        return f"{where} is {json.dumps(bool(value) if value is not None else None)}, not a number"
    if isinstance(value, numbers.Real):
        return None if math.isfinite(value) else f"{where} is {value}, not a finite number"
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            if not isinstance(v, str):
                problem = invalid_value(v, f"{where}[{k!r}]")
                if problem:
                    return problem
        return None
    if isinstance(value, list) and value:
        return next((p for i, v in enumerate(value) if (p := invalid_value(v, f"{where}[{i}]"))), None)
    return f"{where} is {json.dumps(value)[:40]}, not a finite number or a non-empty mapping/list of them"


class ResultsStore:
    """JSONL results keyed by :func:`config_key`. ``path=None`` keeps them in memory only."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = os.fspath(path) if path is not None else None
        self._values: dict[str, Any] = {}
        self._lines: dict[str, int] = {}  # key → line of the file its value was read from
        self.skipped_lines = 0
        if self.path and os.path.exists(self.path):
            self._load()

    def _load(self) -> None:
        with open(self.path, "rb") as f:
            raw = f.read()
        lines = raw.split(b"\n")
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key, value = rec["key"], rec["value"]
                if not isinstance(key, str):
                    raise TypeError("the key is not a string")
                problem = invalid_value(value)
                if problem:
                    raise ValueError(problem)
                self._values[key] = value
                self._lines[key] = lineno
            except (ValueError, KeyError, TypeError) as e:
                self.skipped_lines += 1
                warnings.warn(f"{self.path}:{lineno}: corrupt results line skipped ({e}; "
                              f"{line[:60]!r}...); that point will be recomputed", CacheWarning, stacklevel=3)
        if raw and not raw.endswith(b"\n"):
            with open(self.path, "ab") as f:  # terminate a cut-off line so appends start clean
                f.write(b"\n")

    def __contains__(self, config: Mapping) -> bool:
        return config_key(config) in self._values

    def __len__(self) -> int:
        return len(self._values)

    def get(self, config: Mapping, default=None):
        return self._values.get(config_key(config), default)

    def put(self, config: Mapping, value: Any) -> Any:
        """Store ``value`` under ``config`` (a :class:`~bcjax.errors.BcjaxError` when
        :func:`invalid_value` refuses it: a NaN accuracy is a bug upstream, not a result)."""
        from bcjax.errors import BcjaxError

        problem = invalid_value(value)
        if problem:
            raise BcjaxError(f"results store {self.path or '<memory>'}: refusing to store {config}: {problem}")
        key = config_key(config)
        self._values[key] = value
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            line = json.dumps({"key": key, "config": config, "value": value}, sort_keys=True, default=str)
            with open(self.path, "a") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
        return value

    def expect(self, config: Mapping, check: Callable[[Any], str | None]) -> bool:
        """True when a value is stored for ``config`` and ``check(value)`` finds nothing wrong
        (returns None). A stored value that fails the check (not of the shape the caller
        expects, e.g. accuracies missing a task) is dropped with a :class:`CacheWarning`
        naming file and line, so the point is recomputed; False then, and when absent."""
        key = config_key(config)
        if key not in self._values:
            return False
        problem = check(self._values[key])
        if problem is None:
            return True
        del self._values[key]
        self.skipped_lines += 1
        where = f"{self.path}:{self._lines.pop(key)}" if key in self._lines else f"{self.path or '<memory>'}"
        warnings.warn(f"{where}: results line skipped ({problem}); that point will be recomputed", CacheWarning,
                      stacklevel=2)
        return False

    def get_or_compute(self, config: Mapping, compute: Callable[[], Any],
                       check: Callable[[Any], str | None] | None = None) -> Any:
        """The stored value for ``config``, or ``compute()`` stored and returned. With
        ``check``, a stored value it refuses is recomputed (see :meth:`expect`)."""
        key = config_key(config)
        if check is not None:
            self.expect(config, check)
        if key in self._values:
            return self._values[key]
        return self.put(config, compute())
