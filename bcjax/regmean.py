r"""RegMean (Jin et al., "Dataless knowledge fusion by merging weights of language models"), SPEC §3.

For every 2-D kernel W of a linear map (a Flax ``Dense`` kernel is [in, out], y = x W) whose
inputs' Gram matrices Gt = Xtᵀ Xt / Nt are given, the merged kernel minimises
Σt ‖Xt W − Xt Wt‖² with the Grams' off-diagonal entries shrunk by ``nondiag``:

    W* = (Σt G̃t)⁻¹ Σt G̃t Wt,    G̃t = nondiag · Gt + (1 − nondiag) · diag(Gt).

``nondiag = 1`` is the exact least-squares solution on the union of the tasks' data;
``nondiag = 0`` is a per-input-feature weighted average (row i of every Wt weighted by
Gt[i, i]). Every other merged leaf (biases, norms, embeddings, kernels without a Gram) is
the simple average (1/T) Σt θt.

The system is solved in float32 with a Cholesky factorisation of Σt G̃t after Jacobi scaling
(unit diagonal: features of very different scales cost no accuracy). A singular system — a
feature whose Gram diagonal is 0 in every task, or a numerically singular one: the scaled
Cholesky factor's reciprocal-condition estimate min(diag L)² below eps(float32) ≈ 1.2e-7 —
raises :class:`~bcjax.errors.SingularGramError` naming the key path, unless ``jitter > 0``
regularises it as Σt G̃t + jitter · (trace(Σt G̃t) / in) · I (a ridge relative to the mean
diagonal, so it does not depend on the inputs' scale).

Gram matrices come from the model room (:func:`bcjax.models.grams.collect_grams` records the
inputs of every Flax module whose kernel is a 2-D leaf); this module knows nothing of models.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bcjax import hparams
from bcjax.errors import HyperparameterError, NonFiniteError, SingularGramError, TreeMismatchError
from bcjax.merging import _simple_average_leaf, map_merged_leaves, register_method
from bcjax.tree import is_tracing, leaf_paths

__all__ = ["regmean", "regmean_kernel"]

_HIGHEST = jax.lax.Precision.HIGHEST


@jax.jit
def regmean_kernel(kernels, grams, nondiag, jitter):
    """W* = (Σt G̃t + ridge)⁻¹ Σt G̃t Wt for one [in, out] kernel (float32, traceable).

    The system A = Σt G̃t + ridge is solved with Jacobi scaling (S = D^-½ A D^-½, D = diag A,
    so input features of very different scales, e.g. nearly dead GELU units, cost no
    accuracy) and a Cholesky factorisation L of S. Returns ``(W*, rcond)``, rcond =
    min(diag L)² (an estimate of S's reciprocal condition number; 0 when a feature's
    diagonal is 0, NaN when the factorisation failed).
    """
    n = grams[0].shape[0]
    eye = jnp.eye(n, dtype=bool)
    nondiag = jnp.asarray(nondiag, jnp.float32)
    shrunk = [jnp.where(eye, g, nondiag * g) for g in (jnp.asarray(g, jnp.float32) for g in grams)]
    a = sum(shrunk)
    b = sum(jnp.matmul(g, jnp.asarray(w, jnp.float32), precision=_HIGHEST) for g, w in zip(shrunk, kernels))
    a = a + jnp.asarray(jitter, jnp.float32) * (jnp.trace(a) / n) * jnp.eye(n, dtype=jnp.float32)
    d = jnp.diagonal(a)
    live = d > 0
    scale = jnp.where(live, jax.lax.rsqrt(jnp.where(live, d, 1.0)), 0.0)
    s = jnp.where(eye, 1.0, a * scale[:, None] * scale[None, :])  # dead features: identity rows
    chol = jnp.linalg.cholesky(s)
    solved = jax.scipy.linalg.cho_solve((chol, True), b * scale[:, None]) * scale[:, None]
    rcond = jnp.where(jnp.all(live), jnp.min(jnp.diagonal(chol)) ** 2, 0.0)
    rcond = jnp.where(jnp.all(jnp.isfinite(solved)), rcond, jnp.nan)
    return solved, rcond


def _check_grams(pretrained, grams, flags, num_tasks: int) -> dict[int, list]:
    """Validate ``grams`` and return {leaf index: [G_t per task]} for merged 2-D leaves."""
    if grams is None:
        raise HyperparameterError("regmean needs `grams`: one dict {key path: Gram [in, in]} per fine-tuned model "
                                  "(bcjax.models.grams.collect_grams computes them)")
    if isinstance(grams, Mapping) or not isinstance(grams, Sequence):
        raise HyperparameterError(f"regmean: `grams` must be a list with one dict per task, got {type(grams).__name__}")
    if len(grams) != num_tasks:
        raise TreeMismatchError(f"regmean: {len(grams)} Gram dicts for {num_tasks} fine-tuned models")
    paths = leaf_paths(pretrained)
    index = {p: i for i, p in enumerate(paths)}
    leaves = jax.tree.leaves(pretrained)
    keys = set(grams[0])
    for t, g in enumerate(grams):
        if not isinstance(g, Mapping):
            raise HyperparameterError(f"regmean: Gram dict of task {t} is a {type(g).__name__}, not a dict")
        if set(g) != keys:
            diff = sorted(set(g) ^ keys)
            raise TreeMismatchError(f"regmean: task {t}'s Gram dict and task 0's differ at key path {diff[0]!r} "
                                    "(every task needs the same kernels)")
    out: dict[int, list] = {}
    for key in sorted(keys):
        if key not in index:
            raise TreeMismatchError(f"regmean: Gram for key path {key!r}, which is not a leaf of the pretrained "
                                    f"model (leaves look like {paths[0]!r})")
        i = index[key]
        if not flags[i]:
            continue  # excluded (or non-floating) leaves are copied from θ0
        shape = np.shape(leaves[i])
        if len(shape) != 2:
            raise TreeMismatchError(f"regmean: key path {key!r} has shape {shape}; RegMean applies to 2-D "
                                    "[in, out] kernels only")
        per_task = []
        for t, g in enumerate(grams):
            gram = g[key]
            if np.shape(gram) != (shape[0], shape[0]):
                raise TreeMismatchError(f"regmean: task {t}, key path {key!r}: Gram of shape {np.shape(gram)}, "
                                        f"expected {(shape[0], shape[0])} for a kernel of shape {shape}")
            if not isinstance(gram, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(gram))):
                raise NonFiniteError(f"regmean: task {t}, key path {key!r}: Gram matrix contains NaN or Inf")
            per_task.append(gram)
        out[i] = per_task
    return out


@register_method("regmean", requires=("grams",),
                 hparams={"nondiag": hparams.Real(0.0, 1.0), "jitter": hparams.Real(0.0)})
def regmean(pretrained, finetuned, flags, *, grams=None, nondiag=0.95, jitter=0.0):
    """RegMean (Jin et al., SPEC §3): W* = (Σt G̃t)⁻¹ Σt G̃t Wt per 2-D kernel with Grams, G̃t = off-diagonals × nondiag; other leaves the simple average.

    Args (hyper-parameters):
      grams: list (one per fine-tuned model) of dicts from a kernel's '/'-joined key path
        (:func:`bcjax.keystr`) to its input Gram matrix Gt = Xtᵀ Xt / Nt, shape [in, in]. The
        same key paths for every task; kernels without a Gram get the simple average.
      nondiag: 0 ≤ nondiag ≤ 1, the factor on the Grams' off-diagonal entries (0.95 default,
        1 exact least squares, 0 diagonal: a per-input-feature weighted average).
      jitter: ≥ 0; adds jitter · mean(diag(Σ G̃t)) · I before solving. 0 (default) raises
        :class:`~bcjax.errors.SingularGramError` on a singular system instead.
    """
    per_leaf = _check_grams(pretrained, grams, flags, len(finetuned))
    paths = leaf_paths(pretrained)
    tol = float(np.finfo(np.float32).eps)

    def leaf(i, p0, fts):
        if i not in per_leaf:
            return _simple_average_leaf(p0, tuple(fts))
        solved, rcond = regmean_kernel(tuple(fts), tuple(per_leaf[i]), nondiag, jitter)
        if not (is_tracing() or isinstance(rcond, jax.core.Tracer)):
            r = float(rcond)
            if not np.isfinite(r) or r < tol:
                raise SingularGramError(
                    f"regmean: key path {paths[i]!r}: Σt G̃t is singular (reciprocal condition ≈ {r:.2e} with "
                    f"nondiag={float(nondiag)}, jitter={float(jitter)}); an input feature may be constant zero or "
                    "there are fewer examples than inputs. Pass jitter > 0 (e.g. 1e-4) or nondiag < 1.")
        return solved.astype(jnp.result_type(p0))

    return map_merged_leaves(leaf, pretrained, finetuned, flags)
