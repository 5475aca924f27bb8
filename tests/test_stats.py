"""bcjax.stats (SPEC §4 "Uncertainty"): numpy loop references, hypothesis properties,
coverage on synthetic Bernoulli data."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bcjax import stats
from bcjax.errors import EvaluationDataError

B = 1000  # SPEC §4: >= 1,000 resamples


def _bern(rng, p, n):
    return rng.random(n) < p


# ------------------------------------------------------------------ numpy loop references
def _ref_counts(n, num_resamples, seed, key):
    """The documented protocol, one resample at a time."""
    rng = stats._rng(seed, "bootstrap", key)
    draws = rng.integers(0, n, size=(num_resamples, n), dtype=np.int64)
    return np.stack([np.bincount(d, minlength=n) for d in draws]).astype(float)


def _ref_method(correct, finetuned, seed, num_resamples, baseline):
    tasks = list(next(iter(correct.values())))
    samples = {m: np.zeros(num_resamples) for m in correct}
    for t in tasks:
        n = len(finetuned[t])
        draws = stats._rng(seed, "bootstrap", t).integers(0, n, size=(num_resamples, n), dtype=np.int64)
        for b in range(num_resamples):
            idx = draws[b]
            f = np.mean(finetuned[t][idx])
            for m in correct:
                samples[m][b] += np.mean(correct[m][t][idx]) / f / len(tasks)
    out = {}
    for m in correct:
        point = np.mean([np.mean(correct[m][t]) / np.mean(finetuned[t]) for t in tasks])
        lo, hi = np.percentile(samples[m], [2.5, 97.5])
        d = samples[m] - samples[baseline]
        dpoint = point - np.mean([np.mean(correct[baseline][t]) / np.mean(finetuned[t]) for t in tasks])
        out[m] = (point, lo, hi, dpoint, *np.percentile(d, [2.5, 97.5]))
    return out


def test_bootstrap_counts_match_the_documented_protocol():
    c = stats.bootstrap_counts(37, 50, seed=3, key="mnist")
    np.testing.assert_array_equal(c, _ref_counts(37, 50, 3, "mnist"))
    assert c.shape == (50, 37) and np.all(c.sum(1) == 37)
    assert not np.array_equal(c, stats.bootstrap_counts(37, 50, seed=3, key="digits"))


def test_method_intervals_equal_a_loop_reference():
    rng = np.random.default_rng(0)
    tasks = {"a": 60, "b": 45, "c": 80}
    fine = {t: _bern(rng, 0.9, n) for t, n in tasks.items()}
    correct = {m: {t: _bern(rng, p, n) for t, n in tasks.items()}
               for m, p in (("task_arithmetic", 0.6), ("breadcrumbs", 0.7), ("pretrained", 0.4))}
    got = stats.method_intervals(correct, fine, baseline="task_arithmetic", num_resamples=200, seed=5)
    ref = _ref_method(correct, fine, 5, 200, "task_arithmetic")
    for m, (point, lo, hi, dpoint, dlo, dhi) in ref.items():
        np.testing.assert_allclose(got[m]["avg"]["mean"], point, rtol=1e-12)
        np.testing.assert_allclose(got[m]["avg"]["ci95"], [lo, hi], rtol=1e-12)
        np.testing.assert_allclose(got[m]["delta_vs_task_arithmetic"]["mean"], dpoint, atol=1e-12)
        np.testing.assert_allclose(got[m]["delta_vs_task_arithmetic"]["ci95"], [dlo, dhi], atol=1e-12)
        for t in tasks:
            np.testing.assert_allclose(got[m]["per_task"][t]["mean"], correct[m][t].mean() / fine[t].mean())


def test_without_normalizer_intervals_are_of_plain_accuracy():
    rng = np.random.default_rng(1)
    c = {"m": {"a": _bern(rng, 0.3, 50), "b": _bern(rng, 0.8, 70)}}
    got = stats.method_intervals(c, None, num_resamples=300, seed=2)["m"]["avg"]
    assert got["mean"] == pytest.approx((c["m"]["a"].mean() + c["m"]["b"].mean()) / 2)
    s = sum(stats.resampled_accuracy(c["m"][t], stats.bootstrap_counts(len(c["m"][t]), 300, seed=2, key=t))
            for t in ("a", "b")) / 2
    np.testing.assert_allclose(got["ci95"], np.percentile(s, [2.5, 97.5]))


def test_finetuned_reference_row_is_exactly_one():
    rng = np.random.default_rng(2)
    fine = {"a": _bern(rng, 0.7, 40), "b": _bern(rng, 0.9, 30)}
    got = stats.method_intervals({"finetuned": fine}, fine, num_resamples=B)["finetuned"]["avg"]
    assert got["mean"] == 1.0 and got["ci95"] == [1.0, 1.0]


# ------------------------------------------------------------------ properties
_task_sizes = st.lists(st.integers(20, 120), min_size=1, max_size=4)


@settings(max_examples=25, deadline=None)
@given(sizes=_task_sizes, seed=st.integers(0, 2**31 - 1), p=st.floats(0.2, 0.8), q=st.floats(0.5, 0.95))
def test_interval_contains_point_and_self_difference_is_zero(sizes, seed, p, q):
    rng = np.random.default_rng(seed)
    fine = {f"t{i}": _bern(rng, q, n) | (np.arange(n) == 0) for i, n in enumerate(sizes)}
    m = {f"t{i}": _bern(rng, p, n) for i, n in enumerate(sizes)}
    for v in m.values():  # non-degenerate: at least one right and one wrong answer per task
        v[:2] = (True, False)
    got = stats.method_intervals({"ta": m, "same": {t: v.copy() for t, v in m.items()}}, fine,
                                 baseline="ta", num_resamples=B, seed=seed)
    lo, hi = got["ta"]["avg"]["ci95"]
    assert lo <= got["ta"]["avg"]["mean"] <= hi and lo < hi
    assert got["same"]["delta_vs_ta"] == {"mean": 0.0, "ci95": [0.0, 0.0]}
    assert got["ta"]["delta_vs_ta"] == {"mean": 0.0, "ci95": [0.0, 0.0]}


@settings(max_examples=15, deadline=None)
@given(sizes=_task_sizes, seed=st.integers(0, 2**31 - 1))
def test_deterministic_by_seed_and_independent_of_other_methods(sizes, seed):
    rng = np.random.default_rng(seed)
    fine = {f"t{i}": _bern(rng, 0.9, n) | (np.arange(n) == 0) for i, n in enumerate(sizes)}
    m = {f"t{i}": _bern(rng, 0.5, n) for i, n in enumerate(sizes)}
    other = {f"t{i}": _bern(rng, 0.5, n) for i, n in enumerate(sizes)}
    one = stats.method_intervals({"m": m}, fine, num_resamples=200, seed=seed)
    again = stats.method_intervals({"x": other, "m": m}, fine, num_resamples=200, seed=seed)
    assert one["m"] == again["m"]
    shifted = stats.method_intervals({"m": m}, fine, num_resamples=200, seed=seed + 1)
    assert shifted["m"]["avg"]["mean"] == one["m"]["avg"]["mean"]


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(1, 60), min_size=1, max_size=12), frac=st.floats(0.01, 1.2),
       seed=st.integers(0, 2**31 - 1))
def test_stratified_sample_proportions_no_duplicates_deterministic(counts, frac, seed):
    labels = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(seed).shuffle(labels)
    size = max(1, int(frac * labels.size))
    idx = stats.stratified_sample(labels, size, seed=seed, key="task")
    assert len(idx) == min(size, labels.size) and len(np.unique(idx)) == len(idx)
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < labels.size
    got = np.bincount(labels[idx], minlength=len(counts))
    expected = min(size, labels.size) * np.array(counts) / labels.size
    assert np.all(np.abs(got - expected) < 1)
    np.testing.assert_array_equal(idx, stats.stratified_sample(labels, size, seed=seed, key="task"))


def test_stratified_sample_is_not_the_first_n_and_varies_with_seed():
    labels = np.tile(np.arange(10), 100)
    a = stats.stratified_sample(labels, 200, seed=0)
    assert not np.array_equal(a, np.arange(200))
    assert not np.array_equal(a, stats.stratified_sample(labels, 200, seed=1))
    assert np.all(np.bincount(labels[a]) == 20)


# ------------------------------------------------------------------ coverage (synthetic)
def test_coverage_on_bernoulli_data():
    """95 % intervals cover the true value in about 95 % of 200 synthetic experiments
    (plain accuracy and normalized accuracy with a resampled denominator)."""
    rng = np.random.default_rng(12345)
    p, q, n = {"a": 0.55, "b": 0.3}, {"a": 0.9, "b": 0.8}, {"a": 250, "b": 150}
    true_plain = np.mean(list(p.values()))
    true_norm = np.mean([p[t] / q[t] for t in p])
    hit_plain = hit_norm = 0
    reps = 200
    for r in range(reps):
        c = {t: _bern(rng, p[t], n[t]) for t in p}
        f = {t: _bern(rng, q[t], n[t]) for t in p}
        lo, hi = stats.method_intervals({"m": c}, None, num_resamples=B, seed=r)["m"]["avg"]["ci95"]
        hit_plain += lo <= true_plain <= hi
        lo, hi = stats.method_intervals({"m": c}, f, num_resamples=B, seed=r)["m"]["avg"]["ci95"]
        hit_norm += lo <= true_norm <= hi
    assert 0.89 <= hit_plain / reps <= 0.99, hit_plain
    assert 0.89 <= hit_norm / reps <= 0.99, hit_norm


# ------------------------------------------------------------------ subset curves
def _subset_data(rng, tasks=4, n=40, sizes=None):
    from bcjax.sweeps import all_subsets

    ind = all_subsets(tasks, sizes)
    names = [f"t{i}" for i in range(tasks)]
    correct = {t: rng.random((len(ind), n)) < 0.4 + 0.1 * ind.sum(1, keepdims=True) / tasks for t in names}
    fine = {t: (rng.random(n) < 0.9) | (np.arange(n) == 0) for t in names}
    return ind, names, correct, fine


@pytest.mark.parametrize("protocol", ["observed", "all"])
def test_subset_curve_points_match_sweeps_subset_curve(protocol):
    from bcjax.sweeps import subset_curve

    ind, names, correct, fine = _subset_data(np.random.default_rng(3))
    got = stats.subset_curve_intervals(ind, correct, fine, protocol=protocol, num_resamples=200)
    scores = {i: {t: correct[t][i].mean() / fine[t].mean() for t in names} for i in range(len(ind))}
    want = subset_curve(ind, scores, names, protocol)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k]["mean"] == pytest.approx(want[k], rel=1e-12)
        assert got[k]["num_subsets"] == math.comb(4, k)
        assert got[k]["subsets_resampled"] is False  # exhaustive: population of subsets
        lo, hi = got[k]["ci95"]
        assert lo <= got[k]["mean"] <= hi
        assert got[k]["examples_per_task"] == {t: 40 for t in names}


def test_subset_curve_two_level_reference():
    """Sampled subsets: loop reference of the two-level bootstrap (examples and subsets)."""
    rng = np.random.default_rng(4)
    ind_all, names, correct_all, fine = _subset_data(rng, tasks=5, n=30)
    keep = np.flatnonzero(ind_all.sum(1) != 2)
    keep = np.concatenate([keep, np.flatnonzero(ind_all.sum(1) == 2)[:4]])  # 4 of the 10 pairs
    ind = ind_all[keep]
    correct = {t: v[keep] for t, v in correct_all.items()}
    nb, seed = 150, 9
    got = stats.subset_curve_intervals(ind, correct, fine, protocol="observed", num_resamples=nb, seed=seed)
    assert got[2]["subsets_resampled"] and not got[3]["subsets_resampled"]
    draws = {t: stats._rng(seed, "bootstrap", t).integers(0, 30, size=(nb, 30), dtype=np.int64) for t in names}
    rows = np.flatnonzero(ind.sum(1) == 2)
    pick = stats._rng(seed, "subsets", "observed", "2").integers(0, len(rows), size=(nb, len(rows)))
    samples = []
    for b in range(nb):
        vals = []
        for s in rows[pick[b]]:
            ts = [t for t, on in zip(names, ind[s]) if on]
            vals.append(np.mean([correct[t][s][draws[t][b]].mean() / fine[t][draws[t][b]].mean() for t in ts]))
        samples.append(np.mean(vals))
    np.testing.assert_allclose(got[2]["ci95"], np.percentile(samples, [2.5, 97.5]), rtol=1e-12)


def test_identical_subset_models_get_no_subset_variance():
    rng = np.random.default_rng(5)
    ind = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], bool)[[0, 1]]  # 2 of 3 singletons: sampled
    row = {t: rng.random(50) < 0.6 for t in ("a", "b", "c")}
    correct = {t: np.stack([row[t]] * 2) for t in row}
    fine = {t: np.ones(50, bool) for t in row}
    with_sub = stats.subset_curve_intervals(ind, correct, fine, protocol="all", num_resamples=B, seed=1)
    without = stats.subset_curve_intervals(ind, correct, fine, protocol="all", num_resamples=B, seed=1,
                                           resample_subsets=False)
    assert with_sub[1]["subsets_resampled"] and not without[1]["subsets_resampled"]
    assert with_sub[1]["ci95"] == without[1]["ci95"]


def test_subset_choice_alone_gives_the_interval_when_examples_are_certain():
    """Every model is right on all or none of a task's examples: resampling examples changes
    nothing, the interval comes from the choice of subsets alone."""
    ind = np.eye(6, dtype=bool)[:3]  # 3 of 6 singletons: sampled
    names = [f"t{i}" for i in range(6)]
    correct = {t: np.zeros((3, 20), bool) for t in names}
    for s in range(3):
        for t in names[: s + 1]:
            correct[t][s] = True  # model s: all-task score (s + 1) / 6
    fine = {t: np.ones(20, bool) for t in names}
    got = stats.subset_curve_intervals(ind, correct, fine, protocol="all", num_resamples=B, seed=0)[1]
    assert got["mean"] == pytest.approx(2 / 6)
    pick = stats._rng(0, "subsets", "all", "1").integers(0, 3, size=(B, 3))
    ref = np.percentile(((pick + 1) / 6).mean(1), [2.5, 97.5])
    np.testing.assert_allclose(got["ci95"], ref, rtol=1e-12)
    assert 1 / 6 <= got["ci95"][0] < 2 / 6 < got["ci95"][1] <= 3 / 6


def test_seed_summary():
    got = stats.seed_summary([0.5, 0.7, 0.6])
    assert got["mean"] == pytest.approx(0.6) and got["num_seeds"] == 3
    assert got["se"] == pytest.approx(np.std([0.5, 0.7, 0.6], ddof=1) / np.sqrt(3))
    half = 4.303 * got["se"]  # t_{0.975, 2}
    assert got["ci95"] == pytest.approx([0.6 - half, 0.6 + half])
    assert stats.seed_summary([0.4])["se"] == 0.0 and stats.seed_summary([0.4])["ci95"] == [0.4, 0.4]
    scipy_stats = pytest.importorskip("scipy.stats")
    for n in (2, 5, 31, 32, 40, 200):  # the quantile table and its expansion against scipy
        v = np.linspace(0.0, 1.0, n) ** 2
        got = stats.seed_summary(v)
        t = scipy_stats.t.ppf(0.975, n - 1)
        assert got["ci95"][1] - got["mean"] == pytest.approx(t * got["se"], rel=5e-4)
    with pytest.raises(EvaluationDataError):
        stats.seed_summary([])


# ------------------------------------------------------------------ typed errors
def test_errors_name_what_and_where():
    fine = {"a": np.ones(5, bool)}
    with pytest.raises(EvaluationDataError, match="method 'm', task 'a'"):
        stats.method_intervals({"m": {"a": np.array([0, 2, 1, 0, 1])}}, fine)
    with pytest.raises(EvaluationDataError, match="task 'a'.*4 examples"):
        stats.method_intervals({"m": {"a": np.ones(5, bool)}, "n": {"a": np.ones(4, bool)}}, fine)
    with pytest.raises(EvaluationDataError, match="baseline 'x'"):
        stats.method_intervals({"m": {"a": np.ones(5, bool)}}, fine, baseline="x")
    with pytest.raises(EvaluationDataError, match="fine-tuned accuracy is 0"):
        stats.method_intervals({"m": {"a": np.ones(5, bool)}}, {"a": np.zeros(5, bool)})
    with pytest.raises(EvaluationDataError, match="size must be"):
        stats.stratified_sample(np.zeros(5, int), 0)
    with pytest.raises(EvaluationDataError, match="indicator"):
        stats.subset_curve_intervals(np.ones((2, 3), int), {"a": np.ones((2, 4), bool)}, fine)
    with pytest.raises(EvaluationDataError, match="num_resamples"):
        stats.bootstrap_counts(5, 0)
