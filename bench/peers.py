"""Peer implementations for the merge benchmark, in torch (and mergekit), run in the peer
venv (.venv-bench, made by bench/setup_peers.sh) by bench/merge_speed.py, one per process.

Each takes θ0 and [θt] as dicts of torch float32 tensors in PyTorch state-dict layout
(bench/shapes.py) and returns the merged dict. Semantics, against SPEC §2–3:

- ``torch_task_arithmetic``: θ0 + α Σt τt (SPEC §3), the memory-bandwidth floor.
- ``torch_kthvalue``: SPEC §2 tensor granularity with exact order statistics from two
  ``torch.kthvalue`` calls per leaf and task (lo = a(n_bot), hi = a(n − n_top)); same
  masks as bcjax.
- ``torch_official_row``: the paper's official code's semantics (SPEC §2, last bullet):
  per row along the last axis of the PyTorch tensor (m = row length), remove the top
  int(m·r) entries by |τ| with ``torch.topk``, then keep the top int(m·k) of the rest
  (flags r = 1 − γ, k = γ − β); 1-D leaves are one row. Same as bcjax's
  ``granularity="row", axis=-1`` without ties.
- ``mergekit_breadcrumbs``: mergekit 0.1.5's ``breadcrumbs`` method through its in-memory
  API ``merge_state_dicts`` (per tensor: ``magnitude_outliers`` sparsification of each τt
  by a full sort, then Σ); density = γ − β, gamma = 1 − γ (SPEC §2 converter). Counts:
  keep int(d·n), drop the top int(g·n) — can differ from bcjax's ⌊·+1e-6⌋ counts by one on
  a leaf, and keeps nothing when d·n < 1.
- ``mergekit_ties``: mergekit's ``ties`` (per-tensor magnitude trim keeping exactly
  int(density·n), sum-sign election, disjoint mean, λ). bcjax TIES trims with one global
  threshold per task over all leaves (SPEC §3); on a single-leaf model the two agree.

Only torch, numpy and (for the mergekit peers) mergekit are imported, lazily.
"""
from __future__ import annotations

import math


def _counts(n: int, beta: float, gamma: float) -> tuple[int, int]:
    """SPEC §2 tensor counts (n_bot, n_top)."""
    return math.floor(beta * n + 1e-6), math.floor((1 - gamma) * n + 1e-6)


def torch_task_arithmetic(pre, fts, *, alpha):
    """θ0 + α Σt (θt − θ0), one temporary per leaf."""
    import torch

    out = {}
    for k, p in pre.items():
        acc = torch.zeros_like(p)
        tmp = torch.empty_like(p)
        for ft in fts:
            torch.sub(ft[k], p, out=tmp)
            acc.add_(tmp)
        out[k] = acc.mul_(alpha).add_(p)
    return out


def torch_kthvalue(pre, fts, *, alpha, beta, gamma):
    """SPEC §2 Breadcrumbs (tensor granularity) with ``torch.kthvalue`` thresholds."""
    import torch

    out = {}
    for k, p in pre.items():
        acc = torch.zeros_like(p)
        n = p.numel()
        n_bot, n_top = _counts(n, beta, gamma)
        for ft in fts:
            tau = ft[k] - p
            a = tau.abs()
            flat = a.reshape(-1)
            lo = flat.kthvalue(n_bot + 1).values if n_bot < n else torch.tensor(math.inf)
            hi = flat.kthvalue(n - n_top + 1).values if n_top >= 1 else torch.tensor(math.inf)
            acc.add_(torch.where((a >= lo) & (a < hi), tau, 0))
        out[k] = acc.mul_(alpha).add_(p)
    return out


def official_flags(beta: float, gamma: float) -> tuple[float, float]:
    """(r, k) flags of the official code for SPEC's (β, γ): r = 1 − γ, k = γ − β, rounded
    like a value typed on a command line (0.01, 0.09), not 0.0899999…"""
    return round(1 - gamma, 10), round(gamma - beta, 10)


def torch_official_row(pre, fts, *, alpha, beta, gamma):
    """The official code's per-row top-k Breadcrumbs (see the module docstring)."""
    import torch

    r, keep = official_flags(beta, gamma)
    out = {}
    for k, p in pre.items():
        acc = torch.zeros_like(p)
        for ft in fts:
            tau = ft[k] - p
            rows = tau.reshape(-1, tau.shape[-1]) if tau.dim() else tau.reshape(1, 1)
            m = rows.shape[-1]
            n_top, n_keep = int(m * r), int(m * keep)
            a = rows.abs()
            if n_top > 0:  # remove the outliers: |τ| ≥ 0, so −1 ranks them below everything
                a.scatter_(-1, torch.topk(a, n_top, dim=-1, sorted=False).indices, -1.0)
            mask = torch.zeros_like(rows, dtype=torch.bool)
            if n_keep > 0:
                mask.scatter_(-1, torch.topk(a, n_keep, dim=-1, sorted=False).indices, True)
            acc.add_((rows * mask).reshape(tau.shape))
        out[k] = acc.mul_(alpha).add_(p)
    return out


def mergekit_breadcrumbs(pre, fts, *, alpha, beta, gamma):
    """mergekit's ``breadcrumbs`` (density = γ − β, gamma = 1 − γ, weight 1, λ = α)."""
    from mergekit.merge_methods import merge_state_dicts

    g, density = official_flags(beta, gamma)
    return merge_state_dicts([pre, *fts], "breadcrumbs", base=0,
                             parameters={"weight": 1.0, "density": density, "gamma": g, "lambda": alpha})


def mergekit_ties(pre, fts, *, density, alpha):
    """mergekit's ``ties`` (weight 1, normalize: disjoint mean, λ = α)."""
    from mergekit.merge_methods import merge_state_dicts

    return merge_state_dicts([pre, *fts], "ties", base=0,
                             parameters={"weight": 1.0, "density": density, "lambda": alpha})


def mergekit_counts(n: int, beta: float, gamma: float) -> tuple[int, int]:
    """(n_bot, n_keep) that mergekit's magnitude_outliers uses for an n-entry tensor."""
    g, d = official_flags(beta, gamma)
    target, n_top = int(d * n), int(g * n)
    return max(0, n - target - n_top), target
