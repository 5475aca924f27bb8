"""Frozen classification heads shared by every model's features.

Prototype heads (the embedded demo's analogue of CLIP's zero-shot heads, SPEC §5): per
class, the L2-normalized mean of the L2-normalized pretrained features of k training
images; logits = scale · cos(feature, prototype). Heads of different tasks are padded to
one class count with a validity mask, so one compiled forward serves every task.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

__all__ = ["k_shot_indices", "prototype_head", "pad_head", "cosine_logits"]

_NEG = -1e9


def _l2n(x, axis=-1):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def k_shot_indices(labels: np.ndarray, num_classes: int, k: int, seed: int = 0) -> np.ndarray:
    """k indices per class (fewer where a class has fewer), seeded and sorted."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if idx.size == 0:
            raise ValueError(f"class {c} has no training example: cannot build its prototype")
        out.append(rng.choice(idx, size=min(k, idx.size), replace=False))
    return np.sort(np.concatenate(out))


def prototype_head(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """float32[C, D] unit-norm class prototypes from (N, D) features and their labels."""
    f = _l2n(jnp.asarray(features, jnp.float32))
    protos = []
    for c in range(num_classes):
        sel = f[np.asarray(labels) == c]
        if sel.shape[0] == 0:
            raise ValueError(f"class {c} has no feature: cannot build its prototype")
        protos.append(sel.mean(0))
    return np.asarray(_l2n(jnp.stack(protos)))


def pad_head(weights: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad [C, D] prototypes to [num_classes, D] plus a bool validity mask."""
    c, d = weights.shape
    if c > num_classes:
        raise ValueError(f"head has {c} classes, more than the padded size {num_classes}")
    w = np.zeros((num_classes, d), np.float32)
    w[:c] = weights
    return w, np.arange(num_classes) < c


def cosine_logits(features, weights, valid, scale: float):
    """scale · cos(features, weights) with padded classes at −1e9."""
    logits = scale * _l2n(features.astype(jnp.float32)) @ weights.T
    return jnp.where(valid[None], logits, _NEG)
