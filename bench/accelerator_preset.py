"""The demo's accelerator preset (``bcjax demo --preset accelerator``) compiled at full shape.

Lowers and compiles the preset's two device programs (``bcjax.demo.accelerator_programs``:
one AdamW fine-tuning step of 128 images at 224 px, and one evaluation call of
``models_per_call`` stacked models on ``eval_batch`` images) for the default backend from
abstract arguments — no weights, no data — and prints each program's per-device memory
(``compiled.memory_analysis()``), XLA's FLOP count and the compile time; ``--out FILE``
writes them as JSON. On a CPU-only machine this checks the programs compile and sizes them;
on a GPU/TPU it gives the device's own figures.

    python bench/accelerator_preset.py [--out bench/results/accelerator_preset.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's bcjax


def main() -> None:
    import jax
    from bcjax.demo import DemoConfig, accelerator_programs
    from bcjax.models import dinov2

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = DemoConfig.accelerator()
    vits14 = dinov2.vits14_config()  # the shapes are all the programs need
    t0 = time.perf_counter()
    progs = accelerator_programs(vits14, cfg)
    out = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "backend": jax.default_backend(),
           "devices": [str(d) for d in jax.devices()], "machine": platform.platform(), "jax": jax.__version__,
           "preset": {"resolution": cfg.resolution, "batch": cfg.train.batch_size, "steps": cfg.train.steps,
                      "eval_batch": cfg.eval_batch, "models_per_call": cfg.models_per_call},
           "lower_s": round(time.perf_counter() - t0, 2), "programs": {}}
    for name, lowered in progs.items():
        t0 = time.perf_counter()
        compiled = lowered.compile()
        m = compiled.memory_analysis()
        row = {"compile_s": round(time.perf_counter() - t0, 2), "flops": float(lowered.cost_analysis()["flops"]),
               "memory_bytes": {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                               "temp_size_in_bytes", "generated_code_size_in_bytes")
                                if m is not None and hasattr(m, k)}}
        out["programs"][name] = row
        print(name, json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
