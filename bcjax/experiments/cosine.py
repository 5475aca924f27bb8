"""Fig. 8: cosine similarity of raw and Breadcrumbs-masked task vectors (SPEC §4)."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from bcjax.experiments.registry import register_experiment

__all__ = ["CosineSettings", "cosine_experiment", "offdiagonal_mean"]


@dataclasses.dataclass(frozen=True)
class CosineSettings:
    settings: list[list[float]] = dataclasses.field(default_factory=lambda: [[0.9, 0.99]])  # (β, γ) pairs


def offdiagonal_mean(m: np.ndarray) -> float:
    n = len(m)
    return float((np.sum(m) - np.trace(m)) / max(n * n - n, 1))


def cosine_experiment(suite, *, settings: Sequence[tuple[float, float]]) -> dict:
    """Fig. 8: cos(τi, τj) of raw task vectors and of Breadcrumbs-masked ones at each (β, γ)
    (all thresholds from one pass per leaf × task)."""
    from bcjax import grids, sweeps

    taus = grids.stack_task_vectors(suite.pretrained, suite.finetuned, exclude=suite.exclude)
    pairs = [(float(b), float(g)) for b, g in settings]
    th = grids.grid_threshold_bits(taus, pairs) if pairs else None
    T = len(suite.tasks)

    def split(stacked):
        leaves = [x for x in jax.tree.leaves(stacked) if x is not None]
        return [[x[t] for x in leaves] for t in range(T)]

    mats = {"raw task vectors": sweeps.cosine_similarity_matrix(split(taus))}
    for g, (b, gam) in enumerate(pairs):
        mats[f"Breadcrumbs β={b:g}, γ={gam:g}"] = sweeps.cosine_similarity_matrix(
            split(grids.grid_deltas(suite.pretrained, taus, th, g)))
    return {"tasks": list(suite.tasks), "matrices": {k: v.tolist() for k, v in mats.items()},
            "mean_offdiagonal": {k: offdiagonal_mean(v) for k, v in mats.items()}}


def _figures(res: dict, suite) -> dict:
    from bcjax import plots

    return {"cosine": ("cosine_similarity.png", plots.cosine_heatmaps(
        {k: np.array(v) for k, v in res["matrices"].items()}, res["tasks"], None))}


@register_experiment("cosine", settings=CosineSettings, figures=_figures)
def run(suite, store, s: CosineSettings, *, chunk=None, mesh=None, progress=True) -> dict:
    """Fig. 8: cosine similarity of raw and masked task vectors."""
    return cosine_experiment(suite, settings=[tuple(x) for x in s.settings])
