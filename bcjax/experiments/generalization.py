"""Unseen-task generalization (SPEC §4, FusionBench Table 5): each method merges only the
``seen`` tasks; the merged model is scored on the seen tasks and on the held-out ``unseen``
ones (their heads exist, their task vectors are not merged). Data-dependent methods get only
the seen tasks' data (Grams, Fishers, AdaMerging's unlabeled inputs).

FusionBench's CLIP setting (ViT-B/32, 8 tasks, after AdaMerging's Table 5) merges six tasks and
holds out two, in two experiments (its model pools ``clip-vit-base-patch32_generalization_exp1``
and ``_exp2``): :data:`FUSIONBENCH_CLIP_SEEN` gives their seen tasks in the CLIP pipeline's task
names (its ``stanford-cars`` is our ``cars``) — pass one as ``seen:`` on the CLIP suite. Default,
on any suite: hold out the last ⌊T/3⌋ tasks (at least one) — on the embedded quick suite, digits.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from bcjax.experiments.engine import jsonable, state_dir
from bcjax.experiments.registry import register_experiment
from bcjax.experiments.rows import labelled, merged_model, row_of_tree, score_rows, stored_row
from bcjax.experiments.settings import MethodSpec
from bcjax.experiments.subsets import DEFAULT_METHODS

__all__ = ["GeneralizationSettings", "generalization_experiment", "default_seen", "FUSIONBENCH_CLIP_SEEN"]

#: FusionBench's two CLIP generalization splits: the six merged tasks of each (unseen: exp1 mnist
#: and eurosat, exp2 resisc45 and svhn), in the task names of ``configs/clip_vit_b32.yaml``.
FUSIONBENCH_CLIP_SEEN = {
    "exp1": ["sun397", "cars", "resisc45", "dtd", "svhn", "gtsrb"],
    "exp2": ["sun397", "cars", "gtsrb", "eurosat", "dtd", "mnist"],
}


@dataclasses.dataclass(frozen=True)
class GeneralizationSettings:
    methods: list[MethodSpec] = dataclasses.field(default_factory=lambda: list(DEFAULT_METHODS))
    seen: list[str] | None = None  # None: all but the last ⌊T/3⌋ tasks (at least one held out)
    split: str = "test"
    bootstrap_resamples: int = 1000
    bootstrap_seed: int = 0


def default_seen(tasks: Sequence[str]) -> list[str]:
    """All but the last ``max(1, ⌊T/3⌋)`` tasks."""
    if len(tasks) < 2:
        raise ValueError(f"generalization needs at least 2 tasks, the suite has {list(tasks)}")
    return list(tasks)[: len(tasks) - max(1, len(tasks) // 3)]


def _part(row: Mapping, names: Sequence[str], key: str) -> float:
    return float(np.mean([row[t][key] for t in names]))


def generalization_experiment(suite, store, *, methods: Sequence[MethodSpec], seen: Sequence[str] | None = None,
                              split: str = "test", bootstrap_resamples: int = 1000, bootstrap_seed: int = 0,
                              progress: bool = True, labels: Sequence[str] | None = None) -> dict:
    """Per method (its first hyper-parameter point): the merge of ``seen`` scored on every task;
    ``rows`` as :func:`bcjax.experiments.rows.score_rows` plus ``seen`` / ``unseen`` (mean
    accuracy over those tasks) and ``seen_normalized`` / ``unseen_normalized``; the pretrained
    model θ0 as a reference row (it has seen nothing). Rows are keyed by
    :func:`bcjax.experiments.rows.labelled`, or by ``labels`` (one per method) when given."""
    from bcjax.evaluate import stack_trees
    from bcjax.experiments.engine import progress_bar, reference_correctness

    tasks = list(suite.tasks)
    seen = list(seen) if seen else default_seen(tasks)
    unknown = sorted(set(seen) - set(tasks))
    if unknown:
        raise ValueError(f"generalization: seen names unknown tasks {unknown}; tasks: {tasks}")
    unseen = [t for t in tasks if t not in seen]
    if not unseen:
        raise ValueError("generalization: every task is seen; hold out at least one")
    refs = reference_correctness(suite, store, split) if suite.correctness is not None else None
    specs = labelled(methods) if labels is None else [(lab, m.name, dict(m.points()[0])) for lab, m in
                                                      zip(labels, methods, strict=True)]
    rows, hparams = {}, {}
    bar = progress_bar(len(specs) + 1, "generalization", progress)
    for label, name, hp in [("pretrained", None, None), *specs]:
        key = dict(kind="generalization", suite=suite.fingerprint, split=split, seen=seen, model=name or label,
                   hparams=jsonable(hp or {}))
        build = (lambda: stack_trees([suite.pretrained])) if hp is None else \
            (lambda name=name, hp=hp: merged_model(suite, name, hp, seen, work_dir=state_dir(store)))
        rows[label] = stored_row(store, key, tasks, lambda missing, build=build: row_of_tree(suite, build(), missing,
                                                                                           split))
        if hp is not None:
            hparams[label] = jsonable(hp)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    finetuned = refs["finetuned"] if refs is not None else {
        t: stored_row(store, dict(kind="generalization", suite=suite.fingerprint, split=split, model="finetuned",
                                  hparams={"task": t}), [t],
                      lambda missing, i=i: row_of_tree(suite, stack_trees([suite.finetuned[i]]), missing, split))[t]
        for i, t in enumerate(tasks)}
    scored = score_rows(rows, finetuned, num_resamples=bootstrap_resamples, seed=bootstrap_seed, hparams=hparams)
    ft_acc = {t: float(np.mean(finetuned[t])) for t in tasks}
    table = {}
    for name, r in scored.items():
        r["seen"], r["unseen"] = _part(r, seen, "accuracy"), _part(r, unseen, "accuracy")
        r["seen_normalized"] = float(np.mean([r[t]["accuracy"] / ft_acc[t] for t in seen]))
        r["unseen_normalized"] = float(np.mean([r[t]["accuracy"] / ft_acc[t] for t in unseen]))
        table[name] = {"seen": r["seen"], "unseen": r["unseen"]}
    return {"split": split, "seen_tasks": seen, "unseen_tasks": unseen, "results": scored, "table": table,
            "finetuned_acc": ft_acc}


def _figures(res: dict, suite) -> dict:
    from bcjax import plots

    return {"generalization": ("generalization.png", plots.per_task_bars(
        res["table"], ["seen", "unseen"], None, ylabel="average accuracy (%)"))}


@register_experiment("generalization", settings=GeneralizationSettings, figures=_figures)
def run(suite, store, s: GeneralizationSettings, *, chunk=None, mesh=None, progress=True) -> dict:
    """Generalization: merge the seen tasks, score seen and unseen (FusionBench Table 5)."""
    return generalization_experiment(suite, store, methods=s.methods, seen=s.seen, split=s.split,
                                     bootstrap_resamples=s.bootstrap_resamples, bootstrap_seed=s.bootstrap_seed,
                                     progress=progress)
