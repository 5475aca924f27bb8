"""Figures like the paper's: subset curves (Fig. 2), cosine-similarity heatmaps (Fig. 8),
per-task normalized accuracy. Matplotlib with the Agg backend; each function writes a PNG."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from bcjax._optional import requires

__all__ = ["subset_curves", "cosine_heatmaps", "per_task_bars", "grid_heatmap", "violins"]


def _plt():
    with requires("demo"):
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

    return plt


def subset_curves(curves: Mapping[str, Mapping[int, float]], path: str, *, title: str = "",
                  ylabel: str = "avg normalized accuracy (%)") -> str:
    """One line per method: x = number of merged tasks, y = mean over subsets of that size."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, curve in curves.items():
        ks = sorted(int(k) for k in curve)
        ax.plot(ks, [100 * curve[k] if k in curve else 100 * curve[str(k)] for k in ks], marker="o", label=name)
    ax.set_xticks(sorted({int(k) for c in curves.values() for k in c}))
    ax.set_xlabel("number of merged tasks (0 = pretrained)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cosine_heatmaps(matrices: Mapping[str, np.ndarray], tasks: Sequence[str], path: str) -> str:
    """Side-by-side heatmaps of cos(τi, τj), e.g. raw vs Breadcrumbs-masked."""
    plt = _plt()
    n = len(matrices)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.2), squeeze=False)
    vmax = max(float(np.max(np.abs(m - np.eye(len(m))))) for m in matrices.values()) or 1.0
    for ax, (name, m) in zip(axes[0], matrices.items(), strict=True):
        shown = np.where(np.eye(len(m), dtype=bool), np.nan, m)  # the diagonal (1) would swamp the scale
        im = ax.imshow(shown, vmin=-vmax, vmax=vmax, cmap="coolwarm")
        ax.set_xticks(range(len(tasks)), tasks, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
        for i in range(len(tasks)):
            for j in range(len(tasks)):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6)
        ax.set_title(f"{name}: cos(τi, τj)")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def per_task_bars(values: Mapping[str, Mapping[str, float]], tasks: Sequence[str], path: str, *,
                  ylabel: str = "normalized accuracy (%)") -> str:
    """Grouped bars: one group per task, one bar per method."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks)), 4))
    width = 0.8 / max(len(values), 1)
    for i, (name, per_task) in enumerate(values.items()):
        ax.bar(np.arange(len(tasks)) + i * width, [100 * per_task[t] for t in tasks], width, label=name)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.axhline(100, color="k", lw=0.6)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def grid_heatmap(values: np.ndarray, rows: Sequence, cols: Sequence, path: str, *, row_label: str,
                 col_label: str, title: str = "") -> str:
    """Fig. 9-style heatmap of a score over a 2-D hyper-parameter grid."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1 + 0.9 * len(cols), 1 + 0.6 * len(rows)))
    values = np.asarray(values, float)
    im = ax.imshow(values, cmap="viridis")
    ax.set_xticks(range(len(cols)), [f"{c:g}" for c in cols])
    ax.set_yticks(range(len(rows)), [f"{r:g}" for r in rows])
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if np.isfinite(values[i, j]):  # NaN: no such grid point (e.g. beta > gamma)
                ax.text(j, i, f"{100 * values[i, j]:.1f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def violins(distributions: Mapping[str, Sequence[float]], path: str, *, title: str = "",
            ylabel: str = "avg normalized accuracy (%)") -> str:
    """Fig. 7-style violins: one per masking variant (or method), the distribution of a score
    over grid points or subsets; the points themselves are overlaid."""
    plt = _plt()
    names = [k for k, v in distributions.items() if len(v)]
    fig, ax = plt.subplots(figsize=(1.5 + 1.4 * len(names), 4))
    data = [100 * np.asarray(distributions[k], float) for k in names]
    multi = [i for i, d in enumerate(data) if len(d) > 1]
    if multi:
        ax.violinplot([data[i] for i in multi], positions=multi, showmedians=True)
    for i, d in enumerate(data):
        ax.scatter(np.full(len(d), i) + np.linspace(-0.08, 0.08, len(d)), d, s=8, color="k", alpha=0.6, zorder=3)
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
