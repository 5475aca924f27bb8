"""A FusionBench-style comparison (SPEC §3, §4) in one run: every method's all-task merge at
one fixed hyper-parameter point scored per task on the test split, the reference rows
(pretrained θ0; each task's own fine-tune θk — the max-model predictor; the multi-task model;
the simple and weighted ensembles), and the protocols: robustness on corrupted test sets
(:mod:`~bcjax.experiments.robustness`), unseen-task generalization
(:mod:`~bcjax.experiments.generalization`) and scaling-factor robustness
(:mod:`~bcjax.experiments.scaling`). Every accuracy carries a 95% bootstrap interval
(:mod:`bcjax.stats`), paired across rows.

``bcjax sweep --config configs/fusionbench.yaml --out DIR`` writes ``DIR/report.json``::

    {"methods":        {label: {task: {"accuracy", "ci95", "loss"}, "average", "average_ci95",
                                "normalized_average", "normalized_average_ci95", "average_loss",
                                "hparams"}},
     "references":     {"pretrained" | "individual" | "multitask" | "simple_ensemble" |
                        "weighted_ensemble": same row schema},
     "robustness":     {condition ("clean", corruption...): {label: average accuracy}},
     "generalization": {label: {"seen": average accuracy, "unseen": average accuracy}},
     "scaling":        {method: {α: average accuracy}}, ...}

``loss`` is the mean cross-entropy (natural log) of the row's model on the same test examples
as its accuracy (``suite.loss``), ``average_loss`` its mean over tasks. Only rows that are one
tree (the methods' merges, pretrained, individual, multitask) have them; the ensembles have no
``loss`` / ``average_loss`` keys, and neither does any row when the suite gives no ``loss``.
Losses are stored in the results store like the rows (a rerun reads them back).

plus ``report.md`` (per-task tables, the protocols, the figures) and the PNGs (radar chart,
robustness, generalization, scaling). Hyper-parameters are fixed (as FusionBench's tables),
not selected; ``bcjax sweep`` with ``experiment: select`` selects on validation instead.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Mapping

import numpy as np

from bcjax.experiments.engine import jsonable, state_dir
from bcjax.experiments.registry import register_experiment
from bcjax.experiments.rows import (labelled, losses_of_tree, merged_model, needs, row_of_tree, score_rows,
                                    stored_losses, stored_row)
from bcjax.experiments.settings import MethodSpec, parse_section
from bcjax.experiments.subsets import DEFAULT_METHODS

__all__ = ["FusionBenchSettings", "fusionbench_experiment", "reference_rows", "render_report", "ENSEMBLES"]

#: The ensemble reference rows (SPEC §3; evaluated, not merged).
ENSEMBLES = ("simple_ensemble", "weighted_ensemble")


def _corruptions() -> list[str]:
    from bcjax.data.corruptions import CORRUPTIONS

    return list(CORRUPTIONS)


@dataclasses.dataclass(frozen=True)
class RobustnessSection:
    methods: list[str] | None = None  # labels of `methods` entries (None: all)
    corruptions: list[str] = dataclasses.field(default_factory=_corruptions)
    severity: int = 3
    seed: int = 0

    def check(self):
        from bcjax.experiments.robustness import check_corruptions

        check_corruptions(self.corruptions, self.severity)


@dataclasses.dataclass(frozen=True)
class GeneralizationSection:
    methods: list[str] | None = None  # labels of `methods` entries (None: all)
    seen: list[str] | None = None  # None: all but the last ⌊T/3⌋ tasks


@dataclasses.dataclass(frozen=True)
class ScalingSection:
    methods: list[str] = dataclasses.field(default_factory=lambda: ["task_arithmetic", "gradient_matching"])
    alphas: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0])


_SECTIONS = {"robustness": RobustnessSection, "generalization": GeneralizationSection, "scaling": ScalingSection}


@dataclasses.dataclass(frozen=True)
class FusionBenchSettings:
    methods: list[MethodSpec] = dataclasses.field(default_factory=lambda: list(DEFAULT_METHODS))
    references: list[str] = dataclasses.field(
        default_factory=lambda: ["pretrained", "individual", "multitask", *ENSEMBLES])
    ensemble_weights: list[float] | None = None  # weighted ensemble; None: the training-set sizes
    robustness: dict | None = dataclasses.field(default_factory=dict)  # None: skip the section
    generalization: dict | None = dataclasses.field(default_factory=dict)
    scaling: dict | None = dataclasses.field(default_factory=dict)
    split: str = "test"
    bootstrap_resamples: int = 1000
    bootstrap_seed: int = 0
    _source: str = "<config>"

    def check(self):
        known = ("pretrained", "individual", "multitask", *ENSEMBLES)
        bad = [r for r in self.references if r not in known]
        if bad:
            raise ValueError(f"references: unknown {bad}; known: {list(known)}")
        if any(m.grid or m.settings for m in self.methods):
            raise ValueError("methods: fixed hyper-parameters only (no grid); use experiment: select to tune")
        labels = [lab for lab, _, _ in labelled(self.methods)]
        for name in _SECTIONS:
            sec = self.section(name)
            if sec is None:
                continue
            chosen = sec.methods or []
            pool = labels if name != "scaling" else [m.name for m in self.methods]
            missing = [m for m in chosen if m not in pool]
            if missing:
                raise ValueError(f"{name}.methods: {missing} are not among the methods entries {pool}")

    def section(self, name: str):
        """The typed ``robustness`` / ``generalization`` / ``scaling`` section (None: skipped)."""
        raw = getattr(self, name)
        if raw is None:
            return None
        return parse_section(_SECTIONS[name], {**raw, "_source": f"{self._source}: {name}"}, extra_known=("_source",))


def _timed(timings: dict, name: str, fn):
    t0 = time.perf_counter()
    out = fn()
    timings[name] = round(time.perf_counter() - t0, 1)
    return out


def reference_rows(suite, store, names, *, split: str = "test", ensemble_weights=None,
                   losses: dict | None = None) -> dict:
    """``{reference: {task: bool[n]}}`` for the SPEC §3 references among ``names``: ``pretrained``
    (θ0), ``individual`` (θk on task k: the max-model predictor, the normalizer), ``multitask``
    (``suite.multitask()``), ``simple_ensemble`` / ``weighted_ensemble`` (the T fine-tuned models'
    mean / weighted mean probabilities, :mod:`bcjax.ensembles`; weights default to the tasks'
    training-set sizes). Given a dict ``losses`` and a suite with a ``loss``, it also fills
    ``losses[reference] = {task: mean cross-entropy}`` for the references that are one tree
    (pretrained, individual, multitask; not the ensembles), stored like the rows."""
    from bcjax import ensembles
    from bcjax.evaluate import correctness, stack_trees

    tasks = list(suite.tasks)
    with_loss = losses is not None and suite.loss is not None

    def key(model, **extra):
        return dict(kind="fusionbench_reference", suite=suite.fingerprint, split=split, model=model, **extra)

    def tree_row(name, k, row_tasks, tree):
        """The row (and the loss, see above) of one tree ``tree()`` (built at most once) on ``row_tasks``."""
        built = []

        def stacked():
            if not built:
                built.append(stack_trees([tree()]))
            return built[0]

        row = stored_row(store, k, row_tasks, lambda missing: row_of_tree(suite, stacked(), missing, split))
        if with_loss:
            losses.setdefault(name, {}).update(stored_losses(
                store, {**k, "kind": "fusionbench_reference_loss"}, row_tasks,
                lambda missing: losses_of_tree(suite, stacked(), missing, split)))
        return row

    rows = {}
    for name in names:
        if name == "pretrained":
            rows[name] = tree_row(name, key(name), tasks, lambda: suite.pretrained)
        elif name == "individual":
            rows[name] = {t: tree_row(name, key(name, task=t), [t], lambda i=i: suite.finetuned[i])[t]
                          for i, t in enumerate(tasks)}
        elif name == "multitask":
            needs(suite, "multitask", what="the multi-task reference")
            rows[name] = tree_row(name, key(name), tasks, suite.multitask)
        else:
            needs(suite, "examples", what=f"the {name} reference")
            if name == "weighted_ensemble":
                w = ensemble_weights or [float(v) for v in suite.requirement("dataset_sizes", tasks, method=name)]
                extra = {"weights": [float(v) for v in w]}
            else:
                w, extra = None, {}

            def ensemble_row(missing, w=w):
                stacked = stack_trees(list(suite.finetuned))
                out = {}
                for t in missing:
                    base = suite.requirement("model_fn", [t], method="(ensemble)")[0]
                    predictor = ensembles.SimpleEnsemble(base) if w is None else ensembles.WeightedEnsemble(
                        base, tuple(w))
                    x, y = suite.examples(t, split)
                    out[t] = correctness(predictor, stacked, x, y, batch_size=min(64, len(y)))
                return out

            rows[name] = stored_row(store, key(name, **extra), tasks, ensemble_row)
    return rows


def fusionbench_experiment(suite, store, s: FusionBenchSettings, *, progress: bool = True) -> dict:
    """The whole comparison (module docstring); returns the report (JSON-serializable)."""
    from bcjax.experiments.generalization import generalization_experiment
    from bcjax.experiments.robustness import robustness_experiment
    from bcjax.experiments.scaling import scaling_experiment

    tasks = list(suite.tasks)
    timings: dict = {}
    load = {"start": [round(v, 2) for v in os.getloadavg()]}
    specs = labelled(s.methods)
    boot = dict(num_resamples=s.bootstrap_resamples, seed=s.bootstrap_seed)
    rob = s.section("robustness")
    keep = set() if rob is None else set(rob.methods or [lab for lab, _, _ in specs])
    trees: dict[str, Any] = {}
    method_rows, hparams, losses = {}, {}, {}
    for label, name, hp in specs:
        def build(label=label, name=name, hp=hp):
            if label not in trees:
                trees[label] = merged_model(suite, name, hp, work_dir=state_dir(store))
            return trees[label]

        key = dict(kind="fusionbench", suite=suite.fingerprint, split=s.split, model=label, hparams=jsonable(hp))

        def score(key=key, build=build):
            row = stored_row(store, key, tasks, lambda missing: row_of_tree(suite, build(), missing, s.split))
            loss = None if suite.loss is None else stored_losses(
                store, {**key, "kind": "fusionbench_loss"}, tasks,
                lambda missing: losses_of_tree(suite, build(), missing, s.split))
            return row, loss

        method_rows[label], loss = _timed(timings, f"method {label}", score)
        if loss is not None:
            losses[label] = loss
        hparams[label] = jsonable(hp)
        if label not in keep:
            trees.pop(label, None)
    refs = _timed(timings, "references", lambda: reference_rows(suite, store, s.references, split=s.split,
                                                                ensemble_weights=s.ensemble_weights, losses=losses))
    finetuned = refs.get("individual") or reference_rows(suite, store, ["individual"], split=s.split)["individual"]
    scored = score_rows({**method_rows, **refs}, finetuned, hparams=hparams, **boot)
    for r, loss in losses.items():  # trees only: the ensembles have no loss
        for t in tasks:
            scored[r][t]["loss"] = loss[t]
        scored[r]["average_loss"] = float(np.mean([loss[t] for t in tasks]))
    report = {"suite": suite.name, "tasks": tasks, "split": s.split,
              "methods": {lab: scored[lab] for lab in method_rows},
              "references": {r: scored[r] for r in refs}}
    if rob is not None:
        chosen = [(m, lab) for m, (lab, _, _) in zip(s.methods, specs) if lab in keep]
        res = _timed(timings, "robustness", lambda: robustness_experiment(
            suite, store, methods=[m for m, _ in chosen], labels=[lab for _, lab in chosen],
            corruptions=rob.corruptions, severity=rob.severity, seed=rob.seed, split=s.split,
            bootstrap_resamples=s.bootstrap_resamples, bootstrap_seed=s.bootstrap_seed, progress=progress,
            merged=trees))
        report["robustness"] = res["table"]
        report["robustness_detail"] = res
    trees.clear()
    gen = s.section("generalization")
    if gen is not None:
        chosen = [(m, lab) for m, (lab, _, _) in zip(s.methods, specs) if gen.methods is None or lab in gen.methods]
        res = _timed(timings, "generalization", lambda: generalization_experiment(
            suite, store, methods=[m for m, _ in chosen], labels=[lab for _, lab in chosen], seen=gen.seen,
            split=s.split, progress=progress,
            bootstrap_resamples=s.bootstrap_resamples, bootstrap_seed=s.bootstrap_seed))
        report["generalization"] = res["table"]
        report["generalization_detail"] = res
    sca = s.section("scaling")
    if sca is not None:
        chosen = [next(m for m in s.methods if m.name == n) for n in sca.methods]
        res = _timed(timings, "scaling", lambda: scaling_experiment(
            suite, store, methods=chosen, alphas=sca.alphas, split=s.split, progress=progress,
            bootstrap_resamples=s.bootstrap_resamples, bootstrap_seed=s.bootstrap_seed))
        report["scaling"] = res["curves"]
        report["scaling_detail"] = res
    load["end"] = [round(v, 2) for v in os.getloadavg()]
    report.update(timings_s=timings, load_average=load,
                  bootstrap={"resamples": s.bootstrap_resamples, "seed": s.bootstrap_seed, "level": 0.95,
                             "method": "percentile bootstrap over each task's test examples, paired across rows "
                                       "(bcjax.stats); normalized averages divide by the individual fine-tuned "
                                       "models on the same examples"})
    return jsonable(report)


# ----------------------------------------------------------------------------- report
def _pct(v) -> str:
    return f"{100 * v:.1f}"


def _ci(ci) -> str:
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def render_report(r: Mapping, plots: Mapping[str, str]) -> str:
    """``report.md``: the per-task table (methods and reference rows, accuracy %, the average with
    its 95% interval), the per-task test loss of the rows that have one, then robustness,
    generalization and scaling, and the figures."""
    tasks = r["tasks"]
    out = [f"# FusionBench-style comparison — {r['suite']}", "",
           f"Split `{r['split']}`, accuracy (%) per task; average with its 95% bootstrap interval "
           f"({r['bootstrap']['resamples']} resamples, paired); normalized = accuracy / the task's own fine-tuned "
           "model. Hyper-parameters fixed (not tuned).", "",
           "| row | " + " | ".join(tasks) + " | average [95% CI] | normalized [95% CI] |",
           "|---|" + "---|" * (len(tasks) + 2)]
    for kind in ("references", "methods"):
        for name, row in r[kind].items():
            label = f"*{name}*" if kind == "references" else name
            out.append(f"| {label} | " + " | ".join(_pct(row[t]["accuracy"]) for t in tasks)
                       + f" | {_pct(row['average'])} {_ci(row['average_ci95'])} | {_pct(row['normalized_average'])} "
                       f"{_ci(row['normalized_average_ci95'])} |")
    out.append("")
    lossy = [(f"*{n}*" if kind == "references" else n, row) for kind in ("references", "methods")
             for n, row in r[kind].items() if "average_loss" in row]
    if lossy:
        out += ["## Test loss (mean cross-entropy, nats) per task", "",
                "| row | " + " | ".join(tasks) + " | average |", "|---|" + "---|" * (len(tasks) + 1)]
        out += [f"| {label} | " + " | ".join(f"{row[t]['loss']:.3f}" for t in tasks) + f" | {row['average_loss']:.3f} |"
                for label, row in lossy]
        out += ["", "Same test examples as the accuracies; rows that are one model only (the ensembles have no "
                "loss).", ""]
    if "robustness" in r:
        d = r["robustness_detail"]
        conds = d["conditions"]
        out += [f"## Robustness (severity {d['severity']}, seed {d['seed']}): average accuracy (%)", "",
                "| model | " + " | ".join(conds) + " |", "|---|" + "---|" * len(conds)]
        for m in r["robustness"][conds[0]]:
            out.append(f"| {m} | " + " | ".join(_pct(r["robustness"][c][m]) for c in conds) + " |")
        out += ["", d["note"] + ".", ""]
    if "generalization" in r:
        d = r["generalization_detail"]
        out += [f"## Generalization: merged {', '.join(d['seen_tasks'])}; unseen {', '.join(d['unseen_tasks'])}", "",
                "| model | seen (%) | unseen (%) | unseen normalized (%) |", "|---|---|---|---|"]
        for m, row in d["results"].items():
            out.append(f"| {m} | {_pct(row['seen'])} | {_pct(row['unseen'])} | {_pct(row['unseen_normalized'])} |")
        out.append("")
    if "scaling" in r:
        d = r["scaling_detail"]
        alphas = list(next(iter(d["curves"].values())))
        out += ["## Scaling-factor robustness: average accuracy (%) against α", "",
                "| method | " + " | ".join(f"α={a}" for a in alphas) + " | best α |",
                "|---|" + "---|" * (len(alphas) + 1)]
        for m, c in d["curves"].items():
            out.append(f"| {m} | " + " | ".join(_pct(c[a]) for a in alphas) + f" | {d['best_alpha'][m]} |")
        out += ["", f"Pretrained: {_pct(d['pretrained'])}; fine-tuned (own task): {_pct(d['finetuned_average'])}.", ""]
    out += [f"Timings (s): {r['timings_s']}; load average at start / end: {r['load_average']}.", ""]
    out += [f"![{name}]({fname})" for name, fname in plots.items()]
    return "\n".join(out) + "\n"


def _figures(res: dict, suite) -> dict:
    from bcjax import plots

    rows = {**{f"{n} (ref)": v for n, v in res["references"].items()}, **res["methods"]}
    figs = {"radar": ("radar.png", plots.radar({n: {t: v[t]["accuracy"] for t in res["tasks"]}
                                                for n, v in rows.items()}, res["tasks"], None,
                                               title="accuracy per task (%)",
                                               dashed=[f"{n} (ref)" for n in res["references"]]))}
    if "robustness" in res:
        conds = res["robustness_detail"]["conditions"]
        figs["robustness"] = ("robustness.png", plots.per_task_bars(
            {m: {c: res["robustness"][c][m] for c in conds} for m in res["robustness"][conds[0]]}, conds, None,
            ylabel="average accuracy (%)"))
    if "generalization" in res:
        figs["generalization"] = ("generalization.png", plots.per_task_bars(
            res["generalization"], ["seen", "unseen"], None, ylabel="average accuracy (%)"))
    if "scaling" in res:
        d = res["scaling_detail"]
        figs["scaling"] = ("scaling.png", plots.scaling_curves(
            d["curves"], None, intervals=d["curves_ci95"],
            references={"pretrained": d["pretrained"], "fine-tuned (own task)": d["finetuned_average"]}))
    return figs


def _report(summary: dict, plots: Mapping[str, str]) -> dict[str, str]:
    import json

    keep = {k: v for k, v in summary.items() if k not in ("plots", "results_file", "points_stored")}
    return {"report.json": json.dumps(keep, indent=2), "report.md": render_report(summary, plots)}


@register_experiment("fusionbench", settings=FusionBenchSettings, figures=_figures, report=_report)
def run(suite, store, s: FusionBenchSettings, *, chunk=None, mesh=None, progress=True) -> dict:
    """FusionBench-style comparison: methods, references, robustness, generalization, scaling."""
    return fusionbench_experiment(suite, store, s, progress=progress)
