"""The one cache root of bcjax: converted weights, data, fine-tunes, XLA compile cache."""
from __future__ import annotations

import os
import pathlib

__all__ = ["cache_root"]


def cache_root(*parts: str) -> pathlib.Path:
    """``$BCJAX_CACHE``, else ``$XDG_CACHE_HOME/bcjax``, else ``~/.cache/bcjax``; joined with ``parts``."""
    if os.environ.get("BCJAX_CACHE"):
        root = pathlib.Path(os.environ["BCJAX_CACHE"]).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache") / "bcjax"
    return root.joinpath(*parts)
