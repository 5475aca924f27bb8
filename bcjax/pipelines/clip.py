"""``pipeline: clip`` -- fine-tune CLIP's vision tower per task, then evaluate zero-shot,
fine-tuned and merged models (SPEC §4–5). Driven by ``bcjax finetune|eval --config``.

Config (see ``configs/clip_vit_b32.yaml``; every key but ``model.name`` and
``data.tasks`` has a default)::

    pipeline: clip
    model: {name: openai/clip-vit-base-patch32, dtype: float32}
    data: {tasks: [cars, dtd, ...], data_dir: null, gtsrb_dir: null, prepare: false, seed: 0,
           max_train: null, max_eval: null, materialize_mb: 2048, cache_images: true}
    train: {steps: 2000, batch_size: 128, learning_rate: 1.0e-5, weight_decay: 0.1,
            warmup_steps: 200, grad_clip_norm: 1.0, checkpoint_every: 500, seed: 0}
    finetuned: {source: local, dir: null, paths: {}}
    eval: {split: test, batch_size: 128, models_per_call: 2, merges: [...], export: false}
    cache_dir: null

Images: a task whose preprocessed splits fit in ``data.materialize_mb`` is decoded into
memory; a larger one is preprocessed once into memory-mapped ``.npy`` files under
``<cache_dir>/images`` (``data.cache_images: false``: decode on the fly every batch).

Layout under ``--out``: ``checkpoints/<task>`` (orbax, resumable), ``finetuned/<task>/flax``
(the fine-tuned vision tower, HF ``save_pretrained``), ``summary_finetune.json``,
``summary_eval.json``, ``merged/<i>-<method>/{flax,pytorch}`` when ``eval.export``.

Fine-tuned models for ``bcjax eval``: ``finetuned.source: local`` reads
``finetuned.dir`` (default ``<out>/finetuned``, i.e. run finetune and eval with the same
``--out``); ``fusionbench`` imports FusionBench's ``CLIPVisionModel`` fine-tunes from the
hub; ``paths`` maps a task to any HF CLIPVisionModel folder/hub name (Flax or PyTorch).

Sweeps (``bcjax sweep``, :mod:`bcjax.experiments`): :func:`model_suite` builds the
``ModelSuite`` from a sweep config with ``suite: {name: clip, config: <clip yaml>, out:
<the finetune --out>, set: [key=value, ...]}`` (or the CLIP keys at the sweep config's top
level).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from bcjax import evaluate as evaluate_lib
from bcjax.config import ConfigError, get, require
from bcjax.models import heads as heads_lib

__all__ = ["finetune", "evaluate", "model_suite", "setup", "ClipSetup", "train_config", "default_cache_dir"]


def default_cache_dir() -> str:
    from bcjax.cache import cache_root

    return str(cache_root("clip"))


def check_config(config: dict) -> None:
    """Every key of a CLIP pipeline config is known (:func:`bcjax.config.check_keys`) and every
    ``eval.merges`` entry names a registered method and its hyper-parameters — before any
    model or data is loaded."""
    from bcjax.config import ANY, check_keys
    from bcjax.train import TRAIN_KEYS

    check_keys(config, {
        "pipeline": ANY, "cache_dir": ANY, "suite": ANY,  # suite: when a sweep runs on this pipeline
        "model": dict.fromkeys(("name", "dtype")),
        "data": dict.fromkeys(("tasks", "data_dir", "gtsrb_dir", "prepare", "seed", "max_train", "max_eval",
                               "materialize_mb", "cache_images")),
        "train": dict.fromkeys(TRAIN_KEYS),
        "finetuned": dict.fromkeys(("source", "dir", "paths")),
        "eval": dict.fromkeys(("split", "batch_size", "models_per_call", "export", "merges")),
    })
    from bcjax.merging import get_method

    for i, entry in enumerate(get(config, "eval.merges", [], types=(list, type(None))) or []):
        require(isinstance(entry, dict) and "method" in entry, config,
                f"eval.merges[{i}] must be a mapping with 'method', got {entry!r}")
        try:
            m = get_method(str(entry["method"]))
        except KeyError as e:
            raise ConfigError(f"{config.get('_source', '<config>')}: eval.merges[{i}].method: {e}") from None
        accepted = set(m.tunable) | {"method", "label"} | ({"seed"} if "key" in m.requires else set())
        bad = sorted(set(entry) - accepted)
        require(not bad, config, f"eval.merges[{i}].{bad[0] if bad else ''}: {m.name} has no hyper-parameter "
                f"{bad[0] if bad else ''!r}; accepted: {sorted(accepted)}")


def train_config(config: dict):
    """:class:`bcjax.train.TrainConfig` from ``config["train"]`` (paper defaults, SPEC §5)."""
    from bcjax.train import train_config_from_dict

    src = config.get("_source")
    return train_config_from_dict(get(config, "train", {}, types=dict), where=f"{src}: train" if src else "train")


@dataclasses.dataclass
class ClipSetup:
    """Model, tasks, frozen heads and the shared predict/loss of one config."""

    config: dict
    clip: object
    tasks: list
    heads: dict  # task → (proj_kernel, logit_scale, head_w, head_valid)
    predict: object
    loss: object

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name):
        return next(t for t in self.tasks if t.name == name)


def _log(progress, msg):
    if progress:
        print(f"[clip] {msg}", flush=True)


def setup(config: dict, *, progress: bool = True) -> ClipSetup:
    """Load the CLIP (``model.name``), the tasks (``data.*``) and their zero-shot heads
    (cached per model and data set under ``cache_dir``)."""
    from bcjax.data import vision
    from bcjax.models import clip as clip_lib

    name = get(config, "model.name", types=str)
    dtype = jnp.dtype(get(config, "model.dtype", "float32", types=str))
    clip = clip_lib.load_clip(name, dtype=dtype)
    _log(progress, f"model {name}: image size {clip.image_size}")
    entries = get(config, "data.tasks", types=list)
    require(len(entries) > 0, config, "data.tasks is empty")
    common = dict(data_dir=_path(get(config, "data.data_dir", None, types=(str, type(None)))),
                  image_size=clip.image_size, seed=get(config, "data.seed", 0, types=int),
                  max_train=get(config, "data.max_train", None, types=(int, type(None))),
                  max_eval=get(config, "data.max_eval", None, types=(int, type(None))),
                  prepare=get(config, "data.prepare", False, types=bool),
                  gtsrb_dir=_path(get(config, "data.gtsrb_dir", None, types=(str, type(None)))))
    max_bytes = int(get(config, "data.materialize_mb", 2048, types=(int, float)) * 2**20)
    cache = _path(get(config, "cache_dir", None, types=(str, type(None)))) or default_cache_dir()
    disk = cache if get(config, "data.cache_images", True, types=bool) else None
    tasks = [vision.materialize(vision.load_task(e, **common), max_bytes, disk) for e in entries]
    dup = sorted({t.name for t in tasks if [u.name for u in tasks].count(t.name) > 1})
    require(not dup, config, f"data.tasks names repeat: {dup}")
    _log(progress, "tasks " + ", ".join(f"{t.name} {t.sizes}" for t in tasks))
    cmax = max(t.num_classes for t in tasks)
    frozen = clip_lib.head_args(clip)
    heads = {}
    for t in tasks:
        w = clip_lib.cached_zero_shot_head(clip, t.name, t.class_names, t.templates, cache_dir=cache)
        heads[t.name] = tuple(frozen) + tuple(jnp.asarray(a) for a in heads_lib.pad_head(w, cmax))
    _log(progress, f"zero-shot heads ({len(tasks)} tasks, padded to {cmax} classes) cached in {cache}")
    predict, loss = clip_lib.make_classifier(clip.config, dtype)
    return ClipSetup(config, clip, tasks, heads, predict, loss)


def _path(p):
    return os.path.expanduser(p) if p else p


def _write_json(path: pathlib.Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def finetune(config: dict, *, out_dir: str, progress: bool = True) -> dict:
    """Fine-tune the vision tower on each task (head frozen; SPEC §5), resuming from
    ``<out>/checkpoints/<task>``; save each as ``<out>/finetuned/<task>/flax``."""
    from bcjax.models import clip as clip_lib
    from bcjax.train import finetune as run_finetune

    cfg = train_config(config)
    s = setup(config, progress=progress)
    out = pathlib.Path(out_dir)
    theta0 = s.clip.vision
    summary = {"model": s.clip.name, "train": dataclasses.asdict(cfg), "tasks": {}}
    for t in s.tasks:
        x, y = t.splits["train"]
        t0 = time.perf_counter()
        res = run_finetune(s.loss, theta0, {"x": x, "y": y}, cfg, checkpoint_dir=str(out / "checkpoints" / t.name),
                           progress=progress, description=f"fine-tune {t.name}", loss_args=s.heads[t.name])
        saved = clip_lib.export_vision(jax.device_get(res.params), s.clip.config, out / "finetuned" / t.name,
                                       formats=("flax",))
        summary["tasks"][t.name] = dict(
            steps=cfg.steps, train_examples=len(y), resumed_from=res.resumed_from,
            first_loss=res.losses[0] if res.losses else None, final_loss=res.losses[-1] if res.losses else None,
            seconds=round(time.perf_counter() - t0, 2), path=saved["flax"])
        _log(progress, f"{t.name}: loss {summary['tasks'][t.name]['first_loss']} → "
                       f"{summary['tasks'][t.name]['final_loss']} ({saved['flax']})")
    _write_json(out / "summary_finetune.json", summary)
    return summary


def _finetuned_models(s: ClipSetup, out: pathlib.Path) -> list:
    from bcjax.models import clip as clip_lib

    config = s.config
    source = get(config, "finetuned.source", "local", types=str)
    paths = get(config, "finetuned.paths", {}, types=dict)
    ref = s.clip.vision
    models = []
    for name in s.names:
        if name in paths:
            where = _path(str(paths[name]))
        elif source == "local":
            root = pathlib.Path(_path(get(config, "finetuned.dir", None, types=(str, type(None)))) or out / "finetuned")
            where = str(root / name / "flax")
            require(os.path.isdir(where), config, f"no fine-tuned model for task {name!r} at {where}: run "
                    "`bcjax finetune` with the same --out, or set finetuned.dir / finetuned.paths")
        elif source == "fusionbench":
            where = clip_lib.fusionbench_name(name, get(config, "model.name", types=str))
        else:
            raise ConfigError(f"{config.get('_source', '<config>')}: finetuned.source must be 'local' or "
                              f"'fusionbench', got {source!r}")
        models.append(clip_lib.load_vision_finetune(where, ref))
    return models


def provides(s: ClipSetup, finetuned: list) -> dict:
    """What merge methods may require (:data:`bcjax.merging.REQUIREMENTS`), per task, each
    computed on first use: the diagonal Fisher of the task's fine-tune on its first
    ``eval.fisher_examples`` (default 64) training images, labels sampled from the model, seed
    ``eval.fisher_seed`` (default 0); the training-set size; RegMean Grams of the vision
    tower's Dense layers over the first ``eval.gram_examples`` (default 256, SPEC §3) training
    images with the task's own fine-tune (:func:`bcjax.models.grams.collect_grams`; the frozen
    visual projection is not merged); ``model_fn`` (logits with the task's zero-shot head) and
    ``unlabeled_batches``: the task's test images without labels (AdaMerging, SPEC §3)."""
    from bcjax.fisher import diagonal_fisher
    from bcjax.models import clip as clip_lib

    n = get(s.config, "eval.fisher_examples", 64, types=int)
    n_gram = get(s.config, "eval.gram_examples", 256, types=int)
    seed = get(s.config, "eval.fisher_seed", 0, types=int)
    by_name = dict(zip(s.names, finetuned, strict=True))
    vision_config = getattr(s.clip.config, "vision_config", s.clip.config)
    proj_kernel = clip_lib.head_args(s.clip)[0]

    def tower(vision_model, images):  # one function for every task: one compiled Gram step
        return clip_lib.image_embeds({"vision_model": vision_model}, images, proj_kernel, vision_config=vision_config)

    def grams(t):
        from bcjax.models.grams import collect_grams

        return collect_grams(tower, by_name[t]["vision_model"], s.task(t).splits["train"][0][:n_gram],
                             batch_size=get(s.config, "eval.batch_size", 128, types=int), prefix="vision_model")

    def model_fn(t):
        head = s.heads[t]
        return lambda vision, images: s.predict(vision, images, *head)

    return {"fishers": lambda t: diagonal_fisher(s.predict, by_name[t], s.task(t).splits["train"][0][:n],
                                                 jax.random.key(seed), predict_args=s.heads[t]),
            "dataset_sizes": lambda t: s.task(t).sizes["train"],
            "grams": grams,
            "model_fn": model_fn,
            "unlabeled_batches": lambda t: s.task(t).splits["test"][0]}  # inputs only: labels never passed


def _check_merge_entries(config: dict) -> None:
    """``eval.merges`` entries checked before any work: a mapping with a registered 'method'
    and hyper-parameter values its spec accepts (:func:`bcjax.experiments.settings.check_method_hparams`)."""
    from bcjax.experiments.settings import check_method_hparams

    for i, entry in enumerate(get(config, "eval.merges", [], types=list)):
        require(isinstance(entry, dict) and "method" in entry, config,
                f"eval.merges[{i}] must be a mapping with 'method', got {entry!r}")
        check_method_hparams(config, f"eval.merges[{i}]", entry["method"],
                             {k: v for k, v in entry.items() if k not in ("method", "label")})


def _suite(s: ClipSetup, finetuned: list, fingerprint: str = "", *, out: pathlib.Path | None = None,
           progress: bool = True):
    """The :class:`bcjax.experiments.ModelSuite` of the CLIP vision towers: ``evaluate(stacked,
    task, split)`` by :func:`bcjax.evaluate.accuracy_of_stack` with each task's frozen zero-shot
    head (``eval.batch_size``, ``eval.models_per_call``), ``loss`` (mean cross-entropy,
    :func:`bcjax.evaluate.loss_of_stack`, same examples), :func:`provides`, the labeled
    ``examples``, the SPEC §4 ``corrupt`` and, given the run folder ``out``, the ``multitask``
    reference (:func:`finetune_multitask`, the ``train`` recipe of ``s.config``)."""
    from bcjax.data.corruptions import corrupt
    from bcjax.experiments import ModelSuite

    bs = get(s.config, "eval.batch_size", 128, types=int)
    per_call = get(s.config, "eval.models_per_call", 2, types=int)

    def evaluate(stacked, task, split, score=evaluate_lib.accuracy_of_stack):
        if split not in ("val", "test"):
            raise ConfigError(f"CLIP suite: split must be 'val' or 'test', got {split!r}")
        x, y = s.task(task).splits[split]
        return score(s.predict, stacked, x, y, batch_size=bs, models_per_call=per_call, predict_args=s.heads[task])

    def loss(stacked, task, split):  # mean cross-entropy on the same examples
        return evaluate(stacked, task, split, score=evaluate_lib.loss_of_stack)

    return ModelSuite(name=f"CLIP {s.clip.name}", tasks=tuple(s.names), pretrained=s.clip.vision,
                      finetuned=tuple(finetuned), evaluate=evaluate, loss=loss, fingerprint=fingerprint,
                      heads={n: s.heads[n][2] for n in s.names}, models_per_call=per_call,
                      info={"model": s.clip.name, "sizes": {t.name: t.sizes for t in s.tasks}},
                      provides=provides(s, finetuned),
                      examples=lambda task, split: s.task(task).splits[split], corrupt=corrupt,
                      multitask=None if out is None else (
                          lambda: finetune_multitask(s, train_config(s.config), out, progress=progress)))


def _merge_models(s: ClipSetup, suite) -> list[tuple[str, dict, object]]:
    from bcjax.experiments.engine import method_inputs
    from bcjax.merging import get_method, merge

    out = []
    for i, entry in enumerate(get(s.config, "eval.merges", [], types=list)):
        require(isinstance(entry, dict) and "method" in entry, s.config,
                f"eval.merges[{i}] must be a mapping with 'method', got {entry!r}")
        hp = {k: v for k, v in entry.items() if k not in ("method", "label")}
        method = entry["method"]
        needs = get_method(method).requires
        label = entry.get("label") or f"{method}" + "".join(f" {k}={v}" for k, v in sorted(hp.items())
                                                             if k != "seed" and k not in needs)
        out.append((label, entry, merge(method, suite.pretrained, list(suite.finetuned),
                                        **method_inputs(suite, method, hp, s.names))))
    return out


def evaluate(config: dict, *, out_dir: str, progress: bool = True) -> dict:
    """Accuracy of the zero-shot θ0, of each fine-tune on its task, and of every merge in
    ``eval.merges`` on every task (protocol *all*, SPEC §4) with normalized accuracy."""
    from bcjax.experiments.engine import evaluate_models
    from bcjax.models import clip as clip_lib
    from bcjax.results_store import ResultsStore

    _check_merge_entries(config)
    s = setup(config, progress=progress)
    out = pathlib.Path(out_dir)
    split = get(config, "eval.split", "test", types=str)
    require(split in ("val", "test"), config, f"eval.split must be 'val' or 'test', got {split!r}")
    bs = get(config, "eval.batch_size", 128, types=int)

    def acc(params, name):
        x, y = s.task(name).splits[split]
        return evaluate_lib.accuracy(s.predict, params, x, y, batch_size=bs, predict_args=s.heads[name])

    theta0 = s.clip.vision
    zero_shot = {n: acc(theta0, n) for n in s.names}
    _log(progress, "zero-shot " + ", ".join(f"{n} {100 * a:.1f}" for n, a in zero_shot.items()))
    finetuned = _finetuned_models(s, out)
    ft_acc = {n: acc(p, n) for n, p in zip(s.names, finetuned, strict=True)}
    _log(progress, "fine-tuned " + ", ".join(f"{n} {100 * a:.1f}" for n, a in ft_acc.items()))
    summary = {"model": s.clip.name, "split": split, "tasks": s.names, "zero_shot": zero_shot, "finetuned": ft_acc,
               "zero_shot_normalized": _safe_norm(zero_shot, ft_acc), "merges": {}}
    suite = _suite(s, finetuned)
    merged = _merge_models(s, suite)
    if merged:
        # the engine's chunked evaluation: models_per_call merges per compiled call, every task once per chunk
        per_merge = evaluate_models(suite, ResultsStore(None), [{"merge": i} for i in range(len(merged))],
                                    [s.names] * len(merged),
                                    lambda idx: evaluate_lib.stack_trees([merged[i][2] for i in idx]), split,
                                    chunk=suite.models_per_call, progress=False, desc="merges")
        for i, ((label, entry, tree), a) in enumerate(zip(merged, per_merge, strict=True)):
            norm = _safe_norm(a, ft_acc)
            rec = {"hparams": {k: v for k, v in entry.items() if k != "label"}, "accuracy": a,
                   "avg_accuracy": float(np.mean(list(a.values()))), "normalized": norm,
                   "avg_normalized": float(np.mean(list(norm.values()))) if norm else None}
            if get(config, "eval.export", False, types=bool):
                rec["export"] = clip_lib.export_vision(jax.device_get(tree), s.clip.config,
                                                       out / "merged" / f"{i}-{entry['method']}")
            summary["merges"][label] = rec
            an = rec["avg_normalized"]
            _log(progress, f"{label}: avg acc {100 * rec['avg_accuracy']:.1f}, avg normalized "
                           + ("n/a" if an is None else f"{100 * an:.1f}"))
    _write_json(out / "summary_eval.json", summary)
    return summary


def _safe_norm(acc: dict, ref: dict) -> dict:
    """Normalized accuracy (SPEC §4) for tasks whose fine-tuned accuracy is > 0."""
    return evaluate_lib.normalized_accuracy({k: v for k, v in acc.items() if ref[k] > 0},
                                            {k: v for k, v in ref.items() if v > 0})


def model_suite(config: dict, *, cache_dir: str | None = None, progress: bool = True):
    """A :class:`bcjax.experiments.ModelSuite` over the CLIP vision towers: θ0, the
    fine-tunes (as in ``bcjax eval``) and ``evaluate(stacked, task, split)`` by
    :func:`bcjax.evaluate.accuracy_of_stack` with each task's frozen zero-shot head.

    ``suite.config`` (a CLIP pipeline YAML, with ``suite.set`` overrides) or the sweep config
    itself supplies the model/data/finetuned/eval keys; ``suite.out`` is where
    ``bcjax finetune`` wrote the fine-tunes (default: the current folder)."""
    from bcjax.config import load_config
    from bcjax.experiments.suite import fingerprint, tree_checksum

    src = get(config, "suite.config", None, types=(str, type(None)))
    clip_cfg = load_config(src, get(config, "suite.set", [], types=list)) if src else dict(config)
    if src:
        check_config(clip_cfg)  # the pipeline config's keys, before loading anything
    if "cache_dir" not in clip_cfg and cache_dir:
        clip_cfg["cache_dir"] = os.path.join(cache_dir, "clip")
    s = setup(clip_cfg, progress=progress)
    out = pathlib.Path(_path(get(config, "suite.out", ".", types=str)))
    finetuned = _finetuned_models(s, out)
    data_keys = {k: clip_cfg.get("data", {}).get(k) for k in ("tasks", "seed", "max_train", "max_eval")}
    fp = fingerprint(dict(model=s.clip.name, data=data_keys, theta0=tree_checksum(s.clip.vision),
                          finetuned=tree_checksum(finetuned), sizes={t.name: t.sizes for t in s.tasks}))
    return _suite(s, finetuned, fp, out=out, progress=progress)


def finetune_multitask(s: "ClipSetup", cfg, out: pathlib.Path, *, progress: bool = True):
    """The multi-task reference (SPEC §3) of the CLIP suite: one fine-tune of the vision tower on
    the union of the tasks' training images, each with its task's frozen zero-shot head, the
    per-task recipe ``cfg`` with ``steps × T`` (:func:`bcjax.train.multitask_finetune`); resumable
    from ``<out>/checkpoints/multitask-<tasks hash>``."""
    from bcjax.experiments.suite import fingerprint
    from bcjax.train import multitask_finetune

    tag = fingerprint(list(s.names))
    res = multitask_finetune(s.loss, s.clip.vision,
                             [dict(zip(("x", "y"), s.task(n).splits["train"], strict=True)) for n in s.names],
                             [s.heads[n] for n in s.names], cfg,
                             checkpoint_dir=str(out / "checkpoints" / f"multitask-{tag}"), progress=progress,
                             description="multi-task fine-tune")
    return jax.device_put(res.params, jax.devices()[0])
