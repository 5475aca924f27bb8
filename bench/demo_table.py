"""The README's demo results table, regenerated from a run's ``results.json``.

Rewrites the block between ``<!-- demo:results:begin -->`` and ``<!-- demo:results:end -->``
in README.md with every method and the reference rows (average normalized accuracy with its
95% bootstrap interval, the paired difference to task arithmetic with its interval), the
test-set sizes, and the run's date, machine and load (given, as the run does not record them).

    python bench/demo_table.py docs/demo_run/results.json --doc README.md \\
        --when "2026-11-30" --machine "shared 2-core CPU VM" --load "load average 14-24"
"""
from __future__ import annotations

import argparse
import json
import re

BEGIN, END = "<!-- demo:results:begin -->", "<!-- demo:results:end -->"
NAMES = {"task_arithmetic": "task arithmetic", "simple_average": "simple average", "random_sparse":
         "random-sparsified TA", "dare": "DARE", "fisher": "Fisher merging", "gradient_matching": "gradient matching",
         "ties": "TIES", "breadcrumbs": "Breadcrumbs"}


def _ci(v) -> str:
    return f"[{100 * v[0]:.1f}, {100 * v[1]:.1f}]"


def table(r: dict, *, when: str, machine: str, load: str) -> str:
    n = r["test_examples_per_task"]
    rows = sorted(r["methods"].items(), key=lambda kv: -kv[1]["avg_normalized_acc"])
    out = [f"Run of {when} ({machine}; {load}), `results.json` in `docs/demo_run/`; test split, "
           f"{sum(n.values()):,} images ({', '.join(f'{t} {k}' for t, k in n.items())}); 95% paired percentile "
           f"bootstrap intervals ({r['bootstrap']['resamples']} resamples, seed {r['bootstrap']['seed']}):", "",
           "| model | hyper-parameters (chosen on val) | avg normalized acc (%) | 95% CI | Δ vs task arithmetic "
           "[95% CI] |", "|---|---|---:|---:|---:|"]
    for name, m in rows:
        hp = ", ".join(f"{k}={v}" for k, v in m["hparams"].items()) or "–"
        d = m["delta_vs_task_arithmetic"]
        out.append(f"| {NAMES.get(name, name)} | {hp} | {100 * m['avg_normalized_acc']:.1f} | "
                   f"{_ci(m['avg_normalized_acc_ci95'])} | {100 * d['mean']:+.1f} {_ci(d['ci95'])} |")
    for name in ("finetuned", "pretrained"):
        m = r["references"][name]
        d = m["delta_vs_task_arithmetic"]
        out.append(f"| *{name}* (reference) | – | {100 * m['avg_normalized_acc']:.1f} | "
                   f"{_ci(m['avg_normalized_acc_ci95'])} | {100 * d['mean']:+.1f} {_ci(d['ci95'])} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--doc", default="README.md")
    ap.add_argument("--when", required=True)
    ap.add_argument("--machine", required=True)
    ap.add_argument("--load", required=True)
    args = ap.parse_args()
    with open(args.results) as f:
        r = json.load(f)
    with open(args.doc) as f:
        doc = f.read()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{args.doc}: no {BEGIN} ... {END} block")
    block = f"{BEGIN}\n{table(r, when=args.when, machine=args.machine, load=args.load)}\n{END}"
    doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, doc, flags=re.S)
    with open(args.doc, "w") as f:
        f.write(doc)


if __name__ == "__main__":
    main()
