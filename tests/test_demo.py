"""The embedded demo end to end (`bcjax demo --quick` as a user runs it) and its schema."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bcjax.demo import DemoConfig, validate_results


@pytest.fixture(scope="session")
def quick_run(demo_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_out")
    env = dict(os.environ, BCJAX_CACHE=demo_cache, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "bcjax.cli", "demo", "--quick", "--out", str(out), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc.stdout


@pytest.mark.slow
def test_quick_demo_writes_valid_results_report_and_plots(quick_run, demo_cache):
    out, stdout = quick_run
    results = json.loads((out / "results.json").read_text())
    validate_results(results)
    cfg = DemoConfig.quick()
    assert results["tasks"] == list(cfg.tasks)
    assert set(results["methods"]) == {name for name, _ in cfg.grids}
    # every method's chosen hyper-parameters come from its validation grid
    for name, grid in cfg.grids:
        assert results["methods"][name]["hparams"] in [g["hparams"] for g in results["validation_grid"][name]]
    # fine-tuning gives headroom over the pretrained prototype heads on every task
    for t in results["tasks"]:
        assert results["finetuned_acc"][t] > results["pretrained_acc"][t], t
    sizes = {str(k) for k in range(len(cfg.tasks) + 1)}
    assert set(results["subsets"]["breadcrumbs"]) == sizes and set(results["subsets"]["task_arithmetic"]) == sizes
    report = (out / "report.md").read_text()
    assert "| breadcrumbs |" in report and "Normalized accuracy" in report
    _check_intervals(results, cfg, report)
    for png in ("subsets.png", "subsets_all_tasks.png", "normalized_accuracy.png", "cosine_similarity.png"):
        assert (out / png).stat().st_size > 5000, png
    assert "breadcrumbs" in stdout and "task arithmetic" in stdout
    # the shape-only ViT-S/14 config (accelerator plans) is the architecture the conversion derived
    from bcjax.models import dinov2

    manifest = json.loads((Path(demo_cache) / dinov2.CACHE_NAME / "manifest.json").read_text())
    assert dinov2.param_shapes(dinov2.vits14_config()) == dinov2.param_shapes(
        type(dinov2.vits14_config()).from_dict(manifest["config"]))


def _check_intervals(results, cfg, report):
    """SPEC §4 "Uncertainty" keys: present, every interval holds its point, the paired delta
    of task arithmetic to itself is exactly 0, and the point estimates are the accuracy path's."""
    tasks = results["tasks"]
    assert results["test_examples_per_task"] == {t: cfg.max_test for t in tasks}
    assert results["bootstrap"]["resamples"] == 1000 and results["bootstrap"]["seed"] == 0
    rows = {**results["methods"], **results["references"]}
    assert set(results["references"]) == {"pretrained", "finetuned"}
    for name, m in rows.items():
        lo, hi = m["avg_normalized_acc_ci95"]
        assert lo <= m["avg_normalized_acc"] <= hi, name
        d = m["delta_vs_task_arithmetic"]
        assert d["ci95"][0] <= d["mean"] <= d["ci95"][1], name
        assert d["mean"] == pytest.approx(m["avg_normalized_acc"] - rows["task_arithmetic"]["avg_normalized_acc"],
                                          abs=1e-12)
        for t in tasks:
            assert m["normalized_acc_ci95"][t][0] <= m["normalized_acc"][t] <= m["normalized_acc_ci95"][t][1]
            # accuracies are count / n on the test set: whole multiples of 1 / n
            assert m["acc"][t] * cfg.max_test == pytest.approx(round(m["acc"][t] * cfg.max_test), abs=1e-9)
    assert results["methods"]["task_arithmetic"]["delta_vs_task_arithmetic"] == {"mean": 0.0, "ci95": [0.0, 0.0]}
    # the reference rows are the existing accuracy keys, and the avg normalized accuracy is the
    # mean over tasks of (per-example correctness mean) / (fine-tuned correctness mean)
    assert results["references"]["pretrained"]["acc"] == results["pretrained_acc"]
    assert results["references"]["finetuned"]["acc"] == results["finetuned_acc"]
    ft = results["references"]["finetuned"]
    assert ft["avg_normalized_acc"] == 1.0 and ft["avg_normalized_acc_ci95"] == [1.0, 1.0]
    for name, m in rows.items():
        expect = sum(m["acc"][t] / results["finetuned_acc"][t] for t in tasks) / len(tasks)
        assert m["avg_normalized_acc"] == pytest.approx(expect, rel=1e-12), name
    # subset curve points: the means are today's `subsets`, with intervals around them
    for key, curves in (("subset_points", "subsets"), ("subset_points_all_tasks", "subsets_all_tasks")):
        assert set(results[key]) == set(results[curves])
        for method, pts in results[key].items():
            assert set(pts) == set(results[curves][method])
            for k, p in pts.items():
                assert p["mean"] == pytest.approx(results[curves][method][k], rel=1e-12), (key, method, k)
                assert p["ci95"][0] <= p["mean"] <= p["ci95"][1], (key, method, k)
                assert p["examples_per_task"] == {t: cfg.subset_eval_examples for t in tasks}
                assert p["num_subsets"] >= 1
    first = report.splitlines()[2]
    assert first.startswith("**Headroom.**") and "[" in first
    assert "Breadcrumbs vs task arithmetic" in report and "| 95% CI | Δ vs TA [95% CI] |" in report
    assert "*pretrained* (reference)" in report and "*finetuned* (reference)" in report


def test_validate_results_rejects_bad_schema():
    good = {"suite": "s", "tasks": ["a"], "pretrained_acc": {"a": 0.5}, "finetuned_acc": {"a": 0.9},
            "methods": {m: {"hparams": {}, "acc": {"a": 0.6}, "normalized_acc": {"a": 0.6 / 0.9},
                            "avg_normalized_acc": 0.6 / 0.9} for m in ("task_arithmetic", "breadcrumbs")},
            "subsets": {"breadcrumbs": {"0": 0.5, "1": 0.6}}}
    validate_results(good)
    for mutate, msg in [(lambda r: r.pop("subsets"), "subsets"),
                        (lambda r: r["pretrained_acc"].update(a=1.5), "pretrained_acc"),
                        (lambda r: r["methods"].pop("breadcrumbs"), "breadcrumbs"),
                        (lambda r: r["methods"]["breadcrumbs"].update(avg_normalized_acc=0.1), "mean")]:
        bad = json.loads(json.dumps(good))
        mutate(bad)
        with pytest.raises(ValueError, match=msg):
            validate_results(bad)


def test_accelerator_preset_programs_lower_at_full_shape():
    """`--preset accelerator` (paper scale) is sized for one GPU/TPU: its fine-tuning step and
    evaluation call lower at full shape from abstract arguments (no weights, data or device),
    with the shapes and FLOPs of a 224 px ViT-S/14 step of batch 128 (6·N·tokens rule) and of
    ``models_per_call`` stacked models on ``eval_batch`` images (2·N·tokens each)."""
    import jax

    from bcjax.demo import accelerator_programs
    from bcjax.models import dinov2

    cfg = DemoConfig.accelerator()
    assert (cfg.resolution, cfg.train.steps, cfg.train.batch_size, cfg.train.learning_rate) == (224, 2000, 128, 1e-5)
    assert cfg.max_test is None and cfg.subsets_per_size is None and cfg.subset_sizes is None  # every subset
    vits14 = dinov2.vits14_config()
    progs = accelerator_programs(vits14, cfg)
    n_params = sum(int(np.prod(s)) for s in jax.tree.leaves(dinov2.param_shapes(vits14),
                                                             is_leaf=lambda v: isinstance(v, tuple)))
    tokens = (224 // 14) ** 2 + 1
    train_in = jax.tree.leaves(progs["train"].in_avals)
    assert any(a.shape == (128, 224, 224, 3) for a in train_in)
    params_out, _, loss = progs["train"].out_info
    assert loss.shape == () and sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params_out)) == n_params
    (hits,) = jax.tree.leaves(progs["eval"].out_info)
    assert hits.shape == (cfg.models_per_call, cfg.eval_batch) and hits.dtype == np.bool_
    train_flops = progs["train"].cost_analysis()["flops"] / (6 * n_params * tokens * cfg.train.batch_size)
    eval_flops = progs["eval"].cost_analysis()["flops"] / (2 * n_params * tokens * cfg.eval_batch * cfg.models_per_call)
    assert 0.9 < train_flops < 1.5 and 0.9 < eval_flops < 1.5, (train_flops, eval_flops)  # + attention


def test_split_examples_is_a_seeded_stratified_sample_never_the_first_n():
    """Subset models and sweep suites score a class-stratified sample of each split (SPEC §4),
    keyed by the task's name: class counts within 1 of proportional, not the first n."""
    import types

    from bcjax import stats
    from bcjax.demo import split_examples

    y = np.repeat(np.arange(4, dtype=np.int32), [40, 30, 20, 10])
    x = np.arange(100, dtype=np.float32)[:, None]
    task = types.SimpleNamespace(name="t", splits={"test": (x, y)})
    xs, ys = split_examples(task, "test", 20)
    assert np.bincount(ys).tolist() == [8, 6, 4, 2]
    idx = stats.stratified_sample(y, 20, seed=0, key="t")
    assert np.array_equal(xs[:, 0], x[idx, 0]) and not np.array_equal(idx, np.arange(20))
    assert not np.array_equal(split_examples(task, "test", 20, seed=1)[0], xs)
    for n in (None, 100, 500):  # all of them, in order
        assert np.array_equal(split_examples(task, "test", n)[1], y)


def test_seed_rows_in_the_report():
    """`--seeds N` results (mean ± s.e. and a t-interval over seeds) are rendered as a table."""
    from bcjax.demo import render_report

    summary = lambda m, se, lo, hi: {"mean": m, "se": se, "num_seeds": 3, "ci95": [lo, hi], "values": [m] * 3}
    r = {"suite": "s", "tasks": ["a"], "pretrained_acc": {"a": 0.5}, "finetuned_acc": {"a": 0.9},
         "methods": {"task_arithmetic": {"hparams": {}, "acc": {"a": 0.6}, "normalized_acc": {"a": 0.6 / 0.9},
                                         "avg_normalized_acc": 0.6 / 0.9},
                     "breadcrumbs": {"hparams": {}, "acc": {"a": 0.7}, "normalized_acc": {"a": 0.7 / 0.9},
                                     "avg_normalized_acc": 0.7 / 0.9}},
         "subsets": {"task_arithmetic": {"0": 0.5, "1": 0.6}}, "subsets_all_tasks": {"task_arithmetic": {"0": 0.5}},
         "config": {"subset_eval_examples": 10}, "provenance": {"a": {"source": "x", "license": "y", "sizes": {}}},
         "timings_s": {"total": 1.0},
         "seeds": {"train_seeds": [0, 1, 2],
                   "methods": {"task_arithmetic": summary(0.66, 0.01, 0.62, 0.70),
                               "breadcrumbs": summary(0.77, 0.02, 0.68, 0.86)},
                   "delta_vs_task_arithmetic": {"task_arithmetic": summary(0.0, 0.0, 0.0, 0.0),
                                                "breadcrumbs": summary(0.11, 0.01, 0.07, 0.15)},
                   "references": {"pretrained": summary(0.55, 0.03, 0.42, 0.68)}}}
    text = render_report(r, {k: f"{k}.png" for k in ("subsets", "subsets_all", "per_task", "cosine")})
    assert "## Across fine-tuning seeds (3 seeds: [0, 1, 2])" in text
    assert "| breadcrumbs | 77.0 ± 2.0 | [68.0, 86.0] | +11.0 ± 1.0 | [7.0, 15.0] |" in text
    assert "| *pretrained* (reference) | 55.0 ± 3.0 | [42.0, 68.0] | – | – |" in text
