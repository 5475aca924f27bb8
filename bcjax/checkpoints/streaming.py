r"""Streaming merges of checkpoints on disk (SPEC §7): ``bcjax merge CONFIG --out DIR``.

Tensors are read one name at a time (:mod:`bcjax.checkpoints.io`) and merged with the
registered method itself, called on a one-tensor tree, so every result is bit-identical to
:func:`bcjax.merge` on the checkpoints loaded whole as flat dicts ``{name: array}``:

- a tensor's *leaf index* is its position among the base model's names sorted (the order
  ``jax.tree.leaves`` visits a flat dict); methods with a PRNG key fold it in (SPEC §3), so
  the one-tensor tree puts the tensor at that index behind empty placeholders, which every
  method skips;
- TIES's model-wide trim threshold (SPEC §3) is an order statistic of |τt| over all merged
  tensors of model t: a sample of small blocks brackets it and ONE extra read pass counts
  the additive fine histograms of the bracket and the keys above it (two passes more only
  where a bracket missed: ``merging.ties_thresholds_from_histograms``;
  ``merging.tau_magnitude_histograms``: one native pass per tensor for all T tasks on CPU,
  int32 counts per chunk summed on the host in int64, so models of more than 2^31 − 1
  merged entries work), then each tensor is merged with ``merging.ties_merge_with_thresholds``.

Memory: safetensors tensors are memory-mapped (``Checkpoint.map``) where the method's
kernels read NumPy leaves in place as host views (TIES; float32 leaves): no copy of the page
cache; otherwise they are read into 64-byte-aligned buffers that XLA's CPU client uses in
place (no device copy); bfloat16 inputs reach the selection kernel as they are (no float32
copies), and the elementwise merge is fused, so a tensor costs its T + 1 inputs and its
output in their own dtype (≈ (T + 2) × its size; measured: the kernels' temporaries add
< 2 % on the largest tensor). XLA releases host buffers it used in place through jaxlib's
deferred-release queue, which only a garbage collection flushes: each merge ends with a
generation-0 collection (≈ 2 ms), else a tensor's inputs stay resident until the next
collection, beside the next tensor's. Every tensor's live bytes (inputs and output) count
against a byte budget from its read until its output is written: the larger of
:data:`INFLIGHT_BYTES` and the largest tensor's live bytes (≈ (T + 2) × its size), which
the merge needs anyway, so smaller tensors overlap their reads, merges and writes up to that
level without raising the peak. Elementwise methods (:data:`ELEMENTWISE_METHODS`; TIES once
its thresholds are known) merge large tensors :data:`CHUNK_ENTRIES` entries at a time, read
as byte ranges, so such a tensor holds its output and one chunk's inputs. The peak is
therefore ≈ max(INFLIGHT_BYTES, (T + 2) × the largest tensor) plus fixed overhead (for
TIES, its histogram pass's T + 1 inputs of the largest tensor), never the model. A mapped
tensor's pages count in RSS (file-backed) while it is mapped, like a read buffer, and are
dropped from it with the mapping, as soon as the kernel is done. NaN/Inf: the built-in
kernels make merged entries NaN where an input is not finite, so the *output* is checked
(in chunks: no whole-tensor temporaries) and the inputs are scanned (to name file and
tensor) only when it is not finite; copied tensors are checked directly. Reads, merges and writes overlap on a bounded thread pool
(``workers`` tensors in flight, default 2). The output is written into a temporary sibling
folder and renamed at the end; a killed merge leaves only that folder, from which
``resume=True`` continues after the last finished shard. Any error (including NaN/Inf
found while streaming) removes it.
"""
from __future__ import annotations

import collections
import gc
import hashlib
import json
import os
import resource
import shutil
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from bcjax import merging
from bcjax.checkpoints.io import (WEIGHT_FILE_PATTERNS, Checkpoint, ShardedSafetensorsWriter,
                                  open_checkpoint, parse_size)
from bcjax.checkpoints.merge_config import MergePlan, load_merge_config, parse_merge_config
from bcjax.errors import BcjaxError, CheckpointError, NonFiniteError
from bcjax.host_memory import aligned_empty
from bcjax.tree import all_finite, make_leaf_filter

__all__ = ["merge_checkpoints", "validate_checkpoints", "partial_folder"]

_STATE = "bcjax-merge-state.json"
#: Methods whose merged entry is an expression of the same entry of θ0 and of each θt only
#: (TIES given its model-wide thresholds): large tensors merge :data:`CHUNK_ENTRIES` at a time.
ELEMENTWISE_METHODS = frozenset({"task_arithmetic", "simple_average", "weighted_average", "ties"})
#: Entries per chunk of an elementwise merge (bf16, T = 3: 32 MB of inputs per chunk).
CHUNK_ENTRIES = 1 << 22
#: Live bytes (the T + 1 inputs and the output) of the tensors in flight at once, counted from
#: a tensor's read until its output is written, when the largest tensor needs less.
INFLIGHT_BYTES = 256 * 2**20


def partial_folder(out: str) -> str:
    """The temporary sibling folder a merge into ``out`` writes to (renamed at the end)."""
    out = os.path.abspath(out)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.bcjax-partial")


def release_host_buffers(buffers: Sequence[weakref.ref] = (), timeout: float = 2.0) -> None:
    """Free the host buffers XLA has finished using in place (zero-copy NumPy inputs).

    jaxlib queues their release when the computation that read them lets go (on its own
    thread, possibly just after the output is ready) and flushes the queue from a
    garbage-collection callback, so without a collection they stay resident. A
    generation-0 collection runs that callback (≈ 2 ms); given weak references to the
    buffers, it repeats until they are gone (at most ``timeout`` seconds), so the caller's
    memory accounting holds when it returns."""
    gc.collect(0)
    deadline = time.monotonic() + timeout
    while any(r() is not None for r in buffers) and time.monotonic() < deadline:
        time.sleep(0.0005)
        gc.collect(0)


def _owner(a: np.ndarray) -> np.ndarray:
    """The array that owns ``a``'s memory (the end of its chain of views)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _finite(a: np.ndarray, chunk: int = 1 << 22) -> bool:
    """:func:`bcjax.tree.all_finite` of one host array, in chunks of ``chunk`` entries (the
    check's temporaries stay a few MB whatever the tensor's size)."""
    flat = a.reshape(-1)
    return all(all_finite(flat[k:k + chunk]) for k in range(0, flat.size, chunk))


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def validate_checkpoints(base: Checkpoint, finetuned: Sequence[Checkpoint]) -> None:
    """Raise :class:`CheckpointError` naming the file and tensor unless every fine-tuned
    checkpoint has exactly the base's tensor names, shapes and dtypes (SPEC §1, §7)."""
    if not base.names:
        raise CheckpointError(f"{base.location}: no tensors")
    ref = set(base.names)
    for t, ck in enumerate(finetuned):
        names = set(ck.names)
        missing = [n for n in base.names if n not in names]
        if missing:
            raise CheckpointError(f"fine-tuned model {t} ({ck.location}): tensor {missing[0]!r} of the base model "
                                  f"({base.info(missing[0])[2]}) is missing" +
                                  (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        extra = [n for n in ck.names if n not in ref]
        if extra:
            raise CheckpointError(f"fine-tuned model {t} ({ck.info(extra[0])[2]}): tensor {extra[0]!r} is not in the "
                                  f"base model ({base.location})" + (f" (and {len(extra) - 1} more)" if len(extra) > 1
                                                                     else ""))
        for n in base.names:
            (s0, d0, f0), (s1, d1, f1) = base.info(n), ck.info(n)
            if s0 != s1:
                raise CheckpointError(f"fine-tuned model {t} ({f1}): tensor {n!r} has shape {s1}, base ({f0}) has {s0}")
            if d0 != d1:
                raise CheckpointError(f"fine-tuned model {t} ({f1}): tensor {n!r} has dtype {d1.name}, base ({f0}) "
                                      f"has {d0.name}")


def _check_values(name: str, arrays: Sequence[np.ndarray], cks: Sequence[Checkpoint], labels: Sequence[str]) -> None:
    for a, ck, label in zip(arrays, cks, labels):
        if np.issubdtype(a.dtype, np.inexact) or a.dtype.name == "bfloat16" or a.dtype.kind == "V":
            if a.size and not _finite(a):
                raise NonFiniteError(f"{label} ({ck.info(name)[2]}), tensor {name!r}: contains NaN or Inf")


def _is_float(dtype: np.dtype) -> bool:
    return bool(jnp.issubdtype(jnp.dtype(dtype), jnp.floating))


def _check_method(plan: MergePlan, num_tasks: int) -> dict:
    """The method's hyper-parameters, checked on a tiny tree before any read or write."""
    hp = plan.method_hparams()
    probe = {"x": np.zeros(4, np.float32)}
    try:
        merging.merge(plan.method, probe, [probe] * num_tasks, **hp)
    except BcjaxError:
        raise
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{plan.method}: invalid hyper-parameters {plan.hparams}: {e}") from None
    return hp


def _fingerprint(plan: MergePlan, cks: Sequence[Checkpoint], max_shard_size: int, out_dtype) -> str:
    stats = []
    for ck in cks:
        for f in ck.files():
            st = os.stat(f)
            stats.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"method": plan.method, "hparams": repr(sorted(plan.hparams.items())), "seed": plan.seed,
                       "exclude": plan.exclude, "dtype": out_dtype, "files": stats, "max": max_shard_size},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class _Merger:
    """Per-tensor merge: read T+1 tensors, check them, merge with the method's own code."""

    def __init__(self, plan: MergePlan, base: Checkpoint, fts: Sequence[Checkpoint], names: list[str],
                 hparams: dict, thresholds=None):
        self.plan, self.base, self.fts, self.names = plan, base, list(fts), names
        self.hparams = hparams
        self.thresholds = thresholds
        self.budget = INFLIGHT_BYTES
        keep = make_leaf_filter(plan.exclude or None)
        self.flags = [bool(keep(n, np.empty((0,), base.info(n)[1]))) for n in names]
        self.keyed = "key" in merging.get_method(plan.method).hparams
        self.labels = ["pretrained model", *(f"fine-tuned model {t}" for t in range(len(fts)))]
        self.bytes_read = 0
        self.fresh_reads = all(ck.reads_fresh_buffers for ck in (base, *self.fts))  # freed once dropped
        self.ranged_reads = all(ck.ranged_reads for ck in (base, *self.fts))  # a chunk without the whole tensor
        # kernels that make merged entries NaN where an input is NaN/Inf: check the output, and
        # scan the inputs (to name file and tensor) only when it is not finite (SPEC §1)
        self.fused_check = bool(getattr(merging.get_method(plan.method).fn, "propagates_nonfinite", False))

    def out_dtype(self, i: int) -> np.dtype:
        d = self.base.info(self.names[i])[1]
        return np.dtype(jnp.dtype(self.plan.dtype)) if self.plan.dtype and _is_float(d) else d

    def in_place(self, i: int) -> bool:
        """Whether the method reads tensor ``i``'s NumPy leaves in place (host views): TIES's
        kernels for every dtype, the others' for float32. Otherwise (e.g. bfloat16
        Breadcrumbs, whose selection reads device buffers) they get aligned buffers."""
        return self.plan.method == "ties" or self.base.info(self.names[i])[1] == np.float32

    def read(self, i: int) -> list[np.ndarray]:
        """θ0's and every θt's tensor ``i``: memory-mapped where the format allows and the
        method reads NumPy leaves in place (``Checkpoint.map``; the page cache is read
        without a copy), else read into 64-byte-aligned buffers that XLA's CPU client
        adopts without a copy."""
        name = self.names[i]
        arrays = [ck.map(name) if self.in_place(i) else ck.read(name) for ck in (self.base, *self.fts)]
        self.bytes_read += sum(a.nbytes for a in arrays)
        return arrays

    def input_bytes(self, i: int) -> int:
        return self.base.nbytes(self.names[i]) * (1 + len(self.fts))

    def _tree(self, i: int, leaf):
        if not self.keyed:
            return [leaf]
        # the tensor at its leaf index behind empty leaves (skipped by every method): same PRNG keys
        return [np.zeros((0,), np.float32)] * i + [leaf]

    def merge(self, i: int) -> np.ndarray:
        """Tensor ``i`` merged (or copied from θ0), in the output dtype: whole, or chunk by
        chunk where the method is elementwise (:meth:`chunked`)."""
        if self.chunked(i):
            return self._merge_in_chunks(i)
        return self._merge_arrays(i, self.read(i))

    def chunked(self, i: int) -> bool:
        """Merge tensor ``i`` in chunks of :data:`CHUNK_ENTRIES`: a merged floating tensor
        larger than that, an elementwise method (:data:`ELEMENTWISE_METHODS`), and readers
        that read a byte range without the rest of the tensor."""
        name = self.names[i]
        return (self.plan.method in ELEMENTWISE_METHODS and self.flags[i] and self.ranged_reads
                and _is_float(self.base.info(name)[1]) and self.base.nbytes(name) > 0
                and self._entries(i) > CHUNK_ENTRIES)

    def _entries(self, i: int) -> int:
        return int(np.prod(self.base.info(self.names[i])[0], dtype=np.int64))

    def _merge_in_chunks(self, i: int) -> np.ndarray:
        """Tensor ``i`` merged :data:`CHUNK_ENTRIES` entries (in C order) at a time into one
        output buffer. Every chunk has the same length (the last one is zero-padded: finite,
        and cut off), so the kernel compiles once; each output entry is the same elementwise
        expression of the same input entries as in the whole-tensor kernel, so the result is
        bit-identical."""
        name, n, c = self.names[i], self._entries(i), CHUNK_ENTRIES
        out = aligned_empty(self.base.info(name)[0], self.out_dtype(i))
        flat = out.reshape(-1)
        for start in range(0, n, c):
            stop = min(start + c, n)
            arrays = [ck.read_flat(name, start, stop, pad_to=c) for ck in (self.base, *self.fts)]
            self.bytes_read += sum((stop - start) * a.itemsize for a in arrays)
            flat[start:stop] = self._merge_arrays(i, arrays)[:stop - start]
        return out

    def _merge_arrays(self, i: int, arrays: list) -> np.ndarray:
        """θ0's and every θt's ``arrays`` of tensor ``i`` (whole, or one chunk) merged (or θ0's
        copied), checked for NaN/Inf and in the output dtype. Empties ``arrays``: the inputs
        are freed before this returns (their memory is the caller's budget)."""
        name = self.names[i]
        merged = self.flags[i] and arrays[0].size > 0
        if not (merged and self.fused_check):
            _check_values(name, arrays, [self.base, *self.fts], self.labels)
        inputs = []
        if not merged:
            out = arrays[0]
        else:
            out = np.asarray(self._merge_leaf(  # in place: host views of the maps / aligned buffers (zero-copy)
                i, arrays if self.in_place(i) else [merging._host_to_device(a) for a in arrays]))
            if self.fused_check and not _finite(out):
                _check_values(name, arrays, [self.base, *self.fts], self.labels)
            if self.fresh_reads:
                inputs = [weakref.ref(_owner(a)) for a in arrays]
        arrays.clear()  # the caller's list too
        dt = self.out_dtype(i)
        if out.dtype != dt:
            out = np.asarray(jnp.asarray(out).astype(dt))
        release_host_buffers(inputs)  # the inputs XLA used in place: freed now, not at a later collection
        return out

    def live_bytes(self, i: int) -> int:
        """Bytes tensor ``i`` holds from its read until its output is written: the T + 1
        inputs (one chunk's, when :meth:`chunked`; plus the chunk's kernel output) and the
        output (twice when it is converted to another dtype)."""
        n = self._entries(i)
        out = n * self.out_dtype(i).itemsize
        if self.out_dtype(i) != self.base.info(self.names[i])[1]:
            out += self.base.nbytes(self.names[i])
        if self.chunked(i):
            return out + (len(self.fts) + 2) * CHUNK_ENTRIES * self.base.info(self.names[i])[1].itemsize
        return self.input_bytes(i) + out

    def _merge_leaf(self, i: int, arrays: list) -> jax.Array:
        p0, *fts = arrays
        if self.plan.method == "ties":
            res = merging.ties_merge_with_thresholds([p0], [[f] for f in fts], (True,), thresholds=self.thresholds,
                                                     alpha=self.hparams.get("alpha", 1.0))
            return res[0]
        res = merging.merge(self.plan.method, self._tree(i, p0), [self._tree(i, f) for f in fts],
                            validate=False, **self.hparams)
        return res[-1]

    def histogram(self, i: int, bins=None) -> list:
        arrays = self.read(i)  # mapped: the kernel reads the page cache in place
        hist = merging.tau_magnitude_histograms(arrays[0], arrays[1:], bins)
        inputs = [weakref.ref(_owner(a)) for a in arrays] if self.fresh_reads else []
        del arrays
        release_host_buffers(inputs)  # the maps' pages stay resident (RSS) until they are unmapped
        return hist


def _ordered(pool: ThreadPoolExecutor, fn, items: Sequence, window: int, cost=None, budget: int | None = None):
    """``map(fn, items)`` on ``pool``, in order, with at most ``window`` items in flight and,
    given ``cost(item)``, at most ``budget`` of cost in flight (always at least one item).

    An item's cost counts from its submission until the consumer has finished with its
    result (the generator is resumed after the ``yield``; the consumer must drop its own
    reference by then): results waiting in order, and the one being consumed, are in
    flight too. An item above ``budget`` therefore runs alone: memory stays bounded
    whatever the tensor sizes."""
    items = list(items)
    pending = collections.deque()
    nxt, inflight = 0, 0

    def admit():
        nonlocal nxt, inflight
        while nxt < len(items) and len(pending) < window:
            c = cost(items[nxt]) if cost else 0
            if pending and budget is not None and inflight + c > budget:
                break
            pending.append((pool.submit(fn, items[nxt]), c))
            inflight += c
            nxt += 1

    admit()
    while pending:
        fut, c = pending[0]
        result = fut.result()
        pending.popleft()
        del fut  # the future holds the result too
        yield result
        del result
        inflight -= c
        admit()


def _ties_thresholds(m: _Merger, pool, window: int, progress) -> jax.Array:
    """Each task's model-wide trim threshold bits (SPEC §3): a sample of blocks brackets
    them, one histogram pass counts them exactly (two more passes only where a bracket
    missed), counted per tensor (chunk) in int32 and summed on the host in int64: models of
    more than 2^31 − 1 merged entries are fine (merging.ties_thresholds_from_histograms)."""
    todo = [i for i, f in enumerate(m.flags) if f and int(np.prod(m.base.info(m.names[i])[0])) > 0]
    T = len(m.fts)
    total = sum(int(np.prod(m.base.info(m.names[i])[0])) for i in todo)
    if total == 0:
        return jnp.zeros((T,), jnp.int32)
    density = m.hparams.get("density", merging.get_method("ties").hparams["density"])

    def histogram_pass(bins):
        for h in _ordered(pool, lambda i: m.histogram(i, bins), todo, window, m.input_bytes, m.budget):
            progress(1)
            yield h

    def read_blocks(j, starts, length):
        return [ck.read_blocks(m.names[todo[j]], starts, length) for ck in (m.base, *m.fts)]

    sizes = [int(np.prod(m.base.info(m.names[i])[0])) for i in todo]
    sample = lambda: merging.tau_sample_keys(read_blocks, sizes, T)  # noqa: E731
    return jnp.asarray(merging.ties_thresholds_from_histograms(histogram_pass, total, T, density, sample), jnp.int32)


def _copy_side_files(base_location: str, folder: str) -> list[str]:
    """config / tokenizer / generation files of a base model folder (not weights, not README)."""
    if not os.path.isdir(base_location):
        return []
    copied = []
    for f in sorted(os.listdir(base_location)):
        src = os.path.join(base_location, f)
        if not os.path.isfile(src) or f.startswith(".") or f == "README.md" or f.endswith(WEIGHT_FILE_PATTERNS):
            continue
        shutil.copy2(src, os.path.join(folder, f))
        copied.append(f)
    return copied


def model_card(plan: MergePlan, summary: dict) -> str:
    """README.md of a merged model: the exact config, the SPEC method it ran, differences."""
    import bcjax

    hp = {k: v for k, v in plan.hparams.items()}
    lines = [
        "---", "tags: [merge, bcjax]", "---", "",
        f"# Merged with bcjax {bcjax.__version__}", "",
        f"Method: **{plan.method}** (SPEC §2–3), hyper-parameters `{json.dumps(hp, default=str)}`"
        + (f", PRNG key `jax.random.key({plan.seed})`" if plan.seed is not None and "key" in
           merging.get_method(plan.method).hparams else "") + ".", "",
        f"- base model (θ0): `{plan.pretrained}`",
        *[f"- fine-tuned model {t}: `{f}`" for t, f in enumerate(plan.finetuned)],
        f"- excluded tensors (copied from θ0): {plan.exclude or 'none'}; non-floating tensors are copied from θ0",
        f"- output dtype: {plan.dtype or 'the base model dtype of each tensor'}; arithmetic in float32 (SPEC §1)",
        f"- tensors: {summary['tensors']}, bytes written: {summary['bytes_written']}", "",
        f"## Merge config ({plan.form} form, exactly as given)", "", "```yaml",
        (plan.source_text or yaml.safe_dump(plan.source, sort_keys=False)).rstrip(), "```", "",
    ]
    if plan.form == "mergekit":
        lines += ["## Semantic differences from mergekit", "",
                  "This mergekit config was converted to the SPEC method above (SPEC §7):", ""]
        lines += [f"- {n}" for n in plan.notes] or ["- none for this method and parameters"]
        lines.append("")
    lines += ["Results equal `bcjax.merge` on the checkpoints loaded whole as flat dicts `{name: array}` "
              "(bit for bit).", ""]
    return "\n".join(lines)


def merge_checkpoints(config, out: str, *, max_shard_size="5GB", resume: bool = False, progress: bool = True,
                      workers: int = 2) -> dict[str, Any]:
    """Merge checkpoints on disk described by ``config`` (a path, a mapping of either form,
    or a :class:`MergePlan`) into the Hugging Face folder ``out`` (SPEC §7).

    Validates the config, the method's hyper-parameters and every checkpoint's names,
    shapes and dtypes before writing anything; streams the merge (values are checked for
    NaN/Inf as they are read); writes safetensors shards of at most ``max_shard_size``
    (with ``model.safetensors.index.json`` when there are several), copies config and
    tokenizer files from the base folder, writes a model card, and renames the temporary
    folder to ``out`` at the end. Returns a summary (tensors, bytes, seconds, peak RSS).
    """
    t0 = time.perf_counter()
    plan = config if isinstance(config, MergePlan) else (
        load_merge_config(os.fspath(config)) if isinstance(config, (str, os.PathLike)) else parse_merge_config(config))
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out):
        raise CheckpointError(f"output folder {out} already exists; choose a new --out")
    limit = parse_size(max_shard_size)
    if limit <= 0:
        raise CheckpointError(f"max_shard_size must be positive, got {max_shard_size!r}")
    if workers < 1:
        raise CheckpointError(f"workers must be >= 1, got {workers}")
    hparams = _check_method(plan, len(plan.finetuned))
    base = open_checkpoint(plan.pretrained)
    fts = []
    try:
        fts = [open_checkpoint(f) for f in plan.finetuned]
        validate_checkpoints(base, fts)
        names = sorted(base.names)  # leaf order of a flat dict (jax sorts dict keys)
        m = _Merger(plan, base, fts, names, hparams)
        entries = [(n, base.info(n)[0], m.out_dtype(i)) for i, n in enumerate(names)]
        return _run(plan, m, entries, out, limit, resume, progress, workers, t0)
    finally:
        for ck in [base, *fts]:
            ck.close()


def _run(plan, m: _Merger, entries, out, limit, resume, progress, workers, t0) -> dict:
    tmp = partial_folder(out)
    fp = _fingerprint(plan, [m.base, *m.fts], limit, plan.dtype)
    state = None
    if os.path.isdir(tmp) and resume:
        try:
            with open(os.path.join(tmp, _STATE), encoding="utf-8") as f:
                state = json.load(f)
        except (OSError, json.JSONDecodeError):
            state = None
        if state is None or state.get("fingerprint") != fp:
            raise CheckpointError(f"--resume: {tmp} belongs to a different merge (config, inputs or shard size "
                                  "changed); remove it or run without --resume")
    elif os.path.isdir(tmp):
        shutil.rmtree(tmp)
    elif resume:
        raise CheckpointError(f"--resume: no interrupted merge into {out} (expected {tmp})")
    os.makedirs(tmp, exist_ok=True)
    writer = ShardedSafetensorsWriter(tmp, entries, limit, metadata={"format": "pt"})
    todo = [i for s, idx in enumerate(writer.shards) if not writer.finished(s) for i in idx]
    resumed = sum(1 for s in range(len(writer.shards)) if writer.finished(s))
    for s in range(len(writer.shards)):  # a shard interrupted mid-write restarts from its header
        p = os.path.join(tmp, writer.files[s] + ".partial")
        if os.path.exists(p):
            os.remove(p)
    todo_set = set(todo)
    total_bytes = sum(int(np.prod(sh, dtype=np.int64)) * np.dtype(dt).itemsize for i, (_, sh, dt) in
                      enumerate(entries) if i in todo_set)
    # the largest tensor's inputs and output are live at once in any case: up to that much,
    # smaller tensors may overlap (reads, merges, writes) without raising the peak
    m.budget = max([INFLIGHT_BYTES, *(m.live_bytes(i) for i in todo)])
    try:
        from tqdm.auto import tqdm

        window = workers + 1
        with ThreadPoolExecutor(workers) as pool:
            thresholds = None
            if plan.method == "ties" and todo:
                if state and state.get("ties_thresholds") is not None:
                    thresholds = jnp.asarray(state["ties_thresholds"], jnp.int32)
                else:
                    n_merged = sum(1 for i, f in enumerate(m.flags) if f)
                    with tqdm(total=n_merged, unit="tensor", desc="ties thresholds", disable=not progress) as bar:
                        thresholds = _ties_thresholds(m, pool, window, bar.update)
            m.thresholds = thresholds
            _save_state(tmp, fp, thresholds)
            with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"merge {plan.method}",
                      disable=not progress) as bar:
                merged = _ordered(pool, m.merge, todo, window, m.live_bytes, m.budget)
                for k, i in enumerate(todo):  # not zip(todo, merged): zip's reused tuple would keep `arr` alive
                    arr = next(merged)
                    writer.write(i, arr)
                    bar.update(arr.nbytes)
                    bar.set_postfix_str(f"{k + 1}/{len(todo)} tensors", refresh=False)
                    del arr  # written: its bytes leave the budget when the next tensor is asked for
        writer.write_index()
        summary = {"out": out, "method": plan.method, "tensors": len(entries), "tensors_merged": sum(m.flags),
                   "shards": len(writer.shards), "shards_resumed": resumed, "bytes_read": m.bytes_read,
                   "bytes_written": sum(int(np.prod(sh, dtype=np.int64)) * np.dtype(dt).itemsize
                                        for _, sh, dt in entries)}
        copied = _copy_side_files(plan.pretrained, tmp)
        summary["copied_files"] = copied
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(plan, summary))
        os.remove(os.path.join(tmp, _STATE))
        os.replace(tmp, out)
    except BaseException as e:
        writer.abort()
        if not isinstance(e, KeyboardInterrupt):  # a killed/interrupted merge keeps its finished shards for --resume
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary["peak_rss_bytes"] = _peak_rss_bytes()
    return summary


def _save_state(tmp, fp, thresholds):
    state = {"fingerprint": fp, "ties_thresholds": None if thresholds is None else np.asarray(thresholds).tolist()}
    with open(os.path.join(tmp, _STATE), "w", encoding="utf-8") as f:
        json.dump(state, f)
