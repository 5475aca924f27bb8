"""Pytree plumbing: key paths, which leaves take part in a merge, validation, task vectors.

SPEC §1: a *leaf* is one array; only floating leaves take part in a merge; integer and
boolean leaves, and leaves excluded by the user's filter (a regex on the '/'-joined key
path), are copied from θ0. Merged leaves are computed in (at least) float32 and returned
in the dtype of the θ0 leaf.

Nothing in this module knows about models or data.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bcjax import hparams
from bcjax.errors import DeviceMismatchError, EmptyModelListError, HyperparameterError, NonFiniteError, TreeMismatchError

PyTree = Any
LeafFilter = Callable[[str, Any], bool]

__all__ = [
    "keystr",
    "leaf_paths",
    "is_floating",
    "compute_dtype",
    "make_leaf_filter",
    "merged_leaf_flags",
    "validate_models",
    "check_finite",
    "check_devices",
    "unmerged_complex_paths",
    "all_finite",
    "is_tracing",
    "task_vector",
    "apply_task_vector",
]


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def keystr(path) -> str:
    """'/'-joined key path, e.g. ``params/encoder/layer_0/kernel`` (SPEC §1 filters match this)."""
    return "/".join(_key_name(k) for k in path)


def leaf_paths(tree: PyTree) -> list[str]:
    """The '/'-joined key path of every leaf, in ``jax.tree.leaves`` order."""
    return [keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def is_floating(leaf) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


def compute_dtype(dtype) -> jnp.dtype:
    """float32 for 16-bit floats (SPEC §1 upcast), the dtype itself for float32/float64."""
    return jnp.promote_types(dtype, jnp.float32)


def make_leaf_filter(exclude: str | Sequence[str] | LeafFilter | None = None) -> LeafFilter:
    """Predicate ``(path, leaf) -> bool``: True for leaves that take part in a merge.

    A leaf takes part iff it is floating and its '/'-joined key path matches none of the
    ``exclude`` regexes (``re.search`` semantics). ``exclude`` may also be a callable
    ``(path, leaf) -> bool`` returning True for leaves to *exclude*.
    """
    excluded = _excluded_predicate(exclude)
    return lambda path, leaf: is_floating(leaf) and not excluded(path, leaf)


def _excluded_predicate(exclude) -> LeafFilter:
    """``(path, leaf) -> bool``: True for leaves the user's ``exclude`` names (see :func:`make_leaf_filter`)."""
    if exclude is None:
        return lambda path, leaf: False  # noqa: E731
    if callable(exclude):
        return exclude
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as e:
        raise ValueError(f"invalid leaf-filter regex {e.pattern!r}: {e}") from None
    return lambda path, leaf: any(c.search(path) for c in compiled)  # noqa: E731


def unmerged_complex_paths(tree: PyTree, exclude=None) -> list[str]:
    """Key paths of complex leaves not named by ``exclude``: SPEC §1 merges real floating
    leaves only, so these are copied from θ0 (:func:`bcjax.merging.merge` warns about them)."""
    excluded = _excluded_predicate(exclude)
    return [keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if jnp.issubdtype(jnp.result_type(x), jnp.complexfloating) and not excluded(keystr(p), x)]


def check_devices(trees: Sequence[PyTree], names: Sequence[str] | None = None) -> None:
    """Raise :class:`DeviceMismatchError` when a leaf of ``trees[t]`` is a JAX array committed
    to other devices than the same leaf of ``trees[0]`` (also committed): no computation can
    read both. Names the model (``names[t]``, default "fine-tuned model t-1"), the key path and
    both device sets. NumPy and uncommitted leaves follow the others, so they never clash."""
    def committed_devices(x):
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and getattr(x, "committed", False):
            return frozenset(x.sharding.device_set)
        return None

    names = list(names) if names is not None else ["pretrained model", *(f"fine-tuned model {t}"
                                                                        for t in range(len(trees) - 1))]
    ref = [(keystr(p), committed_devices(x)) for p, x in jax.tree_util.tree_flatten_with_path(trees[0])[0]]
    for name, tree in zip(names[1:], trees[1:]):
        for (path, want), x in zip(ref, jax.tree.leaves(tree)):
            got = committed_devices(x)
            if want is not None and got is not None and got != want:
                raise DeviceMismatchError(
                    f"{name}, key path {path!r}: committed to devices {sorted(d.id for d in got)} but the "
                    f"{names[0]} is on {sorted(d.id for d in want)}; jax.device_put every model on the same "
                    "device(s) (or sharding) first")


def merged_leaf_flags(tree: PyTree, exclude=None) -> list[bool]:
    """One bool per leaf (``jax.tree.leaves`` order): does it take part in the merge?"""
    keep = make_leaf_filter(exclude)
    return [bool(keep(keystr(p), x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def is_tracing() -> bool:
    """True inside a JAX transformation (jit, vmap, grad...), where values can't be inspected."""
    try:
        from jax._src import core as _core

        return not _core.trace_state_clean()
    except (ImportError, AttributeError):  # pragma: no cover - private API moved
        return False


def validate_models(pretrained: PyTree, finetuned: Sequence[PyTree], *, what: str = "fine-tuned model",
                    check_dtype: bool = True) -> None:
    """Raise :class:`TreeMismatchError` unless every tree in ``finetuned`` has the
    structure, shapes (and dtypes) of ``pretrained``; the message names the model index
    and the first offending key path (SPEC §1)."""
    if isinstance(finetuned, (dict,)) or not isinstance(finetuned, Sequence):
        raise TypeError(f"expected a sequence (list/tuple) of {what} trees, got {type(finetuned).__name__}")
    if len(finetuned) == 0:
        raise EmptyModelListError(f"no {what}s given: merging needs at least one")
    ref, ref_def = jax.tree_util.tree_flatten_with_path(pretrained)
    ref_paths = [keystr(p) for p, _ in ref]
    for t, tree in enumerate(finetuned):
        got, got_def = jax.tree_util.tree_flatten_with_path(tree)
        if got_def != ref_def:
            got_paths = [keystr(p) for p, _ in got]
            missing = [p for p in ref_paths if p not in set(got_paths)]
            extra = [p for p in got_paths if p not in set(ref_paths)]
            first = next((a for a, b in zip(ref_paths, got_paths) if a != b), None)
            detail = (f"missing key path {missing[0]!r}" if missing else
                      f"unexpected key path {extra[0]!r}" if extra else
                      f"structure differs at key path {first!r}" if first else
                      f"tree structure differs ({got_def} vs {ref_def})")
            raise TreeMismatchError(f"{what} {t}: {detail} (tree structure must equal the pretrained model's)")
        for path, (_, a), (_, b) in zip(ref_paths, ref, got):
            if np.shape(a) != np.shape(b):
                raise TreeMismatchError(
                    f"{what} {t}, key path {path!r}: shape {tuple(np.shape(b))} != pretrained {tuple(np.shape(a))}")
            if check_dtype and jnp.result_type(a) != jnp.result_type(b):
                raise TreeMismatchError(
                    f"{what} {t}, key path {path!r}: dtype {jnp.result_type(b)} != pretrained {jnp.result_type(a)}")


def all_finite(tree: PyTree, *, only: Sequence[bool] | None = None) -> bool:
    """True unless a floating leaf of ``tree`` (restricted to the leaves where ``only`` is
    True, in ``jax.tree.leaves`` order) holds NaN or Inf. One reduction per leaf, no
    temporaries; True for traced values (they cannot be inspected)."""
    leaves = jax.tree.leaves(tree)
    picked = [x for x, keep in zip(leaves, only if only is not None else [True] * len(leaves))
              if keep and is_floating(x) and np.size(x) > 0]
    if not picked or is_tracing() or any(isinstance(x, jax.core.Tracer) for x in picked):
        return True
    on_device = [x for x in picked if not on_host(x)]
    # accelerator leaves: every reduction is dispatched first, then one transfer of the flags
    # (one host round trip for the whole tree, not one per leaf)
    if on_device and not all(jax.device_get([_device_finite(x) for x in on_device])):
        return False
    return all(_host_finite(x) for x in picked if on_host(x))


def on_host(x) -> bool:
    """Readable in place by numpy: host arrays, and CPU-backend arrays held entirely by this
    process (an array spanning several processes is reduced where it lives)."""
    return isinstance(x, np.ndarray) or np.isscalar(x) or (
        isinstance(x, jax.Array) and x.is_fully_addressable and all(d.platform == "cpu" for d in x.devices()))


def _host_finite(x) -> bool:
    """No NaN/Inf in one concrete floating leaf on the host (or the CPU backend), read in
    place by numpy's vectorised min/max (NaN propagates into both; no temporaries, no
    compilation)."""
    a = np.asarray(x)
    if a.dtype.itemsize == 2:  # bf16 / fp16: exponent all ones ⇔ Inf or NaN
        mask = 0x7F80 if a.dtype != np.float16 else 0x7C00
        return not bool(((a.view(np.uint16) & mask) == mask).any())
    return bool(np.isfinite(a.max()) and np.isfinite(a.min()))


@jax.jit
def _device_finite(x):
    return jnp.all(jnp.isfinite(x))


def check_finite(trees: Sequence[PyTree], names: Sequence[str]) -> None:
    """Raise :class:`NonFiniteError` naming the model and key path of the first floating
    leaf that holds NaN or Inf. A no-op for traced values (inside ``jit`` values cannot be
    inspected; validate eagerly before jitting, see README)."""
    for tree, name in zip(trees, names):
        flat = [(keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if is_floating(x)]
        if not flat or is_tracing() or any(isinstance(x, jax.core.Tracer) for _, x in flat):
            continue
        path = next((p for p, x in flat if np.size(x) > 0 and not all_finite(x)), None)
        if path is not None:
            raise NonFiniteError(f"{name}, key path {path!r}: contains NaN or Inf")


def task_vector(finetuned: PyTree, pretrained: PyTree) -> PyTree:
    """τ = θt − θ0, leaf by leaf.

    Floating leaves are subtracted in :func:`compute_dtype` (float32 for bf16/fp16, so the
    difference keeps its precision); non-floating leaves give zeros (a merge copies them
    from θ0, SPEC §1). Validated like a merge input (SPEC §1): structures, shapes, dtypes,
    devices and finiteness (NaN/Inf → :class:`NonFiniteError` naming the tree and key path);
    a difference that overflows float32 (|θt − θ0| > 3.4e38 for finite inputs) raises
    :class:`bcjax.errors.OverflowMergeError` naming the key path. Checks of values are skipped
    under tracing.
    """
    validate_models(pretrained, [finetuned])
    check_devices([pretrained, finetuned], ["pretrained", "finetuned"])
    check_finite([pretrained, finetuned], ["pretrained", "finetuned"])

    def sub(ft, pt):
        if not is_floating(pt):
            return jnp.zeros_like(pt)
        dt = compute_dtype(jnp.result_type(pt))
        return jnp.asarray(ft, dt) - jnp.asarray(pt, dt)

    out = jax.tree.map(sub, finetuned, pretrained)
    _check_no_overflow("task_vector", out)
    return out


def apply_task_vector(pretrained: PyTree, tv: PyTree, alpha=1.0) -> PyTree:
    """θ = θ0 + α τ on floating leaves (computed in float32 or wider, returned in θ0's
    dtype); non-floating leaves are θ0's.

    ``alpha`` must be a finite real scalar (a Python/NumPy number or 0-d array; bool and
    strings are refused) else :class:`HyperparameterError`; θ0 and τ are checked like merge
    inputs (NaN/Inf → :class:`NonFiniteError` naming ``pretrained``/``task vector`` and the key
    path); a result outside θ0's dtype raises :class:`bcjax.errors.OverflowMergeError`.
    """
    alpha = hparams.real(alpha, "alpha", method="apply_task_vector")
    validate_models(pretrained, [tv], what="task vector", check_dtype=False)
    check_devices([pretrained, tv], ["pretrained", "task vector"])
    check_finite([pretrained, tv], ["pretrained", "task vector"])

    def add(pt, t):
        if not is_floating(pt):
            return pt
        dt = compute_dtype(jnp.result_type(pt))
        return (jnp.asarray(pt, dt) + jnp.asarray(alpha, dt) * jnp.asarray(t, dt)).astype(jnp.result_type(pt))

    out = jax.tree.map(add, pretrained, tv)
    _check_no_overflow("apply_task_vector", out)
    return out


def _check_no_overflow(what: str, tree: PyTree) -> None:
    """Inputs were finite (checked); a non-finite floating leaf here is an overflow."""
    from bcjax.errors import OverflowMergeError

    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if is_floating(leaf) and np.size(leaf) > 0 and not all_finite(leaf):
            raise OverflowMergeError(f"{what}: key path {keystr(path)!r} overflows {jnp.result_type(leaf)} "
                                     "although the inputs are finite")
