"""Host buffers XLA:CPU adopts without a copy (NumPy only; no JAX import).

``jax.device_put`` of a NumPy array on the CPU backend aliases the array's memory instead of
copying it when the data start on a :data:`ZERO_COPY_ALIGNMENT`-byte boundary. Every buffer
bcjax fills for XLA — checkpoint tensors read from disk (:mod:`bcjax.checkpoints.io`), the
outputs of the native host kernels and aligned copies of NumPy leaves (:mod:`bcjax.merging`) —
is allocated here."""
from __future__ import annotations

import numpy as np

#: XLA:CPU adopts a host buffer without copying when its start is aligned to this many bytes.
ZERO_COPY_ALIGNMENT = 64


def aligned_empty(shape, dtype) -> np.ndarray:
    """``np.empty(shape, dtype)`` whose data start on a :data:`ZERO_COPY_ALIGNMENT`-byte
    boundary (at most ``ZERO_COPY_ALIGNMENT`` bytes more are allocated)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = count * dtype.itemsize
    raw = np.empty(nbytes + ZERO_COPY_ALIGNMENT, np.uint8)
    offset = -raw.ctypes.data % ZERO_COPY_ALIGNMENT
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)
