"""Subset-sweep speed (SPEC §4, issue 6): a 256-subset sweep of 8 tasks, where merging every
subset is one contraction per leaf (indicator × stacked Δ), vs evaluation alone, vs a loop
that re-merges each subset with ``bcjax.merge``. Goal: merging ≤ 5% of the sweep's time.

Model: the embedded DINOv2 ViT-S/14 (``--model dinov2``; 22M parameters, converted once
into ``--cache-dir``) with 8 synthetic "fine-tunes" θt = θ0 + N(0, σ²)·|θ0| — merge cost does
not depend on what the fine-tunes learned — and 8 tasks of ``--images`` random 28-px images
with random 10-class prototype heads (the evaluation is the same forward pass as the demo's
subset sweep, which also scores 16 test images per task). ``--model mlp`` uses the tiny
synthetic MLP suite (seconds; ``--smoke``).

Timed (after a warm-up chunk that compiles): the sweep's merge calls (blocked until
ready), its evaluation calls, and the per-subset loop over a sample of ``--loop-sample``
subsets, extrapolated to all non-empty ones (marked as such).

    python bench/sweep_speed.py --out bench/results                  # DINOv2, 256 subsets
    python bench/sweep_speed.py --smoke --out /tmp/x                  # tiny, seconds

Writes ``sweep_speed.json`` and ``sweep_speed.md`` to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bcjax  # noqa: E402
from bcjax import sweeps  # noqa: E402
from bcjax.evaluate import accuracy_of_stack  # noqa: E402


def _block(tree):
    return jax.block_until_ready(tree)


def dinov2_setup(args):
    from bcjax.demo import make_classifier
    from bcjax.models import dinov2

    cache = args.cache_dir or str(dinov2.default_cache_dir())
    model_config, params0 = dinov2.load_pretrained(cache)
    _, predict, _ = make_classifier(model_config, 20.0)
    rng = np.random.default_rng(0)
    fts = [jax.tree.map(lambda p: (np.asarray(p) + args.sigma * np.abs(np.asarray(p)) *
                                   rng.standard_normal(np.shape(p))).astype(np.asarray(p).dtype)
                        if np.issubdtype(np.asarray(p).dtype, np.floating) else p, params0)
           for _ in range(args.tasks)]
    dim = 384
    tasks = []
    for _ in range(args.tasks):
        x = rng.random((args.images, 28, 28, 3), dtype=np.float32)
        y = rng.integers(0, 10, args.images).astype(np.int32)
        w = rng.standard_normal((10, dim)).astype(np.float32)
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        tasks.append((x, y, (jnp.asarray(w), jnp.ones(10, bool))))

    def evaluate(stacked, t):
        x, y, head = tasks[t]
        return accuracy_of_stack(predict, stacked, x, y, batch_size=len(y), models_per_call=args.chunk,
                                 predict_args=head)

    n = sum(int(np.size(p)) for p in jax.tree.leaves(params0))
    return params0, fts, evaluate, f"DINOv2 ViT-S/14 ({n / 1e6:.1f}M params), {args.images} images/task"


def mlp_setup(args):
    from bcjax.experiments import model_suite

    suite = model_suite({"suite": {"name": "synthetic", "tasks": args.tasks, "steps": 5}}, cache_dir="-",
                        progress=False)
    return suite.pretrained, list(suite.finetuned), lambda st, t: suite.evaluate(st, suite.tasks[t], "test"), \
        "synthetic MLP suite"


def run(args) -> dict:
    params0, fts, evaluate, desc = (mlp_setup if args.model == "mlp" else dinov2_setup)(args)
    hp = dict(beta=0.9, gamma=0.99)
    alpha = 0.3
    ind = sweeps.all_subsets(args.tasks)
    _block(sweeps.task_deltas("breadcrumbs", params0, fts[:1], **hp))  # warm-up (compiles the mask kernels)
    t0 = time.perf_counter()
    deltas = _block(sweeps.task_deltas("breadcrumbs", params0, fts, **hp))
    setup_s = time.perf_counter() - t0
    chunks = list(range(0, len(ind), args.chunk))

    def merged(start):
        rows = ind[start:start + args.chunk]
        if len(rows) < args.chunk:
            rows = np.concatenate([rows, np.repeat(rows[-1:], args.chunk - len(rows), 0)])
        return _block(sweeps.subset_merges(params0, deltas, rows, alpha))

    # warm-up: compile the contraction and the evaluation
    w = merged(0)
    for t in range(args.tasks):
        evaluate(w, t)
    merge_s = eval_s = 0.0
    for start in chunks:
        t0 = time.perf_counter()
        stacked = merged(start)
        t1 = time.perf_counter()
        for t in range(args.tasks):
            np.asarray(evaluate(stacked, t))
        t2 = time.perf_counter()
        merge_s += t1 - t0
        eval_s += t2 - t1
    del stacked
    # the loop baseline: bcjax.merge per subset, on a sample, extrapolated
    nonempty = [i for i in range(len(ind)) if ind[i].any()]
    sample = np.random.default_rng(1).choice(nonempty, size=min(args.loop_sample, len(nonempty)), replace=False)
    _block(bcjax.merge("breadcrumbs", params0, [fts[0]], alpha=alpha, **hp))  # warm-up
    t0 = time.perf_counter()
    for i in sample:
        members = [f for f, on in zip(fts, ind[i], strict=True) if on]
        _block(bcjax.merge("breadcrumbs", params0, members, alpha=alpha, **hp))
    loop_sample_s = time.perf_counter() - t0
    loop_s = loop_sample_s / len(sample) * len(nonempty)
    total = setup_s + merge_s + eval_s
    return {
        "model": desc, "tasks": args.tasks, "subsets": int(len(ind)), "models_per_call": args.chunk,
        "method": {"name": "breadcrumbs", "alpha": alpha, **hp},
        "delta_setup_s": round(setup_s, 3), "contraction_merge_s": round(merge_s, 3),
        "evaluation_s": round(eval_s, 3), "sweep_total_s": round(total, 3),
        "merge_share_of_sweep": round((setup_s + merge_s) / total, 4),
        "loop_merge_s": round(loop_s, 3), "loop_merge_extrapolated_from": int(len(sample)),
        "loop_sample_s": round(loop_sample_s, 3), "loop_per_subset_s": round(loop_sample_s / len(sample), 4),
        "contraction_speedup_vs_loop": round(loop_s / max(setup_s + merge_s, 1e-9), 1),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                    "devices": jax.device_count()},
    }


def to_markdown(r: dict) -> str:
    return "\n".join([
        f"Subset sweep: {r['subsets']} subsets of {r['tasks']} tasks, {r['model']}, Breadcrumbs "
        f"(α={r['method']['alpha']}, β={r['method']['beta']}, γ={r['method']['gamma']}), "
        f"{r['models_per_call']} models per compiled call; {r['machine']['cpus']} CPU cores.", "",
        "| part | seconds |", "|---|---:|",
        f"| masked task vectors Δt (once, T single-task merges) | {r['delta_setup_s']:.2f} |",
        f"| merging all subsets (one contraction per leaf, per chunk) | {r['contraction_merge_s']:.2f} |",
        f"| evaluation alone | {r['evaluation_s']:.2f} |",
        f"| **sweep total** | **{r['sweep_total_s']:.2f}** |",
        f"| loop: `bcjax.merge` per subset (extrapolated from {r['loop_merge_extrapolated_from']}) | "
        f"{r['loop_merge_s']:.2f} |", "",
        f"Merging is **{100 * r['merge_share_of_sweep']:.1f}%** of the sweep (goal ≤ 5%); the contraction is "
        f"**{r['contraction_speedup_vs_loop']}×** faster than re-merging each subset "
        f"({r['loop_per_subset_s']:.3f} s per merge).", ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("dinov2", "mlp"), default="dinov2")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--images", type=int, default=16, help="evaluation images per task")
    p.add_argument("--chunk", type=int, default=4, help="models per merge / evaluation call")
    p.add_argument("--sigma", type=float, default=1e-3, help="relative size of the synthetic task vectors")
    p.add_argument("--loop-sample", type=int, default=16)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--smoke", action="store_true", help="tiny MLP, 3 tasks: seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.tasks, args.loop_sample = "mlp", 3, 3
    r = run(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sweep_speed.json"), "w") as f:
        json.dump(r, f, indent=2)
    with open(os.path.join(args.out, "sweep_speed.md"), "w") as f:
        f.write(to_markdown(r))
    print(to_markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
