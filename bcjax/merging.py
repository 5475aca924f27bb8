r"""Merge methods (SPEC §2–3) and their registry.

Every method is a pure function ``fn(pretrained, finetuned, flags, *, **hparams) -> tree``
registered by name with :func:`register_method`; :func:`merge` validates the inputs (SPEC §1)
and dispatches. ``flags`` says, per leaf in ``jax.tree.leaves`` order, whether the leaf
takes part in the merge; other leaves are copied from θ0.

Work is done leaf by leaf with a jitted kernel per leaf shape, so merging T models holds
the inputs, one output tree and one leaf's temporaries (≈ T + 2 copies of the largest
leaf), never T extra full models. Inside an outer ``jax.jit`` the same code traces into
one program. Inputs may be NumPy or JAX arrays, nested (Flax) or flat dicts; sharded JAX
arrays keep their sharding (all kernels are elementwise or additive histograms, so
results do not depend on the device count).

Validation (SPEC §1) costs little on the default path: structure, shapes and dtypes are
checked upfront; finiteness inside each kernel's own pass (a merged entry is NaN where an
input entry is NaN/Inf, :func:`propagates_nonfinite`), so :func:`merge` reduces only the
output and scans the inputs (to name model and key path) only when something is non-finite.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from bcjax import _native, order_stats
from bcjax.host_memory import ZERO_COPY_ALIGNMENT, aligned_empty
from bcjax import hparams as hp_specs
from bcjax.errors import HyperparameterError, OverflowMergeError, TreeMismatchError, UnknownMethodError
from bcjax.masks import (GRANULARITY, bernoulli_leaf_mask, breadcrumbs_counts, breadcrumbs_row_mask,
                         diff_masks_from_counts, fraction_count, threshold_ranks, thresholds_from)
from bcjax.tree import (PyTree, all_finite, check_devices, check_finite, compute_dtype, is_floating, is_tracing,
                        keystr, merged_leaf_flags, on_host, unmerged_complex_paths, validate_models)

__all__ = ["MergeMethod", "REQUIREMENTS", "register_method", "unregister_method", "methods", "get_method", "merge",
           "map_merged_leaves", "propagates_nonfinite", "enable_compilation_cache", "ties_thresholds",
           "ties_elected_vectors"]


# --------------------------------------------------------------------------- registry
#: What a method may need besides its hyper-parameters. Each name is also the keyword
#: argument the method receives; a runner (``bcjax.experiments``) obtains the value from the
#: model suite (:meth:`bcjax.experiments.ModelSuite.requirement`), never by naming a method.
#: Every entry but ``key`` and ``work_dir`` is per task: a list with one value per fine-tuned
#: model passed to the method, in order (so a method merging a subset gets exactly its members' values).
REQUIREMENTS: dict[str, str] = {
    "key": "a jax.random key (configs give an integer `seed`, default 0)",
    "fishers": "per task: a diagonal-Fisher tree shaped like θ0 (non-negative)",
    "dataset_sizes": "per task: the number of training examples (scales the Fishers)",
    "grams": "per task: a dict {'/'-joined key path of a 2-D kernel: Gram X^T X / N [in, in]} of that "
             "layer's inputs over N training examples, computed with the task's own fine-tuned model (RegMean)",
    "unlabeled_batches": "per task: a pool of the task's unlabeled TEST inputs (an array or pytree of arrays "
                         "with a leading example axis, no labels) that the method draws batches from "
                         "(test-time adaptation, e.g. AdaMerging)",
    "labeled_batches": "per task: an iterable of (inputs, labels) batches",
    "model_fn": "per task: logits = model_fn(params, inputs) with that task's head, pure and jittable "
                "(test-time adaptation, e.g. AdaMerging)",
    "work_dir": "a folder under the run's output for this merge's saved state (e.g. learned coefficients), one "
                "per (model suite, method, hyper-parameters, merged tasks): the same merge asked for again, in "
                "this run or a resumed one, reuses it; None when the runner keeps no files",
}


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: its function and hyper-parameters with defaults
    (``inspect.Parameter.empty`` for required ones).

    ``requires`` names what the method needs besides hyper-parameters (keys of
    :data:`REQUIREMENTS`); each is passed as the keyword argument of that name. ``linear`` is
    True when the merge of any subset S is θ0 + α Σ_{t∈S} Δt with Δt independent of S (then
    subset sweeps use one contraction per leaf, :func:`bcjax.sweeps.task_deltas`)."""

    name: str
    fn: Callable
    hparams: dict[str, Any]
    summary: str
    requires: tuple[str, ...] = ()
    linear: bool = False
    specs: dict[str, hp_specs.Spec] = dataclasses.field(default_factory=dict)

    def normalize(self, values: dict, num_tasks: int | None = None) -> dict:
        """``values`` with each declared hyper-parameter read and checked by its spec
        (:func:`bcjax.hparams.normalize`); ``num_tasks=None`` skips per-task lengths."""
        return hp_specs.normalize(self.name, self.specs, values, num_tasks=num_tasks)

    def __repr__(self):
        hp = ", ".join(k if v is inspect.Parameter.empty else f"{k}={v!r}" for k, v in self.hparams.items()
                       if k not in self.requires)
        needs = f" requires {', '.join(self.requires)}" if self.requires else ""
        return f"{self.name}({hp}){needs}"

    @property
    def tunable(self) -> dict[str, Any]:
        """Hyper-parameters proper: ``hparams`` less the requirements."""
        return {k: v for k, v in self.hparams.items() if k not in self.requires}


_REGISTRY: dict[str, MergeMethod] = {}


def register_method(name: str | None = None, *, requires: Sequence[str] = (), linear: bool = False,
                    hparams: dict[str, hp_specs.Spec] | None = None):
    """Decorator registering ``fn(pretrained, finetuned, flags, *, **hparams)`` as a merge
    method. Hyper-parameters are ``fn``'s keyword-only parameters; ``requires`` lists those
    that are not tuned but supplied by the runner (names in :data:`REQUIREMENTS`, each a
    keyword-only parameter of ``fn``); ``linear`` marks methods linear in the task vectors.

    ``hparams`` declares how each scalar hyper-parameter is read and checked
    (:mod:`bcjax.hparams`: ``Real(0, 1)``, ``Real(per_task=True)``, ``Choice(...)``,
    ``PRNGKey()``, ...). The registered function (also returned) reads every declared one,
    its default included, before ``fn`` runs, so ``fn`` receives each real as the Python float
    of the decimal it means (SPEC §2; a float32 tracer when traced, a float32 (T,) array for
    per-task values) and never checks it itself."""

    def deco(fn):
        key = name or fn.__name__
        sig = inspect.signature(fn)
        hp = {p.name: p.default for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        specs = dict(hparams or {})
        undeclared = sorted(set(specs) - set(hp))
        if undeclared:
            raise ValueError(f"register_method({key!r}): specs for {undeclared}, which are not keyword-only "
                             "parameters of the method")
        unknown = [r for r in requires if r not in REQUIREMENTS]
        if unknown:
            raise ValueError(f"register_method({key!r}): unknown requirement(s) {unknown}; known: "
                             f"{sorted(REQUIREMENTS)}")
        missing = [r for r in requires if r not in hp]
        if missing:
            raise ValueError(f"register_method({key!r}): requirement(s) {missing} must be keyword-only "
                             "parameters of the method")
        summary = (inspect.getdoc(fn) or "").split("\n")[0]
        method_fn = _with_normalized_hparams(fn, key, specs, hp) if specs else fn
        _REGISTRY[key] = MergeMethod(key, method_fn, hp, summary, tuple(requires), bool(linear), specs)
        return method_fn

    return deco


def _with_normalized_hparams(fn: Callable, name: str, specs: dict, defaults: dict) -> Callable:
    """``fn`` preceded by :func:`bcjax.hparams.normalize` of its declared hyper-parameters
    (passed or default); attributes such as :func:`propagates_nonfinite` carry over."""

    @functools.wraps(fn)
    def method(pretrained, finetuned, flags, **kwargs):
        values = {k: kwargs.get(k, defaults.get(k)) for k in specs if k in kwargs or
                  defaults.get(k, inspect.Parameter.empty) is not inspect.Parameter.empty}
        num_tasks = len(finetuned) if isinstance(finetuned, (list, tuple)) else None
        kwargs.update(hp_specs.normalize(name, specs, values, num_tasks=num_tasks))
        return fn(pretrained, finetuned, flags, **kwargs)

    return method


def unregister_method(name: str) -> MergeMethod:
    """Remove a registered method (e.g. one a test registered) and return it."""
    get_method(name)
    return _REGISTRY.pop(name)


def methods() -> dict[str, MergeMethod]:
    """All registered methods by name; ``repr`` shows hyper-parameters and defaults."""
    return dict(_REGISTRY)


def get_method(name: str) -> MergeMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(f"unknown merge method {name!r}; registered: {sorted(_REGISTRY)}") from None


def merge(method: str, pretrained: PyTree, finetuned: Sequence[PyTree], *, exclude=None,
          validate: bool = True, **hparams) -> PyTree:
    """Merge ``finetuned`` (a list of trees shaped like ``pretrained``) with ``method``.

    Args:
      method: a registered name (:func:`methods`): ``task_arithmetic``, ``breadcrumbs``,
        ``simple_average``, ``ties``, ``random_sparse``, ``dare``, ``fisher``,
        ``gradient_matching``, or one you registered.
      exclude: regex(es) on the '/'-joined key path (or a predicate ``(path, leaf)``) of
        leaves to copy from θ0 instead of merging (SPEC §1).
      validate: check structures, shapes and dtypes first and finiteness of every model
        (SPEC §1), raising :class:`~bcjax.errors.NonFiniteError` with the model index and key
        path; values are only checked when concrete (not under ``jit``). For the built-in
        methods finiteness is checked within the merge's own pass (see
        :func:`propagates_nonfinite`), so validation costs one reduction over the output.
      **hparams: the method's hyper-parameters.

    Returns the merged tree, each leaf in the dtype of θ0's leaf.

    Raises (validate=True, concrete values): :class:`~bcjax.errors.NonFiniteError` naming the
    model and key path of a NaN/Inf input; :class:`~bcjax.errors.OverflowMergeError` naming the
    key path when every input is finite but the merged value is outside θ0's dtype (built-in
    kernels first rescue intermediate overflow, :func:`_finite_or_rescaled`, so a representable
    result is returned); :class:`~bcjax.errors.DeviceMismatchError` naming the model when
    models are committed to different devices. Complex leaves are copied from θ0 with a
    :class:`~bcjax.errors.ComplexLeafWarning` naming them (SPEC §1: real floating leaves only).
    """
    m = get_method(method)
    unknown = sorted(set(hparams) - set(m.hparams))
    if unknown:
        raise HyperparameterError(f"{method}: unknown hyper-parameter(s) {unknown}; accepted: {m!r}")
    missing = [k for k, v in m.hparams.items() if v is inspect.Parameter.empty and k not in hparams]
    if missing:
        raise HyperparameterError(f"{method}: missing required hyper-parameter(s) {missing}; signature: {m!r}")
    finetuned = list(finetuned) if isinstance(finetuned, (list, tuple)) else finetuned
    if validate:
        validate_models(pretrained, finetuned)  # structure, shapes, dtypes: cheap, upfront
        check_devices([pretrained, *finetuned])
        warn_complex_leaves(pretrained, exclude)
    flags = tuple(merged_leaf_flags(pretrained, exclude))
    models = [pretrained, *finetuned] if validate else []
    names = ["pretrained model", *(f"fine-tuned model {t}" for t in range(len(finetuned)))]
    concrete = validate and not _is_traced(models)
    fused = concrete and getattr(m.fn, "propagates_nonfinite", False)
    if validate and not fused:
        check_finite(models, names)  # a separate pass over every model
    merged = m.fn(pretrained, finetuned, flags, **hparams)
    if concrete:
        # The method's own pass made every merged entry NaN where an input entry is NaN or
        # Inf, so one reduction over the *output* (1/(T+1) of the input bytes) checks θ0 and
        # all θt on merged leaves; leaves copied from θ0 are checked directly. Only when
        # something is non-finite are the inputs scanned, to name the model and key path
        # exactly as the separate check does; finite inputs with a non-finite output are an
        # overflow (SPEC §1: never silently non-finite), named by its key path.
        copied = [not f for f in flags]
        out_ok = all_finite(merged, only=flags)
        if fused and not (out_ok and all(all_finite(t, only=copied) for t in models)):
            check_finite(models, names)
        if not out_ok:
            raise_overflow(method, merged, flags)
    return merged


def raise_overflow(method: str, merged: PyTree, flags: Sequence[bool]) -> None:
    """Raise :class:`~bcjax.errors.OverflowMergeError` naming the first merged leaf holding
    Inf/NaN although every input is finite (checked before): the exact result lies outside
    the θ0 leaf's dtype (e.g. |θ*| > 65504 for float16). Kernels compute in float32 and rescale
    intermediate overflow (:func:`_finite_or_rescaled`), so this is raised only when the true
    merged value itself is not representable — never a silent Inf (SPEC §1)."""
    for (path, leaf), flag in zip(jax.tree_util.tree_flatten_with_path(merged)[0], flags):
        if flag and not all_finite(leaf):
            dt = jnp.result_type(leaf)
            raise OverflowMergeError(
                f"{method}: merged leaf at key path {keystr(path)!r} overflows {dt} (|value| > "
                f"{float(jnp.finfo(dt).max):.6g}) although every input is finite; merge in a wider dtype "
                "(cast θ0 and the θt to float32) or use smaller coefficients")


def warn_complex_leaves(pretrained: PyTree, exclude=None) -> None:
    """Warn (:class:`~bcjax.errors.ComplexLeafWarning`) naming complex leaves that are not
    excluded: SPEC §1 merges only real floating leaves, so they are copied from θ0 — a
    decision made visible instead of silent (pass ``exclude`` to copy them knowingly)."""
    import warnings

    from bcjax.errors import ComplexLeafWarning

    paths = unmerged_complex_paths(pretrained, exclude)
    if paths:
        more = f" (+{len(paths) - 5} more)" if len(paths) > 5 else ""
        warnings.warn(f"complex leaves are not merged (SPEC §1: only real floating leaves take part); copied from "
                      f"θ0: {paths[:5]}{more}; exclude them to silence this", ComplexLeafWarning, stacklevel=3)


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> str:
    """Opt in to JAX's persistent compilation cache under bcjax's cache folder
    (``$BCJAX_CACHE/xla``, default ``~/.cache/bcjax/xla``) or ``directory``: a fresh process
    then loads the merge kernels compiled by an earlier one instead of compiling them again,
    so its first :func:`merge` costs tracing plus cache reads. Every program is cached
    (no minimum compile time). This sets JAX's process-wide configuration, hence an explicit
    call, never a side effect of importing or merging. Returns the folder."""
    from bcjax.cache import cache_root

    folder = os.fspath(directory) if directory is not None else str(cache_root("xla"))
    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


# --------------------------------------------------------------------------- plumbing
def _is_traced(tree) -> bool:
    """True under tracing, and for arrays that span several processes (multi-host): their
    computations contain collectives, which every process must issue in the same order, so
    leaves are then processed one after another (see :func:`parallel_map`)."""
    return is_tracing() or any(isinstance(x, jax.core.Tracer) or not getattr(x, "is_fully_addressable", True)
                               for x in jax.tree.leaves(tree))


def _enable_x64(enabled: bool):
    """JAX's x64 context manager (``jax.enable_x64``; ``jax.experimental.enable_x64`` before it)."""
    manager = getattr(jax, "enable_x64", None)
    if manager is None:
        from jax.experimental import enable_x64 as manager
    return manager(enabled)


def parallel_map(fn: Callable, items: Sequence, *, traced: bool = False) -> list:
    """``[fn(x) for x in items]``, run on a thread pool (one thread per core) when values
    are concrete: XLA:CPU runs scatters and small kernels on one core, so leaves are
    processed concurrently. Under tracing (an outer ``jit``) it is a plain loop."""
    workers = min(len(items), os.cpu_count() or 1)
    if traced or workers <= 1:
        return [fn(x) for x in items]
    # ``with jax.enable_x64(...)`` is thread-local: the workers run under the caller's setting
    x64 = bool(jax.config.jax_enable_x64)

    def run(x):
        with _enable_x64(x64):
            return jax.block_until_ready(fn(x))

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(run, items))


def map_merged_leaves(leaf_fn: Callable, pretrained: PyTree, finetuned: Sequence[PyTree],
                      flags: Sequence[bool], *extra: Sequence[PyTree], host: Callable | None = None,
                      native: Callable | None = None) -> PyTree:
    """Rebuild ``pretrained`` with ``leaf_fn(i, p0, [θt leaf], *[[extra leaf] ...])`` on
    merged leaves (index ``i`` among all leaves) and θ0's leaf elsewhere.

    ``host`` (optional) converts θ0's and each θt's leaf just before ``leaf_fn`` sees it, one
    leaf at a time as the merge streams through the model: :func:`host_view` (kernels that
    read every input through :func:`_upcast`; NumPy leaves without a copy) or
    :func:`_host_to_device` (NumPy leaves copied aligned, then adopted by XLA).

    ``native`` (optional, concrete values only) is ``native(p0s, ftss, device) -> leaves | None``
    merging in one call the leaves that :func:`_host_readable` can read in place (θ0's list,
    then each task's list, as C-contiguous NumPy arrays of one dtype): the same values as
    ``leaf_fn`` bit for bit, without an XLA program per leaf shape (:func:`_native_task_sums`);
    the other leaves (and all of them when it returns None) go through ``leaf_fn``."""
    leaves0, treedef = jax.tree.flatten(pretrained, is_leaf=lambda x: isinstance(x, HostView))
    per_model = [_leaves(t) for t in finetuned]
    per_extra = [[jax.tree.leaves(t) for t in group] for group in extra]
    todo = [i for i, (p0, flag) in enumerate(zip(leaves0, flags)) if flag and np.size(p0) > 0]

    view = host or (lambda x: x)

    def one(i):
        return leaf_fn(i, view(leaves0[i]), [view(m[i]) for m in per_model], *[[t[i] for t in g] for g in per_extra])

    out = list(leaves0)
    traced = _is_traced((pretrained, finetuned, extra))
    if native is not None and not traced and todo:
        readable = {i: _host_readable([leaves0[i], *(m[i] for m in per_model)]) for i in todo}
        groups: dict = {}  # one native call per (device, dtype)
        done: set[int] = set()
        for i, found in readable.items():
            if found is not None:
                groups.setdefault((found[1], found[0][0].dtype), []).append(i)
        for (device, _), group in groups.items():
            arrays = [readable[i][0] for i in group]
            merged = native([a[0] for a in arrays], [[a[1 + t] for a in arrays] for t in range(len(per_model))],
                            device)
            if merged is None:  # no native kernel for these: the leaves stay with leaf_fn
                continue
            for i, leaf in zip(group, merged):
                out[i] = leaf
            done.update(group)
        todo = [i for i in todo if i not in done]
    for i, leaf in zip(todo, parallel_map(one, todo, traced=traced)):
        out[i] = leaf
    return jax.tree.unflatten(treedef, out)


def _host_readable(leaves: Sequence) -> tuple[list[np.ndarray], Any] | None:
    """``leaves`` (θ0's leaf and each θt's, concrete) as C-contiguous NumPy arrays read in
    place, and where the merged leaf belongs — ``(arrays, device)`` with ``device`` None for
    JAX's default device (uncommitted, as a jitted kernel's output would be) or the CPU device
    the committed inputs sit on — or None when a native host kernel must not take them:
    another backend, sharded or multi-process arrays, tracers, dtypes other than float32
    (float64 with x64 enabled), or leaves of different dtypes. NumPy leaves that are strided
    or misaligned for their dtype are copied (same values)."""
    dtype = np.dtype(leaves[0].dtype) if hasattr(leaves[0], "dtype") else None
    allowed = (np.float32, np.float64) if jax.dtypes.canonicalize_dtype(np.float64) == np.float64 else (np.float32,)
    if dtype not in allowed:
        return None
    arrays, device = [], None
    for x in leaves:
        if isinstance(x, HostView):  # NumPy memory already wrapped (TIES): the leaf itself, in place
            x = np.asarray(x.padded)[int(x.offset):int(x.offset) + x.size].reshape(x.shape)
        if isinstance(x, (np.ndarray, np.generic)):
            x = np.asarray(x)
            if x.dtype != dtype or not x.dtype.isnative or jax.default_backend() != "cpu":
                return None
            arrays.append(x if x.flags.c_contiguous and x.flags.aligned else np.ascontiguousarray(x))
        elif isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            if x.dtype != dtype or not x.is_fully_addressable or len(x.sharding.device_set) != 1:
                return None
            (d,) = x.sharding.device_set
            if d.platform != "cpu":
                return None
            if x.committed:
                if device not in (None, d):
                    return None
                device = d
            elif d != _default_device():
                return None
            arrays.append(np.asarray(x))  # CPU: the buffer itself, read-only (waits until it is ready)
        else:
            return None
    return arrays, device


def _default_device():
    return jax.config.jax_default_device or jax.devices()[0]


def _adopt_host_arrays(arrays: Sequence[np.ndarray], device) -> list:
    """NumPy arrays written by a native kernel as jax.Arrays without a copy (their buffers are
    64-byte aligned, :func:`_aligned_empty`): on ``device`` (committed) or, for None, JAX's
    default device (uncommitted)."""
    return jax.device_put(list(arrays), device) if device is not None else jax.device_put(list(arrays))


def _aligned_empty(shapes: Sequence[tuple[int, ...]], dtype) -> list[np.ndarray]:
    """Uninitialised arrays of ``shapes`` in one allocation, each starting on a
    :data:`ZERO_COPY_ALIGNMENT`-byte boundary (so XLA:CPU adopts them without a copy)."""
    dtype = np.dtype(dtype)
    line = ZERO_COPY_ALIGNMENT // dtype.itemsize
    counts = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    starts = np.cumsum([0, *(-(-c // line) * line for c in counts)])
    slab = aligned_empty((int(starts[-1]),), dtype)
    return [slab[a:a + c].reshape(s) for a, c, s in zip(starts, counts, shapes)]


def propagates_nonfinite(fn: Callable) -> Callable:
    """Mark a merge method whose merged entries are NaN wherever an input entry (θ0 or any
    θt, same position) is NaN or Inf. :func:`merge` then validates finiteness with one
    reduction over the merged output instead of a separate pass over all T + 1 models
    (SPEC §1's error, same message). Built-in kernels apply :func:`_nan_where_nonfinite`."""
    fn.propagates_nonfinite = True
    return fn


def _nan_where_nonfinite(out, inputs):
    """``out`` where every one of ``inputs`` (upcast leaves) is finite, NaN elsewhere.
    Elementwise in the kernel's own loop: no extra memory traffic; ``out`` is unchanged
    for finite inputs."""
    ok = functools.reduce(jnp.logical_and, [jnp.isfinite(x) for x in inputs])
    return jnp.where(ok, out, jnp.nan)


#: Power-of-two scale of the overflow rescue: exact (no rounding) for every normal float32.
_RESCUE_SCALE = 2.0 ** -32


def _finite_or_rescaled(out, combine, *args):
    """``out`` (= ``combine(*args)`` in the compute dtype) with its non-finite entries
    recomputed as ``combine(*args · s) / s``, s = 2⁻³²: SPEC §1's "compute in a wider type
    and return the finite answer" for kernels that are positively homogeneous of degree 1
    in their array arguments (every θ0/θt/Fisher-linear combine: an exact power-of-two
    scaling keeps every normal float32 exact and moves intermediates such as
    θt − θ0 = 3e38 − (−3e38) or Σt θt back into range). Entries whose true value itself
    exceeds the dtype stay Inf (merge raises :class:`~bcjax.errors.OverflowMergeError`);
    non-finite inputs stay non-finite.

    Elementwise in the kernel's own loop (one select, no second pass, no ``lax.cond``, which
    would materialise ``out`` and reduce it: measured 1.8× the plain task-arithmetic kernel vs
    1.1× for this form). Each array gets its own opaque copy of s (an optimization barrier on
    the scalars only), so XLA cannot factor the scale back out (a·s + b·s → (a + b)·s)."""
    leaves, treedef = jax.tree.flatten(args)
    scales = jax.lax.optimization_barrier([jnp.asarray(_RESCUE_SCALE, x.dtype) for x in leaves])
    scaled = jax.tree.unflatten(treedef, [x * s for x, s in zip(leaves, scales)])
    return jnp.where(jnp.isfinite(out), out, combine(*scaled) * jnp.asarray(1 / _RESCUE_SCALE, out.dtype))


def _aligned_host_buffer(x: np.ndarray, count: int) -> np.ndarray:
    """A fresh 1-D buffer of ``count`` elements starting on a :data:`ZERO_COPY_ALIGNMENT`-byte
    boundary, holding ``x``'s elements (C order) first (numpy's memcpy: several times faster than
    XLA's own copy of an unaligned buffer)."""
    out = aligned_empty((count,), x.dtype)
    out[:x.size] = x.reshape(-1)
    out[x.size:] = 0
    return out


def _host_to_device(x):
    """A NumPy leaf as a jax.Array on the default device (other leaves unchanged). On the CPU
    backend an unaligned buffer is first copied by numpy into an aligned one, which XLA then
    adopts without a copy (XLA's own copy of an unaligned buffer is several times slower)."""
    if not isinstance(x, np.ndarray):
        return x
    if (x.size and x.dtype.isnative and jax.default_backend() == "cpu"
            and not (x.flags.c_contiguous and x.ctypes.data % ZERO_COPY_ALIGNMENT == 0)):
        x = _aligned_host_buffer(x, x.size).reshape(x.shape)
    return jax.device_put(x)


class _HostSpan:
    """``count`` elements of host memory from address ``start``, as an array interface; holds
    ``leaf`` (whose data lie inside the span) alive as long as any array made from it."""

    def __init__(self, leaf: np.ndarray, start: int, count: int):
        self.leaf = leaf
        # as unsigned integers of the leaf's width (bfloat16 has no array-interface type string)
        self.__array_interface__ = {"data": (start, True), "shape": (count,), "typestr": f"<u{leaf.itemsize}",
                                    "version": 3}


@jax.tree_util.register_pytree_node_class
class HostView:
    """A NumPy leaf handed to a merge kernel on the CPU backend without a copy.

    XLA:CPU adopts only 64-byte-aligned host buffers, and NumPy arrays usually start 16 bytes
    past a boundary (copying 9 models costs several times task arithmetic itself). So
    ``padded`` is a 1-D jax.Array adopting the aligned span of memory around the leaf
    (``offset`` elements before its first element, up to 2 cache lines after its last: the
    same memory pages, so always readable; see :func:`host_view`) and a kernel reads the leaf
    as ``dynamic_slice(padded, offset, size).reshape(shape)`` (:func:`_upcast`), fused into
    its own loop. The padded length depends only on the size, so one program serves every
    alignment. Values are bit for bit the leaf's."""

    def __init__(self, padded, offset, shape: tuple[int, ...], dtype):
        self.padded, self.offset, self.shape, self.dtype = padded, offset, tuple(shape), np.dtype(dtype)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def array(self) -> jax.Array:
        """The leaf (inside a kernel: a slice fused into the consumer, no copy)."""
        return lax.dynamic_slice_in_dim(self.padded, self.offset, self.size).reshape(self.shape)

    def tree_flatten(self):
        return (self.padded, self.offset), (self.shape, self.dtype)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)


def _padded_count(x: np.ndarray) -> int:
    line = ZERO_COPY_ALIGNMENT // x.itemsize
    return -(-x.size // line) * line + line


def host_view(x):
    """A concrete NumPy leaf as a :class:`HostView` on the CPU backend (leaves of other kinds
    and other backends: :func:`_host_to_device`). Zero copy when the aligned span around the
    leaf (start rounded down to 64 bytes, :func:`_padded_count` elements) lies in the pages
    that hold the leaf; otherwise (and for non-contiguous leaves) one aligned numpy copy."""
    if not (isinstance(x, np.ndarray) and x.size and x.dtype.isnative and is_floating(x)
            and jax.default_backend() == "cpu"):
        return _host_to_device(x)
    count = _padded_count(x)
    address = x.ctypes.data
    lead = address % ZERO_COPY_ALIGNMENT
    page = mmap.PAGESIZE
    span_end = address - lead + count * x.itemsize
    if (x.flags.c_contiguous and lead % x.itemsize == 0
            and (span_end - 1) // page == (address + x.nbytes - 1) // page):
        padded, offset = np.asarray(_HostSpan(x, address - lead, count)).view(x.dtype), lead // x.itemsize
    else:
        padded, offset = _aligned_host_buffer(x, count), 0
    return HostView(jax.device_put(padded), np.int32(offset), x.shape, x.dtype)


def _upcast(x, like):
    """``x`` (an array or a :class:`HostView`) in the compute dtype of ``like``'s dtype."""
    if isinstance(x, HostView):
        x = x.array()
    return jnp.asarray(x).astype(compute_dtype(like.dtype if isinstance(like, HostView) else jnp.result_type(like)))


def _per_task(value, num_tasks: int, name: str):
    """A scalar or one value per task, as a float32 array of shape (T,): NumPy when concrete
    (no XLA program of its own: a process's first merge compiles nothing for it), traced otherwise."""
    xp = jnp if any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(value)) else np
    if is_scalar_like(value):
        return xp.broadcast_to(xp.asarray(value, xp.float32), (num_tasks,))
    arr = xp.asarray(value, xp.float32)
    if arr.shape != (num_tasks,):
        raise HyperparameterError(f"{name} must be a scalar or have one value per task ({num_tasks}), got shape {arr.shape}")
    return arr


def is_scalar_like(value) -> bool:
    """A number or 0-d array (not a pytree of them)."""
    return jax.tree_util.treedef_is_leaf(jax.tree.structure(value)) and np.ndim(value) == 0


#: Declared hyper-parameter kinds shared by the built-in methods (:mod:`bcjax.hparams`).
ALPHA = hp_specs.Real(per_task=True)  # a finite scalar or one per task
FRACTION = hp_specs.Real(0.0, 1.0, low_open=True)  # density, keep: (0, 1]
NONNEGATIVE_PER_TASK = hp_specs.Real(0.0, per_task=True, optional=True)  # weights, dataset sizes; None: default


@jax.jit
def _weighted_task_sum(p0, fts, scales, alphas):
    """θ0 + Σt αt · st ⊙ τt, ``scales`` stacked per task (None: st = 1); the TA family's kernel.

    Propagates non-finite inputs by itself (:func:`propagates_nonfinite`): with finite αt and
    st, a NaN/Inf in θ0 or θt makes τt, αt·st·τt (0·Inf = NaN), the sum and θ0 + Σ non-finite."""
    def combine(p, fs):
        acc = jnp.zeros_like(p)
        for t, f in enumerate(fs):
            tau = f - p
            if scales is not None:
                tau = tau * scales[t]
            acc = acc + alphas[t].astype(p.dtype) * tau
        return p + acc

    p, fs = _upcast(p0, p0), [_upcast(ft, p0) for ft in fts]
    return _finite_or_rescaled(combine(p, fs), combine, p, fs).astype(p0.dtype)


# --------------------------------------------------------------------------- methods
@register_method("task_arithmetic", linear=True, hparams={"alpha": ALPHA})
@propagates_nonfinite
def task_arithmetic(pretrained, finetuned, flags, *, alpha=1.0):
    """Task arithmetic (Ilharco et al.): θ* = θ0 + α Σt τt (α scalar or one per task)."""
    alphas = _per_task(alpha, len(finetuned), "alpha")
    native = None if isinstance(alphas, jax.core.Tracer) else functools.partial(_native_task_sums, alphas)
    return map_merged_leaves(lambda i, p0, fts: _weighted_task_sum(p0, tuple(fts), None, alphas),
                             pretrained, finetuned, flags, host=host_view, native=native)


def _native_task_sums(alphas, p0s, ftss, device) -> list | None:
    """:func:`_weighted_task_sum` (no scales) for concrete host leaves, in one call of the
    native kernel over all of them (``bcjax/_native/merge_kernels.cc``: bit-identical, overflow
    rescue included; no XLA program per leaf shape, so a process's first merge compiles
    nothing), outputs adopted by XLA without a copy. See :func:`map_merged_leaves`."""
    if not _native.available():
        return None
    out = _aligned_empty([p.shape for p in p0s], p0s[0].dtype)
    _native.task_sum(p0s, ftss, out, np.asarray(alphas, np.float32))
    return _adopt_host_arrays(out, device)


@jax.jit
def _simple_average_leaf(p0, fts):
    def combine(fs):  # propagates the θt's; θ0 is not in the sum
        return sum(fs) / len(fs)

    fs = [_upcast(f, p0) for f in fts]
    return _nan_where_nonfinite(_finite_or_rescaled(combine(fs), combine, fs), [_upcast(p0, p0)]).astype(p0.dtype)


@register_method("simple_average")
@propagates_nonfinite
def simple_average(pretrained, finetuned, flags):
    """Simple average / model soup: θ* = (1/T) Σt θt."""
    return map_merged_leaves(lambda i, p0, fts: _simple_average_leaf(p0, tuple(fts)), pretrained, finetuned, flags,
                             host=host_view)


@jax.jit
def _weighted_average_leaf(p0, fts, weights):
    def combine(fs):
        return sum(weights[t] * f for t, f in enumerate(fs)) / jnp.sum(weights)

    fs = [_upcast(f, p0) for f in fts]
    return _finite_or_rescaled(combine(fs), combine, fs).astype(p0.dtype)


@register_method("weighted_average", hparams={"weights": NONNEGATIVE_PER_TASK})
def weighted_average(pretrained, finetuned, flags, *, weights=None):
    """Weighted average (SPEC §3): θ* = Σt wt θt / Σt wt (wt ≥ 0, Σ wt > 0; None: equal weights)."""
    w = _per_task(1.0 if weights is None else weights, len(finetuned), "weights")
    if not isinstance(w, jax.core.Tracer):
        wn = np.asarray(w, np.float64)
        if not np.all(np.isfinite(wn)) or np.any(wn < 0) or not wn.sum() > 0:
            raise HyperparameterError(f"weighted_average: weights must be finite, >= 0 and not all 0, got {wn.tolist()}")
    return map_merged_leaves(lambda i, p0, fts: _weighted_average_leaf(p0, tuple(fts), w), pretrained, finetuned, flags)


def _selection_on_views(p0, fts, p, fs):
    """For float32 :class:`HostView` inputs on the CPU backend: a ``select(ranks)`` for
    :func:`diff_masks_from_counts` whose native pass reads the views in place (the kernel
    would otherwise get copies of the sliced leaves); None otherwise (the default selection)."""
    views = [p0, *fts]
    if not (all(isinstance(v, HostView) and v.dtype == np.float32 for v in views)
            and p0.size > order_stats.SORT_BELOW and _native.available()):
        return None

    def native(r):
        return _native.select_diff_bits_views([(p0.padded, p0.offset)], [[(f.padded, f.offset)] for f in fts], r,
                                              sizes=[p0.size])

    return lambda ranks: lax.platform_dependent(ranks, cpu=native,
                                                default=lambda r: order_stats.select_diff_bits_multi(p, fs, r))


@jax.jit
def _breadcrumbs_tensor_leaf(p0, fts, alphas, n_bot, n_top):
    p = _upcast(p0, p0)
    if isinstance(p0, HostView):  # NumPy leaves read in place: the views' own native pass (float32)
        views, fts = fts, [_upcast(ft, p0) for ft in fts]
        masks = diff_masks_from_counts(fts, p, n_bot, n_top, select=_selection_on_views(p0, views, p, fts))
    else:  # all tasks' thresholds in one pass, storage dtype in (bf16 reaches the kernel as it is)
        masks = diff_masks_from_counts(fts, p0, n_bot, n_top)
        fts = [_upcast(ft, p0) for ft in fts]
    return _nan_where_nonfinite(_masked_task_sum(p, fts, masks, alphas), [p, *fts]).astype(p0.dtype)


def _masked_task_sum(p, fs, masks, alphas):
    """θ0 + Σt αt mt ⊙ τt for fixed masks (Breadcrumbs' combine), overflow rescued
    (:func:`_finite_or_rescaled`; the masks are those of the unscaled τt)."""
    def combine(p, fs):
        acc = jnp.zeros_like(p)
        for t, f in enumerate(fs):
            acc = acc + jnp.where(masks[t], alphas[t].astype(p.dtype) * (f - p), 0)
        return p + acc

    return _finite_or_rescaled(combine(p, fs), combine, p, fs)


@functools.partial(jax.jit, static_argnames=("axis",))
def _breadcrumbs_row_leaf(p0, fts, alphas, beta, gamma, axis):
    p = _upcast(p0, p0)
    fs = [_upcast(ft, p0) for ft in fts]
    masks = [breadcrumbs_row_mask(f - p, beta, gamma, axis) for f in fs]
    return _nan_where_nonfinite(_masked_task_sum(p, fs, masks, alphas), [p, *fs]).astype(p0.dtype)


@register_method("breadcrumbs", linear=True,
                 hparams={"alpha": ALPHA, **hp_specs.BETA_GAMMA, "granularity": GRANULARITY})
@propagates_nonfinite
def breadcrumbs(pretrained, finetuned, flags, *, alpha=0.3, beta=0.9, gamma=0.99, granularity="tensor", axis=None):
    """Model Breadcrumbs (SPEC §2): θ* = θ0 + α Σt mt ⊙ τt, mt keeps ranks n_bot … n−n_top−1 of |τt| per leaf.

    β, γ are read as SPEC §2 says (:mod:`bcjax.hparams`); ``axis`` (``granularity="row"``)
    must lie in [−ndim, ndim) of every merged leaf (an error naming the key path)."""
    alphas = _per_task(alpha, len(finetuned), "alpha")
    native = None
    if granularity == "tensor":
        def leaf(i, p0, fts):
            n_bot, n_top = breadcrumbs_counts(int(np.size(p0)), beta, gamma)
            return _breadcrumbs_tensor_leaf(p0, tuple(fts), alphas, n_bot, n_top)

        if not any(isinstance(x, jax.core.Tracer) for x in (alphas, beta, gamma)):
            native = functools.partial(_native_breadcrumbs, alphas, beta, gamma)
    elif granularity == "row":
        if axis is None:
            raise HyperparameterError("granularity='row' needs an explicit axis (Flax Dense kernels: axis=0)")
        paths = [keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(pretrained)[0]]

        def leaf(i, p0, fts):
            ax = axis(paths[i], tuple(np.shape(p0))) if callable(axis) else axis
            ax = hp_specs.leaf_axis(ax, np.ndim(p0), method="breadcrumbs", path=paths[i])
            return _breadcrumbs_row_leaf(p0, tuple(fts), alphas, beta, gamma, ax)
    else:
        raise HyperparameterError(f"granularity must be 'tensor' or 'row', got {granularity!r}")
    return map_merged_leaves(leaf, pretrained, finetuned, flags, host=host_view, native=native)


def _native_breadcrumbs(alphas, beta, gamma, p0s, ftss, device) -> list | None:
    """:func:`_breadcrumbs_tensor_leaf` for concrete float32 host leaves, outside XLA and
    bit-identical (see :func:`map_merged_leaves`): each leaf's two order statistics per task
    from the native selection (the FFI handler's own code, one call for all leaves), then one
    call of the masked-sum kernel (``merge_kernels.cc``: :func:`_masked_task_sum` with its
    overflow rescue and :func:`_nan_where_nonfinite`), outputs adopted by XLA without a copy.
    No XLA program per leaf shape. None (the XLA kernel) for other dtypes or huge leaves."""
    if (p0s[0].dtype != np.float32 or any(p.size > order_stats.MAX_COUNT for p in p0s)
            or not _native.available()):
        return None
    num_tasks = len(ftss)
    counts = [(p.size, *breadcrumbs_counts(p.size, beta, gamma)) for p in p0s]
    ranks = np.stack([np.broadcast_to(threshold_ranks(*c, xp=np), (num_tasks, 2)) for c in counts])
    selected = _native.select_diff_bits_per_leaf(p0s, ftss, ranks)  # (L, T, 2)
    lo, hi = (np.stack(b) for b in zip(*(thresholds_from(sel, *c, xp=np) for sel, c in zip(selected, counts))))
    out = _aligned_empty([p.shape for p in p0s], np.float32)
    _native.masked_task_sum(p0s, ftss, out, lo, hi, np.asarray(alphas, np.float32))
    return _adopt_host_arrays(out, device)


def _leaf_key(key, task: int, leaf_index: int):
    return jax.random.fold_in(jax.random.fold_in(key, task), leaf_index)


def _random_masked_merge(pretrained, finetuned, flags, keep, alpha, key, rescale: bool, name: str):
    alphas = _per_task(alpha, len(finetuned), "alpha")
    scale = (1.0 / jnp.asarray(keep, jnp.float32)) if rescale else jnp.float32(1.0)

    def leaf(i, p0, fts):
        masks = jnp.stack([bernoulli_leaf_mask(_leaf_key(key, t, i), keep, np.shape(p0))
                           for t in range(len(fts))]).astype(compute_dtype(jnp.result_type(p0)))
        return _weighted_task_sum(p0, tuple(fts), masks * scale, alphas)

    return map_merged_leaves(leaf, pretrained, finetuned, flags)


@register_method("random_sparse", requires=("key",), hparams={"keep": FRACTION, "alpha": ALPHA,
                                                             "key": hp_specs.PRNGKey()})
@propagates_nonfinite
def random_sparse(pretrained, finetuned, flags, *, keep=0.1, alpha=0.3, key=None):
    """Random-sparsified TA (paper Table 1): θ* = θ0 + α Σt mt ⊙ τt, mt ~ Bernoulli(keep) per entry, no rescale."""
    return _random_masked_merge(pretrained, finetuned, flags, keep, alpha, key, False, "random_sparse")


@register_method("dare", requires=("key",), hparams={"keep": FRACTION, "alpha": ALPHA, "key": hp_specs.PRNGKey()})
@propagates_nonfinite
def dare(pretrained, finetuned, flags, *, keep=0.1, alpha=0.3, key=None):
    """DARE: θ* = θ0 + α Σt mt ⊙ τt / keep, mt ~ Bernoulli(keep) per entry and task.

    ``key`` is a JAX PRNG key (``jax.random.key(seed)`` or ``jax.random.PRNGKey(seed)``); an
    integer such as ``key=0`` is refused rather than read as a seed (configs give ``seed``)."""
    return _random_masked_merge(pretrained, finetuned, flags, keep, alpha, key, True, "dare")


#: TIES's per-task model-wide thresholds: one program over all merged leaves (SPEC §3).
_model_threshold_bits = jax.jit(order_stats.select_diff_bits_leaves)


def ties_elected_vectors(p, fs, thresholds):
    """TIES steps (1)–(2) on one leaf (SPEC §3): each τt = ft − p trimmed at its task's
    threshold bits, then kept only where its sign equals s = sign(Σt trimmed τt) (sign(0) = +1).
    ``p`` and ``fs`` already in the compute dtype; returns the T elected vectors."""
    return _elect(p, fs, [order_stats.magnitude_bits(f - p) >= thresholds[t] for t, f in enumerate(fs)])


def _elect(p, fs, keeps):
    """TIES's trim (by the boolean masks ``keeps``) and sign election, see :func:`ties_elected_vectors`."""
    trimmed = [jnp.where(keep, f - p, 0) for keep, f in zip(keeps, fs)]
    sign = jnp.where(sum(trimmed) >= 0, 1.0, -1.0).astype(p.dtype)
    return [jnp.where((jnp.sign(tr) == sign) & (tr != 0), tr, 0) for tr in trimmed]


def _ties_leaf(p0, fts, thresholds, alpha):
    """TIES's merge of one leaf given the model-wide trim thresholds (SPEC §3), with the
    overflow rescue (:func:`_finite_or_rescaled`) only where it can change the result.

    The rescue replaces only non-finite entries of the plain combine, and the plain output is
    non-finite wherever the combine is (NaN marks non-finite inputs; a cast keeps Inf/NaN).
    So for concrete leaves on the host (CPU backend), the leaf is first merged without the
    rescue (its second evaluation of the combine costs ≈ 0.6× a task-arithmetic pass), and
    merged again with it only when that output holds a NaN/Inf (one vectorised host
    reduction over the output, :func:`~bcjax.tree.all_finite`): bit-identical to always
    rescuing. Traced, multi-process and accelerator leaves keep the one-program form
    (no host round trip)."""
    arrays = [x.padded if isinstance(x, HostView) else x for x in (p0, *fts)]
    if _is_traced(arrays) or not all(on_host(x) for x in arrays):
        return _ties_leaf_program(p0, fts, thresholds, alpha, rescue=True)
    out = _ties_leaf_program(p0, fts, thresholds, alpha, rescue=False)
    if all_finite(out):
        return out
    return _ties_leaf_program(p0, fts, thresholds, alpha, rescue=True)


@functools.partial(jax.jit, static_argnames=("rescue",))
def _ties_leaf_program(p0, fts, thresholds, alpha, rescue: bool):
    """θ0 + λ · disjoint mean of the elected trimmed τt on one leaf (SPEC §3); ``rescue``
    (static): recompute non-finite entries on scaled inputs (:func:`_finite_or_rescaled`)."""
    p = _upcast(p0, p0)
    fs = [_upcast(ft, p0) for ft in fts]
    keeps = [order_stats.magnitude_bits(f - p) >= thresholds[t] for t, f in enumerate(fs)]

    def combine(p, fs):  # trim masks from the unscaled τt; election and mean are scale-equivariant
        elected = _elect(p, fs, keeps)
        cnt = sum((e != 0).astype(p.dtype) for e in elected)
        if jnp.ndim(alpha) == 0:  # θ0 + λ · disjoint mean
            mean = jnp.where(cnt > 0, sum(elected) / jnp.maximum(cnt, 1), 0)
            return p + jnp.asarray(alpha, p.dtype) * mean
        # one λt per task: θ0 + (Σt λt e_t) / count, per entry (never along a leaf axis)
        num = sum(alpha[t].astype(p.dtype) * e for t, e in enumerate(elected))
        return p + jnp.where(cnt > 0, num / jnp.maximum(cnt, 1), 0)

    out = _finite_or_rescaled(combine(p, fs), combine, p, fs) if rescue else combine(p, fs)
    return _nan_where_nonfinite(out, [p, *fs]).astype(p0.dtype)


def ties_thresholds(pretrained, finetuned, flags, density) -> jax.Array:
    """TIES's trim thresholds (SPEC §3): per task, the float32 magnitude bit pattern of the
    (N − n_keep)-th smallest |τt| over all N entries of the merged leaves, n_keep =
    max(1, ⌊density·N + 1e-6⌋); entries with bits ≥ the threshold are kept (ties kept).
    One native/portable pass over all leaves and tasks; shape (T,), int32."""
    density = hp_specs.normalize("ties", {"density": FRACTION}, {"density": density})["density"]
    leaves0 = _leaves(pretrained)
    merged = [i for i, (p0, f) in enumerate(zip(leaves0, flags)) if f and np.size(p0) > 0]
    total = sum(int(np.size(leaves0[i])) for i in merged)
    if total == 0:
        return jnp.zeros(len(finetuned), jnp.int32)
    # keep n_keep = max(1, ⌊density·N + 1e-6⌋) largest: threshold = (N − n_keep)-th smallest,
    # N over all merged leaves of the model, all tasks in one pass over the models
    per_model = [_leaves(model) for model in finetuned]
    if total > order_stats.MAX_COUNT and not _is_traced((pretrained, finetuned)):
        # more entries than one int32-counted selection: host-summed int64 histograms
        def array(x):
            return x.array() if isinstance(x, HostView) else x

        def histogram_pass(bins):  # HostView leaves are read in place
            for i in merged:
                yield tau_magnitude_histograms(leaves0[i], [m[i] for m in per_model], bins)

        def read_blocks(j, starts, length):
            i = merged[j]
            return [gather_blocks(array(x[i]), starts, length) for x in (leaves0, *per_model)]

        sizes = [int(np.size(leaves0[i])) for i in merged]
        sample = lambda: tau_sample_keys(read_blocks, sizes, len(finetuned))  # noqa: E731
        return jnp.asarray(ties_thresholds_from_histograms(histogram_pass, total, len(finetuned), density, sample))
    p0, fts = [leaves0[i] for i in merged], [[m[i] for i in merged] for m in per_model]
    rank = ties_trim_rank(density, total)
    if isinstance(rank, int) and not _is_traced((pretrained, finetuned)):
        bits = _native_model_threshold_bits(p0, fts, rank)
        if bits is not None:
            return jax.device_put(bits)  # (jnp.asarray would compile a copy program)
    rank = jnp.asarray(rank, jnp.int32)
    ranks = jnp.broadcast_to(rank, (len(finetuned), 1))
    if _selects_on_views([*p0, *(f for task in fts for f in task)]):  # NumPy leaves read in place
        return _model_threshold_bits_on_views([host_view(p) for p in p0], [[host_view(f) for f in task] for task in fts],
                                              ranks, sizes=tuple(int(p.size) for p in p0))[:, 0]
    return _model_threshold_bits(p0, fts, ranks)[:, 0]


def _native_model_threshold_bits(p0, fts, rank: int) -> np.ndarray | None:
    """:func:`_model_threshold_bits` for concrete float32 CPU leaves (NumPy, host views or
    single-device CPU jax.Arrays, see :func:`_host_readable`) in one native call outside XLA —
    the FFI handler's own selection over the union of the leaves, so nothing is compiled;
    int32[T]. None (the XLA/FFI path) otherwise."""
    if not _native.available():
        return None
    readable = [_host_readable([p, *(task[j] for task in fts)]) for j, p in enumerate(p0)]
    if any(r is None or r[0][0].dtype != np.float32 for r in readable):
        return None
    arrays = [r[0] for r in readable]
    ranks = np.full((len(fts), 1), rank, np.int32)
    return _native.select_diff_bits_model([a[0] for a in arrays], [[a[1 + t] for a in arrays] for t in range(len(fts))],
                                          ranks)[:, 0]


def _selects_on_views(leaves) -> bool:
    """True when the native selection can read these leaves as :class:`HostView` in place:
    float32 NumPy arrays (or their views), CPU backend, kernel available."""
    return (all(isinstance(x, (np.ndarray, HostView)) and x.dtype == np.float32 for x in leaves)
            and jax.default_backend() == "cpu" and _native.available())


def _leaves(tree) -> list:
    """``jax.tree.leaves`` keeping :class:`HostView` objects whole."""
    return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, HostView))


def _with_host_views(tree, flags):
    """``tree`` with its merged NumPy leaves as :class:`HostView` (wrapped once, for several passes)."""
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [host_view(x) if f and np.size(x) else x for x, f in zip(leaves, flags)])


@functools.partial(jax.jit, static_argnames=("sizes",))
def _model_threshold_bits_on_views(p0, fts, ranks, sizes):
    """:func:`order_stats.select_diff_bits_leaves` on :class:`HostView` leaves (native, in place)."""
    pair = lambda v: (v.padded, v.offset)  # noqa: E731
    return _native.select_diff_bits_views([pair(p) for p in p0], [[pair(f) for f in task] for task in fts], ranks,
                                          sizes=sizes)


@register_method("ties", hparams={"density": FRACTION, "alpha": ALPHA})
@propagates_nonfinite
def ties(pretrained, finetuned, flags, *, density=0.2, alpha=1.0):
    """TIES-merging (Yadav et al., SPEC §3): trim to the top `density` of |τt| per model (global threshold, ties kept), elect signs, disjoint mean; θ* = θ0 + λ·mean.

    ``alpha`` (λ) is a scalar or one value per task: per task, θ* = θ0 + (Σt λt e_t) / #{t: e_t ≠ 0}
    per entry with e_t the elected trimmed vectors (a scalar λ gives exactly θ0 + λ · mean)."""
    merged = [x for tree in (pretrained, *finetuned) for x, f in zip(jax.tree.leaves(tree), flags) if f and np.size(x)]
    if not _is_traced((pretrained, finetuned)):
        # NumPy leaves are read by two passes (thresholds, then the merge). Float32 ones up to
        # order_stats.MAX_COUNT entries are read where they lie by the native host kernels of
        # both passes (no wrapping at all); larger ones are wrapped once, as views the native
        # histograms read in place; the others (e.g. bfloat16) are put on the device once.
        total = sum(int(np.size(x)) for x, f in zip(jax.tree.leaves(pretrained), flags) if f)
        if _selects_on_views(merged):
            if total > order_stats.MAX_COUNT:
                pretrained, finetuned = (_with_host_views(pretrained, flags),
                                         [_with_host_views(t, flags) for t in finetuned])
        else:
            pretrained, finetuned = jax.tree.map(_host_to_device, (pretrained, list(finetuned)))
    return ties_merge_with_thresholds(pretrained, finetuned, flags,
                                      thresholds=ties_thresholds(pretrained, finetuned, flags, density), alpha=alpha)


def _validate_fishers(pretrained, fishers, name):
    if fishers is None:
        raise HyperparameterError(f"{name} needs `fishers`: one diagonal-Fisher tree per fine-tuned model")
    fishers = list(fishers)
    validate_models(pretrained, fishers, what=f"{name} Fisher tree", check_dtype=False)
    labels = [f"Fisher tree {t}" for t in range(len(fishers))]
    check_finite(fishers, labels)
    _check_nonnegative_trees(fishers, labels, "(a diagonal Fisher is non-negative)")
    return fishers


def _check_nonnegative_trees(trees, labels, why: str) -> None:
    """Raise naming the tree and key path of the first concrete leaf with a negative entry."""
    for label, tree in zip(labels, trees):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if not isinstance(leaf, jax.core.Tracer) and np.issubdtype(np.asarray(leaf).dtype, np.number) \
                    and np.any(np.asarray(leaf) < 0):
                raise HyperparameterError(f"{label}, key path {keystr(path)!r}: negative entries {why}")


@jax.jit
def _fisher_leaf(p0, fts, fs, weights, eps):
    p = _upcast(p0, p0)
    thetas = [_upcast(ft, p0) for ft in fts]
    floored = [jnp.maximum(_upcast(f, p0), eps) for f in fs]

    def combine(thetas, floored):  # degree 1 in θ, degree 0 in F: scaling both is exact
        wf = [weights[t].astype(p.dtype) * f for t, f in enumerate(floored)]
        num = sum(w * th for w, th in zip(wf, thetas))
        den = sum(wf)
        plain = sum(thetas) / len(thetas)
        return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), plain)

    def rescue(thetas, floored):  # weights normalised by their largest: Σ w̃t θt / Σ w̃t, w̃ ≤ 1
        wf = [weights[t].astype(p.dtype) * f for t, f in enumerate(floored)]
        top = functools.reduce(jnp.maximum, wf)
        wn = [w / jnp.where(top > 0, top, 1) for w in wf]
        return combine(thetas, wn)

    out = _finite_or_rescaled(combine(thetas, floored), rescue, thetas, floored)
    return _nan_where_nonfinite(out, [p, *thetas]).astype(p0.dtype)


@register_method("fisher", requires=("fishers",),
                 hparams={"weights": NONNEGATIVE_PER_TASK, "eps": hp_specs.Real(0.0)})
@propagates_nonfinite
def fisher(pretrained, finetuned, flags, *, fishers=None, weights=None, eps=1e-6):
    """Fisher merging (Matena & Raffel): θ* = Σt λt Ft θt / Σt λt Ft per entry, F floored at eps; plain mean where Σ λt Ft = 0."""
    fishers = _validate_fishers(pretrained, fishers, "fisher")
    if len(fishers) != len(finetuned):
        raise TreeMismatchError(f"fisher: {len(fishers)} Fisher trees for {len(finetuned)} fine-tuned models")
    w = _per_task(1.0 if weights is None else weights, len(finetuned), "weights")
    return map_merged_leaves(lambda i, p0, fts, fs: _fisher_leaf(p0, tuple(fts), tuple(fs), w, jnp.float32(eps)),
                             pretrained, finetuned, flags, fishers)


@jax.jit
def _gradient_matching_leaf(p0, fts, hs, alphas, h0, sizes):
    p = _upcast(p0, p0)
    h0 = jnp.broadcast_to(_upcast(h0, p0), p.shape)
    hs = [_upcast(h, p0) for h in hs]
    fs = [_upcast(ft, p0) for ft in fts]

    def combine(p, fs, hs, h0):  # degree 1 in (θ0, θt), degree 0 in (H0, Ht)
        hs = [sizes[t].astype(p.dtype) * h for t, h in enumerate(hs)]  # Ht = Nt · Ft, scaled with the rest
        hbar = h0 + sum(alphas[t].astype(p.dtype) * h for t, h in enumerate(hs))
        safe = jnp.where(hbar > 0, hbar, 1)
        acc = jnp.zeros_like(p)
        for t, (f, h) in enumerate(zip(fs, hs)):
            coef = jnp.where(hbar > 0, (h0 + h) / safe, 1.0)  # 0/0 → task arithmetic
            acc = acc + alphas[t].astype(p.dtype) * coef * (f - p)
        return p + acc

    out = _finite_or_rescaled(combine(p, fs, hs, h0), combine, p, fs, hs, h0)
    return _nan_where_nonfinite(out, [p, *fs]).astype(p0.dtype)


@register_method("gradient_matching", requires=("fishers", "dataset_sizes"),
                 hparams={"alpha": ALPHA, "dataset_sizes": NONNEGATIVE_PER_TASK})
@propagates_nonfinite
def gradient_matching(pretrained, finetuned, flags, *, fishers=None, alpha=1.0, h0=1.0, dataset_sizes=None):
    """Gradient matching (Daheim et al., eq. 10, diagonal): θ* = θ0 + Σt αt (H0+Ht)/H̄ τt, H̄ = H0 + Σt αt Ht."""
    fishers = _validate_fishers(pretrained, fishers, "gradient_matching")
    if len(fishers) != len(finetuned):
        raise TreeMismatchError(f"gradient_matching: {len(fishers)} Fisher trees for {len(finetuned)} fine-tuned models")
    alphas = _per_task(alpha, len(finetuned), "alpha")
    sizes = _per_task(1.0 if dataset_sizes is None else dataset_sizes, len(finetuned), "dataset_sizes")
    if h0 is None or isinstance(h0, str) or is_scalar_like(h0):
        h0 = hp_specs.real(h0, "h0", method="gradient_matching", low=0.0)
        h0_leaves = None
    else:
        validate_models(pretrained, [h0], what="gradient_matching h0 tree", check_dtype=False)
        check_finite([h0], ["gradient_matching h0 tree"])
        _check_nonnegative_trees([h0], ["gradient_matching h0 tree"], "(H0 is a non-negative diagonal)")
        h0_leaves = jax.tree.leaves(h0)

    def leaf(i, p0, fts, hs):
        return _gradient_matching_leaf(p0, tuple(fts), tuple(hs), alphas, h0 if h0_leaves is None else h0_leaves[i],
                                       sizes)

    return map_merged_leaves(leaf, pretrained, finetuned, flags, fishers)


# --------------------------------------------------------------------------- streaming hooks
# Public pieces of TIES for merges that see one leaf at a time (bcjax.checkpoints streams
# checkpoints from disk, and models of more than 2^31 − 1 merged entries in memory): the
# model-wide threshold is an order statistic of additive histograms over leaves (a sample
# brackets it, one counting pass resolves it), then each leaf is merged with the same kernel
# as :func:`ties`.
def ties_trim_rank(density, total: int):
    """Ascending 0-based rank of TIES's trim threshold among a model's N = ``total`` merged
    magnitudes |τ|: N − max(1, ⌊density·N + 1e-6⌋) (SPEC §3; ties at the threshold kept); a
    Python int for a concrete density (exact for any N), traced otherwise."""
    density = hp_specs.normalize("ties", {"density": FRACTION}, {"density": density})["density"]
    kept = fraction_count(density, total)
    return total - (max(kept, 1) if isinstance(kept, int) else jnp.maximum(kept, 1))


#: Elements per device histogram of :func:`tau_magnitude_histogram`: larger leaves are
#: counted in flat chunks (bounded temporaries, int32 counts per chunk, int64 on the host).
HISTOGRAM_CHUNK = 1 << 24
#: Sample keys per task that bracket TIES's threshold (:func:`ties_thresholds_from_histograms`),
#: drawn as contiguous blocks of :data:`TIES_SAMPLE_BLOCK` entries (one read each).
TIES_SAMPLE = 1 << 20
TIES_SAMPLE_BLOCK = 1024
#: Bracket margin in binomial standard deviations of the sample rank, wide because entries of
#: a block are correlated. Only speed depends on it: a miss falls back to two full passes.
TIES_SIGMAS = 8.0
#: The most coarse bins (2^15 fine counts per task each) one bracket spans; a wider one is
#: centred on the sample's estimate (and may miss, then the fallback runs).
TIES_MAX_BINS = 16


@jax.jit
def _tau_histograms(p0, fts, bins):
    """int32 histograms of |θt − θ0|'s float32 bits for every task of one leaf (chunk):
    ``[T, 2^16]`` coarse (``bins`` None) or ``[T, K·2^15 + 1]`` fine (the K rows of
    ``order_stats.fine_histogram`` for ``bins[t]``, then the count of keys whose coarse part
    exceeds every ``bins[t]``). The native kernel on CPU (one pass, θ0 read once, bfloat16
    read as it is); XLA's scatter-add elsewhere."""
    def portable(p0, *fts):
        p = _upcast(p0, p0)
        keys = [order_stats.magnitude_bits(_upcast(f, p0) - p) for f in fts]
        if bins is None:
            return jnp.stack([order_stats.coarse_histogram(k) for k in keys])
        return jnp.stack([jnp.concatenate([order_stats.fine_histogram(k, bins[t]).reshape(-1),
                                           jnp.sum(jnp.ravel(k) >> 15 > jnp.max(bins[t]), dtype=jnp.int32)[None]])
                          for t, k in enumerate(keys)])

    dtypes = {jnp.dtype(x.dtype) for x in (p0, *fts)}
    if len(dtypes) == 1 and dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)} and _native.available():
        return lax.platform_dependent(p0, *fts, cpu=lambda p0, *fts: _native.diff_histograms(p0, fts, bins),
                                      default=portable)
    return portable(p0, *fts)


@functools.partial(jax.jit, static_argnames=("size",))
def _tau_histograms_on_views(padded, offsets, bins, size):
    """:func:`_tau_histograms` (native) of the ``size`` entries of each padded host buffer
    from its offset: :class:`HostView` leaves (NumPy memory, even a mapped file) read in place."""
    return _native.diff_histograms(padded[0], padded[1:], bins, offsets=offsets, size=size)


def _histograms_on_views(leaves) -> bool:
    """True when :func:`tau_magnitude_histograms` can read these leaves in place: NumPy arrays
    or :class:`HostView`, all float32 or all bfloat16, CPU backend, native kernel available."""
    dtypes = {np.dtype(x.dtype) for x in leaves}
    return (all(isinstance(x, (np.ndarray, HostView)) for x in leaves) and len(dtypes) == 1
            and dtypes <= {np.dtype(np.float32), np.dtype(jnp.bfloat16)}
            and jax.default_backend() == "cpu" and _native.available())


def tau_magnitude_histograms(p0, fts, bins=None) -> np.ndarray:
    """One leaf's additive histograms of the float32 bits of |θt − θ0| for every task, NumPy
    int64 on the host: coarse ``[T, 2^16]``, or with ``bins`` (``[T, K]`` coarse bins) fine
    ``[T, K·2^15 + 1]``: the K rows of 2^15 fine counts back to back, then the count of keys
    above every bin of the task. Leaves of more than :data:`HISTOGRAM_CHUNK` entries are
    counted in flat chunks. Summed over leaves they give a model-wide order statistic
    (:func:`ties_thresholds_from_histograms`). NumPy leaves (float32 or bfloat16; memory-mapped
    ones too) and :class:`HostView` leaves are read in place by the native kernel on CPU."""
    leaves = [p0, *fts]
    n = int(p0.size)
    step = n if n <= HISTOGRAM_CHUNK else HISTOGRAM_CHUNK
    bins = None if bins is None else jnp.asarray(np.asarray(bins, np.int32).reshape(len(fts), -1))
    if n and _histograms_on_views(leaves):
        leaves = [x if isinstance(x, HostView) else host_view(x) for x in leaves]
        if all(isinstance(v, HostView) for v in leaves) and max(int(v.offset) for v in leaves) + n < 2**31:
            offsets = np.array([int(v.offset) for v in leaves], np.int64)
            padded = tuple(v.padded for v in leaves)
            return order_stats.accumulate_histograms(None, (
                _tau_histograms_on_views(padded, jnp.asarray(offsets + s, jnp.int32), bins, size=min(step, n - s))
                for s in range(0, n, step)))
    p0, *fts = [x.array() if isinstance(x, HostView) else x for x in leaves]
    flat0, flats = p0.reshape(-1), [f.reshape(-1) for f in fts]  # NumPy: views, chunks used in place
    return order_stats.accumulate_histograms(None, (
        _tau_histograms(_host_to_device(flat0[s:s + step]), tuple(_host_to_device(f[s:s + step]) for f in flats), bins)
        for s in range(0, n, step)))


def ties_sample_blocks(sizes: Sequence[int]) -> list[tuple[np.ndarray, int]]:
    """Per leaf of ``sizes`` entries, ``(starts, length)``: the contiguous sample blocks
    ``[s, s + length)`` of :func:`tau_sample_keys`, about :data:`TIES_SAMPLE` entries in all,
    each leaf sampled at the same rate (whole leaves when the model is smaller). Deterministic
    (fixed seed): only the speed of :func:`ties_thresholds_from_histograms` depends on it."""
    total = int(sum(sizes))
    rate = TIES_SAMPLE / max(total, 1)
    rng = np.random.default_rng(0x5EEDB1C5)
    plan = []
    for n in map(int, sizes):
        if n == 0 or rate >= 1:
            plan.append((np.zeros(1 if n else 0, np.int64), n))
            continue
        length = min(TIES_SAMPLE_BLOCK, n)
        expected = n * rate / length
        count = int(expected) + int(rng.random() < expected - int(expected))
        plan.append((np.sort(rng.integers(0, n - length + 1, count)), length))
    return plan


def gather_blocks(x, starts: np.ndarray, length: int) -> np.ndarray:
    """Entries ``[s, s + length)`` of the flattened leaf ``x`` for each s in ``starts``, concatenated (NumPy)."""
    index = (np.asarray(starts, np.int64)[:, None] + np.arange(length)).reshape(-1)
    if isinstance(x, np.ndarray):
        return x.reshape(-1)[index]
    return np.asarray(jnp.ravel(x)[index])


class TauSample(NamedTuple):
    """TIES's threshold sample: ``keys[t]`` the sample keys (int32 bits of |τt|) of task t, the
    blocks back to back in the same order for every task; ``block_leaf`` and ``block_size``
    each block's leaf and length (the bracket's margin estimates the sample's spread from
    the blocks, so correlated entries within a block widen it)."""
    keys: list
    block_leaf: np.ndarray
    block_size: np.ndarray


def tau_sample_keys(read_blocks, sizes: Sequence[int], num_tasks: int) -> TauSample:
    """Sample keys (float32 bits of |θt − θ0|) of each task for TIES's bracket: ``read_blocks(i,
    starts, length)`` returns θ0's and the T tasks' entries of leaf i in the blocks of
    :func:`ties_sample_blocks` (as :func:`gather_blocks` does), T + 1 1-D arrays."""
    parts = [[] for _ in range(num_tasks)]
    leaf, size = [], []
    for i, (starts, length) in enumerate(ties_sample_blocks(sizes)):
        if len(starts) == 0 or length == 0:
            continue
        p, *fs = read_blocks(i, starts, length)
        p = np.asarray(p, np.float32)
        for t, f in enumerate(fs):
            parts[t].append(np.abs(np.asarray(f, np.float32) - p).view(np.int32))
        leaf += [i] * len(starts)
        size += [length] * len(starts)
    return TauSample([np.concatenate(p) if p else np.zeros(0, np.int32) for p in parts],
                     np.asarray(leaf, np.int64), np.asarray(size, np.int64))


def _count_variance(below: np.ndarray, block_leaf: np.ndarray, block_size: np.ndarray) -> float:
    """Variance of #{sample keys below a value} for a sample stratified by leaf with random
    blocks in each: Σ_leaf n_l/(n_l − 1) Σ_blocks (c_b − p_l·s_b)², c_b the block's count,
    p_l the leaf's rate (leaves of one block contribute nothing)."""
    starts = np.concatenate([[0], np.cumsum(block_size)[:-1]])
    counts = np.add.reduceat(below.astype(np.int64), starts)
    rate = np.bincount(block_leaf, weights=counts) / np.maximum(np.bincount(block_leaf, weights=block_size), 1)
    squares = np.bincount(block_leaf, weights=(counts - rate[block_leaf] * block_size) ** 2)
    blocks = np.bincount(block_leaf)
    several = blocks > 1
    return float(np.sum(squares[several] * blocks[several] / (blocks[several] - 1)))


def _bracket_bins(sample, rank: int, total: int) -> np.ndarray:
    """int32 ``[T, K]`` contiguous coarse bins per task (same K for all) that contain the
    sample's estimate of the rank-th key with a margin of :data:`TIES_SIGMAS` standard
    deviations of the sample rank: binomial, or the blocks' own spread when larger (a
    :class:`TauSample`; a plain list of key arrays counts as independent keys), with the
    finite-population correction; at most :data:`TIES_MAX_BINS` bins."""
    keys_per_task = sample.keys if isinstance(sample, TauSample) else sample
    q = (rank + 0.5) / total
    lows, widths = [], []
    for keys in keys_per_task:
        m = keys.size
        if m == 0:
            lows.append(0), widths.append(order_stats.N_COARSE)
            continue
        pos = q * m
        mid = int(np.clip(np.floor(pos), 0, m - 1))
        estimate = int(np.partition(keys, mid)[mid])
        variance = m * q * (1 - q)
        if isinstance(sample, TauSample) and sample.block_size.sum() == m:  # keys in block order
            variance = max(variance, _count_variance(keys < estimate, sample.block_leaf, sample.block_size))
        spread = 1 - m / total  # a sample of every key is exact
        margin = TIES_SIGMAS * (np.sqrt(variance * spread) + 2) if spread > 0 else 0.0
        at = [int(np.clip(np.floor(pos - margin), 0, m - 1)), int(np.clip(np.ceil(pos + margin), 0, m - 1))]
        part = np.partition(keys, sorted(set(at)))
        lo = 0 if pos - margin < 0 else int(part[at[0]]) >> 15
        hi = order_stats.N_COARSE - 1 if pos + margin >= m else int(part[at[1]]) >> 15
        if hi - lo + 1 > TIES_MAX_BINS:  # centred on the estimate
            lo = max(0, (estimate >> 15) - TIES_MAX_BINS // 2)
            hi = lo + TIES_MAX_BINS - 1
        lows.append(lo), widths.append(hi - lo + 1)
    k = min(max(widths), TIES_MAX_BINS)
    lows = np.minimum(np.asarray(lows, np.int64), order_stats.N_COARSE - k)
    return (lows[:, None] + np.arange(k)).astype(np.int32)


def ties_thresholds_from_histograms(histogram_pass, total: int, num_tasks: int, density, sample=None) -> np.ndarray:
    """TIES's model-wide trim threshold bits (SPEC §3), int32 shape (T,), from additive
    histograms summed on the host in int64 (no limit of 2^31 − 1 entries): the one protocol
    for models seen leaf by leaf (streamed from disk, or beyond int32 counts in memory).

    ``histogram_pass(bins)`` yields, leaf after leaf, the T histograms of
    :func:`tau_magnitude_histograms` (``bins`` None: coarse; else ``bins[t]`` for task t);
    ``sample()``, optional, returns the sample keys of the T tasks (:func:`tau_sample_keys`).

    With a sample, ONE full pass: the sample brackets each task's rank-r key (r =
    :func:`ties_trim_rank`) within K contiguous coarse bins [b, b + K); the fine pass counts
    the keys inside per fine bin and those above; with below = N − above − inside, the
    threshold is (b·2^15 + j) for the first j whose cumulative count exceeds r − below — when
    below ≤ r < below + inside. A task whose bracket missed (or no sample) takes the
    coarse + fine passes (order_stats.locate_coarse / resolve_fine). Exact either way;
    equals :func:`ties_thresholds` (which selects in one pass when the model is in memory)."""
    rank = ties_trim_rank(density, total)
    out = np.zeros(num_tasks, np.int32)
    missed = list(range(num_tasks))
    if sample is not None:
        bins = _bracket_bins(sample(), rank, total)
        width = bins.shape[1] * order_stats.N_FINE
        hist = _sum_pass(histogram_pass(bins), num_tasks)
        missed = []
        for t in range(num_tasks):
            above, inside = int(hist[t, width]), int(hist[t, :width].sum())
            j = rank - (total - above - inside)
            if 0 <= j < inside:
                idx = int(np.searchsorted(np.cumsum(hist[t, :width]), j, side="right"))
                out[t] = (int(bins[t, 0]) << 15) + idx
            else:
                missed.append(t)
        if not missed:
            return out
    ranks = np.full((num_tasks, 1), rank, np.int64)
    hist1 = _sum_pass(histogram_pass(None), num_tasks)
    located = [order_stats.locate_coarse(hist1[t], ranks[t]) for t in range(num_tasks)]
    bins = np.stack([loc[0] for loc in located])
    hist2 = _sum_pass(histogram_pass(bins), num_tasks)[:, :order_stats.N_FINE]
    for t in missed:
        out[t] = order_stats.resolve_fine(hist2[t][None], *located[t], ranks[t])[0]
    return out


def _sum_pass(histograms, num_tasks: int) -> np.ndarray:
    """Σ of a pass's per-leaf ``[T, …]`` histograms, int64 on the host (added in place)."""
    total = None
    for h in histograms:
        if total is None:
            total = np.array(h, np.int64)
        else:
            np.add(total, h, out=total)
    return np.zeros((num_tasks, 0), np.int64) if total is None else total


def ties_merge_with_thresholds(pretrained, finetuned, flags, *, thresholds, alpha=1.0):
    """TIES's trim + elect + disjoint mean (SPEC §3) given each task's trim threshold as
    int32 magnitude bits, shape (T,), computed model-wide beforehand; equals :func:`ties`
    when the thresholds are those of the whole model. ``alpha``: a scalar or one per task."""
    alpha = hp_specs.normalize("ties", {"alpha": ALPHA}, {"alpha": alpha}, num_tasks=len(finetuned))["alpha"]
    thresholds = jnp.asarray(thresholds, jnp.int32)
    native = None if _is_traced((thresholds, alpha)) else functools.partial(_native_ties_merges, thresholds, alpha)
    return map_merged_leaves(lambda i, p0, fts: _ties_leaf(p0, tuple(fts), thresholds, alpha),
                             pretrained, finetuned, flags, host=host_view, native=native)


def _native_ties_merges(thresholds, alpha, p0s, ftss, device) -> list | None:
    """:func:`_ties_leaf` for concrete float32 host leaves in one native call
    (``merge_kernels.cc``: bit-identical, no XLA program per leaf shape); see
    :func:`map_merged_leaves`. None (the XLA kernel) for other dtypes or without the kernel."""
    if p0s[0].dtype != np.float32 or len(ftss) > _NATIVE_MAX_TASKS or not _native.available():
        return None
    out = _aligned_empty([p.shape for p in p0s], np.float32)
    _native.ties_merge(p0s, ftss, out, np.asarray(thresholds, np.int32), np.asarray(alpha, np.float32))
    return _adopt_host_arrays(out, device)


#: Most tasks the native TIES kernel takes (its per-entry scratch); more use the XLA kernel.
_NATIVE_MAX_TASKS = 1024
