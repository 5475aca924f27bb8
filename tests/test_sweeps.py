"""Subset contraction equals per-subset merges from the core API; curves; cosine similarity."""
import numpy as np
import pytest

import bcjax
from bcjax import sweeps


@pytest.fixture(scope="module")
def models():
    rng = np.random.default_rng(0)
    pre = {"w": rng.standard_normal((60, 50)).astype(np.float32), "b": rng.standard_normal(50).astype(np.float32),
           "n": np.int32(2)}
    fts = [{"w": pre["w"] + rng.standard_normal((60, 50)).astype(np.float32),
            "b": pre["b"] + rng.standard_normal(50).astype(np.float32), "n": np.int32(5)} for _ in range(4)]
    return pre, fts


def test_all_subsets():
    ind = sweeps.all_subsets(4)
    assert ind.shape == (16, 4) and ind[0].sum() == 0 and ind[-1].all()
    assert sweeps.all_subsets(4, sizes=[2]).shape == (6, 4)
    with pytest.raises(ValueError, match="outside"):
        sweeps.all_subsets(3, sizes=[4])


def test_all_subsets_sampled_per_size():
    """per_size keeps every subset of a size with at most that many, else a seeded draw of
    distinct subsets of that size from the full list (the demo: 4 per size of 8 tasks = 30)."""
    full = sweeps.all_subsets(8)
    got = sweeps.all_subsets(8, per_size=4, seed=0)
    sizes = got.sum(1)
    assert len(got) == 30 and np.bincount(sizes).tolist() == [1, 4, 4, 4, 4, 4, 4, 4, 1]
    assert len({r.tobytes() for r in got}) == 30  # distinct
    full_rows = {r.tobytes() for r in full}
    assert all(r.tobytes() in full_rows for r in got)
    assert np.array_equal(got, sweeps.all_subsets(8, per_size=4, seed=0))  # seeded
    assert not np.array_equal(got, sweeps.all_subsets(8, per_size=4, seed=1))
    # a size's draw does not depend on which other sizes are asked for
    assert np.array_equal(sweeps.all_subsets(8, [3], per_size=4), got[sizes == 3])
    assert np.array_equal(sweeps.all_subsets(4, per_size=6), sweeps.all_subsets(4))  # C(4, k) <= 6: all
    with pytest.raises(ValueError, match="per_size"):
        sweeps.all_subsets(4, per_size=0)


@pytest.mark.parametrize("method,hp", [("breadcrumbs", dict(beta=0.8, gamma=0.99)), ("task_arithmetic", {})])
def test_contraction_equals_per_subset_merges(models, method, hp):
    pre, fts = models
    deltas = sweeps.task_deltas(method, pre, fts, **hp)
    ind = sweeps.all_subsets(4)
    seen = 0
    for start, stacked in sweeps.iter_subset_merges(pre, deltas, ind, 0.4, chunk=5):
        for j in range(min(5, len(ind) - start)):
            row = ind[start + j]
            members = [f for f, on in zip(fts, row) if on]
            expect = bcjax.merge(method, pre, members, alpha=0.4, **hp) if members else pre
            for k in ("w", "b"):
                np.testing.assert_allclose(np.asarray(stacked[k][j]), np.asarray(expect[k]), rtol=1e-5, atol=1e-5)
            assert int(stacked["n"][j]) == 2
            seen += 1
    assert seen == 16
    with pytest.raises(ValueError, match="linear"):
        sweeps.task_deltas("ties", pre, fts)


def test_subset_curve_protocols():
    ind = sweeps.all_subsets(2)
    scores = {0: {"a": 0.2, "b": 0.4}, 1: {"a": 0.5, "b": 0.1}, 2: {"a": 0.3, "b": 0.9}, 3: {"a": 0.8, "b": 0.6}}
    # rows: {}, {b}, {a}, {a,b}  (combinations order: (0,) = a, (1,) = b)
    obs = sweeps.subset_curve(ind, scores, ["a", "b"], "observed")
    assert obs[0] == pytest.approx(0.3) and obs[2] == pytest.approx(0.7)
    assert obs[1] == pytest.approx((scores[1]["a"] + scores[2]["b"]) / 2)
    allp = sweeps.subset_curve(ind, scores, ["a", "b"], "all")
    assert allp[1] == pytest.approx((0.3 + 0.6) / 2)


def test_cosine_similarity(models):
    pre, fts = models
    tvs = [bcjax.task_vector(f, pre) for f in fts]
    c = sweeps.cosine_similarity_matrix(tvs)
    flat = [np.concatenate([np.ravel(t["b"]), np.ravel(t["w"])]).astype(np.float64) for t in tvs]
    expect = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in flat] for a in flat])
    np.testing.assert_allclose(c, expect, rtol=1e-5, atol=1e-6)
    assert c.shape == (4, 4) and np.allclose(np.diag(c), 1, atol=1e-6)


def test_pad_rows_repeats_the_last_row_for_numpy_and_jax():
    import jax.numpy as jnp
    import pytest

    from bcjax.batching import pad_rows

    x = np.arange(6).reshape(3, 2)
    np.testing.assert_array_equal(pad_rows(x, 5), [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]])
    assert pad_rows(x, 3) is x
    out = pad_rows(jnp.asarray(x), 4)
    assert isinstance(out, jnp.ndarray) and out.tolist() == [[0, 1], [2, 3], [4, 5], [4, 5]]
    with pytest.raises(ValueError, match="cannot pad"):
        pad_rows(x, 2)
