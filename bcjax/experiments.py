"""The paper's experiments (SPEC §4: Fig. 2, 3, 4, 7, 8, 9) as compiled programs over any model.

**One evaluation interface.** An experiment sees a :class:`ModelSuite`: task names, θ0, one
fine-tuned tree per task, and ``evaluate(stacked_params, task, split) -> float[M]`` (the
accuracy of each of M models stacked on a leading axis, e.g. with
:func:`bcjax.evaluate.accuracy_of_stack`). Nothing here knows the model.

**Adding a model family (CLIP, T5, ...).** Either register a builder here::

    @register_suite("my_suite")
    def build(config: dict, *, cache_dir: str, progress: bool) -> ModelSuite: ...

or give the pipeline module named in ``bcjax.pipelines.PIPELINES`` a function
``model_suite(config: dict, *, cache_dir: str, progress: bool) -> ModelSuite``; a sweep
config selects it with ``suite: {name: <pipeline name>, ...}``. Built in:
``dinov2_demo`` (the embedded DINOv2 ViT-S/14 on the offline 8-task suite, reusing the
demo's cached fine-tunes) and ``dinov2_class_split`` (one data set's classes split into
k-class tasks, Fig. 4).

**Sweeps.** :func:`run_sweep` dispatches on ``experiment:`` = ``subsets`` | ``grid`` |
``validation_free`` | ``class_split`` | ``cosine``. Every evaluated point goes through a
:class:`bcjax.results_store.ResultsStore` (JSONL, keyed by the point's config hash), so a
killed sweep resumes without recomputing finished points.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bcjax.config import ConfigError, get

__all__ = ["ModelSuite", "register_suite", "suite_builders", "model_suite", "guard_splits", "SplitAccessError"]

#: ``evaluate(stacked_params, task, split) -> float[M]`` accuracies of M stacked models.
Evaluate = Callable[[Any, str, str], np.ndarray]


class SplitAccessError(RuntimeError):
    """An experiment read a split it must not read (e.g. test while tuning, SPEC §4)."""


@dataclasses.dataclass(frozen=True, eq=False)
class ModelSuite:
    """What every experiment needs, independent of the model adapter (SPEC §4).

    Attributes:
      name: a label for reports.
      tasks: task names, in the order of ``finetuned``.
      pretrained: θ0 (a pytree).
      finetuned: one tree per task, shaped like θ0.
      evaluate: ``(stacked_params, task, split) -> float[M]``, the top-1 accuracy of each of
        the M models stacked on the leading axis of ``stacked_params``, on ``split``
        (``"val"`` or ``"test"``) of ``task``. It applies the task's own head.
      fingerprint: identifies everything the accuracies depend on besides the merged
        parameters (model, fine-tunes, data, evaluation sizes); part of every results key.
      heads: optional per-task heads (informational; ``evaluate`` already applies them).
      exclude: leaves to copy from θ0 instead of merging (as in :func:`bcjax.merge`).
      models_per_call: how many stacked models to merge and evaluate per compiled call.
      info: free-form JSON-serializable metadata for the summary (data provenance...).
    """

    name: str
    tasks: tuple[str, ...]
    pretrained: Any
    finetuned: tuple[Any, ...]
    evaluate: Evaluate
    fingerprint: str
    heads: Mapping[str, Any] | None = None
    exclude: Any = None
    models_per_call: int = 4
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if len(self.tasks) != len(self.finetuned):
            raise ValueError(f"ModelSuite {self.name!r}: {len(self.tasks)} tasks but {len(self.finetuned)} "
                             "fine-tuned models")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"ModelSuite {self.name!r}: duplicate task names {list(self.tasks)}")

    def with_evaluate(self, evaluate: Evaluate) -> "ModelSuite":
        return dataclasses.replace(self, evaluate=evaluate)


def guard_splits(evaluate: Evaluate, allowed: Sequence[str], what: str) -> Evaluate:
    """``evaluate`` that raises :class:`SplitAccessError` on any split outside ``allowed``:
    how tuning is kept off the test split (SPEC §4, validation-free setting)."""
    allowed = tuple(allowed)

    def guarded(stacked, task, split):
        if split not in allowed:
            raise SplitAccessError(f"{what} read split {split!r} of task {task!r}; only {allowed} are allowed")
        return evaluate(stacked, task, split)

    return guarded


# ----------------------------------------------------------------------------- registry
_BUILDERS: dict[str, Callable[..., ModelSuite]] = {}


def register_suite(name: str):
    """Decorator registering ``build(config, *, cache_dir, progress) -> ModelSuite``."""

    def deco(fn):
        _BUILDERS[name] = fn
        return fn

    return deco


def suite_builders() -> dict[str, Callable[..., ModelSuite]]:
    return dict(_BUILDERS)


def model_suite(config: Mapping, *, cache_dir: str | None = None, progress: bool = True) -> ModelSuite:
    """The :class:`ModelSuite` named by ``config["suite"]["name"]``: a registered builder, or
    ``model_suite`` of the pipeline module of that name (``bcjax.pipelines.PIPELINES``)."""
    name = get(config, "suite.name", types=str)
    if cache_dir is None:
        from bcjax.models.dinov2 import default_cache_dir

        cache_dir = str(get(config, "cache_dir", str(default_cache_dir()), types=str))
    if name in _BUILDERS:
        return _BUILDERS[name](config, cache_dir=cache_dir, progress=progress)
    from bcjax.pipelines import PIPELINES

    if name in PIPELINES:
        module = importlib.import_module(PIPELINES[name])
        if hasattr(module, "model_suite"):
            return module.model_suite(config, cache_dir=cache_dir, progress=progress)
        raise ConfigError(f"{config.get('_source', '<config>')}: pipeline {name!r} has no model_suite(config) "
                          "yet, so it cannot run sweeps")
    raise ConfigError(f"{config.get('_source', '<config>')}: unknown suite.name {name!r}; known: "
                      f"{sorted(set(_BUILDERS) | set(PIPELINES))}")


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- embedded suites
_DEMO_KEYS = ("tasks", "resolution", "max_train", "max_val", "max_test", "k_shot", "eval_batch", "models_per_call",
              "seed")


def _demo_config(config: Mapping):
    """A :class:`bcjax.demo.DemoConfig` from ``suite.preset`` (quick | full) plus overrides
    (``suite.tasks``, ``suite.max_train``, ..., ``suite.train.steps``, ...)."""
    from bcjax.demo import DemoConfig
    from bcjax.train import TrainConfig

    preset = get(config, "suite.preset", "quick", types=str)
    if preset not in ("quick", "full"):
        raise ConfigError(f"{config.get('_source', '<config>')}: suite.preset must be 'quick' or 'full', "
                          f"got {preset!r}")
    cfg = DemoConfig.quick() if preset == "quick" else DemoConfig.full()
    over = {}
    for key in _DEMO_KEYS:
        v = get(config, f"suite.{key}", None)
        if v is not None:
            over[key] = tuple(v) if key == "tasks" else v
    train = get(config, "suite.train", None, types=(dict, type(None)))
    if train:
        try:
            over["train"] = TrainConfig(**{**dataclasses.asdict(cfg.train), **train})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{config.get('_source', '<config>')}: suite.train: {e}") from None
    return dataclasses.replace(cfg, **over)


def _stack_evaluator(predict, tasks: Mapping[str, Any], heads: Mapping[str, tuple], eval_examples: Mapping[str, int],
                     batch: int, models_per_call: int) -> Evaluate:
    from bcjax.evaluate import accuracy_of_stack

    def evaluate(stacked, task, split):
        x, y = tasks[task].splits[split]
        n = int(eval_examples.get(split) or len(y))
        return accuracy_of_stack(predict, stacked, x[:n], y[:n], batch_size=min(batch, n),
                                 models_per_call=models_per_call, predict_args=heads[task])

    return evaluate


@register_suite("dinov2_demo")
def dinov2_demo_suite(config: Mapping, *, cache_dir: str, progress: bool = True) -> ModelSuite:
    """The embedded suite (DINOv2 ViT-S/14, offline tasks, frozen prototype heads); fine-tunes
    are the demo's, cached under ``cache_dir`` (a rerun loads them)."""
    from bcjax import demo

    cfg = _demo_config(config)
    ctx = demo.setup(cfg, cache_dir, progress=progress)
    finetuned = demo.finetune_tasks(ctx, progress=progress)
    eval_examples = {s: get(config, f"suite.eval_examples.{s}", None, types=(int, type(None))) for s in ("val", "test")}
    tasks = {t.name: t for t in ctx.tasks}
    evaluate = _stack_evaluator(ctx.predict, tasks, ctx.heads, eval_examples, cfg.eval_batch, cfg.models_per_call)
    fp = _hash(dict(suite="dinov2_demo", finetune=cfg.finetune_fingerprint(), tasks=list(cfg.tasks),
                    max_val=cfg.max_val, max_test=cfg.max_test, eval=eval_examples))
    return ModelSuite(name=demo.SUITE_NAME, tasks=tuple(ctx.names), pretrained=ctx.params0, finetuned=tuple(finetuned),
                      evaluate=evaluate, fingerprint=fp, heads=ctx.heads, models_per_call=cfg.models_per_call,
                      info={"sizes": {t.name: t.sizes for t in ctx.tasks}, "config_fingerprint": cfg.fingerprint()})



@register_suite("synthetic")
def synthetic_suite(config: Mapping, *, cache_dir: str | None = None, progress: bool = False) -> ModelSuite:
    """A tiny in-memory suite for tests and smoke runs: a 2-layer tanh MLP backbone, frozen
    random per-task heads, Gaussian-cluster tasks, each fine-tuned by a few full-batch
    gradient steps. ``suite.classes_per_task: k`` instead splits ONE ``suite.classes``-class
    data set into k-class tasks (the class-split setting, Fig. 4)."""
    import jax
    import jax.numpy as jnp

    c = lambda key, default: get(config, f"suite.{key}", default)  # noqa: E731
    seed, dim, hidden = int(c("seed", 0)), int(c("dim", 8)), int(c("hidden", 16))
    n, steps, lr = int(c("examples", 96)), int(c("steps", 40)), float(c("lr", 0.5))
    rng = np.random.default_rng(seed)
    k_split = c("classes_per_task", None)
    if k_split is None:
        num_tasks, classes = int(c("tasks", 4)), int(c("classes", 3))
        datasets = []
        for _ in range(num_tasks):
            means = rng.standard_normal((classes, dim)) * 1.5
            datasets.append(means)
        groups = [tuple(range(classes))] * num_tasks
    else:
        total = int(c("classes", 6))
        groups = split_classes(total, int(k_split))
        means_all = rng.standard_normal((total, dim)) * 1.5
        datasets = [means_all[list(g)] for g in groups]
        classes = int(k_split)

    def sample(means, count, r):
        y = r.integers(0, len(means), count).astype(np.int32)
        return (means[y] + r.standard_normal((count, dim))).astype(np.float32), y

    data = [{s: sample(m, n, np.random.default_rng([seed, t, i])) for i, s in enumerate(("train", "val", "test"))}
            for t, m in enumerate(datasets)]
    pre = {"l1": {"w": (rng.standard_normal((dim, hidden)) / np.sqrt(dim)).astype(np.float32),
                  "b": np.zeros(hidden, np.float32)},
           "l2": {"w": (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32),
                  "b": np.zeros(hidden, np.float32)}}
    names = [f"task{t}" if k_split is None else f"classes-{'-'.join(map(str, g))}" for t, g in enumerate(groups)]
    heads = {nm: jnp.asarray(rng.standard_normal((hidden, classes)).astype(np.float32)) for nm in names}

    def predict(params, x, head):
        h = jnp.tanh(x @ params["l1"]["w"] + params["l1"]["b"])
        h = jnp.tanh(h @ params["l2"]["w"] + params["l2"]["b"])
        return h @ head

    def loss(params, x, y, head):
        logits = predict(params, x, head)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    @jax.jit
    def train(params, x, y, head):
        def step(p, _):
            g = jax.grad(loss)(p, x, y, head)
            return jax.tree.map(lambda a, b: a - lr * b, p, g), None

        return jax.lax.scan(step, params, None, length=steps)[0]

    finetuned = [jax.tree.map(np.asarray, train(pre, *d["train"], heads[nm])) for d, nm in zip(data, names,
                                                                                                strict=True)]
    by_name = dict(zip(names, data, strict=True))

    @jax.jit
    def _acc(stacked, x, y, head):
        logits = jax.vmap(lambda p: predict(p, x, head))(stacked)
        return jnp.mean(jnp.argmax(logits, -1) == y[None], axis=1)

    def evaluate(stacked, task, split):
        x, y = by_name[task][split]
        return np.asarray(_acc(stacked, x, y, heads[task]))

    fp = _hash(dict(suite="synthetic", cfg=dict(config.get("suite", {}))))
    return ModelSuite(name="synthetic MLP suite", tasks=tuple(names), pretrained=pre, finetuned=tuple(finetuned),
                      evaluate=evaluate, fingerprint=fp, heads=heads, models_per_call=int(c("models_per_call", 4)),
                      info={"classes": [list(g) for g in groups]})

# ----------------------------------------------------------------------------- class splits (Fig. 4)
def split_classes(num_classes: int, classes_per_task: int, order: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """Split classes ``0 … C−1`` (in ``order``, default ascending) into consecutive tasks of
    ``classes_per_task`` classes (SPEC §4, class-split sequences). C must divide evenly."""
    order = list(range(num_classes)) if order is None else [int(c) for c in order]
    if sorted(order) != list(range(num_classes)):
        raise ValueError(f"class order must be a permutation of 0..{num_classes - 1}, got {order}")
    if classes_per_task < 1 or num_classes % classes_per_task:
        raise ValueError(f"{num_classes} classes cannot be split into tasks of {classes_per_task} classes")
    return [tuple(order[i:i + classes_per_task]) for i in range(0, num_classes, classes_per_task)]


def class_subset(x: np.ndarray, y: np.ndarray, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The examples of ``classes``, relabelled 0 … k−1 in the order of ``classes``."""
    classes = [int(c) for c in classes]
    lut = np.full(int(max(int(np.max(y, initial=0)), max(classes))) + 1, -1, np.int32)
    lut[classes] = np.arange(len(classes), dtype=np.int32)
    keep = np.isin(y, classes)
    return x[keep], lut[y[keep]]


def prefix_indicator(num_tasks: int) -> np.ndarray:
    """bool[T, T]: row i merges tasks 0 … i (the class-split sequence's i-th step)."""
    return np.tril(np.ones((num_tasks, num_tasks), bool))


@register_suite("dinov2_class_split")
def dinov2_class_split_suite(config: Mapping, *, cache_dir: str, progress: bool = True) -> ModelSuite:
    """One data set of the offline suite (``suite.dataset``, e.g. mnist) split into tasks of
    ``suite.classes_per_task`` classes; per-task prototype heads; one cached fine-tune per task."""

    from bcjax import demo
    from bcjax.data.suite import Task, load_suite
    from bcjax.models import dinov2

    cfg = _demo_config(config)
    dataset = get(config, "suite.dataset", "mnist", types=str)
    k = get(config, "suite.classes_per_task", 2, types=int)
    log = demo._Log(progress)
    model_config, params0 = dinov2.load_pretrained(cache_dir)
    (full,) = load_suite([dataset], resolution=cfg.resolution, max_train=cfg.max_train, max_val=cfg.max_val,
                         max_test=cfg.max_test, seed=cfg.seed, cache_root=f"{cache_dir}/data")
    order = get(config, "suite.class_order", None, types=(list, type(None)))
    groups = split_classes(full.num_classes, k, order)
    tasks = []
    for cl in groups:
        splits = {s: class_subset(*full.splits[s], cl) for s in ("train", "val", "test")}
        tasks.append(Task(name=f"{dataset}-c{'-'.join(map(str, cl))}",
                          class_names=tuple(full.class_names[c] for c in cl), splits=splits,
                          provenance=full.provenance, license=full.license))
    feats, predict, loss = demo.make_classifier(model_config, cfg.head_scale)
    heads = demo.prototype_heads(feats, params0, tasks, k_shot=cfg.k_shot, seed=cfg.seed, pad_to=k)
    ctx = demo.DemoContext(dataclasses.replace(cfg, tasks=tuple(t.name for t in tasks)), cache_dir, model_config,
                           params0, tasks, heads, predict, loss, log, store=None)
    finetuned = demo.finetune_tasks(ctx, progress=progress)
    eval_examples = {s: get(config, f"suite.eval_examples.{s}", None, types=(int, type(None))) for s in ("val", "test")}
    evaluate = _stack_evaluator(predict, {t.name: t for t in tasks}, heads, eval_examples, cfg.eval_batch,
                                cfg.models_per_call)
    fp = _hash(dict(suite="dinov2_class_split", finetune=cfg.finetune_fingerprint(), dataset=dataset, groups=groups,
                    max_val=cfg.max_val, max_test=cfg.max_test, eval=eval_examples))
    return ModelSuite(name=f"{dataset} split into {len(groups)} tasks of {k} classes (DINOv2 ViT-S/14)",
                      tasks=tuple(t.name for t in tasks), pretrained=params0, finetuned=tuple(finetuned),
                      evaluate=evaluate, fingerprint=fp, heads=heads, models_per_call=cfg.models_per_call,
                      info={"classes": [list(g) for g in groups], "sizes": {t.name: t.sizes for t in tasks}})


# ----------------------------------------------------------------------------- evaluation engine
def _bar(total: int, desc: str, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def reference_accuracy(suite: ModelSuite, store, split: str) -> dict[str, float]:
    """acc(θk, k) on ``split`` for every task (the normalizer of SPEC §4), stored."""
    from bcjax.evaluate import stack_trees

    out = {}
    for t, ft in zip(suite.tasks, suite.finetuned, strict=True):
        out[t] = store.get_or_compute(dict(kind="finetuned_acc", suite=suite.fingerprint, task=t, split=split),
                                      lambda ft=ft, t=t: float(suite.evaluate(stack_trees([ft]), t, split)[0]))
        if out[t] <= 0:
            raise ValueError(f"task {t!r}: the fine-tuned model's {split} accuracy is 0; normalized accuracy is "
                             "undefined")
    return out


def evaluate_models(suite: ModelSuite, store, keys: Sequence[Mapping], tasks_of: Sequence[Sequence[str]],
                    build: Callable[[np.ndarray], Any], split: str, *, chunk: int, progress: bool = True,
                    desc: str = "models") -> list[dict[str, float]]:
    """Accuracies ``{task: acc}`` of model i on ``tasks_of[i]`` (``split``) for every key.

    Models whose key is in ``store`` are not rebuilt; the rest are built ``chunk`` at a time
    by ``build(indices) -> stacked trees`` (indices padded to ``chunk`` by repeating the last,
    so one compilation serves every chunk), evaluated with the models vmapped, and stored
    as soon as their chunk is done — a killed sweep loses at most one chunk.
    """
    todo = [i for i, k in enumerate(keys) if k not in store]
    bar = _bar(len(todo), desc, progress)
    for s in range(0, len(todo), chunk):
        idx = todo[s:s + chunk]
        padded = np.array(idx + [idx[-1]] * (chunk - len(idx)))
        stacked = build(padded)
        needed = sorted({t for i in idx for t in tasks_of[i]}, key=list(suite.tasks).index)
        accs = {t: np.asarray(suite.evaluate(stacked, t, split)) for t in needed}
        for j, i in enumerate(idx):
            store.put(dict(keys[i]), {t: float(accs[t][j]) for t in tasks_of[i]})
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return [store.get(dict(k)) for k in keys]


def _normalized(acc: Mapping[str, float], ref: Mapping[str, float]) -> dict[str, float]:
    return {t: a / ref[t] for t, a in acc.items()}


def _mean_norm(acc: Mapping[str, float], ref: Mapping[str, float]) -> float:
    return float(np.mean(list(_normalized(acc, ref).values())))


def _members(suite: ModelSuite, row) -> list[str]:
    return [t for t, on in zip(suite.tasks, row, strict=True) if on]


def _jsonable(v):
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


# ----------------------------------------------------------------------------- experiments
def _method_builder(suite: ModelSuite, method: str, hparams: Mapping, indicator: np.ndarray,
                    mesh: Mesh | None = None) -> Callable:
    """``build(indices)`` for merged models of the subsets ``indicator[indices]``: one
    contraction per leaf for the per-task-linear methods, else ``bcjax.merge`` per subset.

    With a one-axis ``mesh``, the stacked task vectors Δ are sharded over it (each leaf's
    first divisible parameter axis, :func:`bcjax.grids.leaf_shardings`) and the contraction
    runs as a jitted program with those ``in_shardings``; results are bit-identical."""
    from bcjax import sweeps
    from bcjax.evaluate import stack_trees
    from bcjax.merging import merge

    hp = dict(hparams)
    if method in sweeps.LINEAR_METHODS:
        alpha = hp.pop("alpha", 1.0 if method == "task_arithmetic" else 0.3)
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
            members = [f for f, on in zip(suite.finetuned, indicator[i], strict=True) if on]
            trees.append(merge(method, suite.pretrained, members, exclude=suite.exclude, **hp) if members
                         else suite.pretrained)
        return stack_trees(trees)

    return build


def _lazy_builder(suite: ModelSuite, method: str, hparams: Mapping, indicator: np.ndarray,
                  mesh: Mesh | None = None) -> Callable:
    """:func:`_method_builder`, set up (task deltas) only if some point is not stored yet."""
    state = {}

    def build(idx):
        if "fn" not in state:
            state["fn"] = _method_builder(suite, method, hparams, indicator, mesh)
        return state["fn"](idx)

    return build


def _methods(config: Mapping) -> list[tuple[str, dict]]:
    raw = get(config, "methods", [{"name": "task_arithmetic", "alpha": 0.3},
                                  {"name": "breadcrumbs", "alpha": 0.3, "beta": 0.9, "gamma": 0.99}], types=list)
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, Mapping) or "name" not in m:
            raise ConfigError(f"{config.get('_source', '<config>')}: methods[{i}] must be a mapping with a 'name'")
        out.append((str(m["name"]), {k: v for k, v in m.items() if k != "name"}))
    return out


def subsets_experiment(suite: ModelSuite, store, *, methods: Sequence[tuple[str, Mapping]],
                       sizes: Sequence[int] | None = None, split: str = "test", chunk: int | None = None,
                       progress: bool = True, mesh: Mesh | None = None) -> dict:
    """Fig. 2: every subset (of the given sizes) merged by one contraction per leaf, evaluated
    on all tasks; curves for both protocols (SPEC §4). The empty subset is θ0. ``mesh``
    shards the stacked task vectors and the contraction (see :func:`_method_builder`)."""
    from bcjax import sweeps

    ref = reference_accuracy(suite, store, split)
    ind = sweeps.all_subsets(len(suite.tasks), sizes)
    chunk = chunk or suite.models_per_call
    out = {}
    for method, hp in methods:
        keys = [dict(kind="subset", suite=suite.fingerprint, split=split, method=method, hparams=_jsonable(hp),
                     subset=[int(v) for v in row]) for row in ind]
        build = _lazy_builder(suite, method, hp, ind, mesh)
        accs = evaluate_models(suite, store, keys, [suite.tasks] * len(ind), build, split, chunk=chunk,
                               progress=progress, desc=f"subsets {method}")
        scores = {i: _normalized(a, ref) for i, a in enumerate(accs)}
        out[method] = {"observed": sweeps.subset_curve(ind, scores, suite.tasks, "observed"),
                       "all": sweeps.subset_curve(ind, scores, suite.tasks, "all"),
                       "per_subset": [{"subset": _members(suite, row), "avg_normalized_acc_observed":
                                       float(np.mean([scores[i][t] for t in (_members(suite, row) or suite.tasks)]))}
                                      for i, row in enumerate(ind)]}
    return {"split": split, "finetuned_acc": ref, "num_subsets": int(len(ind)), "methods": out}


def _grid_builder(suite: ModelSuite, pairs, points, rows: np.ndarray, point_of: np.ndarray):
    """``build(indices)``: model i is grid point ``points[point_of[i]]`` merged over the tasks
    in ``rows[i]`` (one threshold pass per leaf × task for the whole grid, computed lazily)."""
    from bcjax import grids

    state = {}

    def build(idx):
        if "th" not in state:
            state["taus"] = grids.stack_task_vectors(suite.pretrained, suite.finetuned, exclude=suite.exclude)
            state["th"] = grids.grid_threshold_bits(state["taus"], pairs)
        pts = [points[point_of[i]] for i in idx]
        weights = np.array([[a * float(v) for v in rows[i]] for i, (a, _, _) in zip(idx, pts, strict=True)], np.float32)
        gidx = np.array([pairs.index((b, g)) for _, b, g in pts], np.int32)
        return grids.weighted_masked_merges(suite.pretrained, state["taus"], state["th"], weights, gidx)

    return build


def grid_experiment(suite: ModelSuite, store, *, alphas, betas, gammas, split: str = "val",
                    subset: Sequence[str] | None = None, chunk: int | None = None, progress: bool = True) -> dict:
    """Fig. 7/9: Breadcrumbs over an (α, β, γ) grid (β ≤ γ) merging ``subset`` (default: all
    tasks), scored by average normalized accuracy on ``split``; per (β, γ) the best α."""
    from bcjax import grids

    pairs = grids.beta_gamma_pairs(betas, gammas)
    points = [(float(a), b, g) for b, g in pairs for a in alphas]
    names = list(subset) if subset else list(suite.tasks)
    unknown = sorted(set(names) - set(suite.tasks))
    if unknown:
        raise ValueError(f"grid subset names unknown tasks {unknown}; tasks: {list(suite.tasks)}")
    row = np.array([t in names for t in suite.tasks])
    ref = reference_accuracy(suite, store, split)
    keys = [dict(kind="grid", suite=suite.fingerprint, split=split, alpha=a, beta=b, gamma=g,
                 subset=[int(v) for v in row]) for a, b, g in points]
    rows = np.repeat(row[None], len(points), 0)
    build = _grid_builder(suite, pairs, points, rows, np.arange(len(points)))
    accs = evaluate_models(suite, store, keys, [names] * len(points), build, split,
                           chunk=chunk or suite.models_per_call, progress=progress, desc="grid")
    scored = [dict(alpha=a, beta=b, gamma=g, variant=grids.masking_variant(b, g), acc=acc,
                   avg_normalized_acc=_mean_norm(acc, ref)) for (a, b, g), acc in zip(points, accs, strict=True)]
    best = max(scored, key=lambda r: r["avg_normalized_acc"])
    heat = np.full((len(betas), len(gammas)), np.nan)
    for r in scored:
        i, j = list(betas).index(r["beta"]), list(gammas).index(r["gamma"])
        heat[i, j] = np.nanmax([heat[i, j], r["avg_normalized_acc"]])
    return {"split": split, "tasks": names, "finetuned_acc": ref, "points": scored, "best": best,
            "heatmap_best_alpha": heat.tolist(), "betas": list(betas), "gammas": list(gammas)}


def tune_validation_free(suite: ModelSuite, store, *, tune_size: int, alphas, betas, gammas,
                         protocol: str = "observed", chunk: int | None = None, progress: bool = True) -> dict:
    """Fig. 3, tuning half: the (α, β, γ) maximizing mean normalized *validation* accuracy over
    all subsets of size ``tune_size``. Evaluation is guarded to the val split: any test
    access raises :class:`SplitAccessError` (SPEC §4: never tune on test)."""
    from bcjax import grids, sweeps

    guarded = suite.with_evaluate(guard_splits(suite.evaluate, ("val",), "validation-free tuning"))
    pairs = grids.beta_gamma_pairs(betas, gammas)
    points = [(float(a), b, g) for b, g in pairs for a in alphas]
    ind = sweeps.all_subsets(len(suite.tasks), [tune_size])
    ref = reference_accuracy(guarded, store, "val")
    n_p, n_s = len(points), len(ind)
    point_of = np.repeat(np.arange(n_p), n_s)
    rows = np.tile(ind, (n_p, 1))
    keys = [dict(kind="vf_tune", suite=suite.fingerprint, split="val", alpha=points[p][0], beta=points[p][1],
                 gamma=points[p][2], subset=[int(v) for v in r]) for p, r in zip(point_of, rows, strict=True)]
    tasks_of = [(_members(suite, r) if protocol == "observed" else list(suite.tasks)) for r in rows]
    build = _grid_builder(guarded, pairs, points, rows, point_of)
    accs = evaluate_models(guarded, store, keys, tasks_of, build, "val", chunk=chunk or suite.models_per_call,
                           progress=progress, desc=f"tune on val (size {tune_size})")
    score = np.array([_mean_norm(a, ref) for a in accs]).reshape(n_p, n_s).mean(1)
    b = int(np.argmax(score))
    a, beta, gamma = points[b]
    return {"alpha": a, "beta": beta, "gamma": gamma, "val_score": float(score[b]),
            "grid": [dict(alpha=p[0], beta=p[1], gamma=p[2], val_score=float(s))
                     for p, s in zip(points, score, strict=True)]}


def validation_free_experiment(suite: ModelSuite, store, *, tune_size: int, variants: Mapping[str, Mapping],
                               alphas, protocol: str = "observed", chunk: int | None = None,
                               progress: bool = True) -> dict:
    """Fig. 3: per variant (e.g. Breadcrumbs, task arithmetic = β 0, γ 1) tune on val over
    subsets of size ``tune_size``, freeze, then report test for sizes ``tune_size`` … T.
    All tuning finishes before the first test access."""
    from bcjax import grids, sweeps

    T = len(suite.tasks)
    if not 1 <= tune_size <= T:
        raise ValueError(f"tune_size must lie in [1, {T}], got {tune_size}")
    tuned = {name: tune_validation_free(suite, store, tune_size=tune_size, alphas=v.get("alphas", alphas),
                                        betas=v.get("betas", [0.0]), gammas=v.get("gammas", [1.0]),
                                        protocol=protocol, chunk=chunk, progress=progress)
             for name, v in variants.items()}
    ref = reference_accuracy(suite, store, "test")
    ind = sweeps.all_subsets(T, range(tune_size, T + 1))
    out = {}
    for name, hp in tuned.items():
        point = (hp["alpha"], hp["beta"], hp["gamma"])
        keys = [dict(kind="vf_test", suite=suite.fingerprint, split="test", alpha=point[0], beta=point[1],
                     gamma=point[2], subset=[int(v) for v in r]) for r in ind]
        tasks_of = [(_members(suite, r) if protocol == "observed" else list(suite.tasks)) for r in ind]
        build = _grid_builder(suite, [point[1:]], [point], ind, np.zeros(len(ind), int))
        accs = evaluate_models(suite, store, keys, tasks_of, build, "test", chunk=chunk or suite.models_per_call,
                               progress=progress, desc=f"test {name}")
        scores = {i: _normalized(a, ref) for i, a in enumerate(accs)}
        curve = {}
        for i, r in enumerate(ind):
            curve.setdefault(int(r.sum()), []).append(float(np.mean(list(scores[i].values()))))
        out[name] = {"hparams": {k: hp[k] for k in ("alpha", "beta", "gamma")}, "val_score": hp["val_score"],
                     "variant": grids.masking_variant(hp["beta"], hp["gamma"]),
                     "test_curve": {k: float(np.mean(v)) for k, v in sorted(curve.items())}, "val_grid": hp["grid"]}
    return {"tune_size": tune_size, "protocol": protocol, "finetuned_test_acc": ref, "variants": out}


def class_split_experiment(suite: ModelSuite, store, *, methods: Sequence[tuple[str, Mapping]], split: str = "test",
                           chunk: int | None = None, progress: bool = True) -> dict:
    """Fig. 4: after each new task i, merge tasks 0 … i and evaluate on all of them (each
    with its own head). Per-task-linear methods use one contraction per leaf for all steps."""
    ref = reference_accuracy(suite, store, split)
    ind = prefix_indicator(len(suite.tasks))
    out = {}
    for method, hp in methods:
        keys = [dict(kind="class_split", suite=suite.fingerprint, split=split, method=method, hparams=_jsonable(hp),
                     subset=[int(v) for v in row]) for row in ind]
        tasks_of = [_members(suite, row) for row in ind]
        build = _lazy_builder(suite, method, hp, ind)
        accs = evaluate_models(suite, store, keys, tasks_of, build, split, chunk=chunk or suite.models_per_call,
                               progress=progress, desc=f"class split {method}")
        out[method] = {"steps": [{"tasks_seen": len(a), "acc": a, "avg_acc": float(np.mean(list(a.values()))),
                                  "avg_normalized_acc": _mean_norm(a, ref)} for a in accs]}
    return {"split": split, "tasks": list(suite.tasks), "finetuned_acc": ref, "methods": out}


def cosine_experiment(suite: ModelSuite, *, settings: Sequence[tuple[float, float]]) -> dict:
    """Fig. 8: cos(τi, τj) of raw task vectors and of Breadcrumbs-masked ones at each (β, γ)
    (all thresholds from one pass per leaf × task)."""
    from bcjax import grids, sweeps

    taus = grids.stack_task_vectors(suite.pretrained, suite.finetuned, exclude=suite.exclude)
    pairs = [(float(b), float(g)) for b, g in settings]
    th = grids.grid_threshold_bits(taus, pairs) if pairs else None
    T = len(suite.tasks)

    def split(stacked):
        return [[x[t] for x in jax_leaves(stacked)] for t in range(T)]

    mats = {"raw task vectors": sweeps.cosine_similarity_matrix(split(taus))}
    for g, (b, gam) in enumerate(pairs):
        mats[f"Breadcrumbs β={b:g}, γ={gam:g}"] = sweeps.cosine_similarity_matrix(
            split(grids.grid_deltas(suite.pretrained, taus, th, g)))
    return {"tasks": list(suite.tasks), "matrices": {k: v.tolist() for k, v in mats.items()},
            "mean_offdiagonal": {k: _offdiag(v) for k, v in mats.items()}}


def jax_leaves(tree) -> list:
    import jax

    return [x for x in jax.tree.leaves(tree) if x is not None]


def _offdiag(m: np.ndarray) -> float:
    n = len(m)
    return float((np.sum(m) - np.trace(m)) / max(n * n - n, 1))


# ----------------------------------------------------------------------------- config entry point
EXPERIMENTS = ("subsets", "grid", "validation_free", "class_split", "cosine")


def _floats(config, key, default):
    v = get(config, key, default, types=(list, tuple))
    try:
        return [float(x) for x in v]
    except (TypeError, ValueError):
        raise ConfigError(f"{config.get('_source', '<config>')}: {key} must be a list of numbers, got {v!r}") from None


def sweep_mesh(config: Mapping) -> Mesh | None:
    """The one-axis device mesh of ``config["mesh"]`` (``{axis: models, devices: 8}``;
    ``devices`` defaults to all of ``jax.devices()``), or None when the key is absent."""
    spec = get(config, "mesh", None, types=(dict, type(None)))
    if spec is None:
        return None
    devices = jax.devices()
    n = get(spec, "devices", len(devices), types=int)
    if not 1 <= n <= len(devices):
        raise ConfigError(f"{config.get('_source', '<config>')}: mesh.devices must be in 1..{len(devices)}, got {n}")
    return Mesh(np.array(devices[:n]), (get(spec, "axis", "models", types=str),))


def run_sweep(config: Mapping, *, out_dir: str, progress: bool = True, suite: ModelSuite | None = None) -> dict:
    """Run the experiment named by ``config["experiment"]`` (one of :data:`EXPERIMENTS`) on
    the suite named by ``config["suite"]`` (or the given ``suite``); write ``results.jsonl``
    (every evaluated point; reruns resume from it), ``summary.json`` and PNG plots to
    ``out_dir``; return the JSON-serializable summary. Keys per experiment: see configs/."""
    import os

    from bcjax import plots
    from bcjax.results_store import ResultsStore

    kind = get(config, "experiment", types=str)
    if kind not in EXPERIMENTS:
        raise ConfigError(f"{config.get('_source', '<config>')}: unknown experiment {kind!r}; known: {EXPERIMENTS}")
    os.makedirs(out_dir, exist_ok=True)
    store = ResultsStore(get(config, "results", os.path.join(out_dir, "results.jsonl"), types=str))
    suite = suite or model_suite(config, progress=progress)
    chunk = get(config, "models_per_call", None, types=(int, type(None)))
    figs: dict[str, str] = {}
    png = lambda name: os.path.join(out_dir, name)  # noqa: E731
    if kind == "subsets":
        sizes = get(config, "sizes", None, types=(list, type(None)))
        res = subsets_experiment(suite, store, methods=_methods(config), sizes=sizes,
                                 split=get(config, "split", "test", types=str), chunk=chunk, progress=progress,
                                 mesh=sweep_mesh(config))
        for proto in ("observed", "all"):
            figs[proto] = plots.subset_curves({m: r[proto] for m, r in res["methods"].items()},
                                              png(f"subsets_{proto}.png"), title=f"{proto}-task protocol")
        figs["violins"] = plots.violins(
            {m: [p["avg_normalized_acc_observed"] for p in r["per_subset"] if p["subset"]]
             for m, r in res["methods"].items()}, png("subsets_violins.png"), title="over all non-empty subsets")
    elif kind == "grid":
        betas, gammas = _floats(config, "betas", [0.0, 0.8, 0.9]), _floats(config, "gammas", [0.99, 1.0])
        res = grid_experiment(suite, store, alphas=_floats(config, "alphas", [0.3, 0.5]), betas=betas, gammas=gammas,
                              split=get(config, "split", "val", types=str),
                              subset=get(config, "subset", None, types=(list, type(None))), chunk=chunk,
                              progress=progress)
        figs["heatmap"] = plots.grid_heatmap(np.array(res["heatmap_best_alpha"]), betas, gammas,
                                             png("grid_heatmap.png"), row_label="β", col_label="γ",
                                             title="best α per (β, γ)")
        dist: dict[str, list] = {}
        for p in res["points"]:
            dist.setdefault(p["variant"], []).append(p["avg_normalized_acc"])
        figs["violins"] = plots.violins(dist, png("grid_violins.png"), title="masking variants over the grid")
    elif kind == "validation_free":
        alphas = _floats(config, "alphas", [0.3, 0.5, 1.0])
        variants = get(config, "variants", {"breadcrumbs": {"betas": [0.85, 0.9], "gammas": [0.99]},
                                            "task_arithmetic": {"betas": [0.0], "gammas": [1.0]}}, types=dict)
        res = validation_free_experiment(suite, store, tune_size=get(config, "tune_size", 2, types=int),
                                         variants=variants, alphas=alphas,
                                         protocol=get(config, "protocol", "observed", types=str), chunk=chunk,
                                         progress=progress)
        figs["test_curves"] = plots.subset_curves({k: v["test_curve"] for k, v in res["variants"].items()},
                                                  png("validation_free.png"),
                                                  title=f"tuned on val at size {res['tune_size']}, test")
    elif kind == "class_split":
        res = class_split_experiment(suite, store, methods=_methods(config),
                                     split=get(config, "split", "test", types=str), chunk=chunk, progress=progress)
        figs["steps"] = plots.subset_curves(
            {m: {s["tasks_seen"]: s["avg_acc"] for s in r["steps"]} for m, r in res["methods"].items()},
            png("class_split.png"), title="class-split sequence: all tasks seen", ylabel="avg accuracy (%)")
    else:
        settings = get(config, "settings", [[0.9, 0.99]], types=list)
        res = cosine_experiment(suite, settings=[tuple(s) for s in settings])
        figs["cosine"] = plots.cosine_heatmaps({k: np.array(v) for k, v in res["matrices"].items()}, suite.tasks,
                                               png("cosine_similarity.png"))
    summary = _jsonable({"experiment": kind, "suite": suite.name, "tasks": list(suite.tasks), **res,
                         "plots": {k: os.path.basename(v) for k, v in figs.items()}, "results_file": store.path,
                         "points_stored": len(store)})
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
