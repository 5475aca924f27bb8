"""Time the planned ViT-B/32 programs on an accelerator, next to their XLA estimates
(issue 16, item 5: "run the ViT-B/32 step there and record step time next to the estimate").

The programs are exactly bench/plans.py's (:func:`bench.plans.lowered_programs` on a
one-device mesh): the fine-tuning step (:func:`bcjax.train._train_step`, AdamW, batch 128,
224 px, float32 as configs/clip_vit_b32.yaml), the evaluation step (2 models per call,
batch 128) and one chunk of the subset-sweep merge kernel (2 subsets of 8 tasks). Each is
compiled ahead of time on the device, its ``memory_analysis()`` / ``cost_analysis()`` are
recorded, and the compiled executable is run on random weights and data resident on the
device: warm-up, then ``--steps`` timed calls (each synchronised), median reported, with
achieved TFLOP/s = XLA's FLOP count ÷ median time.

Needs transformers 4.57.x (its Flax CLIP). On a machine whose transformers is 5.x (no Flax
models), install these wheels into a separate folder first and put it ahead on the path::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site \\
        .whl/transformers-4.57.6-*.whl .whl/huggingface_hub-0.36.2-*.whl .whl/tokenizers-0.22.2-*.whl
    PYTHONPATH=/tmp/site:. python3 bench/gpu_step.py --out $OUT/gpu_step.json

(tokenizers 0.22.x because transformers 4.57.6 checks ``tokenizers>=0.22.0,<=0.23.0`` at
import whenever tokenizers is installed; huggingface_hub < 1.0 likewise.)

    python bench/gpu_step.py --small --out /tmp/gpu_step.json   # CPU smoke run, tiny shapes
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

#: A tiny stand-in for CPU smoke runs (same code path, seconds to compile).
SMALL = {"vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        patch_size=8, projection_dim=16), "image_size": 32, "batch": 8, "classes": 5}


def _require_transformers():
    try:
        import transformers
        from transformers import FlaxCLIPVisionModel  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            f"bench/gpu_step.py needs transformers 4.57.x with its Flax models ({e}). Install the wheels "
            "transformers==4.57.6, huggingface_hub==0.36.2 and tokenizers==0.22.2 with pip --no-deps --target "
            "DIR and run with PYTHONPATH=DIR:. (see this file's docstring)") from None
    return transformers.__version__


def time_calls(fn, steps: int, warmup: int = 2) -> dict:
    import jax

    t0 = time.perf_counter()
    for _ in range(warmup):
        jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return {"median_s": float(np.median(times)), "min_s": float(np.min(times)), "times_s": times,
            "warmup_s": first, "warmup_calls": warmup}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--programs", default="train,eval,merge_chunk")
    ap.add_argument("--small", action="store_true", help="tiny CLIP (CPU smoke run)")
    args = ap.parse_args(argv)
    tf_version = _require_transformers()
    import jax
    import jax.numpy as jnp

    if jax.default_backend() != "cpu":
        os.environ.setdefault("BCJAX_NATIVE", "0")  # the native kernel is CPU-only: skip its build
    from bench import plans
    from bcjax.train import data_mesh

    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", str(dev))
    print(f"device: {kind} ({jax.default_backend()}), jax {jax.__version__}, transformers {tf_version}", flush=True)
    mesh = data_mesh([dev])
    programs = args.programs.split(",")
    t0 = time.perf_counter()
    lowered = plans.lowered_programs("vit_b_32", mesh, programs, small=SMALL if args.small else None)
    t_lower = time.perf_counter() - t0
    key = jax.random.PRNGKey(0)
    rows = []
    for i, (prog, planned) in enumerate(lowered.items()):
        t0 = time.perf_counter()
        compiled = planned.lowered.compile()
        compile_s = time.perf_counter() - t0
        mem, cost = plans._memory(compiled), plans._cost(compiled)
        concrete = plans.random_like(planned.args, jax.random.fold_in(key, i))
        if prog == "train":  # donated parameters and optimizer state: feed the outputs back
            state = {"args": list(concrete)}

            def call():
                p, o, loss = compiled(*state["args"])
                state["args"][0], state["args"][1] = p, o
                return loss
        else:
            def call(concrete=concrete):
                return compiled(*concrete)
        t = time_calls(call, args.steps)
        flops = cost["flops"]
        row = {"program": prog, **planned.info, "compile_s": compile_s, "memory": mem, "cost": cost, **t,
               "achieved_tflops": flops / t["median_s"] / 1e12 if flops else None}
        rows.append(row)
        print(f"  {prog:11s} median {t['median_s'] * 1e3:9.2f} ms  (min {t['min_s'] * 1e3:.2f})  "
              f"XLA estimate {flops / 1e12:.4g} TFLOP → {row['achieved_tflops'] or 0:.4g} TFLOP/s  "
              f"memory (args+out−alias+temp) {mem.get('total_bytes', 0) / 2**30:.2f} GiB  compile {compile_s:.1f} s",
              flush=True)
        del compiled, concrete
    result = {"device": {"device_kind": kind, "platform": jax.default_backend(), "jax": jax.__version__,
                         "transformers": tf_version},
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
              "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "small": args.small, "steps": args.steps,
              "dtype": "float32", "lower_s": t_lower, "rows": rows}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
