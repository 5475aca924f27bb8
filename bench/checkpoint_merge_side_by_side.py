"""Two source trees of bcjax side by side on the same checkpoints: `bcjax merge` wall time,
CPU seconds and peak RSS (os.wait4, = /usr/bin/time -v's maximum resident set size) of
each, in interleaved rounds (the order alternates per round), so a shared machine's load
hits both alike. Uses the models and YAML configs a ``bench/checkpoint_merge.py --reuse``
run left in ``WORKDIR`` (``models/`` and ``METHOD.yaml``).

    git archive 8b032ec | tar -x -C /tmp/bcjax-before
    PYTHONPATH=. python bench/checkpoint_merge.py --case mid --workdir /tmp/ckbench-mid --reuse \\
        --skip mergekit --out /tmp/mid.json                     # writes the models once
    python bench/checkpoint_merge_side_by_side.py --workdir /tmp/ckbench-mid \\
        --before /tmp/bcjax-before --after . --rounds 3 --out /tmp/mid_side_by_side.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checkpoint_merge import run  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True, help="a checkpoint_merge.py --reuse working folder")
    ap.add_argument("--before", required=True, help="source tree (repository root) of the first version")
    ap.add_argument("--after", required=True, help="source tree of the second version")
    ap.add_argument("--methods", default="breadcrumbs,ties")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    py = sys.executable
    srcs = [("before", os.path.abspath(args.before)), ("after", os.path.abspath(args.after))]
    env = lambda src: dict(os.environ, PYTHONPATH=src)  # noqa: E731
    out = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(), "sources": dict(srcs),
           "load_avg_start": os.getloadavg(),
           "interpreter": run([py, "-c", "import bcjax.checkpoints, jax.numpy as jnp; jnp.zeros(1)"],
                              env=env(srcs[1][1]), cwd=srcs[1][1]),
           "runs": {f"{v}_{m}": [] for v, _ in srcs for m in args.methods.split(",")}}
    for r in range(args.rounds):
        for m in args.methods.split(","):
            for v, src in (srcs if r % 2 == 0 else srcs[::-1]):
                dst = os.path.join(args.workdir, f"side_by_side_{v}_{m}")
                shutil.rmtree(dst, ignore_errors=True)
                # cwd = the source tree: `python -m` puts the working directory before PYTHONPATH
                x = run([py, "-m", "bcjax.cli", "merge", os.path.join(os.path.abspath(args.workdir), f"{m}.yaml"),
                         "--out", os.path.abspath(dst), "--no-progress"], env=env(src), cwd=src)
                shutil.rmtree(dst, ignore_errors=True)
                x["load1"] = os.getloadavg()[0]
                out["runs"][f"{v}_{m}"].append(x)
                print(v, m, x["seconds"], x["cpu_seconds"], x["peak_rss_bytes"] / 1e9, x["returncode"], flush=True)
    base = out["interpreter"]["peak_rss_bytes"]
    out["median"] = {k: {q: statistics.median(x[q] for x in xs) for q in ("seconds", "cpu_seconds", "peak_rss_bytes")}
                     for k, xs in out["runs"].items()}
    for v in out["median"].values():
        v["rss_above_interpreter_bytes"] = v["peak_rss_bytes"] - base
    out["load_avg_end"] = os.getloadavg()
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out["median"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
