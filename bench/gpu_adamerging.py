"""AdaMerging step time and RegMean Gram-collection / solve time on a ViT-S/14 (issue 14).

Model: ``--backbone standin`` (default) is ``bench/vit_s14.py``, a pure-Flax ViT-S/14 with the
embedded DINOv2's exact parameter tree (22,056,192 parameters) and forward (identical
features to ``bcjax.models.dinov2.features`` on the same weights), random weights — it needs
no transformers, so it runs where transformers has no Flax models. ``--backbone dinov2``
uses the real converted DINOv2 (CPU machines with the demo extras). T synthetic fine-tunes
θt = θ0 + σ·|θ0|·N(0, 1), random 10-class prototype heads, random images at ``--resolution``
(28 px: the embedded suite's), ``--batch`` (16) unlabeled images per task per step.

AdaMerging: for each mode (granularity × how the T forward passes are traced: ``unrolled``,
the default API, or ``batch_tasks``, one vmapped pass), the compiled step's first call
(compile + one step) and the median of ``--steps`` timed steps (host batch sampling and
transfer included, blocked until ready). RegMean: collecting the Grams of the 72 Dense
kernels over ``--gram-examples`` images per task (all T tasks), and the merge's solve
(first call incl. compilation, then a second call).

    PYTHONPATH=. python3 bench/gpu_adamerging.py --out $OUT/adamerging_gpu.json        # H200, < 2 min
    PYTHONPATH=. python3 bench/gpu_adamerging.py --smoke --out /tmp/x.json              # CPU check
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bcjax  # noqa: E402
from bcjax.models.grams import collect_grams  # noqa: E402
from bcjax.models.heads import cosine_logits  # noqa: E402

DEFAULT_MODES = "layer:batch_tasks,task:batch_tasks,layer:unrolled"
am = importlib.import_module("bcjax.adamerging")  # the module (bcjax.adamerging is the function)


def _block(x):
    return jax.block_until_ready(x)


def setup(args):
    if args.backbone == "dinov2":
        from bcjax.models import dinov2

        config, params0 = dinov2.load_pretrained(args.cache_dir or str(dinov2.default_cache_dir()))
        feats = dinov2.make_features(config)
    else:
        import vit_s14

        params0 = vit_s14.init_params(0, args.resolution)
        feats = vit_s14.features
    params0 = jax.tree.map(jnp.asarray, params0)
    key = jax.random.key(1)
    fts = []
    for t in range(args.tasks):
        leaves, treedef = jax.tree.flatten(params0)
        keys = jax.random.split(jax.random.fold_in(key, t), len(leaves))
        fts.append(jax.tree.unflatten(treedef, [p + args.sigma * jnp.abs(p) * jax.random.normal(k, p.shape, p.dtype)
                                                for p, k in zip(leaves, keys)]))
    rng = np.random.default_rng(0)
    heads = rng.standard_normal((args.tasks, 10, 384)).astype(np.float32)
    heads /= np.linalg.norm(heads, axis=-1, keepdims=True)
    heads = jnp.asarray(heads)
    valid = jnp.ones(10, bool)

    def logits_fn(params, task, x):  # task may be traced (batch_tasks): index the stacked heads
        return cosine_logits(feats(params, x), jnp.take(heads, task, axis=0), valid, 20.0)

    pools = [rng.random((args.pool, args.resolution, args.resolution, 3), dtype=np.float32)
             for _ in range(args.tasks)]
    return params0, fts, feats, logits_fn, pools


def prepare_vectors(params0, fts):
    flags = bcjax.tree.merged_leaf_flags(params0)
    t0 = time.perf_counter()
    deltas, merged = am._prepare(params0, fts, flags, "raw", None)
    _block(deltas)
    return deltas, merged, time.perf_counter() - t0


def time_adamerging(args, params0, deltas, merged, logits_fn, pools, granularity, batch_tasks):
    import optax

    shape = (args.tasks,) if granularity == "task" else (args.tasks, len(merged))
    lam = jnp.full(shape, 0.3, jnp.float32)
    opt = optax.adam(1e-3)
    state = opt.init(lam)
    step, _ = am._make_step(logits_fn, opt, tuple(merged), args.tasks, None, batch_tasks)
    sample = am._sampler(pools, args.tasks, args.batch, 0)
    t0 = time.perf_counter()
    lam, state, loss = _block(step(lam, state, params0, deltas, sample(0)))
    first = time.perf_counter() - t0
    times, cpu, losses = [], [], [float(loss)]
    for s in range(1, args.steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        lam, state, loss = _block(step(lam, state, params0, deltas, sample(s)))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        losses.append(float(loss))
    return dict(granularity=granularity, tasks_traced="batch_tasks" if batch_tasks else "unrolled",
                num_coefficients=int(np.prod(shape)), first_call_s=first,
                step_s_median=float(np.median(times)), step_s_min=float(np.min(times)), step_s=times,
                step_process_cpu_s_median=float(np.median(cpu)),
                entropy_first_last=[losses[0], losses[-1]],
                cache_size=int(step._cache_size()) if hasattr(step, "_cache_size") else None)


def time_regmean(args, params0, fts, feats, pools):
    rng = np.random.default_rng(2)
    grams, collect = [], []
    collect_cpu, solve_cpu = [], []
    for t in range(args.tasks):
        x = rng.random((args.gram_examples, args.resolution, args.resolution, 3), dtype=np.float32)
        t0, c0 = time.perf_counter(), time.process_time()
        grams.append(collect_grams(feats, fts[t], x, batch_size=min(64, args.gram_examples)))
        collect.append(time.perf_counter() - t0)
        collect_cpu.append(time.process_time() - c0)
    sizes = sorted({int(g.shape[0]) for g in grams[0].values()})
    solve = []
    for _ in range(2):
        t0, c0 = time.perf_counter(), time.process_time()
        _block(bcjax.merge("regmean", params0, fts, grams=grams, nondiag=0.95))
        solve.append(time.perf_counter() - t0)
        solve_cpu.append(time.process_time() - c0)
    return dict(kernels=len(grams[0]), gram_sizes=sizes, examples_per_task=args.gram_examples,
                collect_s_per_task=collect, collect_s_first_task=collect[0],
                collect_s_median_later=float(np.median(collect[1:])) if len(collect) > 1 else None,
                collect_process_cpu_s_per_task=collect_cpu, solve_first_call_s=solve[0],
                solve_second_call_s=solve[1], solve_process_cpu_s=solve_cpu)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--backbone", choices=("standin", "dinov2"), default="standin")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--pool", type=int, default=64, help="unlabeled images per task to sample from")
    ap.add_argument("--resolution", type=int, default=28)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    ap.add_argument("--sigma", type=float, default=0.01)
    ap.add_argument("--gram-examples", type=int, default=256)
    ap.add_argument("--modes", default=DEFAULT_MODES,
                    help="comma list of granularity:unrolled|batch_tasks")
    ap.add_argument("--skip-regmean", action="store_true")
    ap.add_argument("--budget-s", type=float, default=60.0,
                    help="start the (slow-compiling) unrolled modes only if less time than this has elapsed")
    ap.add_argument("--smoke", action="store_true", help="2 tasks, 2 steps, 16 Gram examples")
    args = ap.parse_args()
    if args.smoke:
        args.tasks, args.steps, args.gram_examples, args.pool = 2, 2, 16, 16
        if args.modes == DEFAULT_MODES:
            args.modes = "layer:batch_tasks"
    t_all = time.perf_counter()
    params0, fts, feats, logits_fn, pools = setup(args)
    result = dict(bench="adamerging_regmean", backbone=args.backbone, tasks=args.tasks, batch_per_task=args.batch,
                  resolution=args.resolution, params=int(sum(np.size(x) for x in jax.tree.leaves(params0))),
                  jax=jax.__version__, devices=[str(d) for d in jax.devices()], platform=platform.platform(),
                  cpu_count=os.cpu_count(), date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                  adamerging=[])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def write():  # after every part: a run cut short still leaves its results
        result["total_s"] = time.perf_counter() - t_all
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    deltas, merged, prep = prepare_vectors(params0, fts)
    result["prepare_vectors_s"] = prep
    del fts  # memory: the stacked vectors replace the fine-tunes (rebuilt for RegMean)
    modes = [m for m in args.modes.split(",") if m]
    late = [m for m in modes if m.endswith(":unrolled")]  # slow to compile: run last, within the budget
    for mode in [m for m in modes if m not in late]:
        gran, traced = mode.split(":")
        r = time_adamerging(args, params0, deltas, merged, logits_fn, pools, gran, traced == "batch_tasks")
        print(json.dumps({k: v for k, v in r.items() if k != "step_s"}), flush=True)
        result["adamerging"].append(r)
        write()
    if not args.skip_regmean:
        fts = [jax.tree.map(lambda p, d, t=t: p + d[t], params0, deltas) for t in range(args.tasks)]
        result["regmean"] = time_regmean(args, params0, fts, feats, pools)
        del fts
        print(json.dumps(result["regmean"]), flush=True)
        write()
    for mode in late:
        if time.perf_counter() - t_all > args.budget_s:
            result.setdefault("skipped", []).append(f"{mode} (elapsed > --budget-s {args.budget_s})")
            continue
        gran, traced = mode.split(":")
        r = time_adamerging(args, params0, deltas, merged, logits_fn, pools, gran, False)
        print(json.dumps({k: v for k, v in r.items() if k != "step_s"}), flush=True)
        result["adamerging"].append(r)
    write()
    print(f"wrote {args.out} ({result['total_s']:.1f} s)")

if __name__ == "__main__":
    main()
