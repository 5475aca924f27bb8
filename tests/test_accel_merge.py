"""bench/accel_merge.py (issue 16, item 6) runs on tiny shapes on CPU and writes what it
claims: every method × validate setting, bandwidth floors from the byte counts, ratios to
task arithmetic, the selection path; its generated inputs have the benchmark's distribution."""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import accel_merge as am  # noqa: E402
from bench.shapes import num_params  # noqa: E402


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("accel") / "accel.json"
    am.main(["--small", "--repeats", "1", "--workloads", "vit_l_14", "--copy-mib", "4", "--out", str(out)])
    with open(out) as f:
        data = json.load(f)
    assert (out.parent / "accel.md").read_text().startswith(data["device"]["device_kind"])
    return data


def test_rows_cover_every_method_and_validate_setting(result):
    rows = result["rows"]
    assert {(r["method"], r["validate"]) for r in rows} == {(m, v) for m in am.METHODS for v in (False, True, "jit")}
    assert all(r["median_s"] > 0 and len(r["times_s"]) == 1 for r in rows)
    assert result["device"]["platform"] == "cpu"
    assert result["selection_path"] in ("native CPU kernel", "portable scatter-add histograms")


def test_floors_and_ratios_follow_from_bytes_and_times(result):
    name, shapes, tasks = am.SMALL_WORKLOADS[1]
    n = num_params(shapes)
    copy = result["copy"]
    assert copy["gbps"] == pytest.approx(copy["bytes"] / copy["median_s"] / 1e9)
    assert copy["bytes"] == 2 * (4 << 20) * copy["chain"]
    by = {(r["method"], r["validate"]): r for r in result["rows"]}
    for r in result["rows"]:
        assert r["workload"] == name and r["tasks"] == tasks
        assert r["bytes_read"] == 4 * n * (tasks + 1) and r["bytes_written"] == 4 * n
        assert r["floor_read_copy_s"] == pytest.approx(r["bytes_read"] / (copy["gbps"] * 1e9))
        assert r["x_floor_read_copy"] == pytest.approx(r["median_s"] / r["floor_read_copy_s"])
        assert "floor_read_peak_s" not in r  # a CPU has no datasheet entry
        ratio = result["ratios_to_task_arithmetic"].get(f"{name}/{r['method']}/validate={r['validate']}")
        if r["method"] != "task_arithmetic":
            assert ratio == pytest.approx(r["median_s"] / by[("task_arithmetic", r["validate"])]["median_s"])
    bc = result["ratios_to_task_arithmetic"][f"{name}/breadcrumbs/validate=False"]
    assert result["breadcrumbs_target"]["met"][name] == (bc <= 3.0)


def test_generated_models_have_the_benchmark_distribution():
    shapes = {"w": (256, 512)}
    pre, fts = am.make_models(shapes, 2)
    p = np.asarray(pre["w"])
    taus = [np.asarray(f["w"]) - p for f in fts]
    assert p.std() == pytest.approx(0.02, rel=0.02)
    for tau in taus:  # N(0, 1e-6) with 1 % of the entries ×10: std 1e-3·√(0.99 + 1)
        assert tau.std() == pytest.approx(1e-3 * np.sqrt(1.99), rel=0.05)
        assert np.mean(np.abs(tau) > 5e-3) == pytest.approx(0.01 * 0.62, rel=0.25)  # P(|N(0,1)|·10 > 5) ≈ 0.62
    assert not np.allclose(taus[0], taus[1])


def test_datasheet_bandwidth_lookup():
    assert am.device_peak_gbps("NVIDIA H200") == 4800.0
    assert am.device_peak_gbps("NVIDIA H100 80GB HBM3") == 3350.0
    assert am.device_peak_gbps("cpu") is None
