"""T5 on GLUE, text-to-text: fine-tuning, evaluation and target-task improvement (SPEC §4–5).

Config (``pipeline: t5``; see ``configs/t5_base_glue.yaml``)::

    model:  {name: google-t5/t5-base, tokenizer: null, from_pt: null, dtype: float32}
    data:   {tasks: [mrpc, rte, cola, sst2], data_dir: null, download: false, val_size: 0.1,
             split_seed: 0, max_input_length: 256, truncation: truncate, max_examples: null}
    train:  {steps, batch_size, learning_rate, weight_decay, warmup_steps, seeds: [0]}
    eval:   {prediction: rank | generate | both, batch_size: 32, finetuned_dir: null}
    target_task:   # optional, run by ``bcjax eval`` (paper Table 2)
      aux_models: [hub names or paths of fine-tunes of the same base]
      grids: {breadcrumbs: {alpha: [...], beta: [...], gamma: [...]}, task_arithmetic: {alpha: [...]}}

``finetune`` trains one model per (task, seed) with :func:`bcjax.train.finetune` (AdamW,
warm-up + cosine, jitted data-parallel step, orbax checkpoints with resume; dropout off) on
the text-to-text cross-entropy, saves it under ``<out>/models/<task>_seed<s>`` and reports
val/test metrics. ``evaluate`` scores the pretrained model and those fine-tunes, and,
with ``target_task``, runs :func:`target_task_experiment`.

As a sweep suite (``suite: {name: t5, ...}``, :func:`model_suite`) the fine-tunes run every
engine experiment and every registered merge method.

Prediction (every report names it): **rank** classification scores each label string by
its summed token log-likelihood and takes the best; **generate** decodes greedily and maps
the output to the label word it equals (anything else is wrong, class −1).
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bcjax.batching import pad_rows
from bcjax.config import ConfigError, get, require
from bcjax.data import glue
from bcjax.data.task import Task
from bcjax.models import t5 as t5m
from bcjax.experiments.target_task import mean_and_stderr, target_task_experiment, target_task_merge  # noqa: F401

__all__ = ["predict_classes", "evaluate_split", "finetune_task", "target_task_merge", "target_task_experiment",
           "mean_and_stderr", "finetune", "evaluate", "model_suite"]

PREDICTIONS = ("rank", "generate")


# --------------------------------------------------------------------------- prediction
def _batches(arrays: Mapping[str, np.ndarray], batch_size: int):
    n = len(next(iter(arrays.values())))
    for s in range(0, n, batch_size):
        e = min(s + batch_size, n)
        pad = batch_size - (e - s)  # fixed shapes: one compilation per split size
        yield e - s, {k: pad_rows(v[s:e], batch_size) if pad else v[s:e] for k, v in arrays.items()}


def predict_classes(model, params, encoded: glue.Encoded, choices: tuple[np.ndarray, np.ndarray], *,
                    method: str = "rank", batch_size: int = 32) -> np.ndarray:
    """Predicted class index per example (into the task's label words) by ``method``:
    ``"rank"`` (argmax of the label strings' sequence log-likelihoods, jitted and batched)
    or ``"generate"`` (greedy decoding matched token-for-token to a label word, else −1)."""
    if method not in PREDICTIONS:
        raise ConfigError(f"prediction must be one of {PREDICTIONS}, got {method!r}")
    fns = t5m.t5_functions(model)
    choice_ids, choice_mask = (jnp.asarray(c) for c in choices)
    out = []
    for n, b in _batches({k: encoded.arrays[k] for k in ("input_ids", "attention_mask")}, batch_size):
        if method == "rank":
            scores = t5m.jit_rank_scores(fns, params, b["input_ids"], b["attention_mask"], choice_ids, choice_mask)
            pred = np.asarray(jnp.argmax(scores, -1))
        else:
            gen = np.asarray(t5m.jit_greedy(fns, params, b["input_ids"], b["attention_mask"], choices[0].shape[1]))
            match = np.all(gen[:, None, :] == np.asarray(choices[0])[None], axis=-1)  # [B, K]
            pred = np.where(match.any(1), match.argmax(1), -1)
        out.append(pred[:n])
    return np.concatenate(out).astype(np.int64)


def evaluate_split(model, params, tokenizer, task: Task, split: str, *, prediction: str = "rank",
                   max_input_length: int = 256, truncation: str = "truncate", batch_size: int = 32,
                   encoded: glue.Encoded | None = None) -> dict:
    """Metrics (×100) of one model on split ``split`` of the GLUE ``task``, with how it
    predicted and what it truncated (``encoded``: the split already tokenized with these
    settings, to skip re-tokenizing)."""
    enc = encoded or glue.encode(task, split, tokenizer, max_input_length=max_input_length, truncation=truncation)
    choices = glue.encode_choices(task, tokenizer)
    methods = PREDICTIONS if prediction == "both" else (prediction,)
    labels = task.splits[split][1]
    out: dict[str, Any] = {"n": len(labels), "truncated": enc.num_truncated}
    preds = {}
    for m in methods:
        preds[m] = predict_classes(model, params, enc, choices, method=m, batch_size=batch_size)
        out[m] = glue.task_metrics(glue.get_task(task.name), preds[m], labels, task.columns[split].get("scores"))
    if len(preds) == 2:
        out["rank_generate_agreement"] = 100 * float(np.mean(preds["rank"] == preds["generate"]))
    out["prediction"] = prediction
    return out


# --------------------------------------------------------------------------- fine-tuning
def finetune_task(model, params, tokenizer, task: Task, train_cfg, *, max_input_length: int = 256,
                  truncation: str = "truncate", checkpoint_dir: str | None = None, progress: bool = True, mesh=None,
                  stop_after: int | None = None):
    """Fine-tune on the ``train`` split of a GLUE ``task`` (text-to-text cross-entropy) with
    :func:`bcjax.train.finetune`; returns ``(FinetuneResult, Encoded)``."""
    from bcjax.train import finetune as train_loop

    enc = glue.encode(task, "train", tokenizer, max_input_length=max_input_length, truncation=truncation)
    data = {k: enc.arrays[k] for k in ("input_ids", "attention_mask", "labels", "label_mask")}
    fns = t5m.t5_functions(model)
    res = train_loop(fns.loss, params, data, train_cfg, checkpoint_dir=checkpoint_dir, mesh=mesh, progress=progress,
                     description=f"t5 {task.name}", stop_after=stop_after)
    return res, enc


# --------------------------------------------------------------------------- target-task

# --------------------------------------------------------------------------- config plumbing
def check_config(config: dict) -> None:
    """Every key of a T5 pipeline config is known (:func:`bcjax.config.check_keys`), before
    any model or data is loaded."""
    from bcjax.config import ANY, check_keys
    from bcjax.train import TRAIN_KEYS

    check_keys(config, {
        "pipeline": ANY, "cache_dir": ANY, "suite": ANY,
        "model": dict.fromkeys(("name", "tokenizer", "from_pt", "dtype")),
        "data": dict.fromkeys(("tasks", "data_dir", "download", "val_size", "split_seed", "max_input_length",
                               "truncation", "max_examples")),
        "train": dict.fromkeys((*TRAIN_KEYS, "seeds")),
        "eval": dict.fromkeys(("prediction", "batch_size", "finetuned_dir")),
        "target_task": {"aux_models": ANY, "grids": ANY},
    })


def _settings(config: dict) -> dict:
    s = {
        "model": get(config, "model.name", types=str),
        "tokenizer": get(config, "model.tokenizer", None, types=(str, type(None))),
        "from_pt": get(config, "model.from_pt", None, types=(bool, type(None))),
        "dtype": get(config, "model.dtype", "float32", types=str),
        "tasks": get(config, "data.tasks", types=list),
        "data_dir": get(config, "data.data_dir", None, types=(str, type(None))),
        "download": get(config, "data.download", False, types=bool),
        "val_size": get(config, "data.val_size", 0.1, types=(int, float)),
        "split_seed": get(config, "data.split_seed", 0, types=int),
        "max_input_length": get(config, "data.max_input_length", 256, types=int),
        "truncation": get(config, "data.truncation", "truncate", types=str),
        "max_examples": get(config, "data.max_examples", None, types=(int, type(None))),
        "prediction": get(config, "eval.prediction", "rank", types=str),
        "eval_batch_size": get(config, "eval.batch_size", 32, types=int),
        "seeds": get(config, "train.seeds", [get(config, "train.seed", 0, types=int)], types=list),
    }
    for t in s["tasks"]:
        if t not in glue.TASKS:
            raise ConfigError(f"{config.get('_source', '<config>')}: data.tasks: unknown GLUE task {t!r}; "
                              f"supported: {sorted(glue.TASKS)}")
    require(s["prediction"] in (*PREDICTIONS, "both"), config, f"eval.prediction must be rank, generate or both, "
            f"got {s['prediction']!r}")
    require(s["truncation"] in ("error", "truncate"), config, "data.truncation must be 'error' or 'truncate'")
    require(s["max_input_length"] >= 2, config, "data.max_input_length must be >= 2")
    for k in ("model", "data_dir", "tokenizer"):
        if s[k] and not os.path.isabs(s[k]) and config.get("_source") and os.path.exists(
                os.path.join(os.path.dirname(config["_source"]), s[k])):
            s[k] = os.path.join(os.path.dirname(config["_source"]), s[k])  # relative to the config file
    return s


def _train_config(config: dict, seed: int):
    from bcjax.train import train_config_from_dict

    return train_config_from_dict(config.get("train") or {}, where=f"{config.get('_source', '<config>')}: train",
                                  ignore=("seed", "seeds"), seed=seed)


def _load(s: dict):
    model, params = t5m.load_t5(s["model"], from_pt=s["from_pt"], dtype=s["dtype"])
    return model, params, t5m.load_tokenizer(s["tokenizer"] or s["model"])


def _task(s: dict, task: str) -> Task:
    return glue.load_glue(task, data_dir=s["data_dir"], val_size=s["val_size"], seed=s["split_seed"],
                          download=s["download"], max_examples=s["max_examples"])


def _eval_kwargs(s: dict) -> dict:
    return dict(prediction=s["prediction"], max_input_length=s["max_input_length"], truncation=s["truncation"],
                batch_size=s["eval_batch_size"])


def _model_dir(out_dir: str, task: str, seed: int) -> str:
    return os.path.join(out_dir, "models", f"{task}_seed{seed}")


def _write(out_dir: str, name: str, summary: dict) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    return summary


def finetune(config: dict, *, out_dir: str, progress: bool = True) -> dict:
    """``bcjax finetune``: one fine-tune per (task, seed); saves models and ``finetune.json``."""
    s = _settings(config)
    _train_config(config, 0)  # config errors before any loading
    model, params0, tok = _load(s)
    summary: dict[str, Any] = {"model": s["model"], "prediction": s["prediction"], "tasks": {}}
    for task in s["tasks"]:
        data = _task(s, task)
        for seed in s["seeds"]:
            cfg = _train_config(config, int(seed))
            res, enc = finetune_task(model, params0, tok, data, cfg, max_input_length=s["max_input_length"],
                                     truncation=s["truncation"], progress=progress,
                                     checkpoint_dir=os.path.join(out_dir, "checkpoints", f"{task}_seed{seed}"))
            params = jax.device_get(res.params)
            model.save_pretrained(_model_dir(out_dir, task, seed), params=params)
            tok.save_pretrained(_model_dir(out_dir, task, seed))
            summary["tasks"][f"{task}_seed{seed}"] = {
                "train": {"steps": cfg.steps, "first_loss": res.losses[0] if res.losses else None,
                          "final_loss": res.losses[-1] if res.losses else None, "resumed_from": res.resumed_from,
                          "n": data.sizes["train"], "truncated": enc.num_truncated},
                **{sp: evaluate_split(model, params, tok, data, sp, **_eval_kwargs(s)) for sp in ("val", "test")},
            }
    return _write(out_dir, "finetune.json", summary)


def evaluate(config: dict, *, out_dir: str, progress: bool = True) -> dict:
    """``bcjax eval``: the pretrained model and every saved fine-tune on val and test;
    with a ``target_task`` section, the target-task experiment. Writes ``eval.json``."""
    s = _settings(config)
    model, params0, tok = _load(s)
    ft_dir = get(config, "eval.finetuned_dir", out_dir, types=str)
    summary: dict[str, Any] = {"model": s["model"], "prediction": s["prediction"], "tasks": {}}
    say = (lambda msg: print(f"[t5] {msg}", flush=True)) if progress else None
    aux = _aux_models(config, model, params0)
    for task in s["tasks"]:
        data = _task(s, task)
        entry: dict[str, Any] = {"pretrained": {sp: evaluate_split(model, params0, tok, data, sp, **_eval_kwargs(s))
                                                for sp in ("val", "test")}}
        targets = []
        for seed in s["seeds"]:
            path = _model_dir(ft_dir, task, seed)
            if os.path.isdir(path):
                _, p = t5m.load_t5(path, from_pt=False)
                targets.append(p)
                entry[f"seed{seed}"] = {sp: evaluate_split(model, p, tok, data, sp, **_eval_kwargs(s))
                                        for sp in ("val", "test")}
        if aux is not None:
            if not targets:
                raise ConfigError(f"{config.get('_source', '<config>')}: target_task needs fine-tuned {task} models "
                                  f"in {os.path.join(ft_dir, 'models')} (run bcjax finetune first)")
            method = "rank" if s["prediction"] == "both" else s["prediction"]
            kw = {**_eval_kwargs(s), "prediction": method}
            encoded = {sp: glue.encode(data, sp, tok, max_input_length=s["max_input_length"],
                                       truncation=s["truncation"]) for sp in ("val", "test")}

            def score(p, sp, _data=data, _kw=kw, _enc=encoded):
                return evaluate_split(model, p, tok, _data, sp, encoded=_enc[sp], **_kw)[_kw["prediction"]]["main"]

            entry["target_task"] = {"prediction": method, "metric": glue.get_task(task).metrics[0],
                                    **target_task_experiment(params0, targets, aux["params"], score, aux["grids"],
                                                             progress=say)}
        summary["tasks"][task] = entry
    if aux is not None:
        summary["aux_models"] = aux["names"]
    return _write(out_dir, "eval.json", summary)


def _aux_models(config: dict, model, params0) -> dict | None:
    if "target_task" not in config:
        return None
    names = get(config, "target_task.aux_models", types=list)
    grids = get(config, "target_task.grids", types=dict)
    require(len(names) > 0, config, "target_task.aux_models is empty")
    for m, spec in grids.items():
        require(m in ("breadcrumbs", "task_arithmetic"), config,
                f"target_task.grids: method {m!r} is not breadcrumbs or task_arithmetic")
        require(isinstance(spec, dict) and all(isinstance(v, list) and v for v in spec.values()), config,
                f"target_task.grids.{m} must map hyper-parameters to non-empty lists")
    params = []
    base_dir = os.path.dirname(config["_source"]) if config.get("_source") else None
    for name in names:
        if base_dir and not os.path.isabs(name) and os.path.isdir(os.path.join(base_dir, name)):
            name = os.path.join(base_dir, name)  # a folder relative to the config file
        _, p = t5m.load_t5(name)
        params.append(p)
    return {"names": names, "params": params, "grids": grids}


# --------------------------------------------------------------------------- model suite
def _rank_logits(fns, params, x, choice_ids, choice_mask):
    """Rank-classification scores as logits [B, K] (the label words' sequence
    log-likelihoods): ``x`` = int32[B, 2, L], the input ids stacked with their attention mask."""
    return fns.rank_scores(params, x[:, 0], x[:, 1], choice_ids, choice_mask)


def _encoder_decoder_step(fns, params, x):
    """The encoder and one decoder position (from the start token), no LM head: the pass
    whose Dense-layer inputs RegMean's Gram matrices collect."""
    start = jnp.full((x.shape[0], 1), fns.start_id, jnp.int32)
    return fns.hidden_states(params, x[:, 0], x[:, 1], start)


def model_suite(config: dict, *, cache_dir: str | None = None, progress: bool = True):
    """A :class:`bcjax.experiments.ModelSuite` over T5 on GLUE, so every experiment and
    every merge method of ``bcjax sweep`` runs on T5 (SPEC §4–5).

    θ0 is ``model.name``; the fine-tune of task t is ``<dir>/models/<t>_seed<s>`` as
    ``bcjax finetune`` wrote it (``dir``: ``eval.finetuned_dir``, else ``suite.out``, default
    the current folder; ``s`` the first of ``train.seeds``). ``evaluate(stacked, task,
    split)`` is the rank-classification accuracy (each label word scored by its sequence
    log-likelihood) on ``val`` / ``test`` of :func:`bcjax.data.glue.load_glue`, with the
    per-example ``correctness`` behind it (bootstrap intervals). The model's inputs are
    int32[N, 2, L]: the input ids stacked with the attention mask.

    ``provides`` (:data:`bcjax.merging.REQUIREMENTS`), per task and on first use: ``fishers``
    (diagonal Fisher of the task's fine-tune over its first ``eval.fisher_examples``, default
    16, training inputs, labels sampled from the softmax over the label words, seed
    ``eval.fisher_seed``), ``dataset_sizes``, ``grams`` (the inputs of every Dense kernel over
    ``eval.gram_examples``, default 64, training inputs — encoder and one decoder step — with
    the task's fine-tune, padding masked), ``model_fn`` (the rank logits) and
    ``unlabeled_batches`` (the task's test inputs, no labels).

    ``suite.config`` (a T5 pipeline YAML, with ``suite.set`` overrides) or the sweep config
    itself supplies the model / data / train / eval keys."""
    import functools

    from bcjax.config import load_config
    from bcjax.experiments import ModelSuite
    from bcjax.experiments.suite import fingerprint, tree_checksum
    from bcjax.fisher import diagonal_fisher

    src = get(config, "suite.config", None, types=(str, type(None)))
    cfg = load_config(src, get(config, "suite.set", [], types=list)) if src else dict(config)
    s = _settings(cfg)
    model, params0, tok = _load(s)
    ft_dir = get(cfg, "eval.finetuned_dir", None, types=(str, type(None))) or get(config, "suite.out", ".", types=str)
    seed = int(s["seeds"][0])
    finetuned = []
    for task in s["tasks"]:
        path = _model_dir(ft_dir, task, seed)
        require(os.path.isdir(path), cfg, f"no fine-tuned T5 for task {task!r} at {path}: run `bcjax finetune` "
                "first, or set eval.finetuned_dir / suite.out")
        finetuned.append(t5m.load_t5(path, from_pt=False)[1])
    fns = t5m.t5_functions(model)
    predict = functools.partial(_rank_logits, fns)  # one object: one compilation per shape
    gram_apply = functools.partial(_encoder_decoder_step, fns)
    data, inputs, choices = {}, {}, {}
    for task in s["tasks"]:
        data[task] = _task(s, task)
        choices[task] = tuple(jnp.asarray(c) for c in glue.encode_choices(data[task], tok))
        for sp in ("train", "val", "test"):
            enc = glue.encode(data[task], sp, tok, max_input_length=s["max_input_length"], truncation=s["truncation"])
            inputs[task, sp] = np.stack([enc.arrays["input_ids"], enc.arrays["attention_mask"]], axis=1)
    bs, per_call = s["eval_batch_size"], get(cfg, "eval.models_per_call", 2, types=int)

    def correctness(stacked, task, split):
        if split not in ("val", "test"):
            raise ConfigError(f"T5 suite: split must be 'val' or 'test', got {split!r}")
        from bcjax import evaluate as evaluate_lib

        return evaluate_lib.correctness_of_stack(predict, stacked, inputs[task, split], data[task].splits[split][1],
                                                 batch_size=bs, models_per_call=per_call, predict_args=choices[task])

    def evaluate(stacked, task, split):  # count / n in float64, as bcjax.evaluate.accuracy
        hits = correctness(stacked, task, split)
        return np.count_nonzero(hits, axis=1) / hits.shape[1]

    by_name = dict(zip(s["tasks"], finetuned, strict=True))
    n_fisher = get(cfg, "eval.fisher_examples", 16, types=int)
    n_gram = get(cfg, "eval.gram_examples", 64, types=int)
    fisher_seed = get(cfg, "eval.fisher_seed", 0, types=int)

    def grams(t):
        from bcjax.models.grams import collect_grams

        x = inputs[t, "train"][:n_gram]
        return collect_grams(gram_apply, by_name[t], x, batch_size=bs, mask=x[:, 1])

    provides = {
        "fishers": lambda t: diagonal_fisher(predict, by_name[t], inputs[t, "train"][:n_fisher],
                                             jax.random.key(fisher_seed), batch_size=min(8, n_fisher),
                                             predict_args=choices[t]),
        "dataset_sizes": lambda t: data[t].sizes["train"],
        "grams": grams,
        "model_fn": lambda t: functools.partial(predict, choice_ids=choices[t][0], choice_mask=choices[t][1]),
        "unlabeled_batches": lambda t: inputs[t, "test"],  # inputs only: labels are never passed
    }
    fp = fingerprint(dict(suite="t5", model=s["model"], data={k: s[k] for k in (
        "tasks", "val_size", "split_seed", "max_input_length", "truncation", "max_examples")}, seed=seed,
        theta0=tree_checksum(params0), finetuned=tree_checksum(finetuned), sizes={t: d.sizes for t, d in data.items()}))
    return ModelSuite(name=f"T5 {s['model']} on GLUE", tasks=tuple(s["tasks"]), pretrained=params0,
                      finetuned=tuple(finetuned), evaluate=evaluate, fingerprint=fp, models_per_call=per_call,
                      info={"model": s["model"], "sizes": {t: d.sizes for t, d in data.items()},
                            "prediction": "rank"}, provides=provides, correctness=correctness)
