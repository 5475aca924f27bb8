"""The evaluation engine shared by every experiment: reference accuracies, chunked evaluation
of stacked merged models through the resumable results store, and model builders.

A *builder* is ``build(indices) -> stacked trees``: the merged models of rows ``indices`` of an
indicator matrix (subsets of tasks). Methods registered ``linear=True`` are built by one
contraction per leaf (:func:`bcjax.sweeps.subset_merges`); the rest by :func:`bcjax.merge`
per subset, with what the method ``requires`` obtained from the suite (:func:`method_inputs`).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bcjax.experiments.suite import ModelSuite
from bcjax.results_store import finite_number, numbers_for

__all__ = ["reference_accuracy", "evaluate_models", "evaluate_correctness", "reference_correctness",
           "pack_correctness", "unpack_correctness", "normalized", "mean_normalized", "members", "jsonable",
           "method_inputs", "state_dir", "method_builder", "lazy_builder", "grid_builder", "pad_chunk", "progress_bar"]


def pad_chunk(indices: Sequence[int], size: int) -> np.ndarray:
    """``indices`` padded to ``size`` by repeating the last one: every chunk has one shape, so
    one compilation serves all (the last, short chunk included)."""
    from bcjax.batching import pad_rows

    return pad_rows(np.asarray(list(indices)), size)


def progress_bar(total: int, desc: str, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def reference_accuracy(suite: ModelSuite, store, split: str) -> dict[str, float]:
    """acc(θk, k) on ``split`` for every task (the normalizer of SPEC §4), stored; derived from
    the per-example correctness (:func:`reference_correctness`) when the suite provides it."""
    from bcjax.evaluate import stack_trees

    def compute(ft, t):
        if suite.correctness is not None:  # one pass: the mean of the stored per-example correctness
            return _accuracy_of(_stored_hits(suite, store, "finetuned_acc", ft, [t], split, task=t)[t])
        return float(suite.evaluate(stack_trees([ft]), t, split)[0])

    out = {}
    for t, ft in zip(suite.tasks, suite.finetuned, strict=True):
        out[t] = store.get_or_compute(dict(kind="finetuned_acc", suite=suite.fingerprint, task=t, split=split),
                                      lambda ft=ft, t=t: compute(ft, t), check=finite_number)
        if out[t] <= 0:
            raise ValueError(f"task {t!r}: the fine-tuned model's {split} accuracy is 0; normalized accuracy is "
                             "undefined")
    return out


def evaluate_models(suite: ModelSuite, store, keys: Sequence[Mapping], tasks_of: Sequence[Sequence[str]],
                    build: Callable[[np.ndarray], Any], split: str, *, chunk: int, progress: bool = True,
                    desc: str = "models") -> list[dict[str, float]]:
    """Accuracies ``{task: acc}`` of model i on ``tasks_of[i]`` (``split``) for every key.

    Models whose key is in ``store`` are not rebuilt; the rest are built ``chunk`` at a time
    by ``build(indices) -> stacked trees`` (indices padded by :func:`pad_chunk`), evaluated
    with the models vmapped, and stored as soon as their chunk is done — a killed sweep loses
    at most one chunk.
    """
    todo = [i for i, k in enumerate(keys) if not store.expect(dict(k), numbers_for(tasks_of[i]))]
    _evaluate_in_chunks(suite, todo, tasks_of, build, lambda stacked, t: suite.evaluate(stacked, t, split),
                        lambda i, rows: store.put(dict(keys[i]), {t: float(r) for t, r in rows.items()}),
                        chunk=chunk, progress=progress, desc=desc)
    return [_in_order(store.get(dict(k)), tasks_of[i]) for i, k in enumerate(keys)]


def _evaluate_in_chunks(suite: ModelSuite, todo: Sequence[int], tasks_of: Sequence[Sequence[str]],
                        build: Callable[[np.ndarray], Any], score: Callable[[Any, str], Any],
                        record: Callable[[int, dict], None], *, chunk: int, progress: bool, desc: str) -> None:
    """The chunked loop shared by :func:`evaluate_models` and :func:`evaluate_correctness`:
    models ``todo`` are built ``chunk`` at a time, every task some model of the chunk needs is
    scored once for the whole chunk (``score(stacked, task)``, one row per model), and
    ``record(i, {task: row})`` stores model i's rows before the next chunk is built."""
    bar = progress_bar(len(todo), desc, progress)
    for s in range(0, len(todo), chunk):
        idx = todo[s:s + chunk]
        stacked = build(pad_chunk(idx, chunk))
        needed = sorted({t for i in idx for t in tasks_of[i]}, key=list(suite.tasks).index)
        rows = {t: np.asarray(score(stacked, t)) for t in needed}
        for j, i in enumerate(idx):
            record(i, {t: rows[t][j] for t in tasks_of[i]})
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()


def _in_order(acc: Mapping[str, float], tasks: Sequence[str]) -> dict[str, float]:
    """``acc`` in the order of ``tasks``: the store's JSON sorts keys, and means over tasks must
    not depend on whether a value was computed now or read back (floating-point summation order)."""
    return {t: acc[t] for t in tasks}


def pack_correctness(correct: np.ndarray) -> dict:
    """bool[n] → ``{"n": n, "bits": hex of numpy.packbits}`` (JSON for the results store)."""
    c = np.asarray(correct, bool)
    return {"n": int(c.size), "bits": np.packbits(c).tobytes().hex()}


def packed_for(tasks: Sequence[str]) -> Callable[[Any], str | None]:
    """A results-store ``check`` (:meth:`bcjax.results_store.ResultsStore.expect`): a mapping
    holding a :func:`pack_correctness` value for every task (the right number of hex digits)."""
    def check(value):
        if not isinstance(value, Mapping):
            return "per-example value is not a mapping"
        for t in tasks:
            p = value.get(t)
            if not (isinstance(p, Mapping) and isinstance(p.get("n"), int) and not isinstance(p["n"], bool)
                    and p["n"] >= 0 and isinstance(p.get("bits"), str) and len(p["bits"]) == 2 * -(-p["n"] // 8)):
                return f"task {t!r}: not packed correctness {{n, bits}}"
            try:
                bytes.fromhex(p["bits"])
            except ValueError:
                return f"task {t!r}: bits are not hex"
        return None

    return check


def unpack_correctness(packed: Mapping) -> np.ndarray:
    """Inverse of :func:`pack_correctness`."""
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(packed["bits"]), np.uint8))
    return bits[: int(packed["n"])].astype(bool)


def _accuracy_of(correct: np.ndarray) -> float:
    """count / n in float64: bit-identical to :func:`bcjax.evaluate.accuracy` (int / int)."""
    return float(np.count_nonzero(correct) / correct.size)


def evaluate_correctness(suite: ModelSuite, store, keys: Sequence[Mapping], tasks_of: Sequence[Sequence[str]],
                         build: Callable[[np.ndarray], Any], split: str, *, chunk: int, progress: bool = True,
                         desc: str = "models") -> tuple[list[dict[str, float]], list[dict[str, np.ndarray]]]:
    """:func:`evaluate_models` through ``suite.correctness``, in one evaluation pass:
    ``(accuracies, correctness)`` per key, ``correctness[i][t]`` = bool[n_t] and the accuracy
    its mean (count / n, as :func:`bcjax.evaluate.accuracy`).

    The correctness is stored under ``key | {"per_example": True}`` and the accuracy under
    ``key`` (only if absent: an accuracy stored by an earlier run is kept, and a derived one
    that differs from it is reported by a :class:`RuntimeWarning`)."""
    import warnings

    if suite.correctness is None:
        raise ValueError(f"suite {suite.name!r} does not provide per-example correctness")
    ckeys = [dict(k, per_example=True) for k in keys]

    def record(i, hits):
        acc = {t: _accuracy_of(h) for t, h in hits.items()}
        stored = store.get(dict(keys[i])) if store.expect(dict(keys[i]), numbers_for(list(acc))) else None
        if stored is None:
            store.put(dict(keys[i]), acc)
        elif any(stored.get(t) != a for t, a in acc.items()):
            warnings.warn(f"{dict(keys[i])}: stored accuracies {stored} differ from the per-example "
                          f"correctness ({acc}); the stored ones are reported", RuntimeWarning, stacklevel=3)
        store.put(ckeys[i], {t: pack_correctness(h) for t, h in hits.items()})

    todo = [i for i, k in enumerate(ckeys)
            if not (store.expect(k, packed_for(tasks_of[i])) and store.expect(dict(keys[i]), numbers_for(tasks_of[i])))]
    _evaluate_in_chunks(suite, todo, tasks_of, build,
                        lambda stacked, t: np.asarray(suite.correctness(stacked, t, split), bool), record,
                        chunk=chunk, progress=progress, desc=desc)
    accs = [_in_order(store.get(dict(k)), tasks_of[i]) for i, k in enumerate(keys)]
    correct = [{t: unpack_correctness(store.get(k)[t]) for t in tasks_of[i]} for i, k in enumerate(ckeys)]
    return accs, correct


def _stored_hits(suite: ModelSuite, store, kind: str, tree, tasks: Sequence[str], split: str, **key) -> dict:
    """Per-example correctness of one model (θ0 or a θk) on ``tasks``, stored as
    ``{kind, suite, split, per_example: True, **key}``."""
    from bcjax.evaluate import stack_trees

    key = dict(kind=kind, suite=suite.fingerprint, split=split, per_example=True, **key)
    if not store.expect(key, packed_for(tasks)):
        stacked = stack_trees([tree])
        store.put(key, {t: pack_correctness(np.asarray(suite.correctness(stacked, t, split), bool)[0]) for t in tasks})
    stored = store.get(key)  # keys come back sorted from the store's JSON: keep the task order
    return {t: unpack_correctness(stored[t]) for t in tasks}


def reference_correctness(suite: ModelSuite, store, split: str) -> dict[str, dict[str, np.ndarray]]:
    """Per-example correctness of the references on ``split``: ``{"pretrained": {task: bool[n]},
    "finetuned": {task: bool[n]}}`` (θ0 on every task; θk on its own task k), stored. Their
    means are :func:`reference_accuracy` (fine-tuned) and θ0's accuracies."""
    tasks = list(suite.tasks)
    pre = _stored_hits(suite, store, "pretrained_acc", suite.pretrained, tasks, split)
    ft = {t: _stored_hits(suite, store, "finetuned_acc", tree, [t], split, task=t)[t]
          for t, tree in zip(tasks, suite.finetuned, strict=True)}
    return {"pretrained": pre, "finetuned": ft}


def normalized(acc: Mapping[str, float], ref: Mapping[str, float]) -> dict[str, float]:
    return {t: a / ref[t] for t, a in acc.items()}


def mean_normalized(acc: Mapping[str, float], ref: Mapping[str, float]) -> float:
    return float(np.mean(list(normalized(acc, ref).values())))


def members(suite: ModelSuite, row) -> list[str]:
    return [t for t, on in zip(suite.tasks, row, strict=True) if on]


def jsonable(v):
    if isinstance(v, Mapping):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def state_dir(store) -> str | None:
    """The folder of a run's method state (``work_dir`` requirements): ``method_state/`` beside
    the results store's file; None for an in-memory store."""
    import os

    return os.path.join(os.path.dirname(os.path.abspath(store.path)), "method_state") if store.path else None


def method_inputs(suite: ModelSuite, method: str, hparams: Mapping, tasks: Sequence[str], *,
                  seed: int | None = None, work_dir: str | None = None) -> dict:
    """``hparams`` plus what ``method`` requires (:data:`bcjax.merging.REQUIREMENTS`) for merging
    ``tasks``: a PRNG key from the hyper-parameter ``seed`` (else ``seed``, else the suite's) for ``"key"``;
    for ``"work_dir"`` the folder ``<work_dir>/<method>/<hash of suite, hyper-parameters and tasks>``
    (None without ``work_dir``); the suite's per-task values (:meth:`ModelSuite.requirement`) for
    the others. No runner names a method."""
    import os

    from bcjax.experiments.suite import fingerprint
    from bcjax.merging import get_method

    m = get_method(method)
    hp = dict(hparams)
    point = dict(suite=suite.fingerprint, method=method, hparams=jsonable(hp), tasks=list(tasks))
    if "key" in m.requires:  # `seed` makes the key; for other methods it is a hyper-parameter of their own
        seed = hp.pop("seed", suite.seed if seed is None else seed)
    for need in m.requires:
        if need == "key":
            hp["key"] = jax.random.key(int(seed))
        elif need == "work_dir":
            hp["work_dir"] = os.path.join(work_dir, method, fingerprint(point)) if work_dir else None
        else:
            hp[need] = suite.requirement(need, tasks, method=method)
    return hp


def method_builder(suite: ModelSuite, method: str, hparams: Mapping, indicator: np.ndarray,
                   mesh: Mesh | None = None, *, contract: bool = True, work_dir: str | None = None) -> Callable:
    """``build(indices)`` for merged models of the subsets ``indicator[indices]``: one
    contraction per leaf for methods registered ``linear=True`` (unless ``contract`` is False),
    else ``bcjax.merge`` per subset (``work_dir``: the run's :func:`state_dir`, for methods
    requiring one, :func:`method_inputs`).

    With a one-axis ``mesh``, the stacked task vectors Δ are sharded over it (each leaf's
    first divisible parameter axis, :func:`bcjax.grids.leaf_shardings`) and the contraction
    runs as a jitted program with those ``in_shardings``; results are bit-identical."""
    from bcjax import sweeps
    from bcjax.evaluate import stack_trees
    from bcjax.merging import get_method, merge

    m = get_method(method)
    hp = dict(hparams)
    if m.linear and contract:
        alpha = m.normalize({"alpha": hp.pop("alpha", m.hparams.get("alpha", 1.0))})["alpha"]  # bcjax.hparams
        deltas = sweeps.task_deltas(method, suite.pretrained, suite.finetuned, exclude=suite.exclude, **hp)
        if mesh is None:
            return lambda idx: sweeps.subset_merges(suite.pretrained, deltas, indicator[idx], alpha)
        from bcjax import grids

        axis = mesh.axis_names[0]
        d_sh = grids.leaf_shardings(deltas, mesh, axis, skip_leading=1)
        deltas = jax.device_put(deltas, d_sh)
        rep = NamedSharding(mesh, P())
        kernel = grids.subset_merge_kernel(in_shardings=(jax.tree.map(lambda _: rep, suite.pretrained), d_sh,
                                                         rep, rep))
        return lambda idx: kernel(suite.pretrained, deltas, jnp.asarray(indicator[idx]), jnp.float32(alpha))

    def build(idx):
        trees = []
        for i in idx:
            names = members(suite, indicator[i])
            fts = [f for f, on in zip(suite.finetuned, indicator[i], strict=True) if on]
            trees.append(merge(method, suite.pretrained, fts, exclude=suite.exclude,
                               **method_inputs(suite, method, hp, names, work_dir=work_dir))
                         if fts else suite.pretrained)
        stacked = stack_trees(trees)
        if mesh is not None:  # replicate over the mesh: bit-identical, evaluated like the sharded ones
            stacked = jax.device_put(stacked, NamedSharding(mesh, P()))
        return stacked

    return build


def lazy_builder(suite: ModelSuite, method: str, hparams: Mapping, indicator: np.ndarray,
                 mesh: Mesh | None = None, *, contract: bool = True, work_dir: str | None = None) -> Callable:
    """:func:`method_builder`, set up (task deltas) only if some point is not stored yet."""
    state = {}

    def build(idx):
        if "fn" not in state:
            state["fn"] = method_builder(suite, method, hparams, indicator, mesh, contract=contract,
                                         work_dir=work_dir)
        return state["fn"](idx)

    return build


def grid_builder(suite: ModelSuite, pairs, points, rows: np.ndarray, point_of: np.ndarray,
                 mesh: Mesh | None = None):
    """``build(indices)``: model i is Breadcrumbs grid point ``points[point_of[i]]`` = (α, β, γ)
    merged over the tasks in ``rows[i]`` (one threshold pass per leaf × task for the whole
    grid, computed lazily). With a one-axis ``mesh`` the stacked task vectors are sharded over
    it (as in :func:`method_builder`); results are bit-identical."""
    from bcjax import grids

    state = {}

    def build(idx):
        if "th" not in state:
            state["taus"] = grids.stack_task_vectors(suite.pretrained, suite.finetuned, exclude=suite.exclude)
            state["th"] = grids.grid_threshold_bits(state["taus"], pairs)
            if mesh is not None:
                rep = NamedSharding(mesh, P())
                t_sh = grids.leaf_shardings(state["taus"], mesh, mesh.axis_names[0], skip_leading=1)
                state["taus"] = jax.device_put(state["taus"], t_sh)
                state["kernel"] = grids.merges_kernel(in_shardings=(
                    jax.tree.map(lambda _: rep, suite.pretrained), t_sh,
                    jax.tree.map(lambda _: rep, state["th"]), rep, rep))
        pts = [points[point_of[i]] for i in idx]
        weights = np.array([[a * float(v) for v in rows[i]] for i, (a, _, _) in zip(idx, pts, strict=True)], np.float32)
        gidx = np.array([pairs.index((b, g)) for _, b, g in pts], np.int32)
        return grids.weighted_masked_merges(suite.pretrained, state["taus"], state["th"], weights, gidx,
                                            kernel=state.get("kernel"))

    return build
