"""How merge cost grows: time vs parameters per model (≈10M → 300M, ViT-like towers, a
fixed number of tasks) and vs number of tasks (2 → 16, a fixed ≈40M-parameter tower), for
bcjax task arithmetic, bcjax Breadcrumbs, the numpy partition baseline and (when the peer
venv exists) the official code's per-row semantics in torch. Each point runs every
implementation in its own process on identical inputs (bench/merge_speed.py), one timed
run after a warm-up (an eager implementation slower than --slow-s: its one run).

    python bench/scaling.py --out bench/results                 # ~6 min on an idle 2-core box
    python bench/scaling.py --out /tmp/s --scale 0.1            # quick: widths × √0.1

Writes scaling.json and scaling.png (log-log time vs parameters; time vs tasks).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import merge_speed as ms  # noqa: E402
from bench.shapes import num_params  # noqa: E402

PARAM_MODELS = ["vit-w256-l12", "vit-w512-l12", "vit_b_32", "vit_l_14"]  # 10.4M, 39.7M, 87.8M, 304M
PARAM_TASKS = 4
TASK_MODEL = "vit-w512-l12"
TASK_COUNTS = [2, 4, 8, 16]
IMPLS = ["bcjax_task_arithmetic", "bcjax_breadcrumbs", "numpy_breadcrumbs", "torch_official_row"]


def _scaled(model: str, scale: float) -> tuple[str, float]:
    """vit-w… models are scaled by rewriting the width; the named ones through --scale."""
    if scale == 1.0 or not model.startswith("vit-w"):
        return model, scale
    w, layers = (int(x[1:]) for x in model[4:].split("-"))
    w = max(16, int(round(w * scale ** 0.5 / 16)) * 16)
    return f"vit-w{w}-l{layers}", 1.0


def run(args) -> dict:
    impls = [i for i in args.impls.split(",") if i]
    points, done = [], {}
    for sweep, model, tasks in ([("params", m, PARAM_TASKS) for m in PARAM_MODELS]
                                + [("tasks", TASK_MODEL, t) for t in TASK_COUNTS]):
        name, scale = _scaled(model, args.scale)
        if (name, scale, tasks) not in done:  # the shared point of both sweeps runs once
            done[(name, scale, tasks)] = ms.run_workload(name, tasks, impls, args, scale)
        points.append({"sweep": sweep, "model": name, "scale": scale, "tasks": tasks,
                       "params_per_model": num_params(ms.model_shapes(name, scale)),
                       "rows": done[(name, scale, tasks)]})
    return {"points": points, "machine": ms.machine_info(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "repeats": args.repeats, "slow_s": args.slow_s, "scale": args.scale}


def plot(data: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, sweep in zip(axes, ("params", "tasks"), strict=True):
        pts = [p for p in data["points"] if p["sweep"] == sweep]
        impls = [r["impl"] for r in pts[0]["rows"]] if pts else []
        for impl in impls:
            xs, ys = [], []
            for p in pts:
                r = next((r for r in p["rows"] if r["impl"] == impl and "median_s" in r), None)
                if r:
                    xs.append(p["params_per_model"] / 1e6 if sweep == "params" else p["tasks"])
                    ys.append(r["median_s"])
            if xs:
                ax.plot(xs, ys, marker="o", label=impl)
        if sweep == "params":
            ax.set(xscale="log", yscale="log", xlabel="parameters per model (M)",
                   title=f"time vs model size ({PARAM_TASKS} tasks)")
            xs = [p["params_per_model"] / 1e6 for p in pts]
            ax.set_xticks(xs, [f"{x:.3g}" for x in xs])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        else:
            m = pts[0]["params_per_model"] / 1e6 if pts else 0
            ax.set(yscale="log", xlabel="number of tasks", title=f"time vs tasks ({m:.0f}M params per model)")
            ax.set_xticks(TASK_COUNTS)
        ax.set_ylabel("merge time (s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{data['machine']['cpu']}, {data['machine']['cores']} cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--scale", type=float, default=1.0, help="≈ parameter-count factor for quick runs")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--budget-s", type=float, default=0.0)
    ap.add_argument("--slow-s", type=float, default=10.0)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    if ms.peer_python() is None:
        args.impls = ",".join(i for i in args.impls.split(",") if ms.IMPL_INFO[i][0] == "bcjax")
        print("peer venv missing: torch_official_row left out (bash bench/setup_peers.sh)", flush=True)
    data = run(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scaling.json"), "w") as f:
        json.dump(data, f, indent=2)
    plot(data, os.path.join(args.out, "scaling.png"))
    return data


if __name__ == "__main__":
    main()
