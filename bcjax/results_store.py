"""An append-only JSONL store of evaluated points, keyed by a hash of their configuration.

Every evaluated point (a merged model's scores, a sweep cell) is one line
``{"key": <sha256 of the canonical JSON config>, "config": {...}, "value": {...}}``, written
and flushed as soon as it is computed. A killed sweep, rerun, finds its finished points and
computes only the rest. A corrupt line (a write cut off by a crash) is skipped with a
warning and the point is recomputed.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any, Callable, Mapping

__all__ = ["config_key", "ResultsStore"]


def config_key(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``config`` (sorted keys, floats as JSON numbers)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class ResultsStore:
    """JSONL results keyed by :func:`config_key`. ``path=None`` keeps them in memory only."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = os.fspath(path) if path is not None else None
        self._values: dict[str, Any] = {}
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
                self._values[rec["key"]] = rec["value"]
            except (ValueError, KeyError, TypeError):
                self.skipped_lines += 1
                warnings.warn(f"{self.path}:{lineno}: corrupt results line skipped "
                              f"({line[:60]!r}...); that point will be recomputed", RuntimeWarning, stacklevel=3)
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

    def get_or_compute(self, config: Mapping, compute: Callable[[], Any]) -> Any:
        """The stored value for ``config``, or ``compute()`` stored and returned."""
        key = config_key(config)
        if key in self._values:
            return self._values[key]
        return self.put(config, compute())
