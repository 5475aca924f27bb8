"""Merge speed on whatever device JAX finds (GPU, TPU or CPU) against its memory-bandwidth
floor (issue 16, item 6).

Times ``bcjax.merge`` for task arithmetic, Breadcrumbs and TIES (SPEC §2–3; the
hyper-parameters of bench/merge_speed.py) on ViT-B/32 × 8 and ViT-L/14 × 2 vision towers
(bench/shapes.py), with ``validate=False``, with the default (``validate=True``), and traced whole
into one program by an outer ``jax.jit`` ("jit": what a user gets inside their own jitted code).
Inputs are generated on the device (θ0 ~ N(0, 0.02²), τt ~ N(0, 10⁻⁶) with 1 % of the
entries ×10, the distribution of ``bench.shapes.random_models``) and stay there: what is
timed is the merge, not host→device copies. Each configuration gets a warm-up call
(compilation), then ``--repeats`` timed calls; the median is reported.

**Bandwidth floor.** A merge of T models must read T + 1 models and write one; at the
device's memory bandwidth B that takes at least ``bytes_read / B`` (the issue's floor) —
``(bytes_read + bytes_written) / B`` is also reported. B is given two ways: the datasheet
peak (``--peak-gbps``, known for a few devices: H200 4.8 TB/s, H100 SXM 3.35 TB/s) and the
bandwidth this script *measures* with a plain device copy (``y = y + 1`` over a large
float32 array, 10 dependent calls queued back to back: read + write bytes ÷ time), which is
what XLA can actually reach.

**Selection path.** On GPU/TPU the Breadcrumbs and TIES thresholds are found by the
portable scatter-add histogram selection (bcjax.order_stats); on CPU by the native kernel
unless ``--portable`` (``BCJAX_NATIVE=0``). The JSON records which one ran.

Target (issue 16): Breadcrumbs ≤ 3× task arithmetic (validation off, same run).

    PYTHONPATH=. python3 bench/accel_merge.py --out $OUT/accel_merge.json     # the device
    python bench/accel_merge.py --small --out /tmp/accel.json                  # CPU, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.shapes import VIT_B_32, VIT_L_14, clip_vision_shapes, num_params  # noqa: E402

ALPHA, BETA, GAMMA = 0.3, 0.9, 0.99  # as bench/merge_speed.py
TIES_DENSITY, TIES_ALPHA = 0.2, 1.0
METHODS = {
    "task_arithmetic": dict(alpha=ALPHA),
    "breadcrumbs": dict(alpha=ALPHA, beta=BETA, gamma=GAMMA),
    "ties": dict(density=TIES_DENSITY, alpha=TIES_ALPHA),
}
#: (name, shapes, tasks): the issue's workloads, and tiny stand-ins for --small.
WORKLOADS = [("vit_b_32", VIT_B_32, 8), ("vit_l_14", VIT_L_14, 2)]
SMALL_WORKLOADS = [("vit_b_32_small", clip_vision_shapes(64, 2, 32, 7, 32), 8),
                   ("vit_l_14_small", clip_vision_shapes(64, 2, 14, 16, 32), 2)]
#: Datasheet peak memory bandwidth (GB/s) by ``device_kind`` substring.
PEAK_GBPS = {"H200": 4800.0, "H100 80GB HBM3": 3350.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0,
             "A100": 1555.0}
BREADCRUMBS_TARGET = 3.0


def device_peak_gbps(kind: str) -> float | None:
    for key, gbps in PEAK_GBPS.items():
        if key in kind:
            return gbps
    return None


def make_models(shapes: dict, tasks: int, seed: int = 0):
    """(θ0, [θt]) as dicts of float32 device arrays, generated on the default device."""
    import functools

    import jax
    import jax.numpy as jnp

    @functools.partial(jax.jit, static_argnums=(1,))
    def leaf(key, shape):
        k0, *ks = jax.random.split(key, tasks + 1)
        p0 = 0.02 * jax.random.normal(k0, shape, jnp.float32)
        fts = []
        for k in ks:
            a, b = jax.random.split(k)
            d = 1e-3 * jax.random.normal(a, shape, jnp.float32)
            fts.append(p0 + jnp.where(jax.random.uniform(b, shape) < 0.01, 10.0 * d, d))
        return p0, fts

    pre, fts = {}, [{} for _ in range(tasks)]
    key = jax.random.PRNGKey(seed)
    for i, (name, shape) in enumerate(shapes.items()):
        p0, ts = leaf(jax.random.fold_in(key, i), tuple(shape))
        pre[name] = p0
        for t in range(tasks):
            fts[t][name] = ts[t]
    jax.block_until_ready((pre, fts))
    return pre, fts


def timed(fn, repeats: int) -> dict:
    """Warm-up (compilation) then ``repeats`` timed calls; seconds."""
    t0 = time.perf_counter()
    fn()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": float(np.median(times)), "times_s": times, "warmup_s": warm}


def copy_bandwidth(num_bytes: int, repeats: int, chain: int = 10) -> dict:
    """Achievable bandwidth: ``y = y + 1`` over a float32 array of ``num_bytes`` on the
    device, ``chain`` dependent calls per sample (queued back to back, so per-call dispatch
    does not count); (read + write bytes) ÷ median time, GB/s."""
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((num_bytes // 4,), jnp.float32)
    step = jax.jit(lambda a: a + 1.0)

    def run():
        y = x
        for _ in range(chain):
            y = step(y)
        return jax.block_until_ready(y)

    r = timed(run, repeats)
    r["bytes"] = 2 * x.size * 4 * chain
    r["chain"] = chain
    r["gbps"] = r["bytes"] / r["median_s"] / 1e9
    return r


def run_workload(name: str, shapes: dict, tasks: int, repeats: int, peak_gbps, copy_gbps,
                 modes=(False, True, "jit")) -> list[dict]:
    import jax

    import bcjax

    pre, fts = make_models(shapes, tasks)
    n = num_params(shapes)
    bytes_read, bytes_written = 4 * n * (tasks + 1), 4 * n
    rows = []
    for method, hp in METHODS.items():
        # validate off / on: bcjax.merge as users call it (leaf by leaf); "jit": the whole merge
        # traced into one program by an outer jax.jit (no validation under tracing)
        whole = jax.jit(lambda p, f, method=method, hp=hp: bcjax.merge(method, p, f, **hp))
        for validate in modes:
            if validate == "jit":
                call = lambda: jax.block_until_ready(whole(pre, fts))  # noqa: E731
            else:
                call = lambda: jax.block_until_ready(bcjax.merge(method, pre, fts, validate=validate, **hp))  # noqa: E731
            r = timed(call, repeats)
            r.update(workload=name, tasks=tasks, params_per_model=n, method=method, validate=validate,
                     bytes_read=bytes_read, bytes_written=bytes_written)
            for label, gbps in (("peak", peak_gbps), ("copy", copy_gbps)):
                if gbps:
                    floor = bytes_read / (gbps * 1e9)
                    r[f"floor_read_{label}_s"] = floor
                    r[f"floor_rw_{label}_s"] = (bytes_read + bytes_written) / (gbps * 1e9)
                    r[f"x_floor_read_{label}"] = r["median_s"] / floor
            rows.append(r)
            print(f"  {name:16s} {method:16s} validate={str(validate):5s} {r['median_s'] * 1e3:9.2f} ms "
                  f"(warm-up {r['warmup_s']:.2f} s)", flush=True)
    del pre, fts
    return rows


def ratios(rows: list[dict]) -> dict:
    """Per workload and validate setting: Breadcrumbs and TIES time ÷ task arithmetic."""
    out = {}
    for r in rows:
        if r["method"] == "task_arithmetic":
            continue
        ta = next(x for x in rows if x["workload"] == r["workload"] and x["validate"] == r["validate"]
                  and x["method"] == "task_arithmetic")
        out[f"{r['workload']}/{r['method']}/validate={r['validate']}"] = r["median_s"] / ta["median_s"]
    return out


def markdown(result: dict) -> str:
    dev = result["device"]
    lines = [f"{dev['device_kind']} ({dev['platform']}, jax {dev['jax']}), selection path: {result['selection_path']}; "
             f"copy bandwidth {result['copy']['gbps']:.0f} GB/s"
             + (f", datasheet peak {result['peak_gbps']:.0f} GB/s" if result["peak_gbps"] else "")
             + f"; median of {result['repeats']} after a warm-up", "",
             "| workload | method | validate | median (ms) | × task arithmetic | floor, read @ copy BW (ms) "
             "| × floor (copy BW) | × floor (peak BW) |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        ta = next(x for x in result["rows"] if x["workload"] == r["workload"] and x["validate"] == r["validate"]
                  and x["method"] == "task_arithmetic")
        peak = f"{r['x_floor_read_peak']:.1f}" if "x_floor_read_peak" in r else "–"
        lines.append(f"| {r['workload']} × {r['tasks']} | {r['method']} | { {False: 'off', True: 'on'}.get(r['validate'], r['validate'])} | "
                     f"{r['median_s'] * 1e3:.2f} | {r['median_s'] / ta['median_s']:.2f} | "
                     f"{r['floor_read_copy_s'] * 1e3:.2f} | {r['x_floor_read_copy']:.1f} | {peak} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON file to write (a .md table is written next to it)")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU tests)")
    ap.add_argument("--modes", default="off,on,jit", help="comma-separated subset of off,on (validation) and jit")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--workloads", default="vit_b_32,vit_l_14", help="comma-separated subset of vit_b_32,vit_l_14")
    ap.add_argument("--copy-mib", type=int, default=None, help="array size of the copy-bandwidth probe "
                    "(default 2048 MiB on accelerators, 256 on CPU, 16 with --small)")
    ap.add_argument("--peak-gbps", type=float, default=None, help="datasheet peak bandwidth (GB/s); "
                    "default: looked up from the device kind")
    ap.add_argument("--portable", action="store_true",
                    help="force the portable histogram selection on CPU too (BCJAX_NATIVE=0)")
    args = ap.parse_args(argv)
    import jax

    platform_name = jax.default_backend()
    if args.portable or platform_name != "cpu":
        os.environ["BCJAX_NATIVE"] = "0"  # accelerators use the portable path anyway: skip the native build
    from bcjax import _native

    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", str(dev))
    peak = args.peak_gbps or device_peak_gbps(kind)
    copy_mib = args.copy_mib or (16 if args.small else 256 if platform_name == "cpu" else 2048)
    native = platform_name == "cpu" and _native.available()
    path = "native CPU kernel" if native else "portable scatter-add histograms"
    print(f"device: {kind} ({platform_name}), {len(jax.devices())} device(s); selection: {path}", flush=True)
    copy = copy_bandwidth(copy_mib << 20, args.repeats)
    print(f"copy bandwidth: {copy['gbps']:.1f} GB/s ({copy_mib} MiB array)"
          + (f"; datasheet peak {peak:.0f} GB/s" if peak else ""), flush=True)
    rows = []
    t0 = time.perf_counter()
    wanted = args.workloads.split(",")
    modes = [{"off": False, "on": True, "jit": "jit"}[m] for m in args.modes.split(",")]
    unknown = sorted(set(wanted) - {"vit_b_32", "vit_l_14"})
    if unknown:
        raise SystemExit(f"unknown --workloads {unknown}: vit_b_32, vit_l_14")
    for name, shapes, tasks in (SMALL_WORKLOADS if args.small else WORKLOADS):
        if name.removesuffix("_small") not in wanted:
            continue
        rows += run_workload(name, shapes, tasks, args.repeats, peak, copy["gbps"], modes=modes)
    stats = {}
    if hasattr(dev, "memory_stats"):
        try:
            stats = {k: v for k, v in (dev.memory_stats() or {}).items() if "peak" in k or "limit" in k}
        except Exception:  # noqa: BLE001 - not every backend reports
            stats = {}
    r = ratios(rows)
    target = {w: r[f"{w}/breadcrumbs/validate=False"] <= BREADCRUMBS_TARGET
              for w in sorted({x["workload"] for x in rows})}
    result = {
        "device": {"device_kind": kind, "platform": platform_name, "count": len(jax.devices()), "jax": jax.__version__,
                   "memory_stats": stats},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "loadavg_1m": os.getloadavg()[0]},
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "small": args.small, "repeats": args.repeats,
        "selection_path": path, "peak_gbps": peak, "copy": copy,
        "hparams": {"alpha": ALPHA, "beta": BETA, "gamma": GAMMA, "ties_density": TIES_DENSITY,
                    "ties_alpha": TIES_ALPHA},
        "rows": rows, "ratios_to_task_arithmetic": r,
        "breadcrumbs_target": {"max_ratio": BREADCRUMBS_TARGET, "met": target},
        "wall_s": time.perf_counter() - t0,
    }
    table = markdown(result)
    print(table)
    print("Breadcrumbs ≤ 3× task arithmetic (validate off): "
          + ", ".join(f"{w}: {'met' if ok else 'MISSED'} ({r[f'{w}/breadcrumbs/validate=False']:.2f}×)"
                      for w, ok in target.items()))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(table + "\n")
    return result


if __name__ == "__main__":
    main()
