r"""Gram matrices of the inputs of every linear layer of a Flax model, for RegMean (SPEC §3).

Model-agnostic: :func:`collect_grams` runs ``apply_fn(params, inputs)`` (any function that
applies Flax ``linen`` modules) under :func:`flax.linen.intercept_methods` and records the
input x of every module call whose ``params`` collection holds a 2-D ``kernel`` [in, out]
with ``x.shape[-1] == in`` (``nn.Dense``, a 2-D ``nn.DenseGeneral``, the Dense layers inside
transformers' Flax models...). Leading batch / sequence axes are flattened, so for one
kernel

    G = Σ_examples Σ_positions m · x xᵀ / N      ([in, in], float32),

N the number of examples (not of tokens, as FusionBench does) and m the validity of a
position: padding examples of the last batch have m = 0, and a ``mask`` of shape
[N, *positions] multiplies m at layers whose inputs have those leading axes (other layers,
e.g. a head on a pooled token, use the per-example validity only). Sums are accumulated
batch by batch in one compiled step (memory: one [in, in] matrix per kernel). A module
called several times (shared weights) accumulates every call.

Keys are the '/'-joined key paths (:func:`bcjax.keystr`) of the kernels in ``params``, as
:func:`bcjax.merge` with ``"regmean"`` expects, optionally under a ``prefix``.

This module belongs to the model room: the core (:mod:`bcjax.regmean`) never imports it.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bcjax._optional import requires
from bcjax.errors import BcjaxError

with requires("train"):
    import flax.linen as nn
from bcjax.tree import leaf_paths

__all__ = ["collect_grams", "gram_sums"]

_HIGHEST = jax.lax.Precision.HIGHEST


def _capture_linear_inputs(apply_fn: Callable, params, x) -> list[tuple[str, jax.Array]]:
    """Run ``apply_fn(params, x)`` and return [(kernel key path, input)] for every call of a
    module with a 2-D ``params/kernel`` whose input's last axis matches the kernel's rows."""
    captured: list[tuple[str, jax.Array]] = []

    def interceptor(next_fun, args, kwargs, ctx):
        module = ctx.module
        if ctx.method_name == "__call__" and module.scope is not None and module.has_variable("params", "kernel"):
            kernel = module.get_variable("params", "kernel")
            inp = args[0] if args else kwargs.get("inputs")
            if np.ndim(kernel) == 2 and inp is not None and np.ndim(inp) >= 1 and inp.shape[-1] == kernel.shape[0]:
                captured.append(("/".join(str(p) for p in (*module.scope.path, "kernel")), inp))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        apply_fn(params, x)
    return captured


@functools.partial(jax.jit, static_argnums=0)
def gram_sums(apply_fn: Callable, params, x, valid, mask) -> dict[str, jax.Array]:
    """Σ m · x xᵀ per kernel over one batch (``valid``: [B] example validity; ``mask``:
    None or [B, *positions] position validity). Traceable; keys are unprefixed paths."""
    sums: dict[str, jax.Array] = {}
    for key, inp in _capture_linear_inputs(apply_fn, params, x):
        lead = inp.shape[:-1]
        w = jnp.ones(lead, jnp.float32)
        if len(lead) >= 1 and lead[0] == valid.shape[0]:
            w = w * valid.astype(jnp.float32).reshape((-1,) + (1,) * (len(lead) - 1))
        if mask is not None and tuple(mask.shape) == tuple(lead):
            w = w * mask.astype(jnp.float32)
        flat = inp.reshape(-1, inp.shape[-1]).astype(jnp.float32)
        g = jnp.matmul((flat * w.reshape(-1, 1)).T, flat, precision=_HIGHEST)
        sums[key] = sums[key] + g if key in sums else g
    return sums


@jax.jit
def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _take(tree, start: int, stop: int, size: int):
    """Rows [start, stop) of every leaf, padded to ``size`` rows by repeating the last row."""
    def one(a):
        a = np.asarray(a)[start:stop]
        if len(a) < size:
            a = np.concatenate([a, np.repeat(a[-1:], size - len(a), 0)])
        return a

    return jax.tree.map(one, tree)


def collect_grams(apply_fn: Callable[[Any, Any], Any], params, inputs, *, batch_size: int = 32, mask=None,
                  prefix: str = "", progress: bool = False) -> dict[str, np.ndarray]:
    """{kernel key path: G = Xᵀ X / N} for every linear layer ``apply_fn`` applies.

    Args:
      apply_fn: ``apply_fn(params, batch)`` running Flax linen modules (its output is ignored),
        e.g. ``lambda p, x: model.apply({"params": p}, x)``; hashable (a function, not a
        fresh lambda per call, to reuse the compiled step).
      params: the parameter tree the Grams' key paths refer to (the tree you merge).
      inputs: an array or pytree of arrays with a leading axis of N examples (a task's
        training inputs; labels are not needed).
      batch_size: examples per compiled step (the last batch is padded and masked).
      mask: optional [N, *positions] validity (e.g. an attention/padding mask over tokens).
      prefix: prepended (with '/') to every key, e.g. ``"params"`` when merging
        ``{"params": ...}`` variables.

    Returns float32 NumPy arrays [in, in]. Raises :class:`~bcjax.errors.BcjaxError` when no
    linear layer was seen or a recorded kernel is not a leaf of ``params``.
    """
    sizes = {np.shape(a)[0] for a in jax.tree.leaves(inputs)}
    if len(sizes) != 1:
        raise BcjaxError(f"collect_grams: input leaves disagree on the number of examples: {sorted(sizes)}")
    n = sizes.pop()
    if n == 0:
        raise BcjaxError("collect_grams: no examples")
    batch_size = max(1, min(int(batch_size), n))
    total = None
    steps = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="Gram matrices", unit="batch")
    for s in steps:
        stop = min(s + batch_size, n)
        x = _take(inputs, s, stop, batch_size)
        valid = np.arange(batch_size) < (stop - s)
        m = None if mask is None else _take(mask, s, stop, batch_size)
        part = gram_sums(apply_fn, params, x, valid, m)
        total = part if total is None else _add(total, part)
    if not total:
        raise BcjaxError("collect_grams: apply_fn applied no module with a 2-D params/kernel (no linear layer seen)")
    known = set(leaf_paths(params))
    missing = sorted(k for k in total if k not in known)
    if missing:
        raise BcjaxError(f"collect_grams: recorded kernel {missing[0]!r} is not a leaf of `params` "
                         f"(does apply_fn wrap params differently? leaves look like {sorted(known)[0]!r})")
    pre = f"{prefix}/" if prefix else ""
    return {pre + k: np.asarray(v, np.float32) / np.float32(n) for k, v in total.items()}
