"""The embedded DINOv2 suites (SPEC §5 offline stand-in): ``dinov2_demo`` (DINOv2 ViT-S/14 on
the offline 8-task suite, reusing the demo's cached fine-tunes) and ``dinov2_class_split`` (one
data set's classes split into k-class tasks, Fig. 4). Both provide per-task Fishers,
training-set sizes, RegMean Grams, the per-task model function and the unlabeled test inputs
(AdaMerging), so every registered method runs on them."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax

from bcjax.config import ConfigError, get
from bcjax.experiments.class_split import class_subset, split_classes
from bcjax.experiments.settings import where
from bcjax.experiments.suite import Evaluate, ModelSuite, fingerprint, register_suite

__all__ = ["demo_config", "stack_evaluator", "dinov2_demo_suite", "dinov2_class_split_suite"]

_DEMO_KEYS = ("tasks", "resolution", "max_train", "max_val", "max_test", "k_shot", "eval_batch", "models_per_call",
              "seed")
_SUITE_KEYS = ("name", "preset", "train", "eval_examples", "dataset", "classes_per_task", "class_order",
               "gram_examples", *_DEMO_KEYS)
#: RegMean's training examples per task (SPEC §3: 256; fewer in the quick preset).
GRAM_EXAMPLES = {"quick": 64, "full": 256}


def demo_config(config: Mapping):
    """A :class:`bcjax.demo.DemoConfig` from ``suite.preset`` (quick | full) plus overrides
    (``suite.tasks``, ``suite.max_train``, ..., ``suite.train.steps``, ...)."""
    from bcjax.demo import DemoConfig
    from bcjax.train import train_config_from_dict

    unknown = sorted(set(get(config, "suite", {}, types=dict)) - set(_SUITE_KEYS))
    if unknown:
        raise ConfigError(f"{where(config)}: unknown key suite.{unknown[0]}; accepted: {sorted(_SUITE_KEYS)}")
    preset = get(config, "suite.preset", "quick", types=str)
    if preset not in ("quick", "full"):
        raise ConfigError(f"{where(config)}: suite.preset must be 'quick' or 'full', got {preset!r}")
    cfg = DemoConfig.quick() if preset == "quick" else DemoConfig.full()
    over = {}
    for key in _DEMO_KEYS:
        v = get(config, f"suite.{key}", None)
        if v is not None:
            over[key] = tuple(v) if key == "tasks" else v
    train = get(config, "suite.train", None, types=(dict, type(None)))
    if train:
        over["train"] = train_config_from_dict(train, base=cfg.train, where=f"{where(config)}: suite.train")
    return dataclasses.replace(cfg, **over)


def stack_evaluator(predict, tasks: Mapping[str, Any], heads: Mapping[str, tuple], eval_examples: Mapping[str, int],
                    batch: int, models_per_call: int, *, seed: int = 0) -> tuple[Evaluate, Evaluate, Evaluate]:
    """``(evaluate, correctness, loss)``, each ``fn(stacked, task, split)``: accuracies float[M],
    per-example correctness bool[M, n] and mean cross-entropies float[M] on
    ``eval_examples[split]`` seeded class-stratified examples of the split (all if None;
    :func:`bcjax.demo.split_examples`)."""
    from bcjax.evaluate import accuracy_of_stack, correctness_of_stack, loss_of_stack

    data = _examples(tasks, eval_examples, seed)

    def evaluate(stacked, task, split):
        x, y = data(task, split)
        return accuracy_of_stack(predict, stacked, x, y, batch_size=min(batch, len(y)),
                                 models_per_call=models_per_call, predict_args=heads[task])

    def correctness(stacked, task, split):
        x, y = data(task, split)
        return correctness_of_stack(predict, stacked, x, y, batch_size=min(batch, len(y)),
                                    models_per_call=models_per_call, predict_args=heads[task])

    def loss(stacked, task, split):
        x, y = data(task, split)
        return loss_of_stack(predict, stacked, x, y, batch_size=min(batch, len(y)),
                             models_per_call=models_per_call, predict_args=heads[task])

    return evaluate, correctness, loss


def _gram_examples(config) -> int:
    return get(config, "suite.gram_examples", GRAM_EXAMPLES[get(config, "suite.preset", "quick", types=str)],
               types=int)


def _gram_tag(config) -> dict:
    """``gram_examples`` for the suite fingerprint when it is not the preset's default (so the
    fingerprints, and the results stored under them, of existing configs do not change)."""
    n = _gram_examples(config)
    return {} if n == GRAM_EXAMPLES[get(config, "suite.preset", "quick", types=str)] else {"gram_examples": n}


def _provides(ctx, finetuned, gram_examples: int) -> dict:
    """What merge methods require, per task, each computed on first use
    (:meth:`ModelSuite.requirement`): Fishers (the task's first ``fisher_examples`` training
    images, labels sampled from the model, as the demo), training-set sizes, RegMean Grams of
    every Dense layer's inputs over the first ``gram_examples`` training images with the task's
    own fine-tuned model (:func:`bcjax.models.grams.collect_grams`), ``model_fn`` (logits with
    the task's frozen head) and ``unlabeled_batches``: the task's test images, without labels
    (AdaMerging is test-time adaptation, SPEC §3)."""
    from bcjax.fisher import diagonal_fisher
    from bcjax.models import dinov2

    by_name = dict(zip(ctx.names, finetuned, strict=True))
    n = ctx.cfg.fisher_examples
    feats = dinov2.make_features(ctx.model_config)  # one function: one compiled Gram step for every task

    def grams(t):
        from bcjax.models.grams import collect_grams

        return collect_grams(feats, by_name[t], ctx.task(t).splits["train"][0][:gram_examples],
                             batch_size=ctx.cfg.eval_batch)

    def model_fn(t):
        head = ctx.heads[t]
        return lambda params, x: ctx.predict(params, x, *head)

    return {
        "fishers": lambda t: diagonal_fisher(ctx.predict, by_name[t], ctx.task(t).splits["train"][0][:n],
                                             jax.random.key(ctx.cfg.seed), predict_args=ctx.heads[t]),
        "dataset_sizes": lambda t: ctx.task(t).sizes["train"],
        "grams": grams,
        "model_fn": model_fn,
        "unlabeled_batches": lambda t: ctx.task(t).splits["test"][0],  # inputs only: labels are never passed
    }


def _examples(tasks: Mapping[str, Any], eval_examples: Mapping[str, int | None], seed: int = 0):
    """``examples(task, split)``: the labeled images the suite scores — ``eval_examples[split]``
    seeded class-stratified examples of the split (all if None; :func:`bcjax.demo.split_examples`)."""
    from bcjax.demo import split_examples

    def examples(task, split):
        return split_examples(tasks[task], split, eval_examples.get(split), seed=seed)

    return examples


def _protocol_fields(ctx, tasks, eval_examples, progress: bool, seed: int) -> dict:
    """The ModelSuite fields of the FusionBench protocols: ``examples``, ``corrupt`` (the SPEC §4
    image corruptions) and ``multitask`` (:func:`bcjax.demo.finetune_multitask`, on first use)."""
    from bcjax import demo
    from bcjax.data.corruptions import corrupt

    return {"examples": _examples(tasks, eval_examples, seed), "corrupt": corrupt,
            "multitask": lambda: demo.finetune_multitask(ctx, progress=progress)}


def _eval_examples(config):
    return {s: get(config, f"suite.eval_examples.{s}", None, types=(int, type(None))) for s in ("val", "test")}


@register_suite("dinov2_demo")
def dinov2_demo_suite(config: Mapping, *, cache_dir: str, progress: bool = True) -> ModelSuite:
    """The embedded suite (DINOv2 ViT-S/14, offline tasks, frozen prototype heads); fine-tunes
    are the demo's, cached under ``cache_dir`` (a rerun loads them)."""
    from bcjax import demo

    cfg = demo_config(config)
    ctx = demo.setup(cfg, cache_dir, progress=progress)
    finetuned = demo.finetune_tasks(ctx, progress=progress)
    eval_examples = _eval_examples(config)
    tasks = {t.name: t for t in ctx.tasks}
    evaluate, correctness, loss = stack_evaluator(ctx.predict, tasks, ctx.heads, eval_examples, cfg.eval_batch,
                                            cfg.models_per_call, seed=cfg.seed)
    fp = fingerprint(dict(suite="dinov2_demo", finetune=cfg.finetune_fingerprint(), tasks=list(cfg.tasks),
                          max_val=cfg.max_val, max_test=cfg.max_test, eval=eval_examples, sample="stratified",
                          **_gram_tag(config)))
    return ModelSuite(name=demo.SUITE_NAME, tasks=tuple(ctx.names), pretrained=ctx.params0, finetuned=tuple(finetuned),
                      evaluate=evaluate, correctness=correctness, loss=loss, fingerprint=fp, heads=ctx.heads,
                      models_per_call=cfg.models_per_call,
                      info={"sizes": {t.name: t.sizes for t in ctx.tasks}, "config_fingerprint": cfg.fingerprint()},
                      provides=_provides(ctx, finetuned, _gram_examples(config)),
                      **_protocol_fields(ctx, tasks, eval_examples, progress, cfg.seed))


@register_suite("dinov2_class_split")
def dinov2_class_split_suite(config: Mapping, *, cache_dir: str, progress: bool = True) -> ModelSuite:
    """One data set of the offline suite (``suite.dataset``, e.g. mnist) split into tasks of
    ``suite.classes_per_task`` classes; per-task prototype heads; one cached fine-tune per task."""
    from bcjax import demo
    from bcjax.data.suite import load_suite
    from bcjax.data.task import Task
    from bcjax.models import dinov2

    cfg = demo_config(config)
    dataset = get(config, "suite.dataset", "mnist", types=str)
    k = get(config, "suite.classes_per_task", 2, types=int)
    log = demo.StageLog(progress)
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
    ctx = demo.DemoContext(cfg=dataclasses.replace(cfg, tasks=tuple(t.name for t in tasks)), cache_root=cache_dir,
                           model_config=model_config, params0=params0, tasks=tasks, heads=heads, predict=predict,
                           loss=loss, log=log, store=None)
    finetuned = demo.finetune_tasks(ctx, progress=progress)
    eval_examples = _eval_examples(config)
    by_name = {t.name: t for t in tasks}
    evaluate, correctness, loss = stack_evaluator(predict, by_name, heads, eval_examples, cfg.eval_batch,
                                            cfg.models_per_call, seed=cfg.seed)
    fp = fingerprint(dict(suite="dinov2_class_split", finetune=cfg.finetune_fingerprint(), dataset=dataset,
                          groups=groups, max_val=cfg.max_val, max_test=cfg.max_test, eval=eval_examples,
                          sample="stratified", **_gram_tag(config)))
    return ModelSuite(name=f"{dataset} split into {len(groups)} tasks of {k} classes (DINOv2 ViT-S/14)",
                      tasks=tuple(t.name for t in tasks), pretrained=params0, finetuned=tuple(finetuned),
                      evaluate=evaluate, correctness=correctness, loss=loss, fingerprint=fp, heads=heads,
                      models_per_call=cfg.models_per_call,
                      info={"classes": [list(g) for g in groups], "sizes": {t.name: t.sizes for t in tasks}},
                      provides=_provides(ctx, finetuned, _gram_examples(config)),
                      **_protocol_fields(ctx, by_name, eval_examples, progress, cfg.seed))
