"""End-to-end benchmark of merging checkpoints on disk (SPEC §7): `bcjax merge` vs
`mergekit-yaml` vs `cp`, wall time and peak RSS of each process (os.wait4).

Both tools read the *same* mergekit YAML and the same sharded safetensors folders. Models
are written in the Llama layout (mergekit plans Llama; it cannot plan a bare ViT):

- ``vit``: 8 fine-tunes of a ViT-B/32-sized model — 12 blocks of width 768 with a 2048-wide
  gated MLP (7.08 M parameters per block, exactly a ViT-B/32 block's 4·768² + 2·768·3072),
  86.5 M parameters, float32 (346 MB per model);
- ``big``: 3 fine-tunes of a 3.59 B-parameter bf16 model (hidden 3072, 30 layers, gated MLP
  8192, vocabulary 32000): 7.2 GB per model in two 5 GB shards;
- ``smoke``: tiny shapes for the tests of this script.

Values are synthetic (θ0 ~ N(0, 0.02²), τt ~ N(0, 10⁻⁶) with a heavy tail); only speed and
memory are measured here (agreement is tested in tests/test_checkpoints*.py). mergekit can be
given a time limit (``--mergekit-timeout``): a run that hits it is reported as a lower bound.

    PYTHONPATH=. python bench/checkpoint_merge.py --case vit --workdir /tmp/ckbench --out bench/results/checkpoint_vit.json

The working folder's model files are deleted at the end unless ``--keep``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CASES = {  # hidden, layers, intermediate, vocab, tasks, dtype
    "smoke": dict(hidden=64, layers=2, inter=128, vocab=100, tasks=3, dtype="float32"),
    "vit": dict(hidden=768, layers=12, inter=2048, vocab=1000, tasks=8, dtype="float32"),
    "mid": dict(hidden=2048, layers=6, inter=5632, vocab=32000, tasks=3, dtype="bfloat16"),
    "big": dict(hidden=3072, layers=30, inter=8192, vocab=32000, tasks=3, dtype="bfloat16"),
}
METHODS = {  # the same YAML drives both tools; β = 0.85, γ = 0.99 for Breadcrumbs
    "breadcrumbs": {"parameters": {"lambda": 0.3}, "model": {"weight": 1.0, "density": 0.14, "gamma": 0.01}},
    "ties": {"parameters": {"lambda": 1.0}, "model": {"weight": 1.0, "density": 0.2}},
}


def llama_shapes(hidden, layers, inter, vocab, **_):
    s = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
         "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            s[p + f"self_attn.{n}.weight"] = (hidden, hidden)
        s.update({p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                  p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                  p + "post_attention_layernorm.weight": (hidden,)})
    return s


def write_models(case: dict, folder: str) -> list[str]:
    """θ0 and the fine-tunes as sharded safetensors folders (one tensor in memory at a time)."""
    from bcjax.checkpoints.io import ShardedSafetensorsWriter

    shapes = llama_shapes(**case)
    dtype = np.dtype(ml_dtypes.bfloat16) if case["dtype"] == "bfloat16" else np.dtype(np.float32)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": case["hidden"],
              "num_hidden_layers": case["layers"], "intermediate_size": case["inter"], "vocab_size": case["vocab"],
              "num_attention_heads": max(1, case["hidden"] // 64), "num_key_value_heads": max(1, case["hidden"] // 64),
              "tie_word_embeddings": False, "torch_dtype": case["dtype"]}
    entries = [(k, v, dtype) for k, v in shapes.items()]
    locs, writers = [], []
    for m in range(case["tasks"] + 1):
        d = os.path.join(folder, f"m{m}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(config, f)
        writers.append(ShardedSafetensorsWriter(d, entries, 5 * 10**9))
        locs.append(d)
    # fine-tuning deltas are windows of one heavy-tailed pool (fast to make for 10^10 entries)
    n_max = max(int(np.prod(v)) for v in shapes.values())
    rng = np.random.default_rng(0)
    pool = rng.standard_normal(min(n_max, 1 << 26) + (1 << 20), dtype=np.float32)
    pool *= np.float32(1e-3)
    pool[rng.random(pool.size, dtype=np.float32) < 0.01] *= np.float32(10)
    for j, (k, shape, _) in enumerate(entries):
        n = int(np.prod(shape))
        base = np.random.default_rng(j).standard_normal(n, dtype=np.float32)
        base *= np.float32(0.02)
        for m, w in enumerate(writers):
            a = base.copy() if m else base
            if m:
                start = int(rng.integers(0, pool.size - min(n, pool.size - (1 << 20))))
                delta = pool[start:start + n] if n <= pool.size - start else np.resize(pool[start:], n)
                a += delta
            w.write(j, (a.astype(dtype) if dtype != np.float32 else a).reshape(shape))
            del a
        del base
    for w in writers:
        w.write_index()
    return locs


def write_config(method: str, locs: list[str], path: str) -> None:
    import yaml

    spec = METHODS[method]
    cfg = {"merge_method": method, "base_model": locs[0],
           "models": [{"model": f, "parameters": dict(spec["model"])} for f in locs[1:]],
           "parameters": spec["parameters"]}
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)


def run(cmd: list[str], timeout: float | None = None, env=None, cwd=None) -> dict:
    """Wall seconds and peak RSS (bytes) of one process (and its children it waited for)."""
    import re
    import tempfile

    log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty child never blocks on a full pipe
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=cwd, start_new_session=True)
    timed_out = False
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if timeout is not None and time.perf_counter() - t0 > timeout:
            os.killpg(p.pid, 9)
            pid, status, ru = os.wait4(p.pid, 0)
            timed_out = True
            break
        time.sleep(0.05)
    secs = time.perf_counter() - t0
    log.seek(0)
    err = log.read().decode(errors="replace")
    log.close()
    code = os.waitstatus_to_exitcode(status)
    out = {"cmd": " ".join(cmd[:3]) + " …", "seconds": round(secs, 3),
           "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 3), "peak_rss_bytes": ru.ru_maxrss * 1024,
           "returncode": code, "timed_out": timed_out}
    if code != 0 and not timed_out:
        out["stderr_tail"] = err[-2000:]
    if timed_out:  # how far it got: the last "done/total" of its progress bar
        steps = re.findall(r"(\d+)/(\d+) \[", err)
        if steps:
            done, total = map(int, steps[-1])
            out["progress_at_timeout"] = f"{done}/{total}"
            if done:
                out["extrapolated_seconds"] = round(secs * total / done, 1)
    return out


def drop_page_cache() -> None:
    """Write dirty pages back and drop the kernel's page cache (Linux, needs root), so the next
    run reads its inputs from disk, as a first merge of freshly downloaded checkpoints does."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        raise SystemExit(f"--cold needs root on Linux to write /proc/sys/vm/drop_caches: {e}") from None


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", choices=sorted(CASES), default="smoke")
    ap.add_argument("--workdir", required=True, help="scratch folder (model files are deleted at the end)")
    ap.add_argument("--out", required=True, help="results JSON")
    ap.add_argument("--methods", default="breadcrumbs,ties")
    ap.add_argument("--repeats", type=int, default=1, help="bcjax and cp repeats (median reported)")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every timed run (Linux, root): "
                    "inputs come from disk, as on a first merge; default: whatever the page cache holds")
    ap.add_argument("--mergekit", default=os.path.join(ROOT, ".venv-bench", "bin", "mergekit-yaml"))
    ap.add_argument("--mergekit-timeout", type=float, default=None, help="seconds; a cut run is a lower bound")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the model files")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the models a previous --keep run left in WORKDIR/models (written once; implies --keep)")
    ap.add_argument("--skip", default="", help="comma-separated runs to leave out, e.g. cp_all_inputs (it needs "
                    "as much free disk as all inputs), mergekit")
    ap.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    case = CASES[args.case]
    if args.write_only:  # run in a child so the parent stays small: a forked child's ru_maxrss includes the parent's
        print(json.dumps(write_models(case, os.path.join(args.workdir, "models"))))
        return 0
    os.makedirs(args.workdir, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results = {"case": args.case, "shape": case, "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                           "load_avg_start": os.getloadavg()},
               "runs": {}}
    skip = set(filter(None, args.skip.split(",")))
    keep = args.keep or args.reuse
    marker = os.path.join(args.workdir, "models", f"complete-{args.case}.json")
    try:
        t0 = time.perf_counter()
        if args.reuse and os.path.isfile(marker):
            with open(marker) as f:
                locs = json.load(f)
        else:
            locs = json.loads(subprocess.run([sys.executable, os.path.abspath(__file__), "--case", args.case,
                                              "--workdir", args.workdir, "--out", args.out, "--write-only"],
                                             check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            if keep:
                with open(marker, "w") as f:
                    json.dump(locs, f)
            results["write_seconds"] = round(time.perf_counter() - t0, 1)
        results["bytes_per_model"] = folder_bytes(locs[0])
        results["params"] = int(sum(np.prod(s) for s in llama_shapes(**case).values()))
        py = sys.executable
        results["cold_page_cache"] = args.cold

        def cold():
            if args.cold:
                drop_page_cache()
        cold()
        results["runs"]["interpreter"] = run([py, "-c", "import bcjax.checkpoints, jax.numpy as jnp; jnp.zeros(1)"],
                                             env=env)
        cps = []
        for r in range(args.repeats if "cp_base" not in skip else 0):
            dst = os.path.join(args.workdir, "cp_out")
            cold()
            cps.append(run(["cp", "-r", locs[0], dst]))
            shutil.rmtree(dst, ignore_errors=True)
        if cps:
            results["runs"]["cp_base"] = _median(cps)
        cps = []  # the bytes a merge reads: every input folder
        for r in range(args.repeats if "cp_all_inputs" not in skip else 0):
            dst = os.path.join(args.workdir, "cp_all")
            os.makedirs(dst, exist_ok=True)
            cold()
            cps.append(run(["cp", "-r", *locs, dst]))
            shutil.rmtree(dst, ignore_errors=True)
        if cps:
            results["runs"]["cp_all_inputs"] = _median(cps)
        if "read_all_inputs" not in skip:
            cold()
            results["runs"]["read_all_inputs"] = run(["sh", "-c", "cat " + " ".join(
                os.path.join(d, f) for d in locs for f in os.listdir(d) if f.endswith(".safetensors")) + " > /dev/null"])
        for method in args.methods.split(","):
            cfg = os.path.join(args.workdir, f"{method}.yaml")
            write_config(method, locs, cfg)
            rs = []
            for r in range(args.repeats):
                dst = os.path.join(args.workdir, f"bcjax_{method}")
                cold()
                rs.append(run([py, "-m", "bcjax.cli", "merge", cfg, "--out", dst, "--no-progress"], env=env))
                shutil.rmtree(dst, ignore_errors=True)
            results["runs"][f"bcjax_{method}"] = _median(rs)
            if not args.no_mergekit and "mergekit" not in skip and os.path.exists(args.mergekit):
                dst = os.path.join(args.workdir, f"mergekit_{method}")
                cold()
                results["runs"][f"mergekit_{method}"] = run([args.mergekit, cfg, dst, "--no-copy-tokenizer"],
                                                            timeout=args.mergekit_timeout)
                shutil.rmtree(dst, ignore_errors=True)
        _ratios(results)
    finally:
        if not keep:
            shutil.rmtree(os.path.join(args.workdir, "models"), ignore_errors=True)
    results["machine"]["load_avg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    return 0


def _median(runs: list[dict]) -> dict:
    out = dict(sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2])
    out["all_seconds"] = [r["seconds"] for r in runs]
    return out


def _ratios(results: dict) -> None:
    r = results["runs"]
    base_rss = r["interpreter"]["peak_rss_bytes"]
    for key in list(r):
        if key.startswith("bcjax_"):
            m = key[len("bcjax_"):]
            r[key]["rss_above_interpreter_bytes"] = r[key]["peak_rss_bytes"] - base_rss
            if "cp_base" in r:
                r[key]["vs_cp_base"] = round(r[key]["seconds"] / r["cp_base"]["seconds"], 2)
            if "cp_all_inputs" in r:
                r[key]["vs_cp_all_inputs"] = round(r[key]["seconds"] / r["cp_all_inputs"]["seconds"], 2)
            mk = r.get(f"mergekit_{m}")
            if mk:
                r[key]["speedup_vs_mergekit"] = round(mk["seconds"] / r[key]["seconds"], 1)
                r[key]["cpu_speedup_vs_mergekit"] = round(mk["cpu_seconds"] / max(r[key]["cpu_seconds"], 1e-9), 1)
                if mk["timed_out"]:
                    r[key]["speedup_vs_mergekit_is_lower_bound"] = True


if __name__ == "__main__":
    sys.exit(main())
