r"""Ensemble references (SPEC §3): evaluated like merged models, but they are not merges.

Each is a ``predict(stacked_params, x, *predict_args)`` over the T fine-tuned models stacked
on a leading axis (:func:`bcjax.evaluate.stack_trees`), with the adapter's
``predict(params, x, *predict_args) -> logits`` (the task's head in ``predict_args``), so it
plugs into :func:`bcjax.evaluate.accuracy` unchanged:

- :class:`SimpleEnsemble`: log (1/T) Σt softmax(logits of θt) — the mean of the T models'
  probabilities (returned as log-probabilities; the argmax is the ensemble's prediction);
- :class:`WeightedEnsemble`: log Σt wt softmax(logits of θt) / Σt wt;
- :class:`MaxModel`: task k scored with its own fine-tuned model θk (the "individual"
  upper reference; its accuracy is the denominator of normalized accuracy, SPEC §4).

They are frozen dataclasses (hashable by value), so ``accuracy``'s jit cache is reused
across calls. Nothing here knows the model.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bcjax.errors import HyperparameterError

__all__ = ["SimpleEnsemble", "WeightedEnsemble", "MaxModel", "ensemble_log_probs"]


def ensemble_log_probs(predict: Callable, stacked_params: Any, x, *predict_args, weights=None) -> jax.Array:
    """log Σt wt softmax(predict(θt, x, *args)) / Σt wt, the models vmapped over the leading
    axis of ``stacked_params`` (``weights`` None: equal). Float32, traceable."""
    logp = jax.vmap(lambda p: jax.nn.log_softmax(jnp.asarray(predict(p, x, *predict_args), jnp.float32), -1))(
        stacked_params)
    num = logp.shape[0]
    w = jnp.ones((num,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    logw = jnp.log(w / jnp.sum(w))
    return jax.scipy.special.logsumexp(logp + logw[:, None, None], axis=0)


@dataclasses.dataclass(frozen=True)
class SimpleEnsemble:
    """``predict(stacked, x, *args)``: log of the mean of the stacked models' probabilities."""

    predict: Callable

    def __call__(self, stacked_params, x, *predict_args):
        return ensemble_log_probs(self.predict, stacked_params, x, *predict_args)


@dataclasses.dataclass(frozen=True)
class WeightedEnsemble:
    """``predict(stacked, x, *args)``: log Σt wt pt / Σt wt (weights ≥ 0, not all 0)."""

    predict: Callable
    weights: tuple[float, ...]

    def __post_init__(self):
        w = np.asarray(self.weights, np.float64)
        if w.ndim != 1 or not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
            raise HyperparameterError(f"WeightedEnsemble: weights must be a finite, non-negative, non-zero vector, "
                                      f"got {self.weights}")
        object.__setattr__(self, "weights", tuple(float(v) for v in w))

    def __call__(self, stacked_params, x, *predict_args):
        w = jnp.asarray(self.weights, jnp.float32)
        num = jax.tree.leaves(stacked_params)[0].shape[0]
        if w.shape[0] != num:
            raise HyperparameterError(f"WeightedEnsemble: {w.shape[0]} weights for {num} stacked models")
        return ensemble_log_probs(self.predict, stacked_params, x, *predict_args, weights=w)


@dataclasses.dataclass(frozen=True)
class MaxModel:
    """``predict(stacked, x, *args)``: the logits of stacked model ``task`` (its own fine-tune)."""

    predict: Callable
    task: int

    def __call__(self, stacked_params, x, *predict_args):
        return self.predict(jax.tree.map(lambda a: a[self.task], stacked_params), x, *predict_args)

