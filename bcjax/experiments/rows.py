"""Rows of a FusionBench-style table (SPEC §3 references, §4 robustness / generalization /
scaling): one merged model per method, per-example correctness of any model on a task's
examples (clean or corrupted), stored in the results store, and each row's average with its
95% bootstrap interval (:mod:`bcjax.stats`, SPEC §4 "Uncertainty").

A *row* is ``{task: bool[n_t]}``: which of task t's examples a model gets right. Shared by
:mod:`~bcjax.experiments.robustness`, :mod:`~bcjax.experiments.generalization`,
:mod:`~bcjax.experiments.scaling` and :mod:`~bcjax.experiments.fusionbench`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from bcjax.experiments.engine import method_builder, pack_correctness, unpack_correctness
from bcjax.experiments.suite import MissingRequirementError, ModelSuite

__all__ = ["labelled", "merged_model", "needs", "stored_row", "row_of_tree", "stored_losses", "losses_of_tree",
           "score_rows", "EVAL_BATCH"]

#: Examples per compiled evaluation call of :func:`row_of_tree` (padded; one compilation per predictor).
EVAL_BATCH = 64


def labelled(methods) -> list[tuple[str, str, dict]]:
    """``(label, method, hparams)`` per method entry (its first hyper-parameter point): the label is
    the method's name, or, when several entries share it, the name plus the hyper-parameters in
    which they differ and that this entry sets to a scalar (``adamerging[granularity=layer,vectors=breadcrumbs]``)."""
    points = [(m.name, dict(m.points()[0])) for m in methods]
    out = []
    for name, hp in points:
        same = [h for n, h in points if n == name]
        if len(same) == 1:
            out.append((name, name, hp))
            continue
        keys = sorted({k for h in same for k in h if any(h.get(k) != o.get(k) for o in same)})
        scalar = [k for k in keys if k in hp and not isinstance(hp[k], (dict, list))]
        out.append((f"{name}[{','.join(f'{k}={hp[k]}' for k in scalar)}]", name, hp))
    labels = [lab for lab, _, _ in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"method entries are not distinguishable: {labels}")
    return out


def needs(suite: ModelSuite, *fields: str, what: str) -> None:
    """Raise :class:`MissingRequirementError` naming ``what`` if ``suite`` lacks one of ``fields``."""
    missing = [f for f in fields if getattr(suite, f) is None]
    if missing:
        raise MissingRequirementError(f"{what} needs the model suite's {missing}, which suite {suite.name!r} "
                                      "does not provide")


def merged_model(suite: ModelSuite, method: str, hparams: Mapping, tasks: Sequence[str] | None = None, *,
                 work_dir: str | None = None) -> Any:
    """The method's merge of ``tasks`` (default: all) as a stack of one tree (the core
    :func:`bcjax.merge`, with what the method requires from the suite); θ0 when ``tasks`` is empty.
    ``work_dir``: the run's :func:`bcjax.experiments.engine.state_dir` (state such as AdaMerging's
    learned coefficients is then reused across runs)."""
    names = list(suite.tasks) if tasks is None else list(tasks)
    unknown = sorted(set(names) - set(suite.tasks))
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; the suite's tasks: {list(suite.tasks)}")
    row = np.array([[t in names for t in suite.tasks]])
    return method_builder(suite, method, hparams, row, contract=False, work_dir=work_dir)(np.array([0]))


def stored_row(store, key: Mapping, tasks: Sequence[str], compute: Callable[[list[str]], Mapping]) -> dict:
    """``{task: bool[n]}`` stored under ``key`` (per-example correctness, packed); the tasks not
    stored yet are computed by ``compute(missing_tasks)`` and stored (a rerun resumes)."""
    stored = dict(store.get(dict(key)) or {})
    missing = [t for t in tasks if t not in stored]
    if missing:
        stored.update({t: pack_correctness(h) for t, h in compute(missing).items()})
        store.put(dict(key), stored)
    return {t: unpack_correctness(stored[t]) for t in tasks}


def row_of_tree(suite: ModelSuite, stacked: Any, tasks: Sequence[str], split: str,
                inputs: Callable[[str], np.ndarray] | None = None) -> dict:
    """``{task: bool[n]}`` of the one model in ``stacked`` on ``split``: through
    ``suite.correctness`` (or ``suite.evaluate``'s examples) on the clean examples; with
    ``inputs(task) -> x`` (e.g. corrupted test images), through the task's ``model_fn`` on
    those inputs and ``suite.examples``' labels."""
    from bcjax.evaluate import correctness_of_stack

    if inputs is None and suite.correctness is not None:
        return {t: np.asarray(suite.correctness(stacked, t, split), bool)[0] for t in tasks}
    needs(suite, "examples", what="scoring a model on given inputs")
    out = {}
    for t in tasks:
        x, y = suite.examples(t, split)
        x = x if inputs is None else inputs(t)
        predict = suite.requirement("model_fn", [t], method="(evaluation)")[0]
        out[t] = correctness_of_stack(predict, stacked, x, y, batch_size=min(EVAL_BATCH, len(y)),
                                      models_per_call=1)[0]
    return out


def stored_losses(store, key: Mapping, tasks: Sequence[str], compute: Callable[[list[str]], Mapping]) -> dict:
    """``{task: mean cross-entropy}`` stored under ``key`` (as :func:`stored_row`; pass a key
    distinct from the accuracy row's); the tasks not stored yet are ``compute(missing_tasks)``."""
    from bcjax.results_store import finite_number

    stored = dict(store.get(dict(key)) or {})
    missing = [t for t in tasks if t not in stored or finite_number(stored[t]) is not None]
    if missing:
        stored.update({t: float(v) for t, v in compute(missing).items()})
        store.put(dict(key), stored)
    return {t: float(stored[t]) for t in tasks}


def losses_of_tree(suite: ModelSuite, stacked: Any, tasks: Sequence[str], split: str) -> dict:
    """``{task: mean cross-entropy}`` of the one model in ``stacked`` on ``split``, through
    ``suite.loss`` (on the examples ``suite.evaluate`` scores)."""
    needs(suite, "loss", what="the per-task loss")
    return {t: float(np.asarray(suite.loss(stacked, t, split))[0]) for t in tasks}


def score_rows(rows: Mapping[str, Mapping[str, np.ndarray]], finetuned: Mapping[str, np.ndarray], *,
               num_resamples: int = 1000, seed: int = 0, hparams: Mapping[str, Mapping] | None = None) -> dict:
    """Per row: ``{task: {"accuracy", "ci95"}, "average", "average_ci95", "normalized_average",
    "normalized_average_ci95"}`` (fractions), the intervals a seeded percentile bootstrap over
    each task's examples, paired across rows (:func:`bcjax.stats.method_intervals`); normalized by
    ``finetuned`` (each task's own fine-tuned model on the same examples, resampled with it).
    ``hparams[row]`` is copied into the row when given."""
    from bcjax import stats

    if not rows:
        return {}
    tasks = list(finetuned)
    ordered = {r: {t: np.asarray(h[t], bool) for t in tasks} for r, h in rows.items()}
    raw = stats.method_intervals(ordered, None, num_resamples=num_resamples, seed=seed)
    norm = stats.method_intervals(ordered, {t: np.asarray(finetuned[t], bool) for t in tasks},
                                  num_resamples=num_resamples, seed=seed)
    out = {}
    for r in ordered:
        row = {t: {"accuracy": raw[r]["per_task"][t]["mean"], "ci95": raw[r]["per_task"][t]["ci95"]} for t in tasks}
        row.update(average=raw[r]["avg"]["mean"], average_ci95=raw[r]["avg"]["ci95"],
                   normalized_average=norm[r]["avg"]["mean"], normalized_average_ci95=norm[r]["avg"]["ci95"])
        if hparams and r in hparams:
            row["hparams"] = dict(hparams[r])
        out[r] = row
    return out
