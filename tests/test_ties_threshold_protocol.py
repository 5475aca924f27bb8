"""TIES's model-wide threshold for models seen leaf by leaf (merging.ties_thresholds_from_histograms):
a block sample brackets each task's threshold, ONE counting pass resolves it, and a missed
bracket falls back to the coarse + fine passes. Differential against a NumPy sort (SPEC §3),
on distributions chosen to stress the bracket, and the native histogram kernel against
NumPy's bincount (float32 and bfloat16, denormals, several threads)."""
import ml_dtypes
import numpy as np
import pytest

import bcjax
from bcjax import merging, order_stats

TINY = np.float32(np.finfo(np.float32).tiny)


def _keys(p, f):
    """float32 bits of |f − p| with XLA:CPU's denormal semantics (inputs and result flushed)."""
    p, f = (np.asarray(x, np.float32).ravel() for x in (p, f))
    p = np.where(np.abs(p) < TINY, np.float32(0), p)
    f = np.where(np.abs(f) < TINY, np.float32(0), f)
    d = np.abs(f - p)
    return np.where(d < TINY, np.float32(0), d).view(np.int32)


def _reference(p0, fts, density, copies=1):
    """The rank-th smallest key of each task over all leaves (``copies`` copies of the model)."""
    total = copies * sum(p.size for p in p0)
    rank = total - max(1, int(np.floor(density * total + 1e-6)))
    return np.array([np.sort(np.concatenate([_keys(p, f) for p, f in zip(p0, task)]))[rank // copies]
                     for task in fts], np.int32)


def _threshold(p0, fts, density, copies=1, sample=True):
    """The protocol on in-memory leaves; returns (thresholds, number of full passes)."""
    passes = []

    def histogram_pass(bins):
        passes.append(bins)
        for i in range(len(p0)):
            yield copies * merging.tau_magnitude_histograms(p0[i], [f[i] for f in fts], bins)

    def read_blocks(i, starts, length):
        return [merging.gather_blocks(x, starts, length) for x in (p0[i], *(task[i] for task in fts))]

    sizes = [p.size for p in p0]
    sampler = (lambda: merging.tau_sample_keys(read_blocks, sizes, len(fts))) if sample is True else sample
    got = merging.ties_thresholds_from_histograms(histogram_pass, copies * sum(sizes), len(fts), density, sampler)
    return got, len(passes)


def _model(kind, rng, dtype=np.float32, shapes=((300, 257), (4099,), (33, 7, 5))):
    p0 = [rng.standard_normal(s).astype(np.float32) * 0.02 for s in shapes]

    def tau(shape):
        if kind == "normal":  # Gaussian with a heavy tail
            return 1e-3 * rng.standard_normal(shape) * np.where(rng.random(shape) < 0.05, 30, 1)
        if kind == "all_equal":  # every |τ| the same: the threshold is that value
            return 1e-3 * np.where(rng.random(shape) < 0.5, -1.0, 1.0)
        if kind == "ties":  # three magnitudes: thousands of ties at the threshold
            return 1e-3 * rng.choice([1.0, 2.0, 3.0], size=shape, p=[0.5, 0.3, 0.2]) * rng.choice([-1, 1], shape)
        if kind == "zeros":  # 90 % unchanged entries
            return 1e-3 * rng.standard_normal(shape) * (rng.random(shape) < 0.1)
        if kind == "sorted":  # magnitude grows along the flattened index: blocks are far from i.i.d.
            n = int(np.prod(shape))
            return (np.geomspace(1e-6, 1e-1, n) * rng.choice([-1, 1], n)).reshape(shape)
        if kind == "rows":  # a scale per row: entries of a block are correlated
            scale = np.exp(0.5 * rng.standard_normal(shape[:1] + (1,) * (len(shape) - 1)))
            return 1e-4 * scale * rng.standard_normal(shape)
        if kind == "denormal":  # differences of denormals flush to zero, as XLA:CPU's do
            return np.where(rng.random(shape) < 0.5, 3e-39, 1e-3 * rng.standard_normal(shape))
        raise ValueError(kind)

    if kind == "denormal":
        p0 = [np.where(rng.random(p.shape) < 0.3, np.float32(2e-39), p).astype(np.float32) for p in p0]
    fts = [[(p + tau(p.shape)).astype(np.float32) for p in p0] for _ in range(3)]
    if dtype != np.float32:
        p0 = [p.astype(dtype) for p in p0]
        fts = [[f.astype(dtype) for f in task] for task in fts]
    return p0, fts


KINDS = ["normal", "all_equal", "ties", "zeros", "sorted", "rows", "denormal"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("density", [0.2, 0.9, 1e-4])
def test_one_pass_threshold_equals_a_sort(kind, dtype, density):
    """The model is smaller than the sample: the sample is every key, the bracket exact."""
    p0, fts = _model(kind, np.random.default_rng(len(kind)), dtype)
    got, passes = _threshold(p0, fts, density)
    np.testing.assert_array_equal(got, _reference(p0, fts, density))
    assert got.dtype == np.int32 and passes == 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("density", [0.2, 0.01])
def test_sampled_bracket_equals_a_sort(kind, density, monkeypatch):
    """A sample of 1/8 of a 1 M-entry model in blocks of 256: the margin follows the blocks'
    spread (correlated rows), so one pass suffices for continuous magnitudes; exact
    regardless (sorted magnitudes, three discrete magnitudes, or a far tail of correlated
    rows make brackets wider than TIES_MAX_BINS and may take the fallback)."""
    monkeypatch.setattr(merging, "TIES_SAMPLE", 2**17)
    monkeypatch.setattr(merging, "TIES_SAMPLE_BLOCK", 256)
    p0, fts = _model(kind, np.random.default_rng(len(kind)), shapes=((1024, 1000), (4099,), (33, 7, 5)))
    got, passes = _threshold(p0, fts, density)
    np.testing.assert_array_equal(got, _reference(p0, fts, density))
    if kind in ("normal", "all_equal", "zeros", "denormal") or (kind, density) == ("rows", 0.2):
        assert passes == 1
    else:
        assert passes in (1, 3)


def test_tiny_model_and_no_sample():
    rng = np.random.default_rng(3)
    p0 = [rng.standard_normal(3).astype(np.float32), rng.standard_normal((1, 2)).astype(np.float32)]
    fts = [[(p + rng.standard_normal(p.shape)).astype(np.float32) for p in p0] for _ in range(2)]
    for density in (0.2, 0.5, 1.0):
        want = _reference(p0, fts, density)
        got, passes = _threshold(p0, fts, density)
        np.testing.assert_array_equal(got, want)
        assert passes == 1
        got, passes = _threshold(p0, fts, density, sample=None)  # no sample: coarse + fine
        np.testing.assert_array_equal(got, want)
        assert passes == 2


@pytest.mark.parametrize("wrong", ["all", "one", "empty"])
def test_a_missed_bracket_falls_back_exactly(wrong):
    """A sample that misses (here: from the wrong distribution) costs passes, never exactness."""
    rng = np.random.default_rng(4)
    p0, fts = _model("normal", rng)
    honest = [np.concatenate([_keys(p, f) for p, f in zip(p0, task)]) for task in fts]  # independent keys

    def sample():
        keys = [k.copy() for k in honest]
        for t in range(len(keys)) if wrong != "one" else [1]:
            keys[t] = np.zeros(0, np.int32) if wrong == "empty" else (keys[t].view(np.float32) * 64).view(np.int32)
        return keys

    got, passes = _threshold(p0, fts, 0.2, sample=sample)
    np.testing.assert_array_equal(got, _reference(p0, fts, 0.2))
    assert passes == 3


def test_narrow_bracket_misses_and_recovers(monkeypatch):
    """No margin and one bin: the bracket often misses; the result stays the sort's."""
    monkeypatch.setattr(merging, "TIES_SIGMAS", 0.0)
    monkeypatch.setattr(merging, "TIES_MAX_BINS", 1)
    monkeypatch.setattr(merging, "TIES_SAMPLE", 64)
    monkeypatch.setattr(merging, "TIES_SAMPLE_BLOCK", 16)
    p0, fts = _model("normal", np.random.default_rng(5))
    got, passes = _threshold(p0, fts, 0.2)
    np.testing.assert_array_equal(got, _reference(p0, fts, 0.2))
    assert passes == 3


@pytest.mark.parametrize("copies", [3, 2**22 + 5])
def test_counts_beyond_int32(copies):
    """Histograms times k are those of k copies of the model: N beyond 2^31 − 1 entries."""
    p0, fts = _model("ties", np.random.default_rng(6))
    n = sum(p.size for p in p0)
    assert copies < 1000 or copies * n > order_stats.MAX_COUNT
    got, passes = _threshold(p0, fts, 0.2, copies=copies)
    np.testing.assert_array_equal(got, _reference(p0, fts, 0.2, copies=copies))
    assert passes == 1


def test_sample_blocks_are_deterministic_and_in_range():
    sizes = [0, 5, 3000, 2**20, 7 * 2**20 + 3]
    a, b = merging.ties_sample_blocks(sizes), merging.ties_sample_blocks(sizes)
    assert all(np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b))
    for n, (starts, length) in zip(sizes, a):
        assert length <= n and np.all(starts >= 0) and np.all(starts + length <= n)
    assert len(a[0][0]) == 0 and len(a[-1][0]) > 100  # empty leaves get no block, large ones many
    total = sum(len(s) * length for s, length in a)
    assert 0.9 * merging.TIES_SAMPLE < total < 1.1 * merging.TIES_SAMPLE


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_in_memory_ties_beyond_the_count_limit_uses_the_protocol(dtype, monkeypatch):
    """ties() over the int32 limit runs the same protocol: bit-identical merge."""
    rng = np.random.default_rng(7)
    dt = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    pre = {"a": (0.02 * rng.standard_normal((64, 50))).astype(dt), "b": (0.02 * rng.standard_normal(900)).astype(dt)}
    fts = [{k: (v.astype(np.float32) + 1e-3 * rng.standard_normal(v.shape)).astype(dt) for k, v in pre.items()}
           for _ in range(3)]
    want = bcjax.merge("ties", pre, fts, density=0.3)
    calls = []
    real = merging.ties_thresholds_from_histograms
    monkeypatch.setattr(merging, "ties_thresholds_from_histograms", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(order_stats, "MAX_COUNT", 1000)
    got = bcjax.merge("ties", pre, fts, density=0.3)
    assert calls
    for k in pre:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_native_histograms_equal_bincount(dtype):
    """The vectorised, multi-threaded kernel against NumPy: coarse counts, and the fine
    counts of a contiguous bracket plus the count above it (denormals flushed)."""
    rng = np.random.default_rng(8)
    n = 2 * 2**21 + 4099  # two threads of the kernel and a ragged tail
    p0 = (0.02 * rng.standard_normal(n)).astype(np.float32)
    p0[:1000] = 2e-39
    fts = [(p0 + 1e-3 * rng.standard_normal(n) * (rng.random(n) < 0.7)).astype(np.float32) for _ in range(2)]
    fts[1][:500] = 1e-39
    p0, fts = p0.astype(dtype), [f.astype(dtype) for f in fts]
    keys = [_keys(p0, f) for f in fts]
    coarse = merging.tau_magnitude_histograms(p0, fts)
    np.testing.assert_array_equal(coarse, [np.bincount(k >> 15, minlength=order_stats.N_COARSE) for k in keys])
    lo = [int(np.quantile(k, 0.8)) >> 15 for k in keys]
    bins = np.array([[b - 1, b, b + 1] for b in lo], np.int32)
    fine = merging.tau_magnitude_histograms(p0, fts, bins)
    for t, k in enumerate(keys):
        inside = (k >> 15 >= bins[t, 0]) & (k >> 15 <= bins[t, -1])
        rows = ((k[inside] >> 15) - bins[t, 0]) * order_stats.N_FINE + (k[inside] & (order_stats.N_FINE - 1))
        np.testing.assert_array_equal(fine[t, :-1], np.bincount(rows, minlength=3 * order_stats.N_FINE))
        assert fine[t, -1] == np.sum(k >> 15 > bins[t, -1]) > 0
