"""Command line: ``bcjax demo`` (and friends). The CLI only wires; the work is elsewhere."""
from __future__ import annotations

import argparse
import os
import sys


def _enable_compile_cache(cache_root: str) -> None:
    """Persistent XLA compilation cache: a rerun skips recompiling the ViT."""
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(cache_root, "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _cmd_demo(args) -> int:
    from bcjax.demo import run_demo
    from bcjax.models.dinov2 import default_cache_dir

    cache_root = os.path.abspath(args.cache_dir) if args.cache_dir else str(default_cache_dir())
    _enable_compile_cache(cache_root)
    results = run_demo(args.out, quick=args.quick, cache_dir=cache_root, progress=not args.no_progress)
    bc = results["methods"]["breadcrumbs"]["avg_normalized_acc"]
    ta = results["methods"]["task_arithmetic"]["avg_normalized_acc"]
    print(f"\nbreadcrumbs {100 * bc:.1f} vs task arithmetic {100 * ta:.1f} (avg normalized accuracy, test); "
          f"report: {os.path.join(args.out, 'report.md')}")
    return 0


def _cmd_methods(args) -> int:
    import bcjax

    for m in bcjax.methods().values():
        print(f"{m!r}\n    {m.summary}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bcjax", description="Model Breadcrumbs and model merging in JAX.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="pretrained ViT → 8 offline fine-tunes → merge with every method → report")
    d.add_argument("--out", default="demo_out", help="output folder (results.json, report.md, PNG plots)")
    d.add_argument("--quick", action="store_true", help="fewer tasks, steps and images (minutes; used by CI)")
    d.add_argument("--cache-dir", default=None, help="cache folder (default $BCJAX_CACHE or ~/.cache/bcjax)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars or stage lines")
    d.set_defaults(fn=_cmd_demo)
    m = sub.add_parser("methods", help="list merge methods and their hyper-parameters")
    m.set_defaults(fn=_cmd_methods)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
