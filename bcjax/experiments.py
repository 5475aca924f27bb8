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

import numpy as np

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
