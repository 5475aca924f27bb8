r"""AdaMerging (Yang et al., ICLR 2024), SPEC §3: merging coefficients learned by test-time entropy minimisation.

    θ(λ) = θ0 + Σt λt ⊙ vt,

vt = Δt the task's vector — ``"raw"`` τt = θt − θ0, ``"ties"`` the TIES-processed τt
(trimmed to the top ``density`` of |τt| per model, kept where its sign agrees with the
elected sign: AdaMerging++), or ``"breadcrumbs"`` mt ⊙ τt (SPEC §2 masks: ours). λ is one
scalar per task (``granularity="task"``, λ ∈ ℝ^T) or one per task and merged leaf
(``"layer"``, λ ∈ ℝ^{T×L}, the paper's layer-wise AdaMerging), initialised at ``init``
(0.3). λ minimises

    H(λ) = (1/T) Σt mean_{x ∈ Bt} −Σc pc(x; θ(λ)) log pc(x; θ(λ)),   p = softmax(logits_fn(θ(λ), t, x)),

the mean Shannon entropy of the merged model's predictions on a batch Bt of ``batch_size``
(16) **unlabeled** inputs of every task per step, with Adam (optax; learning rate 1e-3).
``clamp=(lo, hi)`` (or ``True`` for [0, 1]) projects λ after every update. (FusionBench sums
the tasks' entropies instead of averaging them; under Adam the two differ only through ε.)

**One compiled step.** Building θ(λ) from the stacked vectors (one [T, ...] array per
leaf, optionally sharded over a mesh), the T forward passes, the entropy and the Adam
update form one jitted function, traced once; the Python loop over leaves and tasks runs
at trace time only. Batches are sampled on the host (seeded per step, without replacement
within a step: ``numpy.random.default_rng([seed, step, t])``), so runs are deterministic
for a seed and a resumed run equals an uninterrupted one.

**Labels are never read.** A task's data is an array or pytree of input arrays. A Mapping
(e.g. ``{"image": x, "label": y}``) is accepted, but its label keys (``label``, ``labels``,
``y``, ``target``, ``targets``, ``label_ids``) are never copied, and ``logits_fn`` sees a
:class:`UnlabeledInputs` mapping that raises :class:`~bcjax.errors.DataAccessError` when
one is read — the same discipline as the engine's split guard for validation-free tuning.
Labeled pairs ``(inputs, labels)`` and objects with a ``labels`` attribute are refused.

**Saved and reusable.** With ``out_dir`` the run writes ``coefficients.json`` and
``coefficients.npz`` (λ, the leaf paths, hyper-parameters, loss log) at the end and a
checkpoint (λ, Adam state, step, losses) every ``checkpoint_every`` steps; a rerun with the
same arguments resumes from the checkpoint. :func:`load_coefficients` reads the saved λ and
:func:`apply_coefficients` (or ``bcjax.merge("adamerging", ..., coefficients=...)``)
rebuilds the merged model without data.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bcjax import hparams
from bcjax.errors import DataAccessError, HyperparameterError
from bcjax.merging import map_merged_leaves, register_method, ties_elected_vectors, ties_thresholds
from bcjax.sweeps import task_deltas
from bcjax.tree import PyTree, check_finite, compute_dtype, leaf_paths, merged_leaf_flags, validate_models

__all__ = ["adamerging", "stacked_vectors", "merged_params", "apply_coefficients", "load_coefficients",
           "mean_entropy", "UnlabeledInputs", "LABEL_KEYS"]

#: Mapping keys treated as labels (never copied, reading them raises DataAccessError).
LABEL_KEYS = frozenset({"label", "labels", "y", "target", "targets", "label_ids"})
VECTORS = ("raw", "ties", "breadcrumbs")
GRANULARITIES = ("task", "layer")


# --------------------------------------------------------------------------- label guard
@jax.tree_util.register_pytree_with_keys_class
class UnlabeledInputs(Mapping):
    """A read-only mapping of input arrays whose label keys raise :class:`DataAccessError`
    (a pytree, so it passes through ``jax.jit``)."""

    def __init__(self, items: Mapping[str, Any], what: str = "AdaMerging"):
        self._items = dict(items)
        self._what = what

    def __getitem__(self, key):
        if key in LABEL_KEYS:
            raise DataAccessError(f"{self._what} read key {key!r} of its batches: labels are never read "
                                  "(unsupervised, SPEC §3); logits_fn must use inputs only")
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)

    def __repr__(self):
        return f"UnlabeledInputs({sorted(self._items)})"

    def tree_flatten_with_keys(self):
        keys = sorted(self._items)
        return [(jax.tree_util.DictKey(k), self._items[k]) for k in keys], (tuple(keys), self._what)

    @classmethod
    def tree_unflatten(cls, aux, children):
        keys, what = aux
        return cls(dict(zip(keys, children)), what)


def _inputs_only(data, task: int):
    """The task's unlabeled inputs (a pytree of arrays with a leading example axis)."""
    if hasattr(data, "labels") and not isinstance(data, Mapping):
        raise DataAccessError(f"AdaMerging: task {task}'s data is a labeled {type(data).__name__} (it has "
                              "`labels`); pass its inputs only")
    if isinstance(data, Mapping):
        return UnlabeledInputs({k: v for k, v in data.items() if k not in LABEL_KEYS})
    if isinstance(data, tuple) and len(data) == 2:
        y = data[1]
        if (isinstance(y, (np.ndarray, jax.Array)) and np.ndim(y) == 1
                and np.issubdtype(np.asarray(y).dtype, np.integer)
                and len(jax.tree.leaves(data[0])) and np.shape(jax.tree.leaves(data[0])[0])[:1] == np.shape(y)):
            raise DataAccessError(f"AdaMerging: task {task}'s data looks like an (inputs, labels) pair; labels "
                                  "are never read (SPEC §3): pass the inputs only")
    return data


def _num_examples(pool, task: int) -> int:
    sizes = {np.shape(a)[0] if np.ndim(a) else 0 for a in jax.tree.leaves(pool)}
    if len(sizes) != 1 or 0 in sizes:
        raise HyperparameterError(f"AdaMerging: task {task}'s inputs need one common, non-zero leading "
                                  f"(example) axis, got sizes {sorted(sizes)}")
    return sizes.pop()


def _sampler(batches, num_tasks: int, batch_size: int, seed: int) -> Callable[[int], list]:
    """``sample(step) -> [inputs of task t]``: from T pools (seeded, without replacement
    within a step) or from a user callable ``batches(step)``."""
    if callable(batches):
        def from_callable(step):
            got = list(batches(step))
            if len(got) != num_tasks:
                raise HyperparameterError(f"AdaMerging: batches({step}) gave {len(got)} batches for {num_tasks} tasks")
            return [_inputs_only(b, t) for t, b in enumerate(got)]

        return from_callable
    pools = list(batches)
    if len(pools) != num_tasks:
        raise HyperparameterError(f"AdaMerging: {len(pools)} input pools for {num_tasks} fine-tuned models")
    pools = [_inputs_only(p, t) for t, p in enumerate(pools)]
    sizes = [_num_examples(p, t) for t, p in enumerate(pools)]

    def sample(step):
        out = []
        for t, (pool, n) in enumerate(zip(pools, sizes)):
            idx = np.sort(np.random.default_rng([seed, step, t]).choice(n, size=min(batch_size, n), replace=False))
            out.append(jax.tree.map(lambda a: np.asarray(a)[idx], pool))
        return out

    return sample


# --------------------------------------------------------------------------- vectors and θ(λ)
@jax.jit
def _ties_vectors_leaf(p0, fts, thresholds):
    p = p0.astype(compute_dtype(p0.dtype))
    return jnp.stack(ties_elected_vectors(p, [ft.astype(p.dtype) for ft in fts], thresholds))


def _ties_vectors(pretrained, finetuned, flags, density):
    thresholds = ties_thresholds(pretrained, finetuned, flags, density)
    num_tasks = len(finetuned)

    def zeros(p0):
        return jnp.zeros((num_tasks,) + np.shape(p0), compute_dtype(jnp.result_type(p0)))

    # map_merged_leaves leaves unmerged leaves as θ0's; replace them by zero vectors below
    stacked = map_merged_leaves(lambda i, p0, fts: _ties_vectors_leaf(p0, tuple(fts), thresholds),
                                pretrained, finetuned, flags)
    leaves0, treedef = jax.tree.flatten(pretrained)
    out = [s if f and np.size(p0) > 0 else zeros(p0)
           for s, p0, f in zip(jax.tree.leaves(stacked), leaves0, flags)]
    return jax.tree.unflatten(treedef, out)


def stacked_vectors(pretrained: PyTree, finetuned: Sequence[PyTree], flags: Sequence[bool], vectors: str = "raw",
                    vector_hparams: Mapping | None = None) -> PyTree:
    """The vectors vt stacked per leaf (leading axis T; zeros on unmerged leaves):
    ``"raw"`` τt, ``"ties"`` TIES-trimmed and sign-elected τt (``density``, default 0.2),
    ``"breadcrumbs"`` mt ⊙ τt (``beta``, ``gamma``, ``granularity``, ``axis`` as
    :func:`bcjax.merge` with ``"breadcrumbs"``)."""
    hp = dict(vector_hparams or {})
    if vectors not in VECTORS:
        raise HyperparameterError(f"AdaMerging: vectors must be one of {VECTORS}, got {vectors!r}")
    if vectors == "ties":
        unknown = sorted(set(hp) - {"density"})
        if unknown:
            raise HyperparameterError(f"AdaMerging: unknown vector_hparams {unknown} for 'ties' (accepted: density)")
        return _ties_vectors(pretrained, finetuned, flags, hp.get("density", 0.2))
    if vectors == "raw" and hp:
        raise HyperparameterError(f"AdaMerging: vectors='raw' takes no vector_hparams, got {sorted(hp)}")
    paths = leaf_paths(pretrained)
    excluded = {p for p, f in zip(paths, flags) if not f}
    method = "task_arithmetic" if vectors == "raw" else "breadcrumbs"
    return task_deltas(method, pretrained, finetuned, exclude=lambda path, leaf: path in excluded, **hp)


def merged_params(pretrained: PyTree, deltas: PyTree, lambdas, merged: Sequence[int]) -> PyTree:
    """θ(λ) = θ0 + Σt λt Δt (traceable). ``lambdas``: [T] (task-wise) or [T, L] with column
    j for leaf ``merged[j]`` (layer-wise); leaves not in ``merged`` are θ0's."""
    leaves0, treedef = jax.tree.flatten(pretrained)
    dleaves = jax.tree.leaves(deltas)
    lambdas = jnp.asarray(lambdas)
    out = list(leaves0)
    for j, i in enumerate(merged):
        p0 = jnp.asarray(leaves0[i])
        dt = compute_dtype(p0.dtype)
        lam = (lambdas[:, j] if lambdas.ndim == 2 else lambdas).astype(dt)
        mixed = jnp.tensordot(lam, jnp.asarray(dleaves[i]).astype(dt), axes=1)
        out[i] = (p0.astype(dt) + mixed).astype(p0.dtype)
    return jax.tree.unflatten(treedef, out)


def mean_entropy(logits) -> jax.Array:
    """Mean over examples of −Σc pc log pc, p = softmax(logits) over the last axis (float32;
    classes at −∞ or −1e9 padding contribute 0)."""
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    p = jnp.exp(logp)
    return jnp.mean(-jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1))


# --------------------------------------------------------------------------- the compiled step
def _make_step(logits_fn, optimizer, merged, num_tasks: int, clamp, batch_tasks: bool = False):
    def loss_fn(lam, p0, deltas, batch):
        params = merged_params(p0, deltas, lam, merged)
        if batch_tasks:  # one vmapped pass over a traced task index (one trace instead of T)
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batch)
            ent = jax.vmap(lambda t, x: mean_entropy(logits_fn(params, t, x)))(jnp.arange(num_tasks), stacked)
            return jnp.mean(ent)
        return sum(mean_entropy(logits_fn(params, t, batch[t])) for t in range(num_tasks)) / num_tasks

    def step(lam, opt_state, p0, deltas, batch):
        loss, grad = jax.value_and_grad(loss_fn)(lam, p0, deltas, batch)
        updates, opt_state = optimizer.update(grad, opt_state, lam)
        lam = lam + updates
        if clamp is not None:
            lam = jnp.clip(lam, clamp[0], clamp[1])
        return lam, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1)), jax.jit(loss_fn)


def _optax():
    from bcjax._optional import requires

    with requires("train"):
        import optax
    return optax


def _clamp(clamp):
    if clamp is None or clamp is False:
        return None
    if clamp is True:
        return (0.0, 1.0)
    lo, hi = (float(c) for c in clamp)
    if not lo <= hi:
        raise HyperparameterError(f"AdaMerging: clamp must be (lo, hi) with lo <= hi, got {clamp}")
    return lo, hi


def _fingerprint(meta: Mapping) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:16]


@jax.jit
def _leaf_sums(leaves):
    return jnp.stack([jnp.sum(jnp.abs(x.astype(jnp.float32)), axis=tuple(range(1, x.ndim))) for x in leaves])


def _vector_checksums(deltas, merged) -> list:
    """Σ|vt| per merged leaf and task (identifies the vectors cheaply, on device)."""
    leaves = jax.tree.leaves(deltas)
    return np.asarray(_leaf_sums([leaves[i] for i in merged])).round(4).tolist() if merged else []


def _inputs_digest(pools, head: int = 16) -> str:
    """Shapes of every task's inputs and the bytes of its first ``head`` examples."""
    h = hashlib.sha256()
    for pool in pools:
        for a in jax.tree.leaves(pool):
            a = np.asarray(a)
            h.update(repr((a.shape, str(a.dtype))).encode())
            h.update(np.ascontiguousarray(a[:head]).tobytes())
    return h.hexdigest()[:16]


def _save_checkpoint(path, lam, opt_state, step, losses, fingerprint):
    tmp = path + ".tmp.npz"
    leaves = {f"opt_{k}": np.asarray(x) for k, x in enumerate(jax.tree.leaves(opt_state))}
    np.savez(tmp, lam=np.asarray(lam), step=np.int64(step), losses=np.asarray(losses, np.float64),
             fingerprint=np.asarray(fingerprint), **leaves)
    os.replace(tmp, path)


def _load_checkpoint(path, opt_state_like, fingerprint):
    if not os.path.exists(path):
        return None
    with np.load(path) as z:
        if str(z["fingerprint"]) != fingerprint:
            return None  # a different run's checkpoint: start over (it is overwritten)
        treedef = jax.tree.structure(opt_state_like)
        leaves = [jnp.asarray(z[f"opt_{k}"]) for k in range(treedef.num_leaves)]
        return jnp.asarray(z["lam"]), jax.tree.unflatten(treedef, leaves), int(z["step"]), list(z["losses"])


def load_coefficients(path: str) -> tuple[np.ndarray, dict]:
    """(λ, metadata) from a run's ``out_dir`` (or its ``coefficients.json``/``.npz``).
    λ is [T] (task-wise) or [T, L] (layer-wise, columns in ``metadata["leaf_paths"]`` order)."""
    base = path
    if os.path.isdir(path):
        base = os.path.join(path, "coefficients")
    base = base[:-5] if base.endswith(".json") else base[:-4] if base.endswith(".npz") else base
    with open(base + ".json") as f:
        meta = json.load(f)
    with np.load(base + ".npz") as z:
        lam = np.asarray(z["lambdas"])
    return lam, meta


def _check_lambdas(lam, num_tasks, num_merged, granularity):
    shape = (num_tasks,) if granularity == "task" else (num_tasks, num_merged)
    if np.shape(lam) != shape:
        what = "T tasks" if granularity == "task" else "T tasks × L merged leaves"
        raise HyperparameterError(f"AdaMerging: {granularity}-wise coefficients must have shape {shape} "
                                  f"({what}), got {np.shape(lam)}")


def _prepare(pretrained, finetuned, flags, vectors, vector_hparams):
    deltas = stacked_vectors(pretrained, finetuned, flags, vectors, vector_hparams)
    merged = [i for i, (p0, f) in enumerate(zip(jax.tree.leaves(pretrained), flags)) if f and np.size(p0) > 0]
    return deltas, merged


def apply_coefficients(pretrained: PyTree, finetuned: Sequence[PyTree], coefficients, *, vectors: str = "raw",
                       vector_hparams: Mapping | None = None, exclude=None) -> PyTree:
    """θ(λ) for saved coefficients (an array, or a path for :func:`load_coefficients`), no data needed."""
    flags = merged_leaf_flags(pretrained, exclude)
    return _apply(pretrained, list(finetuned), flags, coefficients, vectors, vector_hparams)


def _apply(pretrained, finetuned, flags, coefficients, vectors, vector_hparams):
    if isinstance(coefficients, (str, os.PathLike)):
        coefficients, meta = load_coefficients(os.fspath(coefficients))
        vectors, vector_hparams = meta.get("vectors", vectors), meta.get("vector_hparams", vector_hparams)
    lam = np.asarray(coefficients, np.float32)
    deltas, merged = _prepare(pretrained, finetuned, flags, vectors, vector_hparams)
    _check_lambdas(lam, len(finetuned), len(merged), "task" if lam.ndim == 1 else "layer")
    return jax.jit(merged_params, static_argnums=3)(pretrained, deltas, lam, tuple(merged))


def adamerging(logits_fn: Callable[[PyTree, int, Any], jax.Array], pretrained: PyTree, finetuned: Sequence[PyTree],
               batches, *, granularity: str = "layer", steps: int = 500, learning_rate: float = 1e-3,
               init: float = 0.3, clamp=None, vectors: str = "raw", vector_hparams: Mapping | None = None,
               seed: int = 0, batch_size: int = 16, exclude=None, out_dir: str | None = None,
               checkpoint_every: int = 50, progress: bool = True, mesh=None, mesh_axis: str | None = None,
               batch_tasks: bool = False, validate: bool = True) -> tuple[PyTree, np.ndarray]:
    """Learn AdaMerging coefficients λ by entropy minimisation (SPEC §3); returns (θ(λ), λ).

    Args:
      logits_fn: ``logits_fn(params, task, inputs) -> logits [B, C]``, ``task`` the task's
        index (a Python int, so a per-task head can be chosen statically); pure and jittable.
      pretrained, finetuned: θ0 and one tree per task, shaped like θ0.
      batches: the tasks' **unlabeled** inputs: a sequence of T pools (an array or pytree of
        arrays with a leading example axis; ``batch_size`` are drawn per task and step), or a
        callable ``batches(step) -> [inputs of task t]`` with fixed shapes.
      granularity: ``"layer"`` (λ [T, L], one per task and merged leaf) or ``"task"`` (λ [T]).
      steps, learning_rate, init: Adam steps (0: θ0 + init · Σ vt), learning rate, initial λ.
      clamp: None, True ([0, 1]) or (lo, hi): λ projected after every update.
      vectors, vector_hparams: ``"raw"`` | ``"ties"`` ({density}) | ``"breadcrumbs"``
        ({beta, gamma, granularity, axis}).
      seed: seeds the batch sampling (the only randomness).
      exclude: leaves copied from θ0 (as :func:`bcjax.merge`).
      out_dir: where coefficients, the loss log and checkpoints go (resumes from a checkpoint
        of the same run); ``checkpoint_every`` steps between checkpoints.
      mesh, mesh_axis: shard the stacked vectors over a mesh axis (each leaf's first axis
        after T that the axis size divides; :func:`bcjax.grids.leaf_shardings`).
      batch_tasks: ``logits_fn`` accepts a traced task index (e.g. it indexes stacked heads)
        and every task's batch has the same shapes: the T forward passes become one vmapped
        pass (T× less to trace and compile; one large batch instead of T small ones).

    Returns ``(merged_params, coefficients)`` with coefficients a float32 NumPy array.
    """
    if granularity not in GRANULARITIES:
        raise HyperparameterError(f"AdaMerging: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if int(steps) < 0 or int(batch_size) < 1 or int(checkpoint_every) < 1:
        raise HyperparameterError(f"AdaMerging: steps >= 0, batch_size >= 1 and checkpoint_every >= 1 needed, got "
                                  f"{steps}, {batch_size}, {checkpoint_every}")
    if not (np.isfinite(float(learning_rate)) and np.isfinite(float(init))):
        raise HyperparameterError(f"AdaMerging: learning_rate and init must be finite, got {learning_rate}, {init}")
    finetuned = list(finetuned)
    if validate:
        validate_models(pretrained, finetuned)
        check_finite([pretrained, *finetuned],
                     ["pretrained model", *(f"fine-tuned model {t}" for t in range(len(finetuned)))])
    flags = merged_leaf_flags(pretrained, exclude)
    return _adamerging(logits_fn, pretrained, finetuned, flags, batches, granularity=granularity, steps=int(steps),
                       learning_rate=float(learning_rate), init=float(init), clamp=_clamp(clamp), vectors=vectors,
                       vector_hparams=vector_hparams, seed=int(seed), batch_size=int(batch_size), out_dir=out_dir,
                       checkpoint_every=int(checkpoint_every), progress=progress, mesh=mesh, mesh_axis=mesh_axis,
                       batch_tasks=bool(batch_tasks))


def _adamerging(logits_fn, pretrained, finetuned, flags, batches, *, granularity, steps, learning_rate, init, clamp,
                vectors, vector_hparams, seed, batch_size, out_dir, checkpoint_every, progress, mesh, mesh_axis,
                batch_tasks=False):
    optax = _optax()
    num_tasks = len(finetuned)
    deltas, merged = _prepare(pretrained, finetuned, flags, vectors, vector_hparams)
    if mesh is not None:
        from bcjax.grids import leaf_shardings

        if mesh_axis is None:
            raise HyperparameterError("AdaMerging: mesh given without mesh_axis")
        deltas = jax.device_put(deltas, leaf_shardings(deltas, mesh, mesh_axis, skip_leading=1))
    paths = leaf_paths(pretrained)
    shape = (num_tasks,) if granularity == "task" else (num_tasks, len(merged))
    lam = jnp.full(shape, init, jnp.float32)
    if clamp is not None:
        lam = jnp.clip(lam, *clamp)
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(lam)
    meta = dict(method="adamerging", granularity=granularity, learning_rate=learning_rate, init=init,
                clamp=list(clamp) if clamp else None, vectors=vectors, vector_hparams=dict(vector_hparams or {}),
                seed=seed, batch_size=batch_size, num_tasks=num_tasks,
                leaf_paths=[paths[i] for i in merged])
    start, losses = 0, []
    ckpt = os.path.join(out_dir, "adamerging_checkpoint.npz") if out_dir else None
    if not callable(batches):
        batches = list(batches)  # an iterable of pools is read once
    if ckpt:
        # a checkpoint is resumed only by the same run: same hyper-parameters, vectors and inputs
        fingerprint = _fingerprint(dict(meta, vectors_sum=_vector_checksums(deltas, merged),
                                        inputs=None if callable(batches) else
                                        _inputs_digest([_inputs_only(b, t) for t, b in enumerate(batches)])))
        os.makedirs(out_dir, exist_ok=True)
        restored = _load_checkpoint(ckpt, opt_state, fingerprint)
        if restored is not None and restored[2] <= steps:
            lam, opt_state, start, losses = restored
    if start < steps:
        p0 = jax.tree.map(jnp.asarray, pretrained)  # on device once, not per step
        sample = _sampler(batches, num_tasks, batch_size, seed)
        step_fn, _ = _make_step(logits_fn, optimizer, tuple(merged), num_tasks, clamp, batch_tasks)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, initial=start, desc=f"AdaMerging ({granularity}-wise, {vectors})", unit="step")
        pending = []
        for s in range(start, steps):
            lam, opt_state, loss = step_fn(lam, opt_state, p0, deltas, sample(s))
            pending.append(loss)
            if bar is not None:
                bar.update(1)
            if (s + 1) % checkpoint_every == 0 or s + 1 == steps:
                losses.extend(float(x) for x in jax.device_get(pending))
                pending = []
                if bar is not None:
                    bar.set_postfix(entropy=f"{losses[-1]:.4f}")
                if ckpt:
                    _save_checkpoint(ckpt, lam, opt_state, s + 1, losses, fingerprint)
        if bar is not None:
            bar.close()
    coefficients = np.asarray(lam, np.float32)
    merged_tree = jax.jit(merged_params, static_argnums=3)(pretrained, deltas, lam, tuple(merged))
    if out_dir:
        record = dict(meta, steps=steps, loss=losses, lambdas=coefficients.tolist())
        with open(os.path.join(out_dir, "coefficients.json"), "w") as f:
            json.dump(record, f, indent=1)
        np.savez(os.path.join(out_dir, "coefficients.npz"), lambdas=coefficients, loss=np.asarray(losses))
    return merged_tree, coefficients


@register_method("adamerging", requires=("model_fn", "unlabeled_batches", "work_dir"),
                 hparams={"steps": hparams.Integer(0), "learning_rate": hparams.Real(0.0, low_open=True),
                          "init": hparams.Real(), "seed": hparams.Integer(), "batch_size": hparams.Integer(1),
                          "checkpoint_every": hparams.Integer(1)})
def adamerging_method(pretrained, finetuned, flags, *, model_fn=None, unlabeled_batches=None, work_dir=None,
                      coefficients=None, granularity="layer", steps=500, learning_rate=1e-3, init=0.3, clamp=None,
                      vectors="raw", vector_hparams=None, seed=0, batch_size=16, out_dir=None, checkpoint_every=50,
                      progress=False):
    """AdaMerging (Yang et al., SPEC §3): θ0 + Σt λt ⊙ vt, λ (per task or per task and leaf) minimising the entropy on unlabeled inputs.

    Requirements (:data:`bcjax.merging.REQUIREMENTS`, supplied per task by the runner):
      model_fn: one ``logits = model_fn[t](params, inputs)`` per fine-tuned model, applying
        that task's head (pure, jittable).
      unlabeled_batches: one pool of task t's **unlabeled** inputs per fine-tuned model (its
        test inputs without labels: test-time adaptation), an array or pytree of arrays with
        a leading example axis; ``batch_size`` are drawn per task and step.
      work_dir: where the runner keeps this merge's state (``out_dir`` when that is not
        given): the learned coefficients and the final checkpoint, so the same merge asked
        for again (e.g. the select experiment scoring its chosen point on test) reloads λ
        instead of re-running the optimisation.

    Internally ``logits_fn(params, t, x) = model_fn[t](params, x)`` with t a Python int
    (one traced forward pass per task) for :func:`adamerging`. Saved ``coefficients`` (an
    array or a path, :func:`load_coefficients`) skip the optimisation and need neither.
    Other hyper-parameters as :func:`adamerging`.
    """
    finetuned = list(finetuned)
    if coefficients is not None:
        return _apply(pretrained, finetuned, list(flags), coefficients, vectors, vector_hparams)
    if model_fn is None or unlabeled_batches is None:
        raise HyperparameterError("adamerging needs `model_fn` (per task: (params, inputs) -> logits) and "
                                  "`unlabeled_batches` (per task: unlabeled inputs), or saved `coefficients`")
    model_fn, unlabeled_batches = list(model_fn), list(unlabeled_batches)
    for what, got in (("model_fn", model_fn), ("unlabeled_batches", unlabeled_batches)):
        if len(got) != len(finetuned):
            raise HyperparameterError(f"adamerging: {len(got)} `{what}` entries for {len(finetuned)} fine-tuned "
                                      "models (one per task)")
    if granularity not in GRANULARITIES:
        raise HyperparameterError(f"AdaMerging: granularity must be one of {GRANULARITIES}, got {granularity!r}")

    def logits_fn(params, task, x):  # task: a Python int (unrolled, one pass per task)
        return model_fn[task](params, x)

    out_dir = work_dir if out_dir is None else out_dir
    merged, _ = _adamerging(logits_fn, pretrained, finetuned, list(flags), unlabeled_batches,
                            granularity=granularity, steps=int(steps), learning_rate=float(learning_rate),
                            init=float(init), clamp=_clamp(clamp), vectors=vectors, vector_hparams=vector_hparams,
                            seed=int(seed), batch_size=int(batch_size), out_dir=out_dir,
                            checkpoint_every=int(checkpoint_every), progress=progress, mesh=None, mesh_axis=None,
                            batch_tasks=False)
    return merged
