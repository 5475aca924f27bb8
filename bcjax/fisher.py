"""Diagonal Fisher information of a classifier (for Fisher merging and gradient matching).

F = mean over N examples of (∇θ log p(ŷ|x))², with ŷ sampled from the model's own
predictive distribution (the true Fisher, SPEC §3; not the empirical Fisher, which would
use the data labels). Per-example gradients are vmapped over micro-batches.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bcjax.batching import pad_rows

__all__ = ["diagonal_fisher"]


@functools.partial(jax.jit, static_argnums=0)
def _sum_sq_grads(predict, params, x, keys, valid, args):
    def one(xi, key):
        logits = predict(params, xi[None], *args)[0]
        y = jax.random.categorical(key, logits)
        g = jax.grad(lambda p: jax.nn.log_softmax(predict(p, xi[None], *args)[0])[y])(params)
        return jax.tree.map(jnp.square, g)

    sq = jax.vmap(one)(x, keys)
    return jax.tree.map(lambda s: jnp.tensordot(valid.astype(s.dtype), s, axes=1), sq)


def diagonal_fisher(predict: Callable, params: Any, inputs: np.ndarray, key: jax.Array, *,
                    batch_size: int = 8, predict_args: tuple = ()) -> Any:
    """Diagonal Fisher tree of ``predict(params, x, *predict_args) -> logits`` over ``inputs``."""
    n = len(inputs)
    if n == 0:
        raise ValueError("diagonal_fisher needs at least one input")
    total = None
    for s in range(0, n, batch_size):
        x = inputs[s:s + batch_size]
        valid = np.ones(batch_size, bool)
        if len(x) < batch_size:
            valid[len(x):] = False
            x = pad_rows(x, batch_size)
        keys = jax.random.split(jax.random.fold_in(key, s), batch_size)
        part = _sum_sq_grads(predict, params, x, keys, valid, tuple(predict_args))
        total = part if total is None else jax.tree.map(jnp.add, total, part)
    return jax.tree.map(lambda t: t / n, total)
