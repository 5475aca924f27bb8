"""Figures like the paper's: subset curves (Fig. 2), cosine-similarity heatmaps (Fig. 8),
per-task normalized accuracy. Each function draws on a fresh :class:`matplotlib.figure.Figure`
(no pyplot, no backend switch: importing bcjax never changes a notebook's plotting) and writes
it to ``path`` as a PNG (returning the path), or returns the Figure when ``path`` is None."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from bcjax._optional import requires

__all__ = ["subset_curves", "cosine_heatmaps", "per_task_bars", "grid_heatmap", "violins", "scaling_curves", "radar"]


def _figure(figsize):
    with requires("demo"):
        from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _finish(fig, path):
    fig.tight_layout()
    if path is None:
        return fig
    fig.savefig(path, dpi=120)
    return path


def subset_curves(curves: Mapping[str, Mapping[int, float]], path: str | None, *, title: str = "",
                  ylabel: str = "avg normalized accuracy (%)",
                  intervals: Mapping[str, Mapping[int, Sequence[float]]] | None = None,
                  reference: float | None = None) -> Any:
    """One line per method: x = number of merged tasks, y = mean over subsets of that size;
    ``intervals[method][k] = [lo, hi]`` (fractions) drawn as a band, ``reference`` (e.g. the
    pretrained level) as a horizontal line. The legend sits outside the axes."""
    fig = _figure((7.5 if intervals or reference is not None else 5.5, 4))
    ax = fig.subplots()
    for name, curve in curves.items():
        ks = sorted(int(k) for k in curve)
        line, = ax.plot(ks, [100 * curve[k] if k in curve else 100 * curve[str(k)] for k in ks], marker="o",
                        label=name)
        band = (intervals or {}).get(name)
        if band:
            bk = [k for k in ks if k in band or str(k) in band]
            lo_hi = np.array([band[k] if k in band else band[str(k)] for k in bk], float)
            ax.fill_between(bk, 100 * lo_hi[:, 0], 100 * lo_hi[:, 1], color=line.get_color(), alpha=0.2,
                            label=f"{name} 95% CI")
    if reference is not None:
        ax.axhline(100 * reference, color="k", ls="--", lw=1, label="pretrained")
    ax.set_xticks(sorted({int(k) for c in curves.values() for k in c}))
    ax.set_xlabel("number of merged tasks (0 = pretrained)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, borderaxespad=0)
    return _finish(fig, path)


def cosine_heatmaps(matrices: Mapping[str, np.ndarray], tasks: Sequence[str], path: str | None) -> Any:
    """Side-by-side heatmaps of cos(τi, τj), e.g. raw vs Breadcrumbs-masked."""
    n = len(matrices)
    fig = _figure((4.6 * n, 4.2))
    axes = fig.subplots(1, n, squeeze=False)
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
    return _finish(fig, path)


def per_task_bars(values: Mapping[str, Mapping[str, float]], tasks: Sequence[str], path: str | None, *,
                  ylabel: str = "normalized accuracy (%)",
                  intervals: Mapping[str, Mapping[str, Sequence[float]]] | None = None) -> Any:
    """Grouped bars: one group per task, one bar per method; ``intervals[method][task] = [lo, hi]``
    (fractions) drawn as error bars. The legend sits outside the axes."""
    fig = _figure((max(6, 1.2 * len(tasks)) + 2, 4))
    ax = fig.subplots()
    width = 0.8 / max(len(values), 1)
    for i, (name, per_task) in enumerate(values.items()):
        y = np.array([100 * per_task[t] for t in tasks])
        err = None
        if intervals and name in intervals:
            ci = 100 * np.array([intervals[name][t] for t in tasks], float)
            err = np.stack([np.maximum(y - ci[:, 0], 0), np.maximum(ci[:, 1] - y, 0)])
        ax.bar(np.arange(len(tasks)) + i * width, y, width, label=name, yerr=err, capsize=1.5,
               error_kw={"lw": 0.6})
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.axhline(100, color="k", lw=0.6)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    return _finish(fig, path)


def grid_heatmap(values: np.ndarray, rows: Sequence, cols: Sequence, path: str | None, *, row_label: str,
                 col_label: str, title: str = "") -> Any:
    """Fig. 9-style heatmap of a score over a 2-D hyper-parameter grid."""
    fig = _figure((1 + 0.9 * len(cols), 1 + 0.6 * len(rows)))
    ax = fig.subplots()
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
    return _finish(fig, path)


def violins(distributions: Mapping[str, Sequence[float]], path: str | None, *, title: str = "",
            ylabel: str = "avg normalized accuracy (%)") -> Any:
    """Fig. 7-style violins: one per masking variant (or method), the distribution of a score
    over grid points or subsets; the points themselves are overlaid."""
    names = [k for k, v in distributions.items() if len(v)]
    fig = _figure((1.5 + 1.4 * len(names), 4))
    ax = fig.subplots()
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
    return _finish(fig, path)


def scaling_curves(curves: Mapping[str, Mapping[str, float]], path: str | None, *,
                   intervals: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
                   references: Mapping[str, float] | None = None, ylabel: str = "average accuracy (%)") -> Any:
    """Accuracy against the scaling factor α (Daheim et al. Fig. 2): one line per method
    (``curves[method][str(α)]``, fractions), ``intervals`` as bands, ``references`` (e.g.
    pretrained, fine-tuned) as horizontal lines."""
    fig = _figure((7, 4))
    ax = fig.subplots()
    for name, curve in curves.items():
        xs = [float(a) for a in curve]
        line, = ax.plot(xs, [100 * v for v in curve.values()], marker="o", label=name)
        if intervals and name in intervals:
            lo_hi = 100 * np.array([intervals[name][a] for a in curve], float)
            ax.fill_between(xs, lo_hi[:, 0], lo_hi[:, 1], color=line.get_color(), alpha=0.2)
    for (name, level), style in zip((references or {}).items(), ("--", ":", "-.")):
        ax.axhline(100 * level, color="k", ls=style, lw=1, label=name)
    ax.set_xlabel("scaling factor α")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    return _finish(fig, path)


def radar(values: Mapping[str, Mapping[str, float]], axes: Sequence[str], path: str | None, *,
          title: str = "", dashed: Sequence[str] = ()) -> Any:
    """A radar chart (FusionBench's per-task figure): one closed polygon per method over ``axes``
    (e.g. tasks), ``values[method][axis]`` fractions drawn in %; the rows in ``dashed`` (e.g. the
    references) drawn dashed. Up to 20 distinct colours."""
    from matplotlib import colormaps

    fig = _figure((10, 6))
    ax = fig.add_subplot(projection="polar")
    angles = np.linspace(0, 2 * np.pi, len(axes), endpoint=False)
    closed = np.concatenate([angles, angles[:1]])
    colors = colormaps["tab20"].colors
    for i, (name, per_axis) in enumerate(values.items()):
        r = np.array([100 * per_axis[a] for a in axes])
        ax.plot(closed, np.concatenate([r, r[:1]]), lw=1.2, label=name, color=colors[i % len(colors)],
                ls="--" if name in dashed else "-")
    ax.set_xticks(angles, list(axes), fontsize=8)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.1, 1.05), borderaxespad=0)
    return _finish(fig, path)
