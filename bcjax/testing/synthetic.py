"""A tiny in-memory model suite for tests and smoke runs (``suite: {name: synthetic}``)."""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from bcjax.config import ConfigError, get
from bcjax.experiments.class_split import split_classes
from bcjax.experiments.settings import where
from bcjax.experiments.suite import ModelSuite, fingerprint, register_suite

__all__ = ["synthetic_suite"]

_KEYS = ("name", "seed", "dim", "hidden", "examples", "steps", "lr", "classes_per_task", "tasks", "classes",
         "models_per_call", "fisher_examples", "gram_examples")


@register_suite("synthetic")
def synthetic_suite(config: Mapping, *, cache_dir: str | None = None, progress: bool = False) -> ModelSuite:
    """A 2-layer tanh MLP backbone, frozen random per-task heads, Gaussian-cluster tasks, each
    fine-tuned by a few full-batch gradient steps. ``suite.classes_per_task: k`` instead splits
    ONE ``suite.classes``-class data set into k-class tasks (the class-split setting, Fig. 4).
    Provides per-task Fishers, training-set sizes, RegMean Grams (``suite.gram_examples``
    training inputs, default 256 as SPEC §3, i.e. all 96 of the default training split, with the
    task's fine-tuned model), the per-task ``model_fn`` and the test inputs without labels as
    ``unlabeled_batches`` (AdaMerging), so every registered method runs on it. For the FusionBench
    protocols it gives its ``examples``, their mean cross-entropy ``loss``, a ``corrupt`` stand-in
    (seeded Gaussian input noise: the inputs are vectors, not images) and the ``multitask``
    reference (the same full-batch descent on the union of the tasks' training data, ``steps × T``
    steps)."""
    from bcjax.fisher import diagonal_fisher

    unknown = sorted(set(get(config, "suite", {}, types=dict)) - set(_KEYS))
    if unknown:
        raise ConfigError(f"{where(config)}: unknown key suite.{unknown[0]}; accepted: {sorted(_KEYS)}")
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

    def layer_inputs(params, x):
        """The inputs of the two linear layers (l1/w, l2/w) and the backbone's output."""
        h1 = jnp.tanh(x @ params["l1"]["w"] + params["l1"]["b"])
        return x, h1, jnp.tanh(h1 @ params["l2"]["w"] + params["l2"]["b"])

    def predict(params, x, head):
        return layer_inputs(params, x)[2] @ head

    @jax.jit
    def grams(params, x):
        """{key path: Xᵀ X / N} of every linear layer's inputs (RegMean, SPEC §3)."""
        hp = jax.lax.Precision.HIGHEST
        x1, h1, _ = layer_inputs(params, x)
        return {"l1/w": jnp.matmul(x1.T, x1, precision=hp) / len(x),
                "l2/w": jnp.matmul(h1.T, h1, precision=hp) / len(x)}

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
    ft_of = dict(zip(names, finetuned, strict=True))

    @jax.jit
    def _hits(stacked, x, y, head):
        logits = jax.vmap(lambda p: predict(p, x, head))(stacked)
        return jnp.argmax(logits, -1) == y[None]

    def correctness(stacked, task, split):
        x, y = by_name[task][split]
        return np.asarray(_hits(stacked, x, y, heads[task]))

    def evaluate(stacked, task, split):  # count / n in float64, as bcjax.evaluate.accuracy
        hits = correctness(stacked, task, split)
        return np.count_nonzero(hits, axis=1) / hits.shape[1]

    def test_loss(stacked, task, split):
        """Mean cross-entropy of each stacked model on the examples ``evaluate`` scores."""
        from bcjax.evaluate import loss_of_stack

        x, y = by_name[task][split]
        m = jax.tree.leaves(stacked)[0].shape[0]
        return loss_of_stack(predict, stacked, x, y, batch_size=len(y), models_per_call=m,
                             predict_args=(heads[task],))

    def examples(task, split):
        return by_name[task][split]

    def corrupt(x, name, severity=3, seed=0):
        """A stand-in for the image corruptions (these inputs are vectors, not images): seeded
        Gaussian input noise of std 0.25 · severity, its stream keyed by the corruption's name
        (exercises the robustness protocol; not ImageNet-C)."""
        from bcjax.data.corruptions import CORRUPTIONS

        r = np.random.default_rng([int(seed), CORRUPTIONS.index(name), int(severity)])
        return (x + 0.25 * severity * r.standard_normal(x.shape)).astype(x.dtype)

    def multitask():
        """The multi-task reference: the same full-batch descent on the union of the tasks'
        training data (each example with its task's head), ``steps × T`` steps."""
        xs = [jnp.asarray(by_name[t]["train"][0]) for t in names]
        ys = [jnp.asarray(by_name[t]["train"][1]) for t in names]
        hs = [heads[t] for t in names]
        sizes = np.array([len(y) for y in ys], np.float32)

        @jax.jit
        def joint(params):
            def total(p):  # the mean over the union of the tasks' examples
                return sum(float(w) * loss(p, x, y, h) for w, x, y, h in zip(sizes / sizes.sum(), xs, ys, hs))

            def step(p, _):
                return jax.tree.map(lambda a, b: a - lr * b, p, jax.grad(total)(p)), None

            return jax.lax.scan(step, params, None, length=steps * len(names))[0]

        return jax.tree.map(np.asarray, joint(pre))

    n_fisher, n_gram = int(c("fisher_examples", 16)), int(c("gram_examples", 256))
    provides = {
        "fishers": lambda t: diagonal_fisher(predict, ft_of[t], by_name[t]["train"][0][:n_fisher],
                                             jax.random.key(seed), predict_args=(heads[t],)),
        "dataset_sizes": lambda t: len(by_name[t]["train"][1]),
        "grams": lambda t: {k: np.asarray(v) for k, v in grams(ft_of[t], by_name[t]["train"][0][:n_gram]).items()},
        "model_fn": lambda t: lambda params, x, head=heads[t]: predict(params, x, head),
        "unlabeled_batches": lambda t: by_name[t]["test"][0],  # inputs only: labels are never passed
    }
    fp = fingerprint(dict(suite="synthetic", cfg=dict(config.get("suite", {}))))
    return ModelSuite(name="synthetic MLP suite", tasks=tuple(names), pretrained=pre, finetuned=tuple(finetuned),
                      evaluate=evaluate, fingerprint=fp, heads=heads, models_per_call=int(c("models_per_call", 4)),
                      info={"classes": [list(g) for g in groups]}, provides=provides, correctness=correctness,
                      examples=examples, corrupt=corrupt, multitask=multitask, loss=test_loss)
