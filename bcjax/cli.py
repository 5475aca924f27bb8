"""Command line: ``bcjax demo|finetune|eval|sweep|merge|methods``. The CLI only wires; the work is elsewhere."""
from __future__ import annotations

import argparse
import os
import sys


def _enable_compile_cache(cache_root: str) -> None:
    """Persistent XLA compilation cache under the cache root: a rerun skips recompiling."""
    from bcjax.merging import enable_compilation_cache

    enable_compilation_cache(os.path.join(cache_root, "xla"))


def _cmd_demo(args) -> int:
    from bcjax.demo import run_demo

    cache_root = _cache_root(args)
    _enable_compile_cache(cache_root)
    results = run_demo(args.out, quick=args.quick, cache_dir=cache_root, progress=not args.no_progress)
    bc = results["methods"]["breadcrumbs"]["avg_normalized_acc"]
    ta = results["methods"]["task_arithmetic"]["avg_normalized_acc"]
    print(f"\nbreadcrumbs {100 * bc:.1f} vs task arithmetic {100 * ta:.1f} (avg normalized accuracy, test); "
          f"report: {os.path.join(args.out, 'report.md')}")
    return 0


def _load(args) -> dict:
    from bcjax.config import load_config

    return load_config(args.config, args.set or ())


def _print_summary(summary: dict) -> None:
    import json

    print(json.dumps(summary, indent=2, sort_keys=True, default=str))


def _cmd_finetune(args) -> int:
    cfg = _load(args)
    from bcjax.pipelines import get_pipeline

    _enable_compile_cache(_cache_root(args))
    _print_summary(get_pipeline(cfg).finetune(cfg, out_dir=args.out, progress=not args.no_progress))
    return 0


def _cmd_eval(args) -> int:
    cfg = _load(args)
    from bcjax.pipelines import get_pipeline

    _enable_compile_cache(_cache_root(args))
    _print_summary(get_pipeline(cfg).evaluate(cfg, out_dir=args.out, progress=not args.no_progress))
    return 0


def _cmd_sweep(args) -> int:
    cfg = _load(args)
    from bcjax.experiments import run_sweep

    _enable_compile_cache(_cache_root(args))
    cfg.setdefault("cache_dir", _cache_root(args))  # the model suite's fine-tunes and data live there too
    _print_summary(run_sweep(cfg, out_dir=args.out, progress=not args.no_progress))
    return 0


def _cache_root(args) -> str:
    from bcjax.cache import cache_root

    return os.path.abspath(args.cache_dir) if args.cache_dir else str(cache_root())


def _cmd_methods(args) -> int:
    import bcjax

    for m in bcjax.methods().values():
        print(f"{m!r}\n    {m.summary}")
    return 0


def _cmd_merge(args) -> int:
    """Stream-merge checkpoints on disk (SPEC §7) and print the summary."""
    from bcjax.checkpoints import merge_checkpoints
    from bcjax.config import load_config

    _enable_compile_cache(_cache_root(args))  # reruns skip compiling the per-shape kernels
    summary = merge_checkpoints(load_config(args.config, args.set or ()) if args.set else args.config, args.out,
                                max_shard_size=args.max_shard_size, resume=args.resume,
                                progress=not args.no_progress, workers=args.workers)
    gib = summary["bytes_written"] / 2**30
    print(f"bcjax merge: {summary['tensors']} tensors ({summary['tensors_merged']} merged), {gib:.3f} GiB in "
          f"{summary['shards']} shard(s), {summary['seconds']:.1f} s, peak RSS "
          f"{summary['peak_rss_bytes'] / 2**30:.2f} GiB → {summary['out']}")
    return 0


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="merge config YAML (bcjax form: method/pretrained/finetuned; or mergekit's)")
    p.add_argument("--out", required=True, help="output folder (must not exist; written atomically)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted merge after its last finished shard")
    p.add_argument("--workers", type=int, default=2, help="tensors in flight (reads/merges/writes overlap)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config entry (repeatable)")
    _common_args(p)


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="output folder (results.json, report.md, PNG plots)")
    p.add_argument("--quick", action="store_true", help="fewer tasks, steps and images (minutes; used by CI)")
    _common_args(p)


#: The ``--set`` example of each config command's help: a key that command really reads
#: (a sweep fine-tunes through its suite, so its training keys live under ``suite.train``).
SET_EXAMPLES = {"finetune": "train.steps=100", "eval": "eval.batch_size=64", "sweep": "suite.train.steps=100"}


def _config_args(name: str):
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", required=True, help="YAML file (see configs/)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help=f"override a config entry, e.g. --set {SET_EXAMPLES[name]} (repeatable; an unknown "
                            "key is an error)")
        p.add_argument("--out", default=f"{name}_out", help="output folder")
        _common_args(p)

    return add


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default=None,
                   help="cache folder (default $BCJAX_CACHE, else $XDG_CACHE_HOME/bcjax, else ~/.cache/bcjax)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or stage lines")


#: Subcommands: (name, handler, help, add_arguments). A new subcommand is one handler
#: ``_cmd_x(args) -> int`` and one entry here.
COMMANDS = [
    ("demo", _cmd_demo, "pretrained ViT → 8 offline fine-tunes → merge with every method → report", _demo_args),
    ("finetune", _cmd_finetune, "fine-tune one model per task from a config (CLIP, T5)", _config_args("finetune")),
    ("eval", _cmd_eval, "evaluate pretrained / fine-tuned / merged models from a config", _config_args("eval")),
    ("sweep", _cmd_sweep, "run a merging experiment (subsets, grids, ...) from a config", _config_args("sweep")),
    ("merge", _cmd_merge, "merge checkpoints on disk, streaming (bcjax or mergekit YAML config)", _merge_args),
    ("methods", _cmd_methods, "list merge methods, their hyper-parameters and requirements", lambda p: None),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bcjax", description="Model Breadcrumbs and model merging in JAX.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn, what, add_arguments in COMMANDS:
        c = sub.add_parser(name, help=what)
        add_arguments(c)
        c.set_defaults(fn=fn)
    return p


def check_output_path(out: str, *, must_not_exist: bool = False) -> None:
    """Fail fast (:class:`~bcjax.errors.BcjaxError`, one line) when ``--out`` cannot be written:
    a file where a folder is needed, a path under a file, or a folder where no file can be
    created (read-only file system, no permission). Probed by creating and removing a temporary
    file in ``out`` or in its nearest existing ancestor; nothing else is created."""
    import tempfile

    from bcjax.errors import BcjaxError

    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise BcjaxError(f"--out {out}: exists and is not a folder")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise BcjaxError(f"--out {out}: {probe} is not a folder")
    if must_not_exist and probe == path and os.listdir(path):
        return  # the command itself says what to do with an existing output (e.g. --resume)
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".bcjax-write-probe-"):
            pass
    except OSError as e:
        raise BcjaxError(f"--out {out}: cannot write in {probe} ({e.strerror or e})") from None


def main(argv=None) -> int:
    from bcjax.errors import BcjaxError

    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "out", None) is not None:
            check_output_path(args.out, must_not_exist=args.command == "merge")
        return args.fn(args)
    except BcjaxError as e:  # bad input: one clear line, no traceback
        print(f"bcjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file that cannot be written (read-only, no permission, a file in the way)
        if e.filename is None or isinstance(e, FileNotFoundError):
            raise
        print(f"bcjax {args.command}: error: cannot write {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
