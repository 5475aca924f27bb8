"""Bit-for-bit comparison of two runs' JSON outputs (demo results.json, sweep summary.json).

    python bench/compare_runs.py BEFORE_DIR AFTER_DIR [--ignore KEY ...]

Walks both JSON trees; floats must be equal exactly (JSON keeps repr round-trip precision),
keys and list lengths must match. Ignored by default: timings and machine description
(``timings_s``, ``machine``) and file locations (``results_file``). Exit 0 when identical."""
from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_IGNORE = ("timings_s", "machine", "results_file")


def diff(a, b, path="", ignore=()):
    out = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k in ignore:
                continue
            if k not in a or k not in b:
                out.append(f"{path}/{k}: only in {'after' if k not in a else 'before'}")
            else:
                out += diff(a[k], b[k], f"{path}/{k}", ignore)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: length {len(a)} vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            out += diff(x, y, f"{path}[{i}]", ignore)
    elif a != b or type(a) is not type(b):
        out.append(f"{path}: {a!r} vs {b!r}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--ignore", nargs="*", default=list(DEFAULT_IGNORE))
    args = p.parse_args(argv)
    bad = 0
    for root, _, files in os.walk(args.before):
        for f in sorted(files):
            if f not in ("results.json", "summary.json"):
                continue
            rel = os.path.relpath(os.path.join(root, f), args.before)
            other = os.path.join(args.after, rel)
            if not os.path.exists(other):
                print(f"MISSING {rel}")
                bad += 1
                continue
            d = diff(json.load(open(os.path.join(root, f))), json.load(open(other)), ignore=tuple(args.ignore))
            print(f"{'IDENTICAL' if not d else 'DIFFERENT'} {rel}" + "".join(f"\n    {x}" for x in d[:20]))
            bad += bool(d)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
