"""The experiment engine (SPEC §4: Fig. 2, 3, 4, 7, 8, 9 and Table 2) over any model suite.

Rooms, one-way: :mod:`~bcjax.experiments.suite` (the :class:`ModelSuite` interface and the
suite registry) ← :mod:`~bcjax.experiments.engine` (chunked, resumable evaluation and model
builders) ← one module per experiment (``select``, ``subsets``, ``grid``, ``validation_free``,
``class_split``, ``cosine``, ``target_task``, ``robustness``, ``generalization``, ``scaling``, ``fusionbench``), each with a typed settings dataclass and
registered by name (:func:`register_experiment`) ← :mod:`~bcjax.experiments.runner`
(:func:`run_sweep`, behind ``bcjax sweep``).

**Adding a model family.** Register a builder::

    @register_suite("my_suite")
    def build(config: dict, *, cache_dir: str, progress: bool) -> ModelSuite: ...

or give the pipeline module named in ``bcjax.pipelines.PIPELINES`` a function
``model_suite(config, *, cache_dir, progress) -> ModelSuite``. A suite that can compute
Fishers, Gram matrices, ... lists them in ``ModelSuite.provides`` (per task, lazily); then
every method requiring them runs on it. Built in: ``dinov2_demo``, ``dinov2_class_split``
(:mod:`bcjax.experiments.dinov2`) and ``synthetic`` (:mod:`bcjax.testing.synthetic`).

**Adding an experiment.** A module with a settings dataclass and
``@register_experiment(name, settings=..., figures=...)`` on ``run(suite, store, settings, *,
chunk, mesh, progress) -> dict``; import it in :mod:`~bcjax.experiments.runner`. An optional
``report=fn(summary, plots) -> {filename: text}`` writes extra files (``fusionbench``: report.json,
report.md). FusionBench's protocols: ``robustness``, ``generalization``, ``scaling`` and the
one-run ``fusionbench`` comparison (:mod:`~bcjax.experiments.rows` holds their shared rows).
"""
from bcjax.experiments.class_split import class_split_experiment, class_subset, prefix_indicator, split_classes
from bcjax.experiments.cosine import cosine_experiment
from bcjax.experiments.engine import (evaluate_models, grid_builder, lazy_builder, method_builder, method_inputs,
                                      pad_chunk, reference_accuracy)
from bcjax.experiments.grid import grid_experiment
from bcjax.experiments.registry import Experiment, experiments, get_experiment, register_experiment
from bcjax.experiments.runner import EXPERIMENTS, run_sweep
from bcjax.experiments.select import select_and_test
from bcjax.experiments.settings import MethodSpec, parse_methods, parse_section, sweep_mesh
from bcjax.experiments.subsets import subsets_experiment
from bcjax.experiments.suite import (MissingRequirementError, ModelSuite, SplitAccessError, guard_splits,
                                     model_suite, register_suite, suite_builders)
from bcjax.experiments.target_task import mean_and_stderr, target_task_experiment, target_task_merge
from bcjax.experiments.validation_free import tune_validation_free, validation_free_experiment

__all__ = ["ModelSuite", "register_suite", "suite_builders", "model_suite", "guard_splits", "SplitAccessError",
           "MissingRequirementError", "Experiment", "register_experiment", "experiments", "get_experiment",
           "EXPERIMENTS", "run_sweep", "MethodSpec", "parse_methods", "parse_section", "sweep_mesh",
           "reference_accuracy", "evaluate_models", "method_builder", "lazy_builder", "grid_builder",
           "method_inputs", "pad_chunk", "select_and_test", "subsets_experiment", "grid_experiment",
           "tune_validation_free", "validation_free_experiment", "class_split_experiment", "split_classes",
           "class_subset", "prefix_indicator", "cosine_experiment", "target_task_merge", "target_task_experiment",
           "mean_and_stderr"]
