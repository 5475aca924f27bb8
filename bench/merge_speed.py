"""Merge speed and peak memory: bcjax Breadcrumbs vs task arithmetic (the memory-bandwidth
floor) vs an exact numpy-partition Breadcrumbs, on task vectors shaped like real models.

Each implementation runs in its own process (fresh allocator, honest peak RSS); the time
is the median of --repeats runs after one warm-up (compilation excluded).

    python bench/merge_speed.py --model vit_b_32 --tasks 8 --repeats 3 --out bench/results
    python bench/merge_speed.py --smoke          # tiny shapes, seconds; used by the tests

Writes JSON and a markdown table; BENCHMARKS.md records the numbers for this machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.shapes import VIT_B_32, VIT_L_14, num_params, random_models  # noqa: E402

MODELS = {"vit_b_32": VIT_B_32, "vit_l_14": VIT_L_14,
          "smoke": {"a/w": (256, 64), "a/b": (64,), "b/w": (64, 300), "c": (10,)}}
IMPLS = ["bcjax_task_arithmetic", "bcjax_breadcrumbs", "bcjax_ties", "numpy_breadcrumbs"]
BETA, GAMMA, ALPHA = 0.9, 0.99, 0.3


def numpy_breadcrumbs(pre, fts):
    """Exact SPEC §2 Breadcrumbs with np.partition (two selections per leaf and task)."""
    out = {}
    for k, p in pre.items():
        acc = np.zeros_like(p)
        n = p.size
        n_bot, n_top = int(np.floor(BETA * n + 1e-6)), int(np.floor((1 - GAMMA) * n + 1e-6))
        for ft in fts:
            tau = ft[k] - p
            a = np.abs(tau).ravel()
            ks = sorted({min(n_bot, n - 1), min(n - n_top, n - 1)})
            part = np.partition(a, ks)
            lo = part[n_bot] if n_bot < n else np.inf
            hi = part[n - n_top] if n_top >= 1 else np.inf
            m = (np.abs(tau) >= lo) & (np.abs(tau) < hi)
            acc += np.where(m, tau, 0)
        out[k] = p + ALPHA * acc
    return out


def run_one(impl: str, model: str, tasks: int, repeats: int) -> dict:
    shapes = MODELS[model]
    pre, fts = random_models(shapes, tasks)
    input_bytes = sum(x.nbytes for x in pre.values()) * (tasks + 1)
    if impl.startswith("bcjax"):
        import jax

        import bcjax
        def to_device(tree):  # leaf by leaf, freeing each numpy leaf: the RSS high-water mark stays ≈ inputs
            for k in list(tree):
                tree[k] = jax.device_put(tree[k])
            return tree

        pre, fts = to_device(pre), [to_device(f) for f in fts]
        method, hp = {"bcjax_task_arithmetic": ("task_arithmetic", dict(alpha=ALPHA)),
                      "bcjax_breadcrumbs": ("breadcrumbs", dict(alpha=ALPHA, beta=BETA, gamma=GAMMA)),
                      "bcjax_ties": ("ties", dict(density=0.2, alpha=1.0))}[impl]
        fn = lambda: jax.block_until_ready(bcjax.merge(method, pre, fts, validate=False, **hp))  # noqa: E731
    else:
        fn = lambda: numpy_breadcrumbs(pre, fts)  # noqa: E731
    t0 = time.perf_counter()
    fn()  # warm-up: compilation (its memory is not the merge's)
    warmup = time.perf_counter() - t0
    rss_before = _reset_high_water_mark()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    peak = _status_bytes("VmHWM") if rss_before else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    one_model = input_bytes // (tasks + 1)
    return {"impl": impl, "model": model, "tasks": tasks, "params_per_model": num_params(shapes),
            "median_s": float(np.median(times)), "times_s": times, "warmup_s": warmup,
            "peak_rss_bytes": peak, "input_bytes": input_bytes, "rss_before_merge_bytes": rss_before,
            "peak_over_inputs_in_models": (peak - input_bytes) / one_model,
            "merge_overhead_in_models": (peak - rss_before) / one_model}


def _status_bytes(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_high_water_mark() -> int:
    """Reset VmHWM (Linux ``clear_refs``) after the warm-up; return the RSS now (0 if unsupported)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return 0
    return _status_bytes("VmRSS")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_b_32", choices=sorted(MODELS))
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--out", default=None, help="folder for results.json / results.md")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.tasks, args.repeats = "smoke", 3, 1
    if args._child:
        print(json.dumps(run_one(args._child, args.model, args.tasks, args.repeats)))
        return
    rows = []
    for impl in args.impls.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--tasks", str(args.tasks),
               "--repeats", str(args.repeats), "--_child", impl]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise SystemExit(f"{impl} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"{impl:24s} {rows[-1]['median_s']:8.3f} s   peak RSS {rows[-1]['peak_rss_bytes'] / 2**30:6.2f} GiB", flush=True)
    ta = next((r["median_s"] for r in rows if r["impl"] == "bcjax_task_arithmetic"), None)
    lines = ["| implementation | median (s) | × task arithmetic | peak RSS (GiB) | merge's peak above its inputs (models) |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['median_s'] / ta:.1f}" if ta else "–"
        lines.append(f"| {r['impl']} | {r['median_s']:.3f} | {ratio} | {r['peak_rss_bytes'] / 2**30:.2f} | "
                     f"{r['merge_overhead_in_models']:.2f} |")
    header = (f"{args.model}, {args.tasks} tasks, {rows[0]['params_per_model'] / 1e6:.1f}M params per model; "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; median of {args.repeats}")
    table = header + "\n\n" + "\n".join(lines)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"{args.model}_{args.tasks}.json"), "w") as f:
            json.dump(rows, f, indent=2)
        with open(os.path.join(args.out, f"{args.model}_{args.tasks}.md"), "w") as f:
            f.write(table + "\n")
    return rows


if __name__ == "__main__":
    main()
