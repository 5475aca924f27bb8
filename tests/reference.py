"""Plain-numpy reference implementations of SPEC §2–3, written independently of bcjax.

Used by the differential tests; float64 where the SPEC's formulas are float64, float32
magnitudes for thresholds (SPEC §1).
"""
import math

import numpy as np


def counts(n, beta, gamma):
    return math.floor(beta * n + 1e-6), math.floor((1 - gamma) * n + 1e-6)


def breadcrumbs_mask(tau, beta, gamma):
    a = np.abs(np.asarray(tau, np.float32)).ravel()
    n = a.size
    if n == 0:
        return np.zeros(np.shape(tau), bool)
    s = np.sort(a)
    n_bot, n_top = counts(n, beta, gamma)
    lo = s[n_bot] if n_bot < n else np.inf
    hi = s[n - n_top] if n_top >= 1 else np.inf
    keep = (a >= lo) & (a < hi)
    return keep.reshape(np.shape(tau))


def row_mask(tau, keep_frac, remove_frac, axis):
    """The official code's per-row rule, literally: along `axis`, drop the top int(m·r)
    by |τ| (stable argsort), keep the top int(m·k) of the rest."""
    t = np.moveaxis(np.abs(np.asarray(tau, np.float32)), axis, -1)
    m = t.shape[-1]
    flat = t.reshape(-1, m)
    out = np.zeros_like(flat, bool)
    n_top = math.floor(m * remove_frac + 1e-6)
    n_keep = math.floor(m * keep_frac + 1e-6)
    for r, row in enumerate(flat):
        order = np.argsort(-row, kind="stable")
        out[r, order[n_top:n_top + n_keep]] = True
    return np.moveaxis(out.reshape(t.shape), -1, axis)


def _f(x):
    return np.asarray(x, np.float64)


def task_arithmetic(p0, fts, alpha):
    return _f(p0) + alpha * sum(_f(f) - _f(p0) for f in fts)


def breadcrumbs(p0, fts, alpha, beta, gamma):
    acc = 0
    for f in fts:
        tau = np.asarray(f, np.float32) - np.asarray(p0, np.float32)
        acc = acc + np.where(breadcrumbs_mask(tau, beta, gamma), _f(tau), 0)
    return _f(p0) + alpha * acc


def simple_average(fts):
    return sum(_f(f) for f in fts) / len(fts)


def ties(p0_leaves, ft_leaves_per_model, density, alpha):
    """p0_leaves: list of arrays; ft_leaves_per_model: list (models) of lists (leaves)."""
    taus = [[np.asarray(f, np.float32) - np.asarray(p, np.float32) for f, p in zip(fl, p0_leaves)]
            for fl in ft_leaves_per_model]
    trimmed = []
    for tl in taus:
        allmag = np.sort(np.abs(np.concatenate([t.ravel() for t in tl])))
        total = allmag.size
        n_keep = max(1, math.floor(density * total + 1e-6))
        thr = allmag[total - n_keep]
        trimmed.append([np.where(np.abs(t) >= thr, t, 0).astype(np.float64) for t in tl])
    out = []
    for j, p in enumerate(p0_leaves):
        tr = [tm[j] for tm in trimmed]
        s = np.where(sum(tr) >= 0, 1.0, -1.0)
        agree = [(np.sign(t) == s) & (t != 0) for t in tr]
        num = sum(np.where(a, t, 0) for a, t in zip(agree, tr))
        cnt = sum(a.astype(np.float64) for a in agree)
        mean = np.where(cnt > 0, num / np.maximum(cnt, 1), 0)
        out.append(_f(p) + alpha * mean)
    return out


def fisher(fts, fishers, weights, eps):
    wf = [w * np.maximum(_f(F), eps) for w, F in zip(weights, fishers)]
    den = sum(wf)
    num = sum(w * _f(f) for w, f in zip(wf, fts))
    plain = sum(_f(f) for f in fts) / len(fts)
    return np.where(den > 0, num / np.where(den > 0, den, 1), plain)


def gradient_matching(p0, fts, hs, alphas, h0):
    hbar = _f(h0) + sum(a * _f(h) for a, h in zip(alphas, hs))
    out = _f(p0)
    for a, f, h in zip(alphas, fts, hs):
        coef = np.where(hbar > 0, (_f(h0) + _f(h)) / np.where(hbar > 0, hbar, 1), 1.0)
        out = out + a * coef * (_f(f) - _f(p0))
    return out
