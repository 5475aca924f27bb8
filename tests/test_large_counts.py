"""Selections over more than 2^31 − 1 elements (TIES on big models, SPEC §3): device histograms
count in int32 per chunk, the host sums them in int64 and resolves the order statistic there.
Nothing here allocates 2^31 values: large counts are synthesised (histograms of small arrays
scaled by a factor k, i.e. the multiset of k copies, whose rank-r element is sorted[r // k])."""
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bcjax import merging, order_stats
from bcjax.checkpoints import load_state_dict, merge_checkpoints, save_safetensors

BIG = 2**31 - 1


def _histograms(values_bits, counts, bins=None):
    """Coarse (or, given ``bins``, fine rows) int64 histograms of a multiset given as distinct
    bit patterns with (possibly huge) counts."""
    coarse = values_bits >> 15
    if bins is None:
        h = np.zeros(order_stats.N_COARSE, np.int64)
        np.add.at(h, coarse, counts)
        return h
    h = np.zeros((len(bins), order_stats.N_FINE), np.int64)
    for row, b in enumerate(bins):  # an element lands in the first row with its bin
        if b in list(bins[:row]):
            continue
        sel = coarse == b
        np.add.at(h[row], values_bits[sel] & (order_stats.N_FINE - 1), counts[sel])
    return h


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), distinct=st.integers(1, 50), k=st.integers(1, 4))
def test_host_resolution_with_counts_over_int32(seed, distinct, k):
    rng = np.random.default_rng(seed)
    bits = np.unique(rng.integers(0, 0x7F800000, distinct).astype(np.int64))
    bits[rng.random(bits.size) < 0.5] &= ~np.int64(0x7FFF)  # share coarse bins often
    bits = np.unique(bits)
    counts = rng.integers(1, 2**33, bits.size).astype(np.int64)
    counts[0] = 2**31 + 1  # at least one bin over int32
    total = int(counts.sum())
    ranks = np.sort(rng.integers(0, total, k)).astype(np.int64)
    ranks[0] = total - 1 if seed % 3 == 0 else ranks[0]
    hist1 = _histograms(bits, counts)
    b, below, rep = order_stats.locate_coarse(hist1, ranks)
    got = order_stats.resolve_fine(_histograms(bits, counts, b), b, below, rep, ranks)
    cum = np.cumsum(counts)  # reference: the value whose cumulative count first exceeds r
    want = bits[np.searchsorted(cum, ranks, side="right")]
    np.testing.assert_array_equal(got, want.astype(np.int32))
    assert got.dtype == np.int32


def test_ties_trim_rank_exact_beyond_int32():
    n = 3 * 2**31 + 17
    assert merging.ties_trim_rank(0.2, n) == n - int(np.floor(0.2 * n + 1e-6))
    assert merging.ties_trim_rank(1e-12, n) == n - 1  # keeps at least one
    assert int(merging.ties_trim_rank(0.2, 1000)) == 800


@pytest.mark.parametrize("k", [1, 3, 2**22 + 5])
def test_ties_thresholds_from_scaled_histograms(k):
    """Leaves' histograms times k are the histograms of k copies of the model: N = k·n can
    exceed 2^31 − 1; the threshold must be the reference order statistic of the copies."""
    rng = np.random.default_rng(k)
    shapes = [(40, 30), (1000,), (7, 11, 13)]
    p0 = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    fts = [[p + (1e-3 * rng.standard_normal(p.shape) * np.where(rng.random(p.shape) < 0.05, 30, 1)).astype(np.float32)
            for p in p0] for _ in range(3)]
    n = sum(p.size for p in p0)
    total = k * n
    assert (k < 1000) or total > BIG

    def histogram_pass(bins):
        for i in range(len(p0)):
            yield k * merging.tau_magnitude_histograms(p0[i], [f[i] for f in fts], bins)

    got = merging.ties_thresholds_from_histograms(histogram_pass, total, len(fts), 0.2)
    rank = total - max(1, int(np.floor(0.2 * total + 1e-6)))
    for t, f in enumerate(fts):
        keys = np.sort(np.concatenate([np.abs(a - b).view(np.int32).ravel() for a, b in zip(f, p0)]))
        assert got[t] == keys[rank // k], (t, k)
    if k == 1:  # and equal to the in-memory one-pass selection
        ref = merging.ties_thresholds(p0, fts, [True] * len(p0), 0.2)
        np.testing.assert_array_equal(got, np.asarray(ref))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("native", [True, False])
def test_tau_histograms_equal_the_portable_ones(dtype, native, monkeypatch):
    """The native one-pass histograms of all tasks equal order_stats' scatter-add ones."""
    rng = np.random.default_rng(5)
    p0 = jnp.asarray(rng.standard_normal((300, 77)), dtype)
    fts = [p0 + jnp.asarray(1e-2 * rng.standard_normal(p0.shape) * (rng.random(p0.shape) < 0.5), dtype)
           for _ in range(3)]
    fts[2] = fts[2].at[:5].set(p0[:5])  # zero differences
    keys = [order_stats.magnitude_bits(f.astype(jnp.float32) - p0.astype(jnp.float32)) for f in fts]
    if not native:
        monkeypatch.setattr(merging._native, "available", lambda: False)
        merging._tau_histograms.clear_cache()
    coarse = merging.tau_magnitude_histograms(p0, fts)
    np.testing.assert_array_equal(coarse, np.stack([np.asarray(order_stats.coarse_histogram(k)) for k in keys]))
    scattered = np.array([[int(np.asarray(k).ravel()[j]) >> 15 for j in (0, 7, 7000)] for k in keys], np.int32)
    median = [int(np.median(np.asarray(k))) >> 15 for k in keys]
    contiguous = np.array([[b - 1 + j for j in range(3)] for b in median], np.int32)  # a bracket
    for bins in (scattered, contiguous):
        fine = merging.tau_magnitude_histograms(p0, fts, bins)
        want = np.stack([np.asarray(order_stats.fine_histogram(k, jnp.asarray(b))) for k, b in zip(keys, bins)])
        np.testing.assert_array_equal(fine[:, :-1].reshape(want.shape), want)
        above = [int(np.sum(np.asarray(k) >> 15 > b.max())) for k, b in zip(keys, bins)]
        np.testing.assert_array_equal(fine[:, -1], above)
        assert fine[:, :-1].sum() > 0 and fine.dtype == np.int64 and min(above) > 0
    assert coarse.dtype == np.int64
    merging._tau_histograms.clear_cache()


def test_in_memory_ties_beyond_the_device_count_limit(monkeypatch):
    """Over the limit, ties() switches to host-summed chunked histograms: same result."""
    rng = np.random.default_rng(1)
    pre = {"a": rng.standard_normal((64, 50)).astype(np.float32), "b": rng.standard_normal(900).astype(np.float32)}
    fts = [{k: v + (1e-3 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in pre.items()} for _ in range(3)]
    want = bcjax_merge("ties", pre, fts)
    monkeypatch.setattr(order_stats, "MAX_COUNT", 1000)
    monkeypatch.setattr(merging, "HISTOGRAM_CHUNK", 256)  # several chunks per leaf, a ragged last one
    got = bcjax_merge("ties", pre, fts)
    for k in pre:
        np.testing.assert_array_equal(got[k], want[k])


def bcjax_merge(method, pre, fts):
    import bcjax

    return {k: np.asarray(v) for k, v in bcjax.merge(method, pre, fts, density=0.2).items()}


def test_streamed_ties_with_chunked_histograms(tmp_path, monkeypatch):
    """The streaming merge's threshold pass counts big tensors in chunks: bit-identical."""
    rng = np.random.default_rng(2)
    pre = {"w": rng.standard_normal((96, 40)).astype(np.float32), "v": rng.standard_normal(300).astype(np.float32)}
    fts = [{k: v + (1e-3 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in pre.items()} for _ in range(2)]
    locs = []
    for m, tree in enumerate([pre, *fts]):
        save_safetensors(str(tmp_path / f"m{m}.safetensors"), tree)
        locs.append(str(tmp_path / f"m{m}.safetensors"))
    monkeypatch.setattr(merging, "HISTOGRAM_CHUNK", 1000)
    merge_checkpoints({"method": "ties", "hparams": {"density": 0.2}, "pretrained": locs[0], "finetuned": locs[1:]},
                      tmp_path / "o", progress=False)
    got = load_state_dict(str(tmp_path / "o"))
    want = bcjax_merge("ties", pre, fts)
    for k in pre:
        np.testing.assert_array_equal(got[k], want[k])
