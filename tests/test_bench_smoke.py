"""The benchmark runs (tiny shapes) and its numpy baseline agrees with bcjax."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import merge_speed  # noqa: E402
from bench.shapes import random_models  # noqa: E402

import bcjax  # noqa: E402


def test_numpy_baseline_equals_bcjax_breadcrumbs():
    pre, fts = random_models(merge_speed.MODELS["smoke"], 3)
    a = merge_speed.numpy_breadcrumbs(pre, fts)
    b = bcjax.merge("breadcrumbs", pre, fts, alpha=merge_speed.ALPHA, beta=merge_speed.BETA, gamma=merge_speed.GAMMA)
    for k in pre:
        np.testing.assert_allclose(a[k], np.asarray(b[k]), rtol=1e-6, atol=1e-7)


def test_benchmark_smoke_run(tmp_path):
    rows = merge_speed.main(["--smoke", "--impls", "bcjax_task_arithmetic,bcjax_breadcrumbs", "--out", str(tmp_path)])
    assert {r["impl"] for r in rows} == {"bcjax_task_arithmetic", "bcjax_breadcrumbs"}
    assert all(r["median_s"] > 0 and r["peak_rss_bytes"] > 0 for r in rows)
    assert (tmp_path / "smoke_3.md").exists()
