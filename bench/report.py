"""Turn bench/results/*.json into the tables of BENCHMARKS.md: one table per workload, the
issue's targets with met / missed-by-how-much, and the scaling plot. BENCHMARKS.md's
tables live between ``<!-- bench:NAME:begin -->`` / ``<!-- bench:NAME:end -->`` markers and
are rewritten in place (the prose around them is kept); bench/run_all.sh calls this last.

    python bench/report.py --results bench/results --doc BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import merge_speed as ms  # noqa: E402

WORKLOADS = [("vit_b_32_8", "ViT-B/32 × 8"), ("vit_l_14_2", "ViT-L/14 × 2")]
BC = "bcjax_breadcrumbs"


def _median(rows, impl):
    r = next((r for r in rows if r["impl"] == impl and "median_s" in r), None)
    return r["median_s"] if r else None


def targets(rows) -> list[dict]:
    """The issue's targets on one workload's rows: {target, value, goal, met (None: not
    measured), missed_by (speed: factor; memory: models over), text}."""
    bc = _median(rows, BC)
    tas = [t for t in (_median(rows, "bcjax_task_arithmetic"), _median(rows, "torch_task_arithmetic")) if t]
    out = []

    def add(name, value, goal, higher_is_better, unit="×"):
        if value is None:
            out.append({"target": name, "value": None, "goal": goal, "met": None, "missed_by": None,
                        "text": "not measured"})
            return
        met = value >= goal if higher_is_better else value <= goal
        if unit == "×":
            missed = None if met else (goal / value if higher_is_better else value / goal)
            text = (f"{value:.2f}×" if value < 10 else f"{value:.1f}×") + " — " + \
                ("met" if met else f"missed by {missed:.2f}×")
        else:
            missed = None if met else value - goal
            text = f"{value:.2f} models — " + ("met" if met else f"missed by {missed:.2f} models")
        out.append({"target": name, "value": value, "goal": goal, "met": met, "missed_by": missed, "text": text})

    add("Breadcrumbs ≤ 3× task arithmetic", bc / min(tas) if bc and tas else None, 3.0, False)
    for name, impl, goal in (("≥ 5× faster than numpy partition", "numpy_breadcrumbs", 5.0),
                             ("≥ 5× faster than the official code's semantics", "torch_official_row", 5.0),
                             ("≥ 30× faster than mergekit", "mergekit_breadcrumbs", 30.0)):
        peer = _median(rows, impl)
        add(name, peer / bc if peer and bc else None, goal, True)
    r = next((r for r in rows if r["impl"] == BC and "median_s" in r), None)
    add("peak ≤ inputs + 1.5 × one model", r["merge_overhead_in_models"] if r else None, 1.5, False, unit="models")
    return out


def replace_block(path: str, name: str, text: str) -> None:
    """Replace what lies between ``<!-- bench:NAME:begin -->`` and ``<!-- bench:NAME:end -->``."""
    with open(path) as f:
        doc = f.read()
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    pat = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), re.S)
    if not pat.search(doc):
        raise KeyError(f"{path}: no block {begin} … {end}")
    doc = pat.sub(lambda _: f"{begin}\n{text}\n{end}", doc, count=1)
    with open(path, "w") as f:
        f.write(doc)


def _load(path):
    with open(path) as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {"rows": data}


def workload_tables(results: str) -> tuple[str, str, dict | None]:
    tables, tgt_rows, machine = [], [], None
    for stem, label in WORKLOADS:
        path = os.path.join(results, f"{stem}.json")
        if not os.path.exists(path):
            tables.append(f"*{label}: not run yet* (`bash bench/run_all.sh`)")
            continue
        data = _load(path)
        machine = machine or data.get("machine")
        rows = data["rows"]
        p = data.get("params_per_model") or rows[0].get("params_per_model", 0)
        loads = [r.get("loadavg_1m_start") for r in rows if r.get("loadavg_1m_start") is not None]
        load = f"; 1-min load average during the runs {min(loads):.1f}–{max(loads):.1f}" if loads else ""
        title = (f"**{label}** ({p / 1e6:.1f}M parameters per model, {4 * p / 2**20:.0f} MiB; "
                 f"measured {data.get('time', '?')}{load})")
        cores = (data.get("machine") or {}).get("cores") or os.cpu_count()
        # the benchmark itself keeps up to `cores` threads busy (and the 1-min average trails the
        # previous implementation's run), so only load beyond the core count means other jobs
        if loads and max(loads) > cores:
            title += (f"\n\n> ⚠ Measured on a busy machine (1-min load average up to {max(loads):.1f} on {cores} "
                      "cores, other jobs running): timings are inflated and noisy; rerun on a quiet machine.")
        tables.append(ms.markdown_table(rows, title))
        for t in targets(rows):
            tgt_rows.append(f"| {t['target']} | {label} | {t['text']} |")
    tgt = "\n".join(["| target (issue 7) | workload | measured — status |", "|---|---|---|", *tgt_rows])
    bc_ties = []
    for stem, label in WORKLOADS:
        path = os.path.join(results, f"{stem}.json")
        if os.path.exists(path):
            rows = _load(path)["rows"]
            a, b = _median(rows, "bcjax_ties"), _median(rows, "mergekit_ties")
            if a and b:
                bc_ties.append(f"| bcjax TIES vs mergekit TIES | {label} | bcjax {b / a:.1f}× faster "
                               f"({a:.2f} s vs {b:.2f} s; no target) |")
    if bc_ties:
        tgt += "\n" + "\n".join(bc_ties)
    return "\n\n".join(tables), tgt, machine


def user_path_section(results: str) -> str:
    """Issue 16: what a user waits for on ViT-B/32 × 8 — the side-by-side run (current code,
    and the code before, when recorded), the fresh-process first-call table, and the targets."""
    def load(name):
        path = os.path.join(results, name)
        return _load(path) if os.path.exists(path) else None

    now, before = load("vit_b_32_8_side_by_side.json"), load("vit_b_32_8_side_by_side_before.json")
    procs, procs_before = load("vit_b_32_8_user_path.json"), load("vit_b_32_8_user_path_before.json")
    if not now:
        return "*Default path: not run yet* (`bench/merge_speed.py --side-by-side`)"
    parts = [f"**Now** (measured {now.get('time', '?')}):", ms.side_by_side_table(now)]
    if before:
        parts += [f"**Before** (the code before issue 16, same script, measured {before.get('time', '?')}):",
                  ms.side_by_side_table(before)]
    if procs:
        loads = [r.get("loadavg_1m_start") for r in procs["rows"] if r.get("loadavg_1m_start") is not None]
        parts += [f"Fresh processes (measured {procs.get('time', '?')}, 1-min load average "
                  f"{min(loads):.1f}–{max(loads):.1f}; each column its own process, so cross-row ratios carry "
                  "the load swings):", ms.user_path_table(procs["rows"])]
    if procs_before:
        loads = [r.get("loadavg_1m_start") for r in procs_before["rows"] if r.get("loadavg_1m_start") is not None]
        parts += [f"Fresh processes, the code before issue 16 (measured {procs_before.get('time', '?')}, 1-min load "
                  f"average {min(loads):.1f}–{max(loads):.1f}):", ms.user_path_table(procs_before["rows"])]
    rows = ["| target (issue 16) | measured — status |", "|---|---|"]

    def add(name, value, goal):
        rows.append(f"| {name} | " + ("not measured" if value is None else
                                     f"{value:.2f}× — " + ("met" if value <= goal else f"missed by {value / goal:.2f}×"))
                    + " |")

    r = now["median_ratios"]
    add("Breadcrumbs ≤ 2.5× task arithmetic (validate=False, same round)",
        r.get("bcjax_breadcrumbs", {}).get("validate_off/TA"), 2.5)
    add("TIES ≤ 3× task arithmetic (validate=False, same round)", r.get("bcjax_ties", {}).get("validate_off/TA"), 3.0)
    by = {x["impl"]: x for x in (procs or {}).get("rows", [])}
    for impl in ("bcjax_task_arithmetic", "bcjax_breadcrumbs", "bcjax_ties"):
        short = impl.removeprefix("bcjax_")
        add(f"{short}: validation ≤ 1.3× validate=False", r.get(impl, {}).get("default/validate_off"), 1.3)
        add(f"{short}: NumPy inputs ≤ 1.5× device-resident", r.get(impl, {}).get("numpy/default"), 1.5)
        u = by.get(impl, {})
        add(f"{short}: first call ≤ 2× warm, persistent cache filled (fresh processes)",
            u["first_call_cached_s"] / u["default_median_s"] if u.get("first_call_cached_s") else None, 2.0)
        add(f"{short}: first call ≤ 2× warm, no cache (fresh process)",
            u["first_call_s"] / u["default_median_s"] if u.get("first_call_s") else None, 2.0)
    return "\n\n".join([*parts, "\n".join(rows)])


def scaling_section(results: str) -> str:
    path = os.path.join(results, "scaling.json")
    if not os.path.exists(path):
        return "*Scaling: not run yet* (`bash bench/run_all.sh`)"
    data = _load(path)
    impls = []
    for p in data["points"]:
        for r in p["rows"]:
            if r["impl"] not in impls:
                impls.append(r["impl"])
    lines = ["![merge time vs parameters and vs tasks](bench/results/scaling.png)", "",
             "| sweep | params/model | tasks | " + " | ".join(impls) + " | Breadcrumbs ÷ TA |",
             "|---|---:|---:|" + "---:|" * (len(impls) + 1)]
    for p in data["points"]:
        cells = []
        for impl in impls:
            t = _median(p["rows"], impl)
            cells.append(f"{t:.3g} s" if t else "–")
        bc, ta = _median(p["rows"], BC), _median(p["rows"], "bcjax_task_arithmetic")
        ratio = f"{bc / ta:.1f}" if bc and ta else "–"
        lines.append(f"| {p['sweep']} | {p['params_per_model'] / 1e6:.1f}M | {p['tasks']} | "
                     + " | ".join(cells) + f" | {ratio} |")
    lines.append("")
    lines.append(f"One timed run after a warm-up per point (an eager implementation slower than "
                 f"{data.get('slow_s', 10):g} s: its single run); measured {data.get('time', '?')}.")
    return "\n".join(lines)


def machine_line(machine: dict | None) -> str:
    if not machine:
        return "Machine: not recorded."
    return (f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_bytes'] / 2**30:.0f} GiB; "
            f"Python {machine['python']}, numpy {machine['numpy']}; bcjax on jax (CPU) from `.venv`, "
            "peers on torch 2.13.0 (CPU) and mergekit 0.1.5 from `.venv-bench`.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="bench/results")
    ap.add_argument("--doc", default="BENCHMARKS.md")
    args = ap.parse_args(argv)
    tables, tgt, machine = workload_tables(args.results)
    scaling = scaling_section(args.results)
    with open(os.path.join(args.results, "summary.md"), "w") as f:
        f.write("\n\n".join([machine_line(machine), tables, tgt, scaling]) + "\n")
    if args.doc:
        replace_block(args.doc, "machine", machine_line(machine))
        replace_block(args.doc, "tables", tables)
        replace_block(args.doc, "targets", tgt)
        replace_block(args.doc, "scaling", scaling)
        replace_block(args.doc, "userpath", user_path_section(args.results))
    print(tgt)


if __name__ == "__main__":
    main()
