"""Optional dependencies: one helper that turns a failed import into an error naming the extra.

The core (``import bcjax``, merging, masks, grids, sweeps) needs only jax and numpy. Everything
else is imported lazily inside the function (or adapter module) that needs it::

    with requires("train"):
        import optax

A missing package then raises :class:`~bcjax.errors.MissingDependencyError` with the command
that fixes it (``pip install 'bcjax[train]'``). The extras are defined in ``pyproject.toml``:
``train`` (flax, optax, orbax-checkpoint, chex), ``demo``, ``clip``, ``t5``, ``torch``, ``test``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from bcjax.errors import MissingDependencyError

__all__ = ["requires", "EXTRAS"]

#: extra -> what it is for (quoted in the error message)
EXTRAS = {
    "train": "fine-tuning (flax, optax, orbax-checkpoint, chex)",
    "demo": "the embedded DINOv2 demo (transformers' Flax models, onnx, image-data packages)",
    "clip": "the CLIP pipeline (transformers' Flax CLIP, tensorflow-datasets, Pillow)",
    "t5": "the T5 pipeline (transformers' Flax T5, tensorflow-datasets, sentencepiece)",
    "torch": "PyTorch checkpoint interop (torch, safetensors)",
    "test": "the test suite's reference checks (onnxruntime, pytest, hypothesis)",
}


@contextlib.contextmanager
def requires(extra: str) -> Iterator[None]:
    """Run the imports in the ``with`` block; if one fails, raise
    :class:`~bcjax.errors.MissingDependencyError` naming the missing module and the bcjax
    extra that provides it. Import errors raised from bcjax's own modules pass through."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown bcjax extra {extra!r}; known: {sorted(EXTRAS)}")
    try:
        yield
    except ImportError as e:
        missing = (getattr(e, "name", None) or "").split(".")[0]
        if missing == "bcjax":
            raise
        what = f"module {missing!r} is not installed" if isinstance(e, ModuleNotFoundError) \
            else f"an incompatible version is installed ({e})"
        raise MissingDependencyError(
            f"{what}: it is an optional dependency of bcjax, needed for {EXTRAS[extra]}. "
            f"Install it with: pip install 'bcjax[{extra}]' "
            f"(the tested versions: pip install -c constraints.txt 'bcjax[{extra}]' from the repository)"
        ) from e
