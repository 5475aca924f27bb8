"""Fixed-shape chunking: the last, short chunk is padded by repeating its last row, so one
compiled program serves every chunk (the padded rows are dropped or masked by the caller)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["pad_rows"]


def pad_rows(x, size: int):
    """``x`` (NumPy or JAX, leading axis n with 1 ≤ n ≤ size) extended to ``size`` rows by
    repeating its last row; ``x`` itself when n == size."""
    n = x.shape[0]
    if n == size:
        return x
    if not 0 < n < size:
        raise ValueError(f"cannot pad {n} rows to {size}")
    xp = jnp if isinstance(x, jax.Array) else np
    return xp.concatenate([x, xp.repeat(x[-1:], size - n, axis=0)])
