"""Paper-scale plans without a hub (issue 16, item 5): per-device memory and FLOPs of the
real programs, from ahead-of-time compilation on CPU.

For CLIP ViT-B/32, ViT-B/16, ViT-L/14 (vision tower, batch 128, 224 px, 397 classes — the
largest of the eight tasks, SUN397 — float32 as configs/clip_*.yaml) and T5-base (batch 32,
512 input tokens, 8 target tokens), the architectures are built from transformers configs
with the published hyper-parameters and *abstract* random weights (``jax.eval_shape``: no
memory, no hub). Three programs are lowered and compiled for a data-parallel mesh of 1, 8
and 32 (fake CPU) devices, exactly as bcjax runs them:

``train``
    :func:`bcjax.train._train_step` (AdamW + clipping, the paper's schedule, SPEC §5) with
    parameters and optimizer state replicated and the batch sharded over ``data``, as
    :func:`bcjax.train.finetune` does. CLIP's loss is :func:`bcjax.models.clip.make_classifier`'s
    (frozen zero-shot head), T5's :meth:`bcjax.models.t5.T5Functions.loss`.
``eval``
    CLIP: :func:`bcjax.evaluate._correct_stack` (``accuracy_of_stack``'s step: 2 merged models
    per call, batch 128, as configs/clip_*.yaml); T5: rank classification
    (:func:`bcjax.models.t5.jit_rank_scores`, 2 label strings). Batch sharded over ``data``.
``merge256`` / ``merge_chunk``
    The subset sweep's merge kernel (:func:`bcjax.grids.subset_merge_kernel`: θ0 + α ·
    indicator @ Δ per leaf) over 8 tasks, with Δ sharded over the mesh as
    :func:`bcjax.experiments.subset_sweep` does (``leaf_shardings``, first divisible axis):
    all 2^8 = 256 subsets in one call, and one chunk of ``models_per_call`` (2) subsets —
    what the sweep actually runs per call.

Reported per program and device count: ``compiled.memory_analysis()`` (per device:
arguments, outputs, temporaries, aliased, XLA's peak estimate) and ``cost_analysis()``
(per-device FLOPs and bytes accessed), plus lowering and compile times. The numbers are
XLA:CPU's: a GPU/TPU compilation fuses differently, so temporaries differ there; argument
and output sizes and FLOPs carry over. Each (model, device count) runs in its own process
(``jax_num_cpu_devices`` is fixed at backend start).

    python bench/plans.py --models vit_b_32                # 1, 8, 32 devices; updates the JSON
    python bench/plans.py --models vit_b_32 --devices 8 --programs merge256 --no-write
    python bench/plans.py --table                          # print the README table from the JSON
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "plans.json")

#: transformers CLIPVisionConfig fields of OpenAI's three CLIP vision towers (their config.json).
CLIP_VISION = {
    "vit_b_32": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     patch_size=32, projection_dim=512),
    "vit_b_16": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     patch_size=16, projection_dim=512),
    "vit_l_14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     patch_size=14, projection_dim=768),
}
#: google-t5/t5-base's config.json (T5 v1.0: ReLU FFN, tied embeddings).
T5_BASE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12,
               relative_attention_num_buckets=32, feed_forward_proj="relu", tie_word_embeddings=True,
               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
MODELS = ("vit_b_32", "vit_b_16", "vit_l_14", "t5_base")
PROGRAMS = ("train", "eval", "merge256", "merge_chunk")
DEVICES = (1, 8, 32)
IMAGE_SIZE, CLIP_BATCH, NUM_CLASSES = 224, 128, 397
T5_BATCH, T5_INPUT_LEN, T5_TARGET_LEN, T5_CHOICES = 32, 512, 8, 2
NUM_TASKS, MODELS_PER_CALL = 8, 2


# ----------------------------------------------------------------------------- model setups
def _abstract(tree, sharding):
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def clip_setup(name: str, image_size: int = IMAGE_SIZE, batch: int = CLIP_BATCH, num_classes: int = NUM_CLASSES,
               vision_overrides: dict | None = None):
    """(vision config, abstract ``{"vision_model": ...}`` tree, predict, loss, head-argument
    shapes, batch shapes) of a CLIP vision tower — random weights, nothing allocated."""
    import jax
    import jax.numpy as jnp
    from transformers import CLIPVisionConfig, FlaxCLIPVisionModel

    from bcjax.models import clip as clip_lib

    vcfg = CLIPVisionConfig(image_size=image_size, hidden_act="quick_gelu",
                            **{**CLIP_VISION.get(name, {}), **(vision_overrides or {})})
    params = FlaxCLIPVisionModel(vcfg, _do_init=False).params_shape_tree  # jax.eval_shape of init
    predict, loss = clip_lib.make_classifier(vcfg, jnp.float32)
    f32 = jnp.float32
    heads = (jax.ShapeDtypeStruct((vcfg.hidden_size, vcfg.projection_dim), f32),  # visual projection
             jax.ShapeDtypeStruct((), f32),                                          # logit scale
             jax.ShapeDtypeStruct((num_classes, vcfg.projection_dim), f32),          # zero-shot head
             jax.ShapeDtypeStruct((num_classes,), jnp.bool_))                        # padded-class mask
    batch_shapes = {"x": ((batch, image_size, image_size, 3), jnp.uint8), "y": ((batch,), jnp.int32)}
    return vcfg, dict(params), predict, loss, heads, batch_shapes


def t5_setup(config_overrides: dict | None = None):
    """(T5Functions, abstract parameter tree) of T5-base with random weights."""
    from transformers import FlaxT5ForConditionalGeneration, T5Config

    from bcjax.models import t5 as t5m

    t5m.install_clip_shim()
    cfg = T5Config(**{**T5_BASE, **(config_overrides or {})})
    model = FlaxT5ForConditionalGeneration(cfg, _do_init=False)
    return t5m.t5_functions(model), model.params_shape_tree


def random_like(tree, key, scale: float = 0.02):
    """Concrete arrays for an abstract tree (e.g. :attr:`Planned.args`), placed as each
    leaf's ``sharding`` says: floats ~ N(0, scale²), bools True, uint8 uniform in [0, 256),
    other integers uniform in [0, 5)."""
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree.flatten(tree)
    out = []
    for i, x in enumerate(leaves):
        k = jax.random.fold_in(key, i)
        if jnp.issubdtype(x.dtype, jnp.floating):
            v = (scale * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
        elif x.dtype == jnp.bool_:
            v = jnp.ones(x.shape, bool)
        elif x.dtype == jnp.uint8:
            v = jax.random.randint(k, x.shape, 0, 256, jnp.int32).astype(jnp.uint8)
        else:
            v = jax.random.randint(k, x.shape, 0, 5, jnp.int32).astype(x.dtype)
        out.append(jax.device_put(v, x.sharding) if getattr(x, "sharding", None) is not None else v)
    return jax.tree.unflatten(treedef, out)


def _flops_6nd(params, tokens: int) -> float:
    """The usual training-FLOP rule of thumb 6 · parameters · tokens (no attention term)."""
    import jax
    import numpy as np

    return 6.0 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) * tokens


# ----------------------------------------------------------------------------- lowering
@dataclasses.dataclass
class Planned:
    """One lowered program: ``lowered`` (``jax.stages.Lowered``), ``args`` (its non-static
    arguments as ``ShapeDtypeStruct`` with shardings, in call order: the compiled program
    takes concrete arrays shaped and placed like them) and ``info`` (what it computes)."""

    lowered: Any
    args: tuple
    info: dict


def _planned(fn, static: tuple, args: tuple, info: dict) -> Planned:
    return Planned(fn.lower(*static, *args), args, info)


def lowered_programs(model: str, mesh, programs=PROGRAMS, *, small: dict | None = None) -> dict:
    """{program: :class:`Planned`} for ``model`` on ``mesh`` (axis ``data``).

    ``small`` (tests only) overrides the architecture/batch for a cheap compile:
    ``{"vision": {...CLIPVisionConfig fields}, "image_size": .., "batch": .., "classes": ..}``
    or ``{"t5": {...T5Config fields}, "batch": .., "input_len": ..}``.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from bcjax import evaluate, grids, train
    from bcjax.models import t5 as t5m

    small = small or {}
    rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    tx = train.make_optimizer(train.TrainConfig())
    out = {}
    if model.startswith("vit"):
        vcfg, params, predict, loss, heads, batch_shapes = clip_setup(
            model, small.get("image_size", IMAGE_SIZE), small.get("batch", CLIP_BATCH),
            small.get("classes", NUM_CLASSES), small.get("vision"))
        batch = {k: jax.ShapeDtypeStruct(s, d, sharding=data) for k, (s, d) in batch_shapes.items()}
        tokens = batch["x"].shape[0] * ((vcfg.image_size // vcfg.patch_size) ** 2 + 1)
        heads = tuple(jax.ShapeDtypeStruct(h.shape, h.dtype, sharding=rep) for h in heads)
        if "train" in programs:
            p, opt = _abstract(params, rep), _abstract(jax.eval_shape(tx.init, params), rep)
            out["train"] = _planned(train._train_step, (loss, tx), (p, opt, batch, heads),
                                    {"flops_6nd": _flops_6nd(params, tokens), "batch": batch["x"].shape[0]})
        if "eval" in programs:
            stacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct((MODELS_PER_CALL,) + x.shape, x.dtype,
                                                                  sharding=rep), params)
            valid = jax.ShapeDtypeStruct(batch["y"].shape, jnp.bool_, sharding=data)
            out["eval"] = _planned(evaluate._correct_stack, (predict,), (stacked, batch["x"], batch["y"], valid, heads),
                                   {"models_per_call": MODELS_PER_CALL, "batch": batch["x"].shape[0]})
    else:
        fns, params = t5_setup(small.get("t5"))
        b, lin = small.get("batch", T5_BATCH), small.get("input_len", T5_INPUT_LEN)
        i32 = jnp.int32
        batch = {"input_ids": jax.ShapeDtypeStruct((b, lin), i32, sharding=data),
                 "attention_mask": jax.ShapeDtypeStruct((b, lin), i32, sharding=data),
                 "labels": jax.ShapeDtypeStruct((b, T5_TARGET_LEN), i32, sharding=data),
                 "label_mask": jax.ShapeDtypeStruct((b, T5_TARGET_LEN), i32, sharding=data)}
        if "train" in programs:
            p, opt = _abstract(params, rep), _abstract(jax.eval_shape(tx.init, params), rep)
            out["train"] = _planned(train._train_step, (fns.loss, tx), (p, opt, batch, ()), {"batch": b})
        if "eval" in programs:
            choices = jax.ShapeDtypeStruct((T5_CHOICES, T5_TARGET_LEN), i32, sharding=rep)
            out["eval"] = _planned(t5m.jit_rank_scores, (fns,), (_abstract(params, rep), batch["input_ids"],
                                                                 batch["attention_mask"], choices, choices),
                                   {"choices": T5_CHOICES, "batch": b})
    for prog, subsets in (("merge256", 2 ** NUM_TASKS), ("merge_chunk", MODELS_PER_CALL)):
        if prog not in programs:
            continue
        deltas = jax.tree.map(lambda x: jax.ShapeDtypeStruct((NUM_TASKS,) + x.shape, x.dtype), params)
        d_sh = grids.leaf_shardings(deltas, mesh, "data", skip_leading=1)
        kernel = grids.subset_merge_kernel(in_shardings=(jax.tree.map(lambda _: rep, params), d_sh, rep, rep))
        deltas = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), deltas, d_sh)
        indicator = jax.ShapeDtypeStruct((subsets, NUM_TASKS), jnp.bool_, sharding=rep)
        alpha = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
        out[prog] = _planned(kernel, (), (_abstract(params, rep), deltas, indicator, alpha),
                             {"subsets": subsets, "tasks": NUM_TASKS})
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    for planned in out.values():
        planned.info["params"] = n_params
    return out


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    cost = cost or {}
    return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "transcendentals": float(cost.get("transcendentals", 0.0))}


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes", "peak_memory_in_bytes")
    out = {k.replace("_in_bytes", "_bytes"): int(getattr(m, k, 0) or 0) for k in keys}
    out["total_bytes"] = (out["argument_size_bytes"] + out["output_size_bytes"] - out["alias_size_bytes"]
                          + out["temp_size_bytes"])
    return out


def plan(model: str, num_devices: int, programs=PROGRAMS, *, compile_programs: bool = True,
         small: dict | None = None, log=print) -> list[dict]:
    """Rows for ``model`` on the first ``num_devices`` devices (this process's)."""
    import jax

    from bcjax.train import data_mesh

    devices = jax.devices()
    if len(devices) < num_devices:
        raise SystemExit(f"{num_devices} devices asked for, {len(devices)} present "
                         f"(run through plans.py's driver, which sets jax_num_cpu_devices)")
    mesh = data_mesh(devices[:num_devices])
    t0 = time.perf_counter()
    lowered = lowered_programs(model, mesh, programs, small=small)
    t_lower = time.perf_counter() - t0
    rows = []
    for prog, planned in lowered.items():
        row = {"model": model, "devices": num_devices, "program": prog, **planned.info,
               "lower_s_all_programs": t_lower}
        if compile_programs:
            t0 = time.perf_counter()
            compiled = planned.lowered.compile()
            row["compile_s"] = time.perf_counter() - t0
            row["memory_per_device"] = _memory(compiled)
            row["cost_per_device"] = _cost(compiled)
            del compiled
            mem = row["memory_per_device"]
            log(f"  {model:9s} {num_devices:3d} dev  {prog:11s} per device: "
                f"args {mem['argument_size_bytes'] / 2**30:7.3f} GiB  out {mem['output_size_bytes'] / 2**30:7.3f}  temp {mem['temp_size_bytes'] / 2**30:7.3f}"
                f"  total {mem['total_bytes'] / 2**30:7.3f} GiB  {row['cost_per_device']['flops'] / 1e12:8.3f} TFLOP"
                f"  (compile {row['compile_s']:.1f} s)")
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- driver
def _child(args) -> None:
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices_child)
    rows = plan(args.models_child, args.devices_child, args.programs.split(","),
                log=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps(rows))


def run_child(model: str, ndev: int, programs: str) -> list[dict]:
    cmd = [sys.executable, os.path.abspath(__file__), "--_model", model, "--_devices", str(ndev),
           "--programs", programs]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False, cwd=ROOT, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{model} on {ndev} devices failed (exit {res.returncode}): {' '.join(cmd)}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _gib(b) -> str:
    return f"{b / 2**30:.2f}"


def markdown_table(rows: list[dict]) -> str:
    """The README's table: one row per (model, program), memory and FLOPs per device at each
    device count."""
    counts = sorted({r["devices"] for r in rows})
    order = {m: i for i, m in enumerate(MODELS)}
    porder = {p: i for i, p in enumerate(PROGRAMS)}
    keyed = {(r["model"], r["program"], r["devices"]): r for r in rows if "memory_per_device" in r}
    head = ["model", "program", "params (M)"]
    head += [f"{n} dev: GiB/device" for n in counts] + [f"{n} dev: TFLOP/device" for n in counts]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (2 * len(counts))]
    names = {"train": "fine-tuning step", "eval": "evaluation step", "merge256": "merge, 256 subsets",
             "merge_chunk": f"merge, {MODELS_PER_CALL} subsets"}
    for model, prog in sorted({(r["model"], r["program"]) for r in rows},
                              key=lambda mp: (order.get(mp[0], 99), porder.get(mp[1], 99))):
        cells = [model, names.get(prog, prog)]
        some = next((keyed[(model, prog, n)] for n in counts if (model, prog, n) in keyed), None)
        cells.append(f"{some['params'] / 1e6:.1f}" if some else "–")
        for n in counts:
            r = keyed.get((model, prog, n))
            cells.append(_gib(r["memory_per_device"]["total_bytes"]) if r else "–")
        for n in counts:
            r = keyed.get((model, prog, n))
            cells.append(f"{r['cost_per_device']['flops'] / 1e12:.3g}" if r else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_results(path: str = RESULTS) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"rows": []}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--devices", default=",".join(map(str, DEVICES)))
    ap.add_argument("--programs", default=",".join(PROGRAMS))
    ap.add_argument("--out", default=RESULTS, help="JSON (rows are merged into an existing file); a .md beside it")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--table", action="store_true", help="only print the markdown table of --out")
    ap.add_argument("--_model", dest="models_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_devices", dest="devices_child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.models_child:
        return _child(args)
    result = load_results(args.out)
    if args.table:
        print(markdown_table(result["rows"]))
        return result
    for model in args.models.split(","):
        if model not in MODELS:
            raise SystemExit(f"unknown model {model!r}: one of {MODELS}")
        for ndev in (int(n) for n in args.devices.split(",")):
            t0 = time.perf_counter()
            rows = run_child(model, ndev, args.programs)
            print(f"{model} × {ndev} devices: {time.perf_counter() - t0:.0f} s", flush=True)
            fresh = {(r["model"], r["devices"], r["program"]): r for r in rows}
            result["rows"] = [r for r in result["rows"] if (r["model"], r["devices"], r["program"]) not in fresh]
            result["rows"] += list(fresh.values())
            if not args.no_write:
                import jax

                result["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                     "python": platform.python_version(), "jax": jax.__version__}
                result["time"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
                result["settings"] = {"image_size": IMAGE_SIZE, "clip_batch": CLIP_BATCH, "classes": NUM_CLASSES,
                                      "t5_batch": T5_BATCH, "t5_input_len": T5_INPUT_LEN,
                                      "t5_target_len": T5_TARGET_LEN, "tasks": NUM_TASKS,
                                      "models_per_call": MODELS_PER_CALL, "dtype": "float32"}
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=2)
                with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
                    f.write(markdown_table(result["rows"]) + "\n")
    print(markdown_table(result["rows"]))
    return result


if __name__ == "__main__":
    main()
