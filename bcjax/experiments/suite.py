"""The model-suite interface every experiment sees (SPEC §4) and the suite registry.

A :class:`ModelSuite` is task names, θ0, one fine-tuned tree per task and
``evaluate(stacked_params, task, split) -> float[M]`` (the accuracy of each of M models
stacked on a leading axis; splits ``"val"`` / ``"test"``), optionally their ``loss`` (mean
cross-entropy) on the same examples, plus — lazily, on demand — the
per-task values merge methods declare in ``requires`` (:data:`bcjax.merging.REQUIREMENTS`):
Fishers, data-set sizes, Gram matrices, batches, a model function. Nothing here knows the model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from typing import Any, Callable, Mapping, Sequence

from bcjax.config import ConfigError, get
from bcjax.errors import BcjaxError

__all__ = ["ModelSuite", "Evaluate", "register_suite", "suite_builders", "model_suite", "guard_splits",
           "SplitAccessError", "MissingRequirementError", "fingerprint", "tree_checksum"]

#: ``evaluate(stacked_params, task, split) -> float[M]`` accuracies of M stacked models.
Evaluate = Callable[[Any, str, str], Any]


class SplitAccessError(RuntimeError):
    """An experiment read a split it must not read (e.g. test while tuning, SPEC §4)."""


class MissingRequirementError(BcjaxError):
    """A merge method needs something (``requires``) the model suite cannot provide."""


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
      provides: requirement name (:data:`bcjax.merging.REQUIREMENTS`) → ``fn(task) -> value``
        for one task; computed on first use and kept (see :meth:`requirement`).
      seed: the PRNG seed of methods requiring a key when the hyper-parameters give no ``seed``.
      correctness: optional ``(stacked_params, task, split) -> bool[M, n]``, the per-example
        top-1 correctness of each stacked model on the same examples ``evaluate`` scores, with
        ``evaluate`` = its row means (count / n). When given, ``select`` and ``subsets`` evaluate
        through it (one pass: accuracies are derived from it) and add 95% bootstrap intervals
        (:mod:`bcjax.stats`, SPEC §4 "Uncertainty").
      examples: optional ``(task, split) -> (inputs, labels)``, the labeled examples
        ``evaluate`` scores (the same ones, in the same order): what the FusionBench protocols
        (:mod:`bcjax.experiments.fusionbench`) score predictors other than a stacked tree on
        (ensembles, models on corrupted inputs). Experiments that tune never read it.
      corrupt: optional ``(inputs, name, severity, seed) -> inputs``, the SPEC §4 robustness
        corruption of a batch of inputs (image suites: :func:`bcjax.data.corruptions.corrupt`).
      loss: optional ``(stacked_params, task, split) -> float[M]``, the mean cross-entropy
        (natural log, with the task's head) of each stacked model on the same examples
        ``evaluate`` scores (:func:`bcjax.evaluate.loss_of_stack`); what the FusionBench
        comparison reports next to each tree's accuracy. Experiments that tune never read it.
      multitask: optional ``() -> tree``, the multi-task reference model (SPEC §3: one model
        fine-tuned on the union of the tasks' training data with each task's frozen head, same
        recipe and total steps), trained on first call and cached by the suite's builder.
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
    provides: Mapping[str, Callable[[str], Any]] = dataclasses.field(default_factory=dict)
    seed: int = 0
    correctness: Callable[[Any, str, str], Any] | None = None
    examples: Callable[[str, str], tuple] | None = None
    corrupt: Callable[..., Any] | None = None
    multitask: Callable[[], Any] | None = None
    loss: Callable[[Any, str, str], Any] | None = None
    _computed: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if len(self.tasks) != len(self.finetuned):
            raise ValueError(f"ModelSuite {self.name!r}: {len(self.tasks)} tasks but {len(self.finetuned)} "
                             "fine-tuned models")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"ModelSuite {self.name!r}: duplicate task names {list(self.tasks)}")

    def with_evaluate(self, evaluate: Evaluate) -> "ModelSuite":
        """This suite scored by ``evaluate``; ``correctness`` is dropped (it must agree with
        ``evaluate``, so experiments on the result use the accuracy path), and so is ``loss``
        (it reads the splits ``evaluate`` reads, and would bypass a guard such as
        :func:`guard_splits`)."""
        out = dataclasses.replace(self, evaluate=evaluate, correctness=None, loss=None)
        out._computed.update(self._computed)  # requirements do not depend on evaluate
        return out

    def requirement(self, name: str, tasks: Sequence[str], *, method: str = "?") -> list:
        """The per-task values of requirement ``name`` for ``tasks`` (each computed once)."""
        if name not in self.provides:
            raise MissingRequirementError(f"merge method {method!r} requires {name!r}, which the model suite "
                                          f"{self.name!r} does not provide (it provides {sorted(self.provides)})")
        out = []
        for t in tasks:
            if (name, t) not in self._computed:
                self._computed[(name, t)] = self.provides[name](t)
            out.append(self._computed[(name, t)])
        return out


def guard_splits(evaluate: Evaluate, allowed: Sequence[str], what: str) -> Evaluate:
    """``evaluate`` that raises :class:`SplitAccessError` on any split outside ``allowed``:
    how tuning is kept off the test split (SPEC §4, validation-free setting)."""
    allowed = tuple(allowed)

    def guarded(stacked, task, split):
        if split not in allowed:
            raise SplitAccessError(f"{what} read split {split!r} of task {task!r}; only {allowed} are allowed")
        return evaluate(stacked, task, split)

    return guarded


def fingerprint(obj) -> str:
    """A short stable hash of a JSON-serializable description (results-store keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tree_checksum(trees) -> str:
    """A short hash of pytrees' leaf shapes and a strided sample of their values (≤ 512 per
    leaf, as float32): identifies loaded models in a suite's fingerprint cheaply."""
    import jax
    import numpy as np

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(trees):
        a = np.asarray(leaf)
        h.update(str(a.shape).encode())
        h.update(a.reshape(-1)[:: max(1, a.size // 512)].astype(np.float32).tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- registry
_BUILDERS: dict[str, Callable[..., ModelSuite]] = {}

#: Built-in suites: name → module that registers it on import (imported on first use).
BUILTIN_SUITES = {
    "dinov2_demo": "bcjax.experiments.dinov2",
    "dinov2_class_split": "bcjax.experiments.dinov2",
    "synthetic": "bcjax.testing.synthetic",
}


def register_suite(name: str):
    """Decorator registering ``build(config, *, cache_dir, progress) -> ModelSuite``."""

    def deco(fn):
        _BUILDERS[name] = fn
        return fn

    return deco


def suite_builders() -> dict[str, Callable[..., ModelSuite]]:
    for module in sorted(set(BUILTIN_SUITES.values())):
        importlib.import_module(module)
    return dict(_BUILDERS)


def model_suite(config: Mapping, *, cache_dir: str | None = None, progress: bool = True) -> ModelSuite:
    """The :class:`ModelSuite` named by ``config["suite"]["name"]``: a registered builder, or
    ``model_suite`` of the pipeline module of that name (``bcjax.pipelines.PIPELINES``)."""
    from bcjax.cache import cache_root

    name = get(config, "suite.name", types=str)
    if cache_dir is None:
        cache_dir = str(get(config, "cache_dir", str(cache_root()), types=str))
    if name not in _BUILDERS and name in BUILTIN_SUITES:
        importlib.import_module(BUILTIN_SUITES[name])
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
                      f"{sorted(set(_BUILDERS) | set(BUILTIN_SUITES) | set(PIPELINES))}")
