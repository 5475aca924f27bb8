"""Merge speed and peak memory: bcjax (SPEC §2–3) against its peers, side by side, on
identical task vectors shaped like real models' vision towers (bench/shapes.py).

Implementations (``--impls``; each runs in its own process, fresh allocator, honest RSS):

    bcjax_task_arithmetic  bcjax_breadcrumbs  bcjax_breadcrumbs_row  bcjax_ties   (.venv)
    numpy_breadcrumbs      exact np.partition, SPEC §2 tensor granularity        (.venv)
    torch_task_arithmetic  torch_kthvalue  torch_official_row                     (.venv-bench)
    mergekit_breadcrumbs   mergekit_ties                                          (.venv-bench)

The peers (bench/peers.py) run with the peer venv's python (bench/setup_peers.sh makes it;
override with $BCJAX_BENCH_PEER_PYTHON); without it they are reported as skipped. torch
uses its default thread count unless $BCJAX_BENCH_TORCH_THREADS is set (on a loaded
machine, 2 spinning OpenMP threads on 2 shared cores are 3–10× slower than 1). The parent
generates θ0 and [θt] once (``random_models``, fixed seed) into a temporary folder, one
.npy per model, and every child loads the same files: identical inputs for every peer.

Timing: a warm-up call (compilation for bcjax), then up to --repeats timed calls while
their total stays under --budget-s (at least one); the median is reported. For an eager
implementation (numpy, torch, mergekit: nothing to compile) whose warm-up already took
--slow-s or more, the warm-up is the one sample (``runs`` says so), to keep the suite's
runtime bounded (mergekit takes ~1.5 min per ViT-B/32 × 8 merge).
bcjax rows also time what a user waits for (issue 16), each in its own fresh process:
``first_call_s`` (the first ``bcjax.merge`` with the defaults, validation on, device-resident
inputs, native kernel already built: compilation included), ``default_median_s`` (the same
call warm), ``numpy_median_s`` (the same call warm on the NumPy arrays as loaded, in a process
that never copied them to the device), and ``first_call_cached_s`` (the first call in a fresh
process after another one filled ``bcjax.enable_compilation_cache``'s folder). ``median_s``
stays the ``validate=False`` device-resident time it always was.
Memory: the process's RSS high-water mark (VmHWM) is reset after the inputs are loaded
(after the warm-up for bcjax, whose compilation memory is not the merge's) and read after
the last run; ``merge_overhead_in_models`` = (peak − RSS before merging) / one model.

    python bench/merge_speed.py --model vit_b_32 --tasks 8 --out bench/results
    python bench/merge_speed.py --model vit_b_32 --tasks 8 --scale 0.1 --repeats 1   # quick
    python bench/merge_speed.py --smoke          # tiny shapes, seconds; used by the tests
    python bench/merge_speed.py --side-by-side --model vit_b_32 --tasks 8 \
        --impls bcjax_task_arithmetic,bcjax_breadcrumbs,bcjax_ties --repeats 3 --first-call-rounds 2
        # issue 16's three user-path ratios in one command: fresh processes (first call ÷ warm call in
        # the same process) first, then validate=False / default / NumPy cells interleaved in one process

Writes ``{model}_{tasks}.json`` and ``.md`` to --out; bench/report.py turns the results
into BENCHMARKS.md's tables; bench/run_all.sh runs everything.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.shapes import VIT_B_32, VIT_L_14, clip_vision_shapes, num_params, random_models  # noqa: E402

MODELS = {"vit_b_32": VIT_B_32, "vit_l_14": VIT_L_14,
          "smoke": {"a/w": (256, 64), "a/b": (64,), "b/w": (64, 300), "c": (10,)}}
BETA, GAMMA, ALPHA = 0.9, 0.99, 0.3
TIES_DENSITY, TIES_ALPHA = 0.2, 1.0

# name -> (venv, compiled?, what it computes)
IMPL_INFO = {
    "bcjax_task_arithmetic": ("bcjax", True, "bcjax task arithmetic (bandwidth floor)"),
    "bcjax_breadcrumbs": ("bcjax", True, "bcjax Breadcrumbs, tensor granularity (exact)"),
    "bcjax_breadcrumbs_row": ("bcjax", True, "bcjax Breadcrumbs, row granularity (official semantics)"),
    "bcjax_ties": ("bcjax", True, "bcjax TIES (global trim threshold per task)"),
    "numpy_breadcrumbs": ("bcjax", False, "numpy np.partition Breadcrumbs, tensor (exact)"),
    "torch_task_arithmetic": ("peer", False, "torch task arithmetic (bandwidth floor)"),
    "torch_kthvalue": ("peer", False, "torch.kthvalue thresholds, tensor (exact)"),
    "torch_official_row": ("peer", False, "official code's per-row top-k semantics (torch.topk)"),
    "mergekit_breadcrumbs": ("peer", False, "mergekit 0.1.5 breadcrumbs (per-tensor full sort)"),
    "mergekit_ties": ("peer", False, "mergekit 0.1.5 TIES (per-tensor trim)"),
}
IMPLS = list(IMPL_INFO)
DEFAULT_IMPLS = [i for i in IMPLS if i != "bcjax_breadcrumbs_row"]


def peer_python() -> str | None:
    """The peer venv's python (bench/setup_peers.sh), or None when it is not installed."""
    exe = os.environ.get("BCJAX_BENCH_PEER_PYTHON") or os.path.join(ROOT, ".venv-bench", "bin", "python")
    return exe if os.path.exists(exe) else None


def model_shapes(model: str, scale: float = 1.0) -> dict[str, tuple]:
    """Shapes of ``model``: a name in MODELS or ``vit-w{width}-l{layers}`` (a ViT-B/32-like
    tower of that width and depth). ``scale`` ≠ 1 scales the width by √scale (rounded to a
    multiple of 16), so the parameter count scales by ≈ scale; for quick development runs."""
    if model.startswith("vit-w"):
        w, layers = (int(x[1:]) for x in model[4:].split("-"))
        base = dict(width=w, layers=layers, patch=32, grid=7, embed=512)
    elif model in ("vit_b_32", "vit_l_14") and scale != 1.0:
        base = {"vit_b_32": dict(width=768, layers=12, patch=32, grid=7, embed=512),
                "vit_l_14": dict(width=1024, layers=24, patch=14, grid=16, embed=768)}[model]
    elif model in MODELS:
        if scale != 1.0:
            raise SystemExit(f"--scale is for the ViT models, not {model!r}")
        return MODELS[model]
    else:
        raise SystemExit(f"unknown model {model!r}: one of {sorted(MODELS)} or vit-w<width>-l<layers>")
    if scale != 1.0:
        base["width"] = max(16, int(round(base["width"] * math.sqrt(scale) / 16)) * 16)
    return clip_vision_shapes(**base)


def numpy_breadcrumbs(pre, fts, alpha=ALPHA, beta=BETA, gamma=GAMMA):
    """Exact SPEC §2 Breadcrumbs with np.partition (two selections per leaf and task)."""
    out = {}
    for k, p in pre.items():
        acc = np.zeros_like(p)
        n = p.size
        n_bot, n_top = int(np.floor(beta * n + 1e-6)), int(np.floor((1 - gamma) * n + 1e-6))
        for ft in fts:
            tau = ft[k] - p
            a = np.abs(tau).ravel()
            ks = sorted({min(n_bot, n - 1), min(n - n_top, n - 1)})
            part = np.partition(a, ks)
            lo = part[n_bot] if n_bot < n else np.inf
            hi = part[n - n_top] if n_top >= 1 else np.inf
            m = (np.abs(tau) >= lo) & (np.abs(tau) < hi)
            acc += np.where(m, tau, 0)
        out[k] = p + alpha * acc
    return out


# ------------------------------------------------------------------------------ inputs
def write_inputs(shapes, tasks: int, folder: str, seed: int = 0) -> None:
    """θ0 and [θt] (``random_models(shapes, tasks, seed)``) as model_{i}.npy, i = 0 for θ0,
    each the concatenation of the flattened leaves in ``shapes`` order."""
    pre, fts = random_models(shapes, tasks, seed=seed)
    for i, m in enumerate([pre, *fts]):
        np.save(os.path.join(folder, f"model_{i}.npy"), np.concatenate([m[k].ravel() for k in shapes]))
    del pre, fts


def read_model(shapes, folder: str, i: int) -> dict[str, np.ndarray]:
    """Model i from ``write_inputs``: a dict of views into one loaded buffer."""
    flat = np.load(os.path.join(folder, f"model_{i}.npy"))
    out, off = {}, 0
    for k, s in shapes.items():
        n = int(np.prod(s))
        out[k] = flat[off:off + n].reshape(s)
        off += n
    return out


# ------------------------------------------------------------------------------ one implementation
BCJAX_CALLS = {
    "bcjax_task_arithmetic": ("task_arithmetic", dict(alpha=ALPHA)),
    "bcjax_breadcrumbs": ("breadcrumbs", dict(alpha=ALPHA, beta=BETA, gamma=GAMMA)),
    "bcjax_breadcrumbs_row": ("breadcrumbs", dict(alpha=ALPHA, beta=BETA, gamma=GAMMA, granularity="row", axis=-1)),
    "bcjax_ties": ("ties", dict(density=TIES_DENSITY, alpha=TIES_ALPHA)),
}


def build(impl: str, shapes, tasks: int, folder: str, validate: bool = False, on_device: bool = True):
    """Load the inputs for ``impl`` and return (merge function, inputs) — the function
    returns the merged dict (arrays/tensors, computation finished). bcjax: ``validate`` is
    merge's flag; ``on_device=False`` keeps the NumPy arrays as loaded."""
    if impl.startswith("bcjax"):
        import jax

        import bcjax

        def load(i):  # leaf by leaf onto the device (transfers finished: not the merge's time); the
            m = read_model(shapes, folder, i)  # numpy buffer is freed after
            return jax.block_until_ready({k: jax.device_put(v) for k, v in m.items()}) if on_device else m

        pre, fts = load(0), [load(i + 1) for i in range(tasks)]
        method, hp = BCJAX_CALLS[impl]
        return (lambda: jax.block_until_ready(bcjax.merge(method, pre, fts, validate=validate, **hp))), pre
    pre, fts = read_model(shapes, folder, 0), [read_model(shapes, folder, i + 1) for i in range(tasks)]
    if impl == "numpy_breadcrumbs":
        return (lambda: numpy_breadcrumbs(pre, fts)), pre
    import torch

    from bench import peers

    if os.environ.get("BCJAX_BENCH_TORCH_THREADS"):  # default: torch's own (one per core)
        torch.set_num_threads(int(os.environ["BCJAX_BENCH_TORCH_THREADS"]))

    pre = {k: torch.from_numpy(v) for k, v in pre.items()}  # zero-copy views of the same buffers
    fts = [{k: torch.from_numpy(v) for k, v in ft.items()} for ft in fts]
    if impl.startswith("mergekit"):
        import mergekit.merge_methods  # noqa: F401  (import time and memory are not the merge's)
    fn = getattr(peers, impl)
    hp = dict(density=TIES_DENSITY, alpha=TIES_ALPHA) if impl == "mergekit_ties" else \
        dict(alpha=ALPHA) if impl == "torch_task_arithmetic" else dict(alpha=ALPHA, beta=BETA, gamma=GAMMA)
    return (lambda: fn(pre, fts, **hp)), pre


def _timed(fn, repeats: int, budget_s: float) -> list[float]:
    times = []
    while len(times) < max(1, repeats) and (not times or sum(times) < budget_s):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    return times


def run_user_path(impl: str, shapes, tasks: int, folder: str, repeats: int, budget_s: float, phase: str) -> dict:
    """bcjax's default path in this fresh process (module docstring): ``phase`` "first" times
    the first call only, "numpy" the warm call on NumPy inputs."""
    from bcjax import _native

    if os.environ.get("BCJAX_BENCH_XLA_CACHE"):
        import bcjax
        if hasattr(bcjax, "enable_compilation_cache"):
            bcjax.enable_compilation_cache(os.environ["BCJAX_BENCH_XLA_CACHE"])
        else:  # an older bcjax (before/after comparisons): the same settings by hand
            import jax
            jax.config.update("jax_compilation_cache_dir", os.environ["BCJAX_BENCH_XLA_CACHE"])
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _native.available()  # the once-per-machine native build is not the first call's
    fn, _ = build(impl, shapes, tasks, folder, validate=True, on_device=phase != "numpy")
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if phase == "first":
        return {"first_call_s": first}
    if phase == "first_warm":  # the same call warm in the same process: a ratio immune to other jobs' load
        warm = _timed(fn, repeats, budget_s)
        return {"first_call_s": first, "warm_median_s": float(np.median(warm)), "warm_times_s": warm}
    times = _timed(fn, repeats, budget_s)
    return {"numpy_median_s": float(np.median(times)), "numpy_times_s": times}


def run_one(impl: str, shapes, tasks: int, folder: str, repeats: int, budget_s: float, slow_s: float,
            dump: str | None = None) -> dict:
    """Time and measure ``impl`` in this process (see the module docstring for the rules)."""
    load0 = os.getloadavg()[0]
    compiled = IMPL_INFO[impl][1]
    user = {}
    if compiled:  # bcjax: the first call in this fresh process is the default path's
        from bcjax import _native
        _native.available()  # the once-per-machine native build is not the first call's
        fn, pre = build(impl, shapes, tasks, folder, validate=True)
        t0 = time.perf_counter()
        fn()
        user["first_call_s"] = time.perf_counter() - t0
        fn()  # warm
        user["default_times_s"] = _timed(fn, repeats, budget_s)
        user["default_median_s"] = float(np.median(user["default_times_s"]))
        del fn, pre
    fn, pre = build(impl, shapes, tasks, folder)
    one_model = 4 * num_params(shapes)
    input_bytes = one_model * (tasks + 1)
    rss_before = 0 if compiled else _reset_high_water_mark()
    t0 = time.perf_counter()
    out = fn()  # warm-up: compilation for bcjax (its memory is not the merge's)
    warmup = time.perf_counter() - t0
    if dump:
        np.savez(dump, **{k: np.asarray(v) for k, v in out.items()})
    del out
    times = []
    if not compiled and warmup >= slow_s:
        times, warmup_counted = [warmup], True
    else:
        warmup_counted = False
        rss_before = _reset_high_water_mark()  # after the warm-up: a clean merge's memory
        while len(times) < max(1, repeats) and (not times or sum(times) < budget_s):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
            del out
    peak = _status_bytes("VmHWM") if rss_before else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    extra = {}
    if impl.startswith(("torch", "mergekit")):
        import torch
        extra["torch_threads"] = torch.get_num_threads()
        extra["torch_version"] = torch.__version__
    return {"impl": impl, "tasks": tasks, "params_per_model": num_params(shapes),
            "median_s": float(np.median(times)), "times_s": times, "runs": len(times),
            "warmup_s": warmup, "warmup_counted": warmup_counted,
            "peak_rss_bytes": peak, "input_bytes": input_bytes, "rss_before_merge_bytes": rss_before,
            "peak_over_inputs_in_models": (peak - input_bytes) / one_model,
            "merge_overhead_in_models": (peak - rss_before) / one_model if rss_before else float("nan"),
            "loadavg_1m_start": load0, "loadavg_1m_end": os.getloadavg()[0], **user, **extra}


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
    """Return freed heap memory to the OS (glibc ``malloc_trim``: else memory the warm-up
    freed stays resident and a later run reuses it unseen), reset VmHWM (Linux
    ``clear_refs``); return the RSS now (0 if unsupported)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return 0
    return _status_bytes("VmRSS")


# ------------------------------------------------------------------------------ driver
def machine_info() -> dict:
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "python": platform.python_version(),
            "numpy": np.__version__}


def run_child(impl, model, scale, tasks, folder, args) -> dict:
    """Run one implementation in a fresh process with the right venv; a row (or a skip row)."""
    venv = IMPL_INFO[impl][0]
    exe = sys.executable if venv == "bcjax" else peer_python()
    if exe is None:
        return {"impl": impl, "tasks": tasks, "skipped": "peer venv missing: run bash bench/setup_peers.sh"}
    cmd = [exe, os.path.abspath(__file__), "--model", model, "--scale", str(scale), "--tasks", str(tasks),
           "--repeats", str(args.repeats), "--budget-s", str(args.budget_s), "--slow-s", str(args.slow_s),
           "--data-dir", folder, "--_child", impl]
    row = _child_json(cmd, impl)
    if IMPL_INFO[impl][1] and not getattr(args, "no_user_path", True):
        row.update({k: v for k, v in _child_json(cmd + ["--_phase", "numpy"], impl).items()})
        cache = tempfile.mkdtemp(prefix="bcjax_xla_cache_")
        try:  # one fresh process fills the persistent cache, the next one's first call reads it
            env = dict(os.environ, BCJAX_BENCH_XLA_CACHE=cache)
            row["first_call_cache_fill_s"] = _child_json(cmd + ["--_phase", "first"], impl, env)["first_call_s"]
            row["first_call_cached_s"] = _child_json(cmd + ["--_phase", "first"], impl, env)["first_call_s"]
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    return row


def _child_json(cmd, impl, env=None) -> dict:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{impl} failed ({' '.join(cmd)}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def dump_merged(impl: str, model: str, tasks: int, folder: str, path: str) -> bool:
    """Run ``impl`` once in its own process on the inputs in ``folder`` (``write_inputs``)
    and save its merged model to ``path`` (.npz); False if its venv is missing."""
    exe = sys.executable if IMPL_INFO[impl][0] == "bcjax" else peer_python()
    if exe is None:
        return False
    cmd = [exe, os.path.abspath(__file__), "--model", model, "--tasks", str(tasks), "--repeats", "1",
           "--slow-s", "0", "--data-dir", folder, "--_child", impl, "--_dump", path]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"{impl} failed ({' '.join(cmd)}):\n{res.stderr[-3000:]}")
    return True


def markdown_table(rows, title: str) -> str:
    """One workload's table: time, ratios to the task-arithmetic floor and to bcjax Breadcrumbs, memory."""
    by = {r["impl"]: r for r in rows if "median_s" in r}
    tas = [by[k]["median_s"] for k in ("bcjax_task_arithmetic", "torch_task_arithmetic") if k in by]
    floor = min(tas) if tas else None
    bc = by.get("bcjax_breadcrumbs", {}).get("median_s")
    threads = sorted({r["torch_threads"] for r in rows if "torch_threads" in r})
    if threads:
        title = title.replace("\n\n", f"; torch threads: {', '.join(map(str, threads))}\n\n", 1) \
            if "\n\n" in title else title + f"; torch threads: {', '.join(map(str, threads))}"
    lines = [title, "",
             "| implementation | what it computes | median (s) | runs | × TA floor | bcjax Breadcrumbs faster by "
             "| peak RSS (GiB) | merge's peak above its inputs (models) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        what = IMPL_INFO.get(r["impl"], ("", False, ""))[2]
        if "median_s" not in r:
            lines.append(f"| {r['impl']} | {what} | skipped: {r.get('skipped', '?')} | | | | | |")
            continue
        ratio = f"{r['median_s'] / floor:.1f}" if floor else "–"
        speed = "–" if not bc or r["impl"] == "bcjax_breadcrumbs" or "task_arithmetic" in r["impl"] \
            else f"{r['median_s'] / bc:.1f}×"
        runs = f"{r['runs']}" + (" (no warm-up)" if r.get("warmup_counted") else "")
        ovh = r["merge_overhead_in_models"]
        lines.append(f"| {r['impl']} | {what} | {r['median_s']:.3f} | {runs} | {ratio} | {speed} | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} | {'–' if ovh != ovh else f'{ovh:.2f}'} |")
    return "\n".join(lines)


def first_calls(model: str, scale: float, tasks: int, folder: str, impls, rounds: int, repeats: int) -> dict:
    """Per impl, ``rounds`` fresh processes (interleaved over impls), each timing the first
    ``bcjax.merge`` with the defaults on device-resident inputs (native kernel built before,
    compilation included) and then the same call warm (median of ``repeats``), so the ratio
    first ÷ warm comes from one process. Returns the times and the median ratios."""
    out = {impl: {"first_call_s": [], "warm_median_s": [], "first/warm": []} for impl in impls}
    for _ in range(rounds):
        for impl in impls:
            cmd = [sys.executable, os.path.abspath(__file__), "--model", model, "--scale", str(scale), "--tasks",
                   str(tasks), "--repeats", str(repeats), "--budget-s", "60", "--data-dir", folder, "--_child", impl,
                   "--_phase", "first_warm"]
            r = _child_json(cmd, impl)
            out[impl]["first_call_s"].append(r["first_call_s"])
            out[impl]["warm_median_s"].append(r["warm_median_s"])
            out[impl]["first/warm"].append(r["first_call_s"] / r["warm_median_s"])
    return {impl: {**v, "median_first/warm": float(np.median(v["first/warm"]))} for impl, v in out.items()}


def side_by_side(shapes, tasks: int, folder: str, impls, rounds: int) -> dict:
    """bcjax's methods × {validate=False, default path, NumPy inputs} in ONE process,
    interleaved round by round (each round times every cell once after a warm-up of all
    cells), so load from other jobs hits all cells alike: on a shared machine the per-round
    ratios are what to compare. Returns per-cell times and per-round ratios (medians)."""
    import jax

    import bcjax
    from bcjax import _native

    _native.available()
    host = [read_model(shapes, folder, i) for i in range(tasks + 1)]
    dev = [{k: jax.device_put(v) for k, v in m.items()} for m in host]
    jax.block_until_ready(dev)
    cells = {}
    for impl in impls:
        method, hp = BCJAX_CALLS[impl]
        for mode, models, validate in (("validate_off", dev, False), ("default", dev, True),
                                       ("numpy", host, True)):
            cells[(impl, mode)] = functools.partial(
                lambda m, ms_, v, h: jax.block_until_ready(bcjax.merge(m, ms_[0], ms_[1:], validate=v, **h)),
                method, models, validate, hp)
    for fn in cells.values():  # warm-up: compilation
        fn()
    times = {key: [] for key in cells}
    for _ in range(rounds):
        for key, fn in cells.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    ratios = {}
    ta = times.get(("bcjax_task_arithmetic", "validate_off"))
    for impl in impls:
        off, dflt, npy = (times[(impl, m)] for m in ("validate_off", "default", "numpy"))
        r = {"default/validate_off": [a / b for a, b in zip(dflt, off)], "numpy/default": [a / b for a, b in zip(npy, dflt)]}
        if ta:
            r["validate_off/TA"] = [a / b for a, b in zip(off, ta)]
        ratios[impl] = {k: float(np.median(v)) for k, v in r.items()}
    return {"rounds": rounds, "loadavg_1m": os.getloadavg()[0],
            "times_s": {f"{i}/{m}": v for (i, m), v in times.items()},
            "median_s": {f"{i}/{m}": float(np.median(v)) for (i, m), v in times.items()},
            "median_ratios": ratios}


def side_by_side_table(res: dict) -> str:
    """The side-by-side run as a table of median per-round ratios."""
    lines = [f"Side by side in one process, {res['rounds']} interleaved rounds (median of per-round ratios; "
             f"1-min load average at the end {res['loadavg_1m']:.1f}):", "",
             "| bcjax | validate=False (s) | × TA (same round) | default path (s) | default ÷ validate=False "
             "| NumPy inputs (s) | NumPy ÷ device |", "|---|---:|---:|---:|---:|---:|---:|"]
    for impl, r in res["median_ratios"].items():
        med = res["median_s"]
        lines.append(f"| {impl.removeprefix('bcjax_')} | {med[impl + '/validate_off']:.3f} | "
                     f"{r.get('validate_off/TA', float('nan')):.2f} | {med[impl + '/default']:.3f} | "
                     f"{r['default/validate_off']:.2f} | {med[impl + '/numpy']:.3f} | {r['numpy/default']:.2f} |")
    first = res.get("first_calls")
    if first:
        n = len(next(iter(first.values()))["first/warm"])
        lines += ["", f"First call in a fresh process (native kernel built before), {n} process(es) per method "
                  "interleaved; the warm call timed in the same process after it (median of per-process ratios; "
                  "1-min load average before the rounds "
                  f"{res.get('loadavg_1m_first_calls', float('nan')):.1f}):", "",
                  "| bcjax | first call (s) | warm, same process (s) | first ÷ warm |", "|---|---:|---:|---:|"]
        for impl, v in first.items():
            lines.append(f"| {impl.removeprefix('bcjax_')} | {np.median(v['first_call_s']):.3f} | "
                         f"{np.median(v['warm_median_s']):.3f} | {v['median_first/warm']:.2f} |")
    return "\n".join(lines)


def user_path_table(rows) -> str:
    """bcjax's default path next to the ``validate=False`` timing (issue 16): validation on,
    NumPy inputs, and the first call in a fresh process (compilation; with a persistent cache
    filled by an earlier process), each as seconds and as a ratio."""
    by = {r["impl"]: r for r in rows if "median_s" in r and "default_median_s" in r}
    if not by:
        return ""
    ta = by.get("bcjax_task_arithmetic", {}).get("median_s")
    lines = ["| bcjax | validate=False (s) | × TA | default path (s) | × validate=False | NumPy inputs (s) "
             "| × device | first call (s) | × warm | first call, cache filled (s) | × warm |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(v, ref):
        return ("–", "–") if v is None else (f"{v:.3f}", f"{v / ref:.2f}" if ref else "–")

    for impl, r in by.items():
        warm = r["default_median_s"]
        cells = [f"{r['median_s']:.3f}", f"{r['median_s'] / ta:.2f}" if ta else "–",
                 *cell(warm, r["median_s"]), *cell(r.get("numpy_median_s"), warm),
                 *cell(r.get("first_call_s"), warm), *cell(r.get("first_call_cached_s"), warm)]
        lines.append(f"| {impl.removeprefix('bcjax_')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_workload(model: str, tasks: int, impls, args, scale: float = 1.0) -> list[dict]:
    """Generate the inputs once, run every implementation on them; the rows."""
    shapes = model_shapes(model, scale)
    folder = tempfile.mkdtemp(prefix="bcjax_bench_", dir=args.data_dir)
    try:
        t0 = time.perf_counter()
        write_inputs(shapes, tasks, folder)
        print(f"[{model} ×{tasks}, {num_params(shapes) / 1e6:.1f}M params/model] inputs in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        rows = []
        for impl in impls:
            r = run_child(impl, model, scale, tasks, folder, args)
            r["model"] = model
            rows.append(r)
            if "median_s" in r:
                print(f"  {impl:24s} {r['median_s']:8.3f} s ×{r['runs']}  "
                      f"peak RSS {r['peak_rss_bytes'] / 2**30:6.2f} GiB"
                      f"  (+{r['merge_overhead_in_models']:.2f} models)  load {r['loadavg_1m_start']:.1f}", flush=True)
            else:
                print(f"  {impl:24s} skipped: {r['skipped']}", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_b_32", help="vit_b_32 | vit_l_14 | smoke | vit-w<width>-l<layers>")
    ap.add_argument("--scale", type=float, default=1.0, help="≈ parameter-count factor for quick runs")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=25.0, help="stop repeating once timed runs took this long")
    ap.add_argument("--slow-s", type=float, default=15.0, help="eager impls this slow: the warm-up is the sample")
    ap.add_argument("--impls", default=",".join(DEFAULT_IMPLS))
    ap.add_argument("--update", action="store_true",
                    help="replace only these implementations' rows in the existing JSON under --out "
                         "(then rerun bench/report.py); the other rows are kept")
    ap.add_argument("--out", default=None, help="folder for {model}_{tasks}.json / .md")
    ap.add_argument("--data-dir", default=None, help="where the inputs are written (default: the temp dir)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_dump", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_phase", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--side-by-side", action="store_true",
                    help="bcjax only: all methods × {validate=False, default, NumPy} in one process, "
                         "interleaved --repeats rounds, after --first-call-rounds fresh processes per method "
                         "(first call ÷ warm call); writes {model}_{tasks}_side_by_side.json")
    ap.add_argument("--first-call-rounds", type=int, default=1,
                    help="--side-by-side: fresh processes per method timing the first call and then the warm "
                         "call (0: none)")
    ap.add_argument("--no-user-path", action="store_true",
                    help="bcjax: skip the NumPy-input and persistent-cache first-call processes")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.tasks, args.repeats, args.scale = "smoke", 3, 1, 1.0
    if args._child and args._phase:
        shapes = model_shapes(args.model, args.scale)
        print(json.dumps(run_user_path(args._child, shapes, args.tasks, args.data_dir, args.repeats, args.budget_s,
                                       args._phase)))
        return None
    if args._child:
        shapes = model_shapes(args.model, args.scale)
        print(json.dumps(run_one(args._child, shapes, args.tasks, args.data_dir, args.repeats, args.budget_s,
                                 args.slow_s, dump=args._dump)))
        return None
    impls = args.impls.split(",")
    unknown = sorted(set(impls) - set(IMPL_INFO))
    if unknown:
        raise SystemExit(f"unknown --impls {unknown}; known: {IMPLS}")
    if args.side_by_side:
        impls = [i for i in impls if i in BCJAX_CALLS]
        shapes = model_shapes(args.model, args.scale)
        folder = tempfile.mkdtemp(prefix="bcjax_bench_", dir=args.data_dir)
        try:
            write_inputs(shapes, args.tasks, folder)
            load_first = os.getloadavg()[0]
            # fresh processes first, before this one holds the inputs (memory: one copy at a time)
            first = first_calls(args.model, args.scale, args.tasks, folder, impls, args.first_call_rounds,
                                args.repeats) if args.first_call_rounds else None
            res = side_by_side(shapes, args.tasks, folder, impls, args.repeats)
            if first:
                res.update(first_calls=first, loadavg_1m_first_calls=load_first)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        res.update(model=args.model, scale=args.scale, tasks=args.tasks, machine=machine_info(),
                   time=time.strftime("%Y-%m-%d %H:%M:%S"))
        print(side_by_side_table(res))
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            stem = f"{args.model}_{args.tasks}_side_by_side"
            with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
                json.dump(res, f, indent=2)
        return res
    rows = run_workload(args.model, args.tasks, impls, args, args.scale)
    shapes = model_shapes(args.model, args.scale)
    stem = f"{args.model}_{args.tasks}" if args.scale == 1.0 else f"{args.model}@{args.scale:g}_{args.tasks}"
    if args.update and args.out and os.path.exists(os.path.join(args.out, f"{stem}.json")):
        with open(os.path.join(args.out, f"{stem}.json")) as f:
            old = json.load(f)["rows"]
        fresh = {r["impl"]: r for r in rows}
        rows = [fresh.pop(r["impl"], r) for r in old] + list(fresh.values())
    name = args.model if args.scale == 1.0 else f"{args.model}@{args.scale:g}"
    title = (f"**{name} × {args.tasks} tasks**, {num_params(shapes) / 1e6:.1f}M params per model "
             f"({4 * num_params(shapes) / 2**20:.0f} MiB); median of up to {args.repeats} after a warm-up")
    table = markdown_table(rows, title)
    user = user_path_table(rows)
    if user:
        table += "\n\nWhat a user waits for (default path; ratios within this run):\n\n" + user
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
            json.dump({"model": args.model, "scale": args.scale, "tasks": args.tasks,
                       "params_per_model": num_params(shapes), "repeats": args.repeats,
                       "budget_s": args.budget_s, "slow_s": args.slow_s,
                       "hparams": {"alpha": ALPHA, "beta": BETA, "gamma": GAMMA,
                                   "ties_density": TIES_DENSITY, "ties_alpha": TIES_ALPHA},
                       "machine": machine_info(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "rows": rows}, f, indent=2)
        with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
            f.write(table + "\n")
    return rows


if __name__ == "__main__":
    main()
