"""The embedded demo end to end (`bcjax demo --quick` as a user runs it) and its schema."""
import json
import os
import subprocess
import sys

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
def test_quick_demo_writes_valid_results_report_and_plots(quick_run):
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
    for png in ("subsets.png", "subsets_all_tasks.png", "normalized_accuracy.png", "cosine_similarity.png"):
        assert (out / png).stat().st_size > 5000, png
    assert "breadcrumbs" in stdout and "task arithmetic" in stdout


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
