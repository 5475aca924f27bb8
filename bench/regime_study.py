"""Regime study of the embedded DINOv2 suite (issue 13, Deliver 1; criteria in docs/regime.md).

Measures, without ever merging anything:

* M1 — per input resolution: pretrained k-shot prototype-head accuracy on the validation
  split of every task (k = 16 and 32), and seconds per image of the batched forward pass
  and per fine-tuning step (batch 32) on this machine;
* M2 — at the resolutions the budget rule D1 admits (best 1–2 by M1) and, for
  information, the lowest one it rejects: fine-tuned validation accuracy, ‖τ‖/‖θ0‖ and
  seconds per step for a few fixed recipes on three fixed tasks;
* M3 — the largest test sets the sources allow.

The decision rules D1–D3 of docs/regime.md are applied here mechanically and their outcome
is written to the JSON next to the measurements. Results are written after every stage, so
an interrupted run keeps what it measured.

Run from the repository root (about 30–40 CPU-minutes on 2 cores)::

    PYTHONPATH=. python bench/regime_study.py --out bench/results/regime_study.json

``--smoke`` runs a tiny version (2 tasks, 28 px, a few steps) to check the script.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bcjax.data.suite import SUITE_TASKS, TASK_INFO, load_suite, load_task
from bcjax.models import dinov2
from bcjax.models import heads as heads_lib
from bcjax.train import TrainConfig, _train_step, batch_indices, finetune, make_optimizer

# ---- fixed by docs/regime.md §1 (before any measurement) ---------------------------------
RESOLUTIONS = (28, 42, 56, 84)
K_SHOTS = (16, 32)
M2_TASKS = ("fashion_mnist", "font_letters")
M2_LEARNING_RATES = (1e-5, 3e-5, 1e-4)
BATCH = 32
HEAD_SCALE = 20.0
MAX_VAL = 200
BUDGET_FINETUNE_S_PER_TASK = 60.0  # 8 tasks -> 8 of the 20 default minutes
BUDGET_EVAL_S = 600.0  # 10 of the 20 default minutes
MIN_STEPS = 40
EVAL_PLAN = dict(n_test_cap=1000, val_grid_merges=25, n_val=100, methods=8, linear_methods=2,
                 subsets=40, subset_images=200)
D2_KMAX_MIN_GAIN = 0.02
D2_TIE = 0.01
D3_GAIN_FRACTION = 0.75
EVAL_BATCH = 128
# Unloaded anchors (docs/regime.md D1): measured on this machine at load average 0.4
# (2026-11-29 23:41 UTC, before the criteria were written): forward 2.93 ms per image at
# 28 px (batch 64), one fine-tuning step 1.33 s at 42 px (batch 32). The study measures
# every resolution's cost *relative* to these, side by side, and scales by them.
ANCHOR_FWD_S_28 = 2.93e-3
ANCHOR_STEP_S_42 = 1.33


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _rel_norm(params, params0) -> float:
    """‖θ − θ0‖₂ / ‖θ0‖₂ over every leaf (the whole backbone)."""
    num = sum(float(jnp.sum((jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)) ** 2))
              for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params0)))
    den = sum(float(jnp.sum(jnp.asarray(b, jnp.float32) ** 2)) for b in jax.tree.leaves(params0))
    return math.sqrt(num / den)


def _features(feats_jit, params, x, batch=EVAL_BATCH):
    """Features of ``x`` in fixed-size (padded) batches; returns (features, seconds per image
    excluding the first batch, which may include compilation)."""
    out, times = [], []
    for s in range(0, len(x), batch):
        xb = x[s:s + batch]
        n = len(xb)
        if n < batch:
            xb = np.concatenate([xb, np.repeat(xb[-1:], batch - n, axis=0)])
        t = time.perf_counter()
        f = np.asarray(feats_jit(params, xb))
        times.append((time.perf_counter() - t) / batch)
        out.append(f[:n])
    return np.concatenate(out), times


def _head(features, labels, num_classes, k, seed=0):
    idx = heads_lib.k_shot_indices(labels, num_classes, k, seed=seed)
    return heads_lib.prototype_head(features[idx], labels[idx], num_classes)


def _head_accuracy(head, features, labels) -> float:
    f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    return float(np.mean(np.argmax(f @ head.T, axis=1) == labels))


def _loss_fn(feats):
    def loss(params, batch, head_w, head_valid):
        logits = heads_lib.cosine_logits(feats(params, batch["x"]), head_w, head_valid, HEAD_SCALE)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss


def _interleaved_timing(feats_jit, loss, params0, step_inputs, rounds=3):
    """Seconds per image (forward, batch EVAL_BATCH) and per fine-tuning step (batch BATCH)
    for every resolution: ``rounds`` interleaved passes over the resolutions, minimum over
    rounds (the least load-disturbed estimate on a shared machine; medians kept too).
    Every function is compiled (and run once) before the timed rounds."""
    tx = make_optimizer(TrainConfig(steps=100, batch_size=BATCH, learning_rate=1e-5, warmup_steps=10))
    state, fwd, step = {}, {r: [] for r in step_inputs}, {r: [] for r in step_inputs}
    for r, (x, y, head) in step_inputs.items():
        params = jax.tree.map(lambda a: jnp.array(a, copy=True), params0)
        state[r] = [params, tx.init(params), {"x": jnp.asarray(x), "y": jnp.asarray(y)},
                    tuple(jnp.asarray(h) for h in head),
                    np.resize(np.asarray(x), (EVAL_BATCH,) + x.shape[1:])]
        p, o, lv = _train_step(loss, tx, state[r][0], state[r][1], state[r][2], state[r][3])
        lv.block_until_ready()
        state[r][0], state[r][1] = p, o
        np.asarray(feats_jit(params0, state[r][4]))
    for _ in range(rounds):
        for r in step_inputs:
            t0 = time.perf_counter()
            np.asarray(feats_jit(params0, state[r][4]))
            fwd[r].append((time.perf_counter() - t0) / EVAL_BATCH)
            t0 = time.perf_counter()
            p, o, lv = _train_step(loss, tx, state[r][0], state[r][1], state[r][2], state[r][3])
            lv.block_until_ready()
            step[r].append(time.perf_counter() - t0)
            state[r][0], state[r][1] = p, o
    return {r: dict(s_per_image_forward=float(min(fwd[r])), s_per_image_forward_median=float(np.median(fwd[r])),
                    s_per_step=float(min(step[r])), s_per_step_median=float(np.median(step[r])),
                    rounds=rounds, loadavg=os.getloadavg()) for r in step_inputs}


def cost_model(t_fwd: float, t_step: float, n_test: dict, plan=EVAL_PLAN) -> dict:
    """docs/regime.md D1: fine-tuning steps allowed and evaluation seconds of the minimum plan."""
    sum_test = sum(min(n, plan["n_test_cap"]) for n in n_test.values())
    forwards = (2 * sum_test + plan["val_grid_merges"] * 8 * plan["n_val"] + plan["methods"] * sum_test
                + plan["linear_methods"] * plan["subsets"] * 8 * plan["subset_images"])
    steps = int(BUDGET_FINETUNE_S_PER_TASK / t_step) // 10 * 10
    eval_s = forwards * t_fwd
    return dict(eval_forwards=forwards, eval_s=round(eval_s, 1), finetune_steps_allowed=steps,
                finetune_s_8_tasks=round(8 * steps * t_step, 1),
                passes=bool(steps >= MIN_STEPS and eval_s <= BUDGET_EVAL_S),
                fails=[w for w, bad in (("finetune", steps < MIN_STEPS), ("eval", eval_s > BUDGET_EVAL_S)) if bad])


def _m2_runs(r, recipes, k, m2_tasks, max_val, smoke, feats_jit, loss, params0, log, on_run):
    """M2 at resolution ``r``: for each task and recipe (lr, steps), fine-tune the backbone
    with the frozen k-shot head; ``on_run(results_so_far)`` after every run."""
    suite = load_suite(m2_tasks, resolution=r, max_train=1000 if not smoke else 40, max_val=max_val,
                       max_test=10 if not smoke else None)
    res_out = {}
    for t in suite:
        xtr, ytr = t.splits["train"]
        xva, yva = t.splits["val"]
        ftr, _ = _features(feats_jit, params0, xtr)  # head: k per class of the demo-size train split
        head = _head(ftr, ytr, t.num_classes, k)
        hw, hv = heads_lib.pad_head(head, 10)
        fva, _ = _features(feats_jit, params0, xva)
        pre = _head_accuracy(head, fva, yva)
        runs = []
        for lr, s in recipes:
            cfg = TrainConfig(steps=s, batch_size=BATCH, learning_rate=lr, weight_decay=0.1,
                              warmup_steps=max(s // 10, 1), seed=0)
            t0 = time.perf_counter()
            res = finetune(loss, params0, {"x": xtr, "y": ytr}, cfg, progress=False, loss_args=(hw, hv))
            wall = time.perf_counter() - t0
            fva_ft, _ = _features(feats_jit, res.params, xva)
            acc = _head_accuracy(head, fva_ft, yva)
            runs.append(dict(lr=lr, steps=s, batch=BATCH, val_acc=acc, gain=acc - pre,
                             rel_tau_norm=_rel_norm(res.params, params0), wall_s=round(wall, 1),
                             final_loss=res.losses[-1], loadavg=os.getloadavg()))
            log(f"M2 r={r} {t.name} lr={lr} steps={s}: val {pre:.3f} -> {acc:.3f}, "
                f"|tau|/|theta0| {runs[-1]['rel_tau_norm']:.2e}, {wall:.0f}s")
            res_out[t.name] = dict(pretrained_val_acc=pre, runs=runs)
            on_run(res_out)
    return res_out


def followup(path: str, resolution: int, lrs, steps: int, k: int):
    """Extra M2 recipes at one resolution, appended to ``path`` under ``m2_followup``."""
    with open(path) as f:
        out = json.load(f)
    model_config, params0 = dinov2.load_pretrained()
    feats = dinov2.make_features(model_config)

    def on_run(res_out):
        out.setdefault("m2_followup", {})[str(resolution)] = dict(steps=steps, k=k, tasks=res_out)
        out["updated"] = _now()
        with open(path, "w") as f:
            json.dump(out, f, indent=2)

    _m2_runs(resolution, [(lr, steps) for lr in lrs], k, tuple(out["criteria"]["m2_tasks"]),
             out["criteria"]["max_val"], False, jax.jit(feats), _loss_fn(feats), params0,
             lambda msg: print(f"[{_now()}] {msg}", flush=True), on_run)


def render_markdown(r: dict) -> str:
    """The candidate tables of docs/regime.md from a (possibly partial) results JSON."""
    lines = []
    m1 = r.get("m1", {})
    if m1:
        ks = list(next(iter(m1.values()))["avg"])
        tasks = list(next(iter(m1.values()))["per_task"])
        lines += ["| px | " + " | ".join(f"avg val acc {k}" for k in ks) + " | fwd ms/img (anchored; raw min) "
                  "| step s (anchored; raw min) | eval plan min | fine-tune steps in 60 s | D1 |",
                  "|---:|" + "---:|" * len(ks) + "---:|---:|---:|---:|:--:|"]
        for px, v in m1.items():
            tm, cm = v.get("timing", {}), v.get("cost_model", {})
            lines.append(f"| {px} | " + " | ".join(f"{100 * v['avg'][k]:.1f}" for k in ks) +
                         (f" | {1e3 * tm['anchored_s_per_image_forward']:.1f}; {1e3 * tm['s_per_image_forward']:.1f}"
                          f" | {tm['anchored_s_per_step']:.2f}; {tm['s_per_step']:.2f} | {cm['eval_s'] / 60:.1f}"
                          f" | {cm['finetune_steps_allowed']} | {'pass' if cm['passes'] else 'fail: ' + ', '.join(cm['fails'])} |"
                          if tm else " | – | – | – | – | – |"))
        lines += ["", f"Per task, pretrained val accuracy ({ks[0]} / {ks[-1]}), %:", "",
                  "| px | " + " | ".join(tasks) + " |", "|---:|" + "---:|" * len(tasks)]
        for px, v in m1.items():
            lines.append(f"| {px} | " + " | ".join(f"{100 * v['per_task'][t][ks[0]]:.0f} / {100 * v['per_task'][t][ks[-1]]:.0f}"
                                                   for t in tasks) + " |")
    m2 = [(px, v) for key in ("m2", "m2_followup") for px, v in r.get(key, {}).items()]
    if m2:
        lines += ["", "| px | task | lr | steps | pretrained val | fine-tuned val | gain | ‖τ‖/‖θ0‖ | wall s |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for px, v in m2:
            for t, tv in v["tasks"].items():
                for run in tv["runs"]:
                    lines.append(f"| {px}{' (info)' if v.get('information_only') else ''} | {t} | {run['lr']:g} | "
                                 f"{run['steps']} | {100 * tv['pretrained_val_acc']:.1f} | {100 * run['val_acc']:.1f} | "
                                 f"{100 * run['gain']:+.1f} | {run['rel_tau_norm']:.2e} | {run['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/regime_study.json")
    ap.add_argument("--smoke", action="store_true", help="tiny run to check the script")
    ap.add_argument("--render", metavar="JSON", help="print the markdown tables of a results file and exit")
    ap.add_argument("--followup", type=int, metavar="PX", help="extra M2 recipes at this resolution, appended "
                    "to --out (with --lrs, --steps, --k)")
    ap.add_argument("--lrs", default="1e-5,1e-4")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--k", type=int, default=32)
    args = ap.parse_args(argv)
    if args.followup:
        return followup(args.out, args.followup, [float(v) for v in args.lrs.split(",")], args.steps, args.k)
    if args.render:
        with open(args.render) as f:
            print(render_markdown(json.load(f)))
        return None

    smoke = args.smoke
    resolutions = (28,) if smoke else RESOLUTIONS
    tasks = ("digits", "textures") if smoke else SUITE_TASKS
    m2_tasks = ("digits",) if smoke else M2_TASKS
    max_train = 40 if smoke else 320
    max_val = 20 if smoke else MAX_VAL
    k_shots = (2, 4) if smoke else K_SHOTS

    out = dict(study="regime_study", started=_now(), smoke=smoke,
               machine=dict(platform=platform.platform(), cpus=os.cpu_count(), jax=jax.__version__,
                            devices=[str(d) for d in jax.devices()],
                            loadavg_at_start=os.getloadavg()),
               criteria=dict(resolutions=resolutions, k_shots=k_shots, m2_tasks=m2_tasks,
                             m2_learning_rates=M2_LEARNING_RATES, batch=BATCH, head_scale=HEAD_SCALE,
                             max_val=max_val, max_train=max_train, eval_plan=EVAL_PLAN,
                             budget_finetune_s_per_task=BUDGET_FINETUNE_S_PER_TASK,
                             budget_eval_s=BUDGET_EVAL_S, min_steps=MIN_STEPS))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():
        out["updated"] = _now()
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)

    def log(msg):
        print(f"[{_now()}] {msg}", flush=True)

    model_config, params0 = dinov2.load_pretrained()
    feats = dinov2.make_features(model_config)
    feats_jit = jax.jit(feats)
    loss = _loss_fn(feats)

    # ---- M3: test-set sizes the sources allow (uncapped), at 28 px -------------------------
    sizes = {}
    for name in tasks:
        t = load_task(name, resolution=28, max_train=10 * TASK_INFO[name].num_classes,
                      max_val=TASK_INFO[name].num_classes, max_test=None)
        generated = bool(TASK_INFO[name].default_sizes)
        sizes[name] = dict(test_uncapped=t.sizes["test"], generated=generated,
                           note=("generated on demand: any test size, but drawn from a fixed set of "
                                 "source cells / typefaces (not iid)") if generated else "")
    out["test_sizes"] = sizes
    n_test = {n: (EVAL_PLAN["n_test_cap"] if s["generated"] else s["test_uncapped"]) for n, s in sizes.items()}
    out["n_test_plan"] = n_test
    save()
    log(f"M3 sizes {n_test}")

    # ---- M1: pretrained heads against resolution ------------------------------------------
    m1, step_inputs = {}, {}
    for r in resolutions:
        t0 = time.perf_counter()
        suite = load_suite(tasks, resolution=r, max_train=max_train, max_val=max_val,
                           max_test=max(TASK_INFO[n].num_classes for n in tasks))
        load_s = time.perf_counter() - t0
        per_task, fwd_times = {}, []
        for t in suite:
            xtr, ytr = t.splits["train"]
            xva, yva = t.splits["val"]
            ftr, tt = _features(feats_jit, params0, xtr)
            fva, tv = _features(feats_jit, params0, xva)
            fwd_times += (tt + tv)[1:]
            per_task[t.name] = {f"k{k}": _head_accuracy(_head(ftr, ytr, t.num_classes, k), fva, yva) for k in k_shots}
            per_task[t.name]["chance"] = 1.0 / t.num_classes
            if t.name == m2_tasks[0]:
                idx = batch_indices(len(ytr), BATCH, 0, 0)
                step_inputs[r] = (np.asarray(xtr[idx]), np.asarray(ytr[idx]),
                                  heads_lib.pad_head(_head(ftr, ytr, t.num_classes, k_shots[0]), 10))
        avg = {f"k{k}": float(np.mean([v[f"k{k}"] for v in per_task.values()])) for k in k_shots}
        m1[str(r)] = dict(per_task=per_task, avg=avg, data_load_s=round(load_s, 1),
                          s_per_image_forward_during_m1_median=round(float(np.median(fwd_times)), 5),
                          loadavg=os.getloadavg())
        out["m1"] = m1
        save()
        log(f"M1 r={r}: avg {avg}, load {os.getloadavg()[0]:.1f}")

    # ---- timing: interleaved rounds over resolutions (ratios robust to the shared load) ---
    timing = _interleaved_timing(feats_jit, loss, params0, step_inputs, rounds=1 if smoke else 3)
    f_anchor = ANCHOR_FWD_S_28 / timing[28]["s_per_image_forward"] if 28 in timing else 1.0
    s_anchor = ANCHOR_STEP_S_42 / timing[42]["s_per_step"] if 42 in timing else 1.0
    for r in resolutions:
        tm = timing[r]
        tm["anchored_s_per_image_forward"] = tm["s_per_image_forward"] * f_anchor
        tm["anchored_s_per_step"] = tm["s_per_step"] * s_anchor
        m1[str(r)].update(timing=tm, cost_model=cost_model(tm["anchored_s_per_image_forward"],
                                                           tm["anchored_s_per_step"], n_test),
                          cost_model_as_measured=cost_model(tm["s_per_image_forward"], tm["s_per_step"], n_test))
        log(f"timing r={r}: {tm} cost {m1[str(r)]['cost_model']}")
    out["timing_anchors"] = dict(forward_s_per_image_28px=ANCHOR_FWD_S_28, step_s_42px=ANCHOR_STEP_S_42,
                                 forward_scale=f_anchor, step_scale=s_anchor)
    save()

    # ---- D1 + D2 ------------------------------------------------------------------------
    kbest = f"k{k_shots[-1]}" if np.mean([m1[str(r)]["avg"][f"k{k_shots[-1]}"] - m1[str(r)]["avg"][f"k{k_shots[0]}"]
                                          for r in resolutions]) >= D2_KMAX_MIN_GAIN else f"k{k_shots[0]}"
    admitted = [r for r in resolutions if m1[str(r)]["cost_model"]["passes"] or smoke]
    rejected = [r for r in resolutions if r not in admitted]
    ranked = sorted(admitted, key=lambda r: (-m1[str(r)]["avg"][kbest], r))
    chosen_res = None
    if ranked:
        chosen_res = ranked[0]
        for r in ranked[1:]:  # ties within D2_TIE: the cheaper resolution
            if r < chosen_res and m1[str(chosen_res)]["avg"][kbest] - m1[str(r)]["avg"][kbest] <= D2_TIE:
                chosen_res = r
    m2_res = ranked[:2]
    info_res = rejected[:1]  # lr 3e-5 only (information)
    out["d1_d2"] = dict(head=kbest, admitted=admitted, rejected=rejected, chosen_resolution=chosen_res,
                        m2_resolutions=m2_res, m2_information_only=info_res)
    save()
    log(f"D1/D2: head {kbest}, admitted {admitted}, chosen {chosen_res}, M2 at {m2_res} + info {info_res}")

    # ---- M2: recipes at the admitted resolutions (+ one rejected, for information) -------
    k = int(kbest[1:])
    m2 = {}
    for r in list(m2_res) + list(info_res):
        t_step = m1[str(r)]["timing"]["anchored_s_per_step"]
        steps = max(int(BUDGET_FINETUNE_S_PER_TASK / t_step) // 10 * 10, 10)
        if smoke:
            steps = 4
        recipes = [(lr, steps) for lr in (M2_LEARNING_RATES if r not in info_res else (3e-5,))]
        def on_run(res_out, r=r, steps=steps):
            m2[str(r)] = dict(steps=steps, tasks=res_out, information_only=r in info_res)
            out["m2"] = m2
            save()

        _m2_runs(r, recipes, k, m2_tasks, max_val, smoke, feats_jit, loss, params0, log, on_run)

    # ---- D3 + D4 at the chosen resolution --------------------------------------------------
    if chosen_res is not None and str(chosen_res) in m2:
        tasks_out = m2[str(chosen_res)]["tasks"]
        keys = [(run["lr"], run["steps"]) for run in next(iter(tasks_out.values()))["runs"]]
        table = []
        for lr, s in keys:
            rs = [next(x for x in v["runs"] if (x["lr"], x["steps"]) == (lr, s)) for v in tasks_out.values()]
            table.append(dict(lr=lr, steps=s, avg_gain=float(np.mean([x["gain"] for x in rs])),
                              avg_val_acc=float(np.mean([x["val_acc"] for x in rs])),
                              avg_rel_tau_norm=float(np.mean([x["rel_tau_norm"] for x in rs]))))
        best_gain = max(x["avg_gain"] for x in table)
        ok = [x for x in table if x["avg_gain"] >= D3_GAIN_FRACTION * best_gain]
        recipe = min(ok, key=lambda x: x["avg_rel_tau_norm"])
        pre = float(np.mean([v["pretrained_val_acc"] for v in tasks_out.values()]))
        out["d3_d4"] = dict(recipes=table, chosen_recipe=recipe, avg_pretrained_val_acc_m2_tasks=pre,
                            ratio_pretrained_over_finetuned=pre / recipe["avg_val_acc"],
                            in_paper_band=bool(0.45 <= pre / recipe["avg_val_acc"] <= 0.75))
        log(f"D3/D4: {out['d3_d4']}")
    out["finished"] = _now()
    save()
    return out


if __name__ == "__main__":
    main()
