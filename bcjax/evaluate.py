"""Model-agnostic evaluation: batched jitted accuracy and cross-entropy loss, many models per compiled call, and
normalized accuracy (SPEC §4).

An adapter supplies ``predict(params, inputs) -> logits``; nothing here knows the model.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bcjax.batching import pad_rows

__all__ = ["accuracy", "accuracy_of_stack", "correctness", "correctness_of_stack", "loss_of_stack",
           "normalized_accuracy", "stack_trees", "unstack_tree"]

Predict = Callable[[Any, jax.Array], jax.Array]


def _batches(n: int, batch_size: int):
    for s in range(0, n, batch_size):
        yield s, min(s + batch_size, n)


def _padded(x: np.ndarray, size: int) -> np.ndarray:
    return pad_rows(x, size)


@functools.partial(jax.jit, static_argnums=0)
def _correct(predict, params, x, y, valid, args):
    return jnp.sum((jnp.argmax(predict(params, x, *args), -1) == y) & valid)


def accuracy(predict: Predict, params: Any, inputs: np.ndarray, labels: np.ndarray, *, batch_size: int = 256,
             predict_args: tuple = ()) -> float:
    """Top-1 accuracy of one model; ``predict(params, x, *predict_args) -> logits``.

    Batches are padded to a fixed size and ``predict_args`` (e.g. a task's head) are traced,
    so every call with the same shapes shares one compilation.
    """
    if len(inputs) != len(labels):
        raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("accuracy of an empty evaluation set")
    bs = batch_size  # fixed (last batch padded): every set size shares one compilation
    correct = 0
    for s, e in _batches(len(labels), bs):
        valid = np.arange(bs) < (e - s)
        correct += int(_correct(predict, params, _padded(inputs[s:e], bs), _padded(labels[s:e], bs), valid,
                                tuple(predict_args)))
    return correct / len(labels)


def stack_trees(trees: Sequence[Any]) -> Any:
    """Stack equally-shaped pytrees along a new leading axis (models → one stacked tree)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack_tree(tree: Any) -> list[Any]:
    n = jax.tree.leaves(tree)[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


def _stack_sums(kernel, predict: Predict, stacked_params: Any, inputs: np.ndarray, labels: np.ndarray, *,
                batch_size: int, models_per_call: int, predict_args: tuple, dtype) -> np.ndarray:
    """Σ over the data set of ``kernel``'s per-model batch sums (fixed padded batches, padded
    rows masked by ``valid``; ``models_per_call`` models vmapped per compiled call), float[M]
    in ``dtype``: the one loop behind :func:`accuracy_of_stack` and :func:`loss_of_stack`."""
    m = jax.tree.leaves(stacked_params)[0].shape[0]
    chunk = max(1, min(models_per_call, m))
    bs = batch_size
    out = np.zeros(m, dtype)
    for ms in range(0, m, chunk):
        me = min(ms + chunk, m)
        params_chunk = jax.tree.map(lambda x: _pad_models(x[ms:me], chunk), stacked_params)
        for s, e in _batches(len(labels), bs):
            valid = np.arange(bs) < (e - s)
            sums = kernel(predict, params_chunk, _padded(inputs[s:e], bs), _padded(labels[s:e], bs), valid,
                          tuple(predict_args))
            out[ms:me] += np.asarray(sums, dtype)[: me - ms]
    return out


def accuracy_of_stack(predict: Predict, stacked_params: Any, inputs: np.ndarray, labels: np.ndarray, *,
                      batch_size: int = 128, models_per_call: int = 4, predict_args: tuple = ()) -> np.ndarray:
    """Accuracy of each of M models (``stacked_params`` has a leading axis M) on one data
    set: ``models_per_call`` models are vmapped in one compiled call, so sweeps over many
    merged models amortize dispatch; returns float[M]."""
    counts = _stack_sums(_correct_stack, predict, stacked_params, inputs, labels, batch_size=batch_size,
                         models_per_call=models_per_call, predict_args=predict_args, dtype=np.int64)
    return counts / len(labels)


def loss_of_stack(predict: Predict, stacked_params: Any, inputs: np.ndarray, labels: np.ndarray, *,
                  batch_size: int = 128, models_per_call: int = 4, predict_args: tuple = ()) -> np.ndarray:
    """Mean cross-entropy (natural log) of each of M stacked models on one data set, float[M]:
    ``-mean_n log softmax(predict(θm, x_n))[y_n]``, on the examples :func:`accuracy_of_stack`
    scores, batched the same way (fixed padded batches, ``models_per_call`` models vmapped per
    compiled call; padded rows are masked out). Per-batch sums in float32, accumulated in float64."""
    if len(inputs) != len(labels):
        raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("loss of an empty evaluation set")
    sums = _stack_sums(_nll_stack, predict, stacked_params, inputs, labels, batch_size=batch_size,
                       models_per_call=models_per_call, predict_args=predict_args, dtype=np.float64)
    return sums / len(labels)


@functools.partial(jax.jit, static_argnums=0)
def _nll_stack(predict, params_chunk, x, y, valid, args):
    def nll(p):
        logp = jax.nn.log_softmax(predict(p, x, *args).astype(jnp.float32), -1)
        return -jnp.sum(jnp.where(valid, jnp.take_along_axis(logp, y[:, None].astype(jnp.int32), -1)[:, 0], 0.0))

    return jax.vmap(nll)(params_chunk)


def _pad_models(x, size):
    return pad_rows(jnp.asarray(x), size)


@functools.partial(jax.jit, static_argnums=0)
def _correct_stack(predict, params_chunk, x, y, valid, args):
    logits = jax.vmap(lambda p: predict(p, x, *args))(params_chunk)
    return jnp.sum((jnp.argmax(logits, -1) == y[None]) & valid[None], axis=1)


@functools.partial(jax.jit, static_argnums=0)
def _hits(predict, params, x, y, args):
    return jnp.argmax(predict(params, x, *args), -1) == y


@functools.partial(jax.jit, static_argnums=0)
def _hits_stack(predict, params_chunk, x, y, args):
    return jax.vmap(lambda p: jnp.argmax(predict(p, x, *args), -1) == y)(params_chunk)


def correctness(predict: Predict, params: Any, inputs: np.ndarray, labels: np.ndarray, *, batch_size: int = 256,
                predict_args: tuple = ()) -> np.ndarray:
    """Per-example top-1 correctness of one model, bool[N] (its mean is :func:`accuracy`):
    the input of the bootstrap intervals of :mod:`bcjax.stats` (SPEC §4 "Uncertainty").
    Fixed (padded) batches, as :func:`accuracy`."""
    if len(inputs) != len(labels):
        raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("correctness of an empty evaluation set")
    out = np.zeros(len(labels), bool)
    for s, e in _batches(len(labels), batch_size):
        hit = _hits(predict, params, _padded(inputs[s:e], batch_size), _padded(labels[s:e], batch_size),
                    tuple(predict_args))
        out[s:e] = np.asarray(hit)[: e - s]
    return out


def correctness_of_stack(predict: Predict, stacked_params: Any, inputs: np.ndarray, labels: np.ndarray, *,
                         batch_size: int = 128, models_per_call: int = 4, predict_args: tuple = ()) -> np.ndarray:
    """Per-example correctness of each of M stacked models, bool[M, N] (row means are
    :func:`accuracy_of_stack`); ``models_per_call`` models are vmapped per compiled call."""
    if len(inputs) != len(labels):
        raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
    m = jax.tree.leaves(stacked_params)[0].shape[0]
    chunk = max(1, min(models_per_call, m))
    out = np.zeros((m, len(labels)), bool)
    for ms in range(0, m, chunk):
        me = min(ms + chunk, m)
        params_chunk = jax.tree.map(lambda x: _pad_models(x[ms:me], chunk), stacked_params)
        for s, e in _batches(len(labels), batch_size):
            hit = _hits_stack(predict, params_chunk, _padded(inputs[s:e], batch_size),
                              _padded(labels[s:e], batch_size), tuple(predict_args))
            out[ms:me, s:e] = np.asarray(hit)[: me - ms, : e - s]
    return out


def normalized_accuracy(acc: Mapping[str, float], finetuned_acc: Mapping[str, float]) -> dict[str, float]:
    """acc(merged, k) / acc(θk, k) per task (SPEC §4)."""
    out = {}
    for k, a in acc.items():
        ref = finetuned_acc[k]
        if ref <= 0:
            raise ValueError(f"task {k!r}: fine-tuned accuracy is {ref}; normalized accuracy is undefined")
        out[k] = a / ref
    return out
