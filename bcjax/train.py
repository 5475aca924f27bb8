"""Model-agnostic fine-tuning: a jitted, data-parallel optax loop with orbax checkpoints.

An adapter supplies ``loss_fn(params, batch) -> scalar`` (its forward, its frozen head, its
loss); this module supplies everything else: AdamW with a warm-up + cosine schedule (the
paper's recipe, SPEC §5), a jit-compiled step, the batch sharded over a device mesh and
the parameters replicated, a progress bar with the loss, checkpoints every
``checkpoint_every`` steps, and resumption from the last checkpoint after a crash.

Batches are a deterministic function of (seed, step), so a resumed run sees exactly the
batches an uninterrupted one would have.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import types
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bcjax._optional import requires

with requires("train"):
    import optax

__all__ = ["train_config_from_dict", "TrainConfig", "make_optimizer", "batch_indices", "data_mesh", "finetune",
           "FinetuneResult", "joint_loss", "multitask_config", "multitask_finetune"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning hyper-parameters (paper, SPEC §5: lr 1e-5, wd 0.1, 200 warm-up steps of
    2000, batch 128; scaled-down runs keep the shape)."""

    steps: int = 2000
    batch_size: int = 128
    learning_rate: float = 1e-5
    weight_decay: float = 0.1
    warmup_steps: int = 200
    grad_clip_norm: float | None = 1.0
    seed: int = 0
    checkpoint_every: int = 0  # 0: only at the end

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must lie in [0, steps={self.steps}], got {self.warmup_steps}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


#: The keys of a ``train:`` config section (the fields of :class:`TrainConfig`).
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def train_config_from_dict(values: Mapping | None, *, base: TrainConfig | None = None, where: str = "train",
                          ignore: Sequence[str] = (), **fixed) -> TrainConfig:
    """A :class:`TrainConfig` from a config section: ``base``'s fields (default: the paper's)
    updated by ``values`` and ``fixed``; keys in ``ignore`` are skipped (e.g. a pipeline's own
    ``seeds``). Unknown keys and invalid values raise :class:`bcjax.config.ConfigError`
    prefixed with ``where`` (e.g. ``"configs/x.yaml: train"``)."""
    from bcjax.config import ConfigError

    values = dict(values or {})
    allowed = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(set(values) - allowed - set(ignore))
    if bad:
        raise ConfigError(f"{where}: unknown key(s) {bad}; allowed: {sorted(allowed | set(ignore))}")
    merged = {**dataclasses.asdict(base or TrainConfig()), **{k: v for k, v in values.items() if k in allowed},
              **fixed}
    try:
        return TrainConfig(**merged)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warm-up then cosine decay to 0. Cached on the optimizer's own
    fields only (not the seed or checkpointing), so every run with the same schedule —
    other seeds and tasks included — shares one compiled train step."""
    return _optimizer(cfg.steps, cfg.learning_rate, cfg.weight_decay, cfg.warmup_steps, cfg.grad_clip_norm)


@functools.lru_cache(maxsize=32)
def _optimizer(steps, learning_rate, weight_decay, warmup_steps, grad_clip_norm) -> optax.GradientTransformation:
    cfg = types.SimpleNamespace(steps=steps, learning_rate=learning_rate, weight_decay=weight_decay,
                                warmup_steps=warmup_steps, grad_clip_norm=grad_clip_norm)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1), cfg.steps)
    chain = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm else []
    return optax.chain(*chain, optax.adamw(schedule, weight_decay=cfg.weight_decay))


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of the batch at ``step``: epochs are seeded permutations, batches wrap."""
    if num_examples < 1:
        raise ValueError("no training examples")
    per_epoch = max(num_examples // batch_size, 1)
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    idx = perm[pos * batch_size:(pos + 1) * batch_size]
    if idx.size < batch_size:  # tiny data sets: wrap around
        idx = np.resize(perm, batch_size)
    return idx


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``data`` over ``devices`` (default: all)."""
    return Mesh(np.array(devices if devices is not None else jax.devices()), ("data",))


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def _train_step(loss_fn, tx, params, opt_state, batch, loss_args):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, *loss_args)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


@dataclasses.dataclass
class FinetuneResult:
    params: Any
    losses: list[float]
    resumed_from: int | None


def _checkpoint_manager(directory, keep: int = 2):
    with requires("train"):
        import orbax.checkpoint as ocp

    return ocp.CheckpointManager(os.path.abspath(directory), options=ocp.CheckpointManagerOptions(max_to_keep=keep))


#: File in each orbax step folder recording the size and sha256 of every other file in it.
MANIFEST = "bcjax_manifest.json"


def _files(folder: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs
                  if not (d == folder and f == MANIFEST))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str) -> None:
    """Record ``{relative path: [size, sha256]}`` of every file of a finished checkpoint
    ``folder`` in ``folder/bcjax_manifest.json``, written atomically (temporary file + rename)
    after the save, so a manifest exists only for a complete checkpoint."""
    entries = {rel: [os.path.getsize(os.path.join(folder, rel)), _sha256(os.path.join(folder, rel))]
               for rel in _files(folder)}
    tmp = os.path.join(folder, f".{MANIFEST}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump({"version": 1, "files": entries}, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, MANIFEST))


def verify_manifest(folder: str) -> str | None:
    """None when every file the manifest of ``folder`` lists is present with its recorded size
    and sha256, else what is wrong (missing manifest, missing/truncated/altered file)."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            entries = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"has no readable {MANIFEST}"
    for rel, (size, digest) in sorted(entries.items()):
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            return f"lacks {rel}"
        if os.path.getsize(path) != size:
            return f"{rel} has {os.path.getsize(path)} bytes, expected {size} (truncated?)"
        if _sha256(path) != digest:
            return f"{rel} fails its sha256 check"
    return None


def _restore_verified(manager, checkpoint_dir: str, abstract) -> dict | None:
    """The newest checkpoint of ``manager`` that passes :func:`verify_manifest` and restores,
    as ``{"params", "opt_state", "step"}``; None when there is none (train from scratch). A
    step that fails (truncated or missing file, 1-bit flip, unreadable metadata) is deleted
    with a :class:`bcjax.errors.CacheWarning` naming its folder, and an older step (or a fresh
    run) takes its place — a corrupt cache is rebuilt, never a tensorstore traceback."""
    import shutil
    import warnings

    from bcjax.errors import CacheWarning

    with requires("train"):
        import orbax.checkpoint as ocp

    for step in sorted((int(s) for s in manager.all_steps()), reverse=True):
        folder = os.path.join(os.path.abspath(checkpoint_dir), str(step))
        problem = verify_manifest(folder)
        legacy = not os.path.exists(os.path.join(folder, MANIFEST))  # saved before manifests: restore is the check
        if problem is None or legacy:
            try:
                state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
                return {**state, "step": step}
            except Exception as e:  # noqa: BLE001 - any failure to read a cached checkpoint means: rebuild it
                problem = f"cannot be restored ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
        warnings.warn(f"fine-tune checkpoint {folder} {problem}; deleting it and rebuilding (retraining)",
                      CacheWarning, stacklevel=3)
        shutil.rmtree(folder, ignore_errors=True)
        manager.reload()
    return None


def finetune(loss_fn: Callable[[Any, Mapping[str, jax.Array]], jax.Array], params: Any,
             data: Mapping[str, np.ndarray], cfg: TrainConfig, *, checkpoint_dir: str | None = None,
             mesh: Mesh | None = None, progress: bool = True, description: str = "fine-tuning",
             stop_after: int | None = None, loss_args: tuple = ()) -> FinetuneResult:
    """Fine-tune ``params`` on ``data`` (a dict of equally long arrays) with ``loss_fn``.

    Args:
      loss_fn: ``(params, batch, *loss_args) -> scalar``; the batch is ``{k: v[idx]}`` of
        ``data``. ``loss_args`` (e.g. a task's frozen head) are traced arguments, so runs
        that differ only in them share one compiled step.
      checkpoint_dir: orbax checkpoints of (params, optimizer state) go here; if it holds
        one, training resumes from its step. A finished run returns its final parameters.
      mesh: a mesh with a ``data`` axis; the batch is sharded over it, parameters are
        replicated (default: all devices; the batch size must divide evenly).
      stop_after: stop (after checkpointing) once this step is reached — to simulate an
        interrupted run in tests.
    """
    n = len(next(iter(data.values())))
    if any(len(v) != n for v in data.values()):
        raise ValueError(f"data arrays differ in length: { {k: len(v) for k, v in data.items()} }")
    mesh = mesh or data_mesh()
    ndev = mesh.shape["data"]
    if cfg.batch_size % ndev:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {ndev} devices of the data mesh")
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    tx = make_optimizer(cfg)
    loss_args = jax.device_put(tuple(loss_args), replicated)
    start, resumed = 0, None
    manager = _checkpoint_manager(checkpoint_dir) if checkpoint_dir else None
    # restore straight into the replicated layout; nothing is allocated before (the initial
    # parameters and optimizer state would be replaced anyway: one copy per device each)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                            {"params": jax.eval_shape(lambda p: p, params),
                             "opt_state": jax.eval_shape(tx.init, params)})
    state = _restore_verified(manager, checkpoint_dir, abstract) if manager is not None else None
    if state is not None:
        start = resumed = state.pop("step")
        params, opt_state = state["params"], state["opt_state"]
    else:
        params = jax.tree.map(lambda x: jnp.array(x, copy=True), jax.device_put(params, replicated))  # donated below
        opt_state = jax.device_put(tx.init(params), replicated)

    def save(step):
        if manager is None:
            return
        with requires("train"):
            import orbax.checkpoint as ocp

        manager.save(step, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}), force=True)
        manager.wait_until_finished()
        write_manifest(os.path.join(os.path.abspath(checkpoint_dir), str(step)))

    losses: list[float] = []
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = None
    if progress and start < end:
        from tqdm.auto import tqdm

        bar = tqdm(total=end - start, desc=description, leave=False, dynamic_ncols=True)
    for step in range(start, end):
        idx = batch_indices(n, cfg.batch_size, step, cfg.seed)
        batch = {k: jax.device_put(np.asarray(v[idx]), sharded) for k, v in data.items()}
        params, opt_state, loss = _train_step(loss_fn, tx, params, opt_state, batch, loss_args)
        if bar is not None or step == end - 1 or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0):
            losses.append(float(loss))
        else:
            losses.append(loss)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < end:
            save(step + 1)
    if bar is not None:
        bar.close()
    if start < end:
        save(end)
    if manager is not None:
        manager.close()
    return FinetuneResult(params=params, losses=[float(x) for x in losses], resumed_from=resumed)


def joint_loss(loss_fn: Callable) -> Callable:
    """The multi-task loss over a batch mixing tasks: ``(params, batch, *stacked_heads)`` with
    ``batch["task"]`` the task index of each example and ``stacked_heads`` the tasks' frozen
    heads stacked on a leading axis; the mean over examples i of
    ``loss_fn(params, {k: batch[k][i:i+1]}, *head[task_i])`` (the single-task loss with that
    example's own head; vmapped, so the backbone runs once on the whole batch)."""

    def loss(params, batch, *stacked_heads):
        rest = {k: v for k, v in batch.items() if k != "task"}

        def one(example, task):
            head = tuple(jnp.asarray(h)[task] for h in stacked_heads)
            return loss_fn(params, {k: v[None] for k, v in example.items()}, *head)

        return jnp.mean(jax.vmap(one)(rest, batch["task"]))

    return loss


def multitask_config(cfg: TrainConfig, num_tasks: int) -> TrainConfig:
    """The per-task recipe ``cfg`` for one joint run over ``num_tasks`` tasks (SPEC §3 "Multi-task
    reference"): the same optimizer, batch size and learning rate, ``steps`` and ``warmup_steps``
    multiplied by the number of tasks (the per-task fine-tunes' total steps)."""
    return dataclasses.replace(cfg, steps=cfg.steps * num_tasks, warmup_steps=cfg.warmup_steps * num_tasks)


def multitask_finetune(loss_fn: Callable, params: Any, task_data: Sequence[Mapping[str, np.ndarray]],
                       heads: Sequence[tuple], cfg: TrainConfig, *, checkpoint_dir: str | None = None,
                       progress: bool = True, description: str = "multi-task fine-tuning") -> FinetuneResult:
    """The multi-task reference (SPEC §3): one :func:`finetune` of ``params`` on the union of the
    tasks' training data ``task_data`` (one ``{"x", "y", ...}`` per task), each example scored with
    its own task's frozen head (``heads[t]``, a tuple of arrays; equal shapes across tasks, e.g.
    padded), by :func:`joint_loss` of the single-task ``loss_fn(params, batch, *head)``, with
    :func:`multitask_config` of the per-task recipe ``cfg``. Batches are drawn from the union as in
    :func:`finetune` (so each task contributes in proportion to its size); checkpointed and
    resumable like any fine-tune."""
    if len(task_data) != len(heads) or not task_data:
        raise ValueError(f"multitask_finetune: {len(task_data)} data sets for {len(heads)} heads")
    keys = set(task_data[0])
    if any(set(d) != keys for d in task_data):
        raise ValueError(f"multitask_finetune: the tasks' data have different keys {[sorted(d) for d in task_data]}")
    data = {k: np.concatenate([np.asarray(d[k]) for d in task_data]) for k in sorted(keys)}
    data["task"] = np.concatenate([np.full(len(next(iter(d.values()))), t, np.int32) for t, d in enumerate(task_data)])
    shapes = [tuple(np.shape(a) for a in h) for h in heads]
    if len(set(shapes)) != 1:
        raise ValueError(f"multitask_finetune: the tasks' heads differ in shape {shapes}; pad them to one shape")
    stacked = tuple(jnp.stack([jnp.asarray(h[i]) for h in heads]) for i in range(len(heads[0])))
    return finetune(joint_loss(loss_fn), params, data, multitask_config(cfg, len(task_data)),
                    checkpoint_dir=checkpoint_dir, progress=progress, description=description, loss_args=stacked)
