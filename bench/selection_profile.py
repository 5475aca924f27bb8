"""CPU time of the native selection pass against a task-arithmetic pass over the same bytes
(issue 16 §4): one ``--shape`` leaf × ``--tasks`` tasks (bench/shapes.py's task-vector model),
device-resident, every cell timed once per round, rounds interleaved, ``time.process_time``
(CPU time: steadier than wall time on a shared machine). Cells: task arithmetic's leaf kernel,
Breadcrumbs' selection (2 ranks per task) and TIES's (1 rank) on each instruction set (one the
CPU lacks runs its best, so its row repeats that one), Breadcrumbs' whole leaf kernel and TIES's merge pass; ratios are medians of per-round
ratios to task arithmetic.

    python bench/selection_profile.py                       # ViT-B/32's 3072 × 768 MLP leaf, 8 tasks
    python bench/selection_profile.py --shape 768x768 --tasks 4 --rounds 31
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="3072x768")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from bcjax import _native, masks, merging
    from bench.shapes import random_models

    if not _native.available():
        raise SystemExit(f"native kernel unavailable: {_native.unavailable_reason()}")
    shape = tuple(int(x) for x in args.shape.split("x"))
    pre, fts = random_models({"w": shape}, args.tasks)
    p0 = jax.device_put(pre["w"])
    ft = tuple(jax.device_put(f["w"]) for f in fts)
    n, T = p0.size, args.tasks
    alphas = jnp.full((T,), 0.3, jnp.float32)
    n_bot, n_top = masks.breadcrumbs_counts(n, 0.9, 0.99)
    two = jnp.broadcast_to(masks._threshold_ranks(n, n_bot, n_top), (T, 2))
    one = jnp.broadcast_to(jnp.asarray([merging.ties_trim_rank(0.2, n)], jnp.int32), (T, 1))
    thresholds = jax.jit(lambda p, f, r: _native.select_diff_bits_multi(p, f, r))(p0, ft, one)[:, 0]
    cells = {"task arithmetic": lambda: merging._weighted_task_sum(p0, ft, None, alphas)}
    for isa in ("avx512", "avx2", "scalar"):
        sel = jax.jit(lambda p, f, r, isa=isa: _native.select_diff_bits_multi(p, f, r, isa=isa))
        cells[f"selection, 2 ranks ({isa})"] = lambda sel=sel: sel(p0, ft, two)
        cells[f"selection, 1 rank ({isa})"] = lambda sel=sel: sel(p0, ft, one)
    cells["Breadcrumbs leaf (selection + masked sum)"] = lambda: merging._breadcrumbs_tensor_leaf(
        p0, ft, alphas, n_bot, n_top)
    cells["TIES merge pass (thresholds given)"] = lambda: merging._ties_leaf(p0, ft, thresholds, 1.0)
    for fn in cells.values():  # warm-up: compilation
        jax.block_until_ready(fn())
    times = {k: [] for k in cells}
    for _ in range(args.rounds):
        for k, fn in cells.items():
            c0 = time.process_time()
            jax.block_until_ready(fn())
            times[k].append(time.process_time() - c0)
    ta = np.asarray(times["task arithmetic"])
    print(f"one {args.shape} leaf x {T} tasks, {args.rounds} interleaved rounds, CPU time "
          f"(1-min load {os.getloadavg()[0]:.1f}):\n")
    print("| cell | CPU ms (median) | × task arithmetic (same round) |\n|---|---:|---:|")
    res = {}
    for k, v in times.items():
        ratio = float(np.median(np.asarray(v) / ta))
        res[k] = {"cpu_ms": float(np.median(v)) * 1e3, "x_ta": ratio}
        print(f"| {k} | {res[k]['cpu_ms']:.2f} | {ratio:.2f} |")
    return res


if __name__ == "__main__":
    main()
