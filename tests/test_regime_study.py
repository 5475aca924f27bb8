"""bench/regime_study.py's budget rule (docs/regime.md D1) and its table rendering; the
study itself is a one-off measurement (bench/results/regime_study.json)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import regime_study as rs  # noqa: E402


def test_cost_model_counts_the_minimum_evaluation_plan():
    n_test = {"a": 500, "b": 10000, "c": 359}  # capped at 1,000: 500 + 1000 + 359 = 1859
    plan = dict(n_test_cap=1000, val_grid_merges=25, n_val=100, methods=8, linear_methods=2, subsets=40,
                subset_images=200)
    got = rs.cost_model(3e-3, 0.5, n_test, plan)
    forwards = 2 * 1859 + 25 * 8 * 100 + 8 * 1859 + 2 * 40 * 8 * 200
    assert got["eval_forwards"] == forwards
    assert got["eval_s"] == round(forwards * 3e-3, 1)
    assert got["finetune_steps_allowed"] == 120 and got["passes"]
    slow = rs.cost_model(3e-3, 1.6, n_test, plan)  # 60 s / 1.6 s = 37 -> 30 steps < 40
    assert slow["finetune_steps_allowed"] == 30 and not slow["passes"] and slow["fails"] == ["finetune"]
    assert rs.cost_model(1e-2, 0.5, n_test, plan)["fails"] == ["eval"]


def test_render_markdown_tables():
    r = {"m1": {"28": {"avg": {"k16": 0.4, "k32": 0.5}, "per_task": {"a": {"k16": 0.3, "k32": 0.6, "chance": 0.1}},
                       "timing": {"anchored_s_per_image_forward": 3e-3, "s_per_image_forward": 9e-3,
                                  "anchored_s_per_step": 0.5, "s_per_step": 1.5},
                       "cost_model": rs.cost_model(3e-3, 0.5, {"a": 1000})}},
         "m2": {"28": {"information_only": False, "tasks": {"a": {"pretrained_val_acc": 0.3, "runs": [
             dict(lr=3e-5, steps=120, val_acc=0.8, gain=0.5, rel_tau_norm=1.2e-3, wall_s=61.0)]}}}}}
    md = rs.render_markdown(r)
    assert "| 28 | 40.0 | 50.0 | 3.0; 9.0 | 0.50; 1.50 |" in md
    assert "| 28 | 30 / 60 |" in md
    assert "| 28 | a | 3e-05 | 120 | 30.0 | 80.0 | +50.0 | 1.20e-03 | 61 |" in md
