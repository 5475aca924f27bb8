"""GLUE (MRPC, RTE, CoLA, SST-2, STS-B) as text-to-text tasks, read through
tensorflow-datasets ``glue/<task>`` by name, without TensorFlow (SPEC §5).

Data come from ``tfds.data_source`` (ArrayRecord random access; only ``array_record`` is
needed, not TensorFlow). Prepare them once with tfds's own builder where a network is
available (``tfds.builder('glue/mrpc', file_format='array_record').download_and_prepare()``)
or point ``data_dir`` at a folder that holds prepared ``glue/<task>/<version>`` data.

**Splits.** GLUE's test labels are hidden, so (SPEC §5) our ``val`` is carved from GLUE
train — a seeded permutation of the examples sorted by their ``idx``, so it does not depend
on the on-disk record order — and our ``test`` is GLUE's own ``validation`` split (the one
place GLUE's split names appear: tasks are :class:`bcjax.data.task.Task`).

**Text-to-text.** Each task has an explicit prompt template (the T5 paper's) and label
words; STS-B scores are rounded to the nearest 0.2 and written as ``"3.8"`` (26 label
strings, T5's recipe). :func:`encode` tokenizes; inputs longer than ``max_input_length``
either raise :class:`InputTooLongError` (``truncation="error"``) or are truncated with
``</s>`` kept (``truncation="truncate"``), and the count is returned — truncation is never
silent. Label words that tokenize to nothing, or to the same ids, are an error.

Metrics (numpy, ×100 as the paper reports): accuracy; CoLA Matthews correlation; MRPC F1
(positive class ``equivalent``); STS-B Spearman correlation.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from bcjax.data.task import LABEL_DTYPE, Task
from bcjax.errors import BcjaxError

__all__ = [
    "GlueDataError", "UnknownTaskError", "LabelWordError", "InputTooLongError",
    "GlueTask", "TASKS", "get_task", "load_glue", "encode", "encode_choices", "Encoded",
    "accuracy", "matthews_corrcoef", "f1_binary", "spearman", "task_metrics",
]


class GlueDataError(BcjaxError):
    """A GLUE data set cannot be read (not prepared in ``data_dir``, tfds missing, ...)."""


class UnknownTaskError(BcjaxError, KeyError):
    """A task name that is not one of :data:`TASKS`."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class LabelWordError(BcjaxError):
    """A label word tokenizes to nothing (only ``</s>``), or two label words to the same ids."""


class InputTooLongError(BcjaxError):
    """An input exceeds ``max_input_length`` tokens and ``truncation="error"``."""


@dataclasses.dataclass(frozen=True)
class GlueTask:
    """One GLUE task as text-to-text: ``template.format(**text_fields)`` → a label word."""

    name: str
    tfds_name: str
    text_fields: tuple[str, ...]
    template: str
    label_words: tuple[str, ...]
    metrics: tuple[str, ...]  # first one is the task's headline metric
    regression: bool = False

    def format(self, example: dict) -> str:
        return self.template.format(**{k: _text(example[k]) for k in self.text_fields})


_STSB_WORDS = tuple(f"{0.2 * i:.1f}" for i in range(26))

#: the supported tasks, T5's prompt templates, label words and metrics
TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("cola", "glue/cola", ("sentence",), "cola sentence: {sentence}",
                     ("unacceptable", "acceptable"), ("matthews", "accuracy")),
    "sst2": GlueTask("sst2", "glue/sst2", ("sentence",), "sst2 sentence: {sentence}",
                     ("negative", "positive"), ("accuracy",)),
    "mrpc": GlueTask("mrpc", "glue/mrpc", ("sentence1", "sentence2"),
                     "mrpc sentence1: {sentence1} sentence2: {sentence2}", ("not_equivalent", "equivalent"),
                     ("accuracy", "f1")),
    "rte": GlueTask("rte", "glue/rte", ("sentence1", "sentence2"), "rte sentence1: {sentence1} sentence2: {sentence2}",
                    ("entailment", "not_entailment"), ("accuracy",)),
    "stsb": GlueTask("stsb", "glue/stsb", ("sentence1", "sentence2"),
                     "stsb sentence1: {sentence1} sentence2: {sentence2}", _STSB_WORDS, ("spearman", "accuracy"),
                     regression=True),
}


def get_task(name: str) -> GlueTask:
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTaskError(f"unknown GLUE task {name!r}; supported: {sorted(TASKS)}") from None


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, (bytes, bytearray)) else str(x)


def _read_split(task: GlueTask, split: str, data_dir: str | None, download: bool) -> list[dict]:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise GlueDataError(f"{task.tfds_name}: tensorflow-datasets is not installed (pip install bcjax[t5]): "
                            f"{e}") from None
    try:
        source = tfds.data_source(task.tfds_name, split=split, data_dir=data_dir, download=download)
    except Exception as e:  # tfds raises many types (AssertionError, FileNotFoundError, DatasetNotFoundError ...)
        where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
        raise GlueDataError(f"{task.tfds_name} split {split!r}: not available in {where} "
                            f"(prepare it with tfds, file_format='array_record'): {type(e).__name__}: {e}") from None
    rows = [source[i] for i in range(len(source))]
    return sorted(rows, key=lambda r: int(r["idx"]))


def _to_split(task: GlueTask, split: str, rows: Sequence[dict]) -> tuple[tuple[list[str], np.ndarray], dict]:
    """``((prompts, labels int32), columns)`` of ``rows``; columns: ``idx`` (GLUE's example
    idx) and, for STS-B, ``scores`` (the gold floats; labels are them rounded to 0.2)."""
    inputs = [task.format(r) for r in rows]
    columns = {"idx": np.asarray([int(r["idx"]) for r in rows], np.int64)}
    if task.regression:
        columns["scores"] = np.asarray([float(r["label"]) for r in rows], np.float64)
        labels = np.clip(np.round(columns["scores"] / 0.2), 0, len(task.label_words) - 1).astype(LABEL_DTYPE)
    else:
        labels = np.asarray([int(r["label"]) for r in rows], LABEL_DTYPE)
        bad = np.flatnonzero((labels < 0) | (labels >= len(task.label_words)))
        if bad.size:
            raise GlueDataError(f"{task.tfds_name} {split}: example idx {int(rows[bad[0]]['idx'])} has label "
                                f"{int(labels[bad[0]])} (hidden test labels are -1; use GLUE validation as test)")
    return (inputs, labels), columns


def load_glue(task: str | GlueTask, *, data_dir: str | None = None, val_size: int | float = 0.1, seed: int = 0,
              download: bool = False, max_examples: int | None = None) -> Task:
    """One task as a :class:`~bcjax.data.task.Task` (class names = the label words; splits
    ``train`` / ``val`` / ``test``, module docstring: ``val`` is a seeded carve-out of GLUE
    train of ``val_size`` examples — or that fraction — and ``test`` is GLUE's
    ``validation``; ``columns[split]`` holds ``idx`` and STS-B's ``scores``).
    ``max_examples`` caps each split (after splitting; for quick runs)."""
    task = get_task(task) if isinstance(task, str) else task
    train_rows = _read_split(task, "train", data_dir, download)
    test_rows = _read_split(task, "validation", data_dir, download)  # GLUE's validation is our test
    n = len(train_rows)
    n_val = int(round(val_size * n)) if isinstance(val_size, float) and val_size < 1 else int(val_size)
    if not 0 < n_val < n:
        raise GlueDataError(f"{task.name}: val_size {val_size} gives {n_val} of {n} training examples; "
                            "need at least one for validation and one for training")
    perm = np.random.default_rng([seed, 0x91E]).permutation(n)
    val_i, train_i = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    rows = {"train": [train_rows[i] for i in train_i], "val": [train_rows[i] for i in val_i], "test": test_rows}
    parts = {sp: _to_split(task, sp, r[:max_examples]) for sp, r in rows.items()}
    return Task(task.name, task.label_words, {sp: p[0] for sp, p in parts.items()},
                columns={sp: p[1] for sp, p in parts.items()}, provenance=f"tfds {task.tfds_name}")


# --------------------------------------------------------------------------- tokenization
@dataclasses.dataclass(frozen=True)
class Encoded:
    """Token arrays of one split plus what truncation did."""

    arrays: dict[str, np.ndarray]  # input_ids, attention_mask, labels, label_mask, class_id
    num_truncated: int
    max_input_tokens: int  # longest input before truncation


def _token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]


def encode_choices(task: Task, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """The label words (``task.class_names``) as ``(ids [K, Lt], mask [K, Lt])`` (each ending
    with ``</s>``). Raises :class:`LabelWordError` for a word that tokenizes to nothing or two
    equal ones."""
    ids = _token_ids(tokenizer, task.class_names)
    eos = tokenizer.eos_token_id
    seen: dict[tuple, str] = {}
    for word, t in zip(task.class_names, ids, strict=True):
        body = tuple(i for i in t if i != eos)
        if not body or all(i == tokenizer.unk_token_id for i in body):
            raise LabelWordError(f"task {task.name}: label word {word!r} tokenizes to nothing "
                                 f"but </s> or unknown tokens (ids {t}); choose words the tokenizer knows")
        if body in seen:
            raise LabelWordError(f"task {task.name}: label words {seen[body]!r} and {word!r} tokenize identically")
        seen[body] = word
    return _pad(ids, max(map(len, ids)), tokenizer.pad_token_id)


def _pad(seqs: Sequence[Sequence[int]], length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.full((len(seqs), length), pad, np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return out, mask


def encode(task: Task, split: str, tokenizer, *, max_input_length: int, truncation: str = "error") -> Encoded:
    """Tokenize split ``split`` of ``task`` (inputs padded to ``max_input_length``; targets to the longest label
    word). ``truncation``: ``"error"`` raises :class:`InputTooLongError` naming the first
    over-long example; ``"truncate"`` cuts it (keeping the final ``</s>``) and counts it."""
    if truncation not in ("error", "truncate"):
        raise GlueDataError(f"truncation must be 'error' or 'truncate', got {truncation!r}")
    choice_ids, choice_mask = encode_choices(task, tokenizer)
    inputs, labels = task.splits[split]
    ids = _token_ids(tokenizer, inputs)
    lengths = np.asarray([len(t) for t in ids])
    over = np.flatnonzero(lengths > max_input_length)
    if over.size and truncation == "error":
        i = int(over[0])
        raise InputTooLongError(f"task {task.name} split {split}: {over.size} input(s) exceed "
                                f"max_input_length={max_input_length} tokens, first: example idx "
                                f"{int(task.columns[split]['idx'][i])} "
                                f"with {int(lengths[i])} tokens; raise the limit or set truncation: truncate")
    eos = tokenizer.eos_token_id
    ids = [t if len(t) <= max_input_length else t[:max_input_length - 1] + [eos] for t in ids]
    input_ids, attention_mask = _pad(ids, max_input_length, tokenizer.pad_token_id)
    return Encoded({"input_ids": input_ids, "attention_mask": attention_mask, "labels": choice_ids[labels],
                    "label_mask": choice_mask[labels], "class_id": labels},
                   int(over.size), int(lengths.max(initial=0)))


# --------------------------------------------------------------------------- metrics
def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    return float(np.mean(pred == gold)) if gold.size else float("nan")


def matthews_corrcoef(pred: np.ndarray, gold: np.ndarray) -> float:
    """Matthews correlation (multi-class form of Gorodkin 2004; 0 when undefined, as sklearn)."""
    pred, gold = np.asarray(pred).ravel(), np.asarray(gold).ravel()
    classes = np.union1d(pred, gold)
    c = np.zeros((classes.size, classes.size), np.float64)
    np.add.at(c, (np.searchsorted(classes, gold), np.searchsorted(classes, pred)), 1)
    t, p = c.sum(1), c.sum(0)
    n, correct = c.sum(), np.trace(c)
    cov_yp = correct * n - t @ p
    cov_pp, cov_yy = n * n - p @ p, n * n - t @ t
    denom = np.sqrt(cov_pp * cov_yy)
    return float(cov_yp / denom) if denom > 0 else 0.0


def f1_binary(pred: np.ndarray, gold: np.ndarray, positive: int = 1) -> float:
    pred, gold = np.asarray(pred) == positive, np.asarray(gold) == positive
    tp = np.sum(pred & gold)
    denom = pred.sum() + gold.sum()
    return float(2 * tp / denom) if denom else 0.0


def _rankdata(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based), ties sharing their mean rank (scipy's ``rankdata``)."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], x.size]
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty_like(x)
    ranks[order] = mean_rank[group]
    return ranks


def spearman(pred: np.ndarray, gold: np.ndarray) -> float:
    """Spearman rank correlation (Pearson on average ranks; nan if either is constant)."""
    a, b = _rankdata(pred), _rankdata(gold)
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / denom) if denom > 0 else float("nan")


def task_metrics(task: GlueTask, pred_class: np.ndarray, labels: np.ndarray,
                 scores: np.ndarray | None = None) -> dict[str, Any]:
    """All of the task's metrics ×100 against the gold ``labels`` (and, for STS-B, the gold
    ``scores``); ``pred_class`` indexes ``task.label_words`` (−1: an unparseable generation,
    counted wrong)."""
    pred = np.asarray(pred_class)
    out: dict[str, Any] = {"accuracy": 100 * accuracy(pred, labels)}
    if "matthews" in task.metrics:
        out["matthews"] = 100 * matthews_corrcoef(pred, labels)
    if "f1" in task.metrics:
        out["f1"] = 100 * f1_binary(pred, labels, positive=1)
    if "spearman" in task.metrics:
        values = np.where(pred >= 0, pred * 0.2, 2.5)  # unparseable: the middle of the scale
        out["spearman"] = 100 * spearman(values, scores)
    out["main"] = out[task.metrics[0]]
    out["main_metric"] = task.metrics[0]
    return out
