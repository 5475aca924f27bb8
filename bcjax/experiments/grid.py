"""Fig. 7/9: Breadcrumbs over an (α, β, γ) grid, all (or some) tasks merged (SPEC §4)."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from bcjax.experiments.engine import evaluate_models, grid_builder, mean_normalized, reference_accuracy
from bcjax.experiments.registry import register_experiment

__all__ = ["GridSettings", "grid_experiment"]


@dataclasses.dataclass(frozen=True)
class GridSettings:
    alphas: list[float] = dataclasses.field(default_factory=lambda: [0.3, 0.5])
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.8, 0.9])
    gammas: list[float] = dataclasses.field(default_factory=lambda: [0.99, 1.0])
    split: str = "val"
    subset: list[str] | None = None  # task names to merge (default: all)


def grid_experiment(suite, store, *, alphas, betas, gammas, split: str = "val", subset: Sequence[str] | None = None,
                    chunk: int | None = None, progress: bool = True, mesh=None) -> dict:
    """Fig. 7/9: Breadcrumbs over an (α, β, γ) grid (β ≤ γ) merging ``subset`` (default: all
    tasks), scored by average normalized accuracy on ``split``; per (β, γ) the best α."""
    from bcjax import grids

    betas, gammas = grids.grid_axis(betas, "betas"), grids.grid_axis(gammas, "gammas")  # SPEC §2 decimals
    pairs = grids.beta_gamma_pairs(betas, gammas)
    points = grids.grid_points(alphas, pairs)
    names = list(subset) if subset else list(suite.tasks)
    unknown = sorted(set(names) - set(suite.tasks))
    if unknown:
        raise ValueError(f"grid subset names unknown tasks {unknown}; tasks: {list(suite.tasks)}")
    row = np.array([t in names for t in suite.tasks])
    ref = reference_accuracy(suite, store, split)
    keys = [dict(kind="grid", suite=suite.fingerprint, split=split, alpha=a, beta=b, gamma=g,
                 subset=[int(v) for v in row]) for a, b, g in points]
    rows = np.repeat(row[None], len(points), 0)
    build = grid_builder(suite, pairs, points, rows, np.arange(len(points)), mesh)
    accs = evaluate_models(suite, store, keys, [names] * len(points), build, split,
                           chunk=chunk or suite.models_per_call, progress=progress, desc="grid")
    scored = [dict(alpha=a, beta=b, gamma=g, variant=grids.masking_variant(b, g), acc=acc,
                   avg_normalized_acc=mean_normalized(acc, ref)) for (a, b, g), acc in zip(points, accs, strict=True)]
    best = max(scored, key=lambda r: r["avg_normalized_acc"])
    heat = np.full((len(betas), len(gammas)), np.nan)
    for r in scored:
        i, j = list(betas).index(r["beta"]), list(gammas).index(r["gamma"])
        heat[i, j] = np.nanmax([heat[i, j], r["avg_normalized_acc"]])
    return {"split": split, "tasks": names, "finetuned_acc": ref, "points": scored, "best": best,
            "heatmap_best_alpha": heat.tolist(), "betas": list(betas), "gammas": list(gammas)}


def _figures(res: dict, suite) -> dict:
    from bcjax import plots

    dist: dict[str, list] = {}
    for p in res["points"]:
        dist.setdefault(p["variant"], []).append(p["avg_normalized_acc"])
    return {"heatmap": ("grid_heatmap.png", plots.grid_heatmap(np.array(res["heatmap_best_alpha"]), res["betas"],
                                                               res["gammas"], None, row_label="β", col_label="γ",
                                                               title="best α per (β, γ)")),
            "violins": ("grid_violins.png", plots.violins(dist, None, title="masking variants over the grid"))}


@register_experiment("grid", settings=GridSettings, figures=_figures)
def run(suite, store, s: GridSettings, *, chunk=None, mesh=None, progress=True) -> dict:
    """Fig. 7/9: Breadcrumbs (α, β, γ) grid scored on one split."""
    return grid_experiment(suite, store, alphas=s.alphas, betas=s.betas, gammas=s.gammas, split=s.split,
                           subset=s.subset, chunk=chunk, progress=progress, mesh=mesh)
