"""(β, γ) grids reuse one order-statistics pass and equal point-by-point merges exactly;
sharded kernels are bit-identical on 1 and 8 fake devices (SPEC §2, §4)."""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import bcjax
from bcjax import grids, order_stats, sweeps


@pytest.fixture(scope="module")
def models():
    rng = np.random.default_rng(1)
    # "w" is above SORT_BELOW (histogram path), "b" below (sort path); "q" has many ties
    pre = {"w": rng.standard_normal((64, 48)).astype(np.float32), "b": rng.standard_normal(40).astype(np.float32),
           "q": np.zeros((16, 16), np.float32), "n": np.int32(3)}
    fts = []
    for t in range(3):
        fts.append({"w": pre["w"] + rng.standard_normal((64, 48)).astype(np.float32) * (0.5 + t),
                    "b": pre["b"] + rng.standard_normal(40).astype(np.float32),
                    "q": np.round(rng.standard_normal((16, 16)) * 2).astype(np.float32), "n": np.int32(7)})
    return pre, fts


ALPHAS, BETAS, GAMMAS = (0.3, 1.0), (0.0, 0.5, 0.9), (0.9, 0.99, 1.0)


def test_grid_equals_point_by_point_merges_exactly(models):
    pre, fts = models
    stacked, points = grids.breadcrumbs_grid_merge(pre, fts, ALPHAS, BETAS, GAMMAS)
    assert len(points) == len(ALPHAS) * len(grids.beta_gamma_pairs(BETAS, GAMMAS)) == 18
    assert points[0] == (0.3, 0.0, 0.9) and points[1] == (1.0, 0.0, 0.9)
    for i, (a, b, g) in enumerate(points):
        expect = bcjax.merge("breadcrumbs", pre, fts, alpha=a, beta=b, gamma=g)
        for k in ("w", "b", "q"):
            np.testing.assert_array_equal(np.asarray(stacked[k][i]), np.asarray(expect[k]), err_msg=f"{k} {a, b, g}")
        assert int(stacked["n"][i]) == 3


def test_grid_of_a_subset_equals_merge_of_its_members(models):
    pre, fts = models
    stacked, points = grids.breadcrumbs_grid_merge(pre, fts, (0.7,), (0.8,), (0.99,), subset=[True, False, True])
    expect = bcjax.merge("breadcrumbs", pre, [fts[0], fts[2]], alpha=0.7, beta=0.8, gamma=0.99)
    np.testing.assert_array_equal(np.asarray(stacked["w"][0]), np.asarray(expect["w"]))


def test_grid_masks_and_deltas_match_core(models):
    pre, fts = models
    pairs = grids.beta_gamma_pairs(BETAS, GAMMAS)
    taus = grids.stack_task_vectors(pre, fts)
    assert taus["n"] is None
    th = grids.grid_threshold_bits(taus, pairs)
    for g, (b, gam) in enumerate(pairs):
        masks = grids.grid_masks(taus, th, g)
        deltas = grids.grid_deltas(pre, taus, th, g)
        ref = sweeps.task_deltas("breadcrumbs", pre, fts, beta=b, gamma=gam)
        for t, ft in enumerate(fts):
            core = bcjax.breadcrumbs_mask(bcjax.task_vector(ft, pre), b, gam)
            for k in ("w", "b", "q"):
                np.testing.assert_array_equal(np.asarray(masks[k][t]), np.asarray(core[k]), err_msg=f"{k} {b, gam}")
        for k in ("w", "b", "q", "n"):
            np.testing.assert_array_equal(np.asarray(deltas[k]), np.asarray(ref[k]))


def test_one_select_bits_call_per_leaf_and_task(models, monkeypatch):
    pre, fts = models
    calls = []
    real = order_stats.select_bits

    def counting(arrays, ranks):
        calls.append(int(np.size(ranks)))
        return real(arrays, ranks)

    monkeypatch.setattr(order_stats, "select_bits", counting)
    taus = grids.stack_task_vectors(pre, fts)
    with jax.disable_jit():  # every call is seen (no cached trace)
        grids.grid_threshold_bits(taus, grids.beta_gamma_pairs((0.1, 0.2, 0.3, 0.4), (0.95, 0.97)))
    merged_leaves = 3  # w, b, q
    assert len(calls) == merged_leaves * len(fts)
    assert max(calls) <= 2 * 8 and max(calls) > 2


def test_variants_and_bad_grid():
    assert grids.masking_variant(0.0, 1.0) == "no mask"
    assert grids.masking_variant(0.9, 1.0) == "bottom-only"
    assert grids.masking_variant(0.0, 0.99) == "top-only"
    assert grids.masking_variant(0.9, 0.99) == "breadcrumbs"
    with pytest.raises(ValueError, match="beta <= gamma"):
        grids.beta_gamma_pairs((0.9,), (0.5,))


def _shard_stack(tree, mesh):
    sh = grids.leaf_shardings(tree, mesh, "x", skip_leading=1)
    return jax.tree.map(lambda x, s: None if x is None else jax.device_put(x, s), tree, sh,
                        is_leaf=lambda x: x is None), sh


def test_sharded_kernels_bit_identical_on_1_and_8_devices(models):
    assert jax.device_count() == 8
    pre, fts = models
    mesh = Mesh(np.array(jax.devices()), ("x",))
    one = Mesh(np.array(jax.devices()[:1]), ("x",))
    pairs = grids.beta_gamma_pairs((0.5, 0.9), (0.99,))
    weights = np.array([[0.4, 0.4, 0.0], [0.4, 0.4, 0.4], [1.0, 0.0, 1.0], [0.3, 0.3, 0.3]], np.float32)
    gidx = np.array([0, 1, 0, 1], np.int32)
    ind = sweeps.all_subsets(3)
    outs = {}
    for name, m in (("one", one), ("eight", mesh)):
        taus, tau_sh = _shard_stack(grids.stack_task_vectors(pre, fts), m)
        th = grids.grid_threshold_bits(taus, pairs)
        out_sh = grids.leaf_shardings(jax.tree.map(lambda x: np.zeros((4,) + np.shape(x)), pre), m, "x",
                                      skip_leading=1)
        kernel = grids.merges_kernel(out_shardings=out_sh)
        merged = grids.weighted_masked_merges(pre, taus, th, weights, gidx, kernel=kernel)
        deltas = grids.grid_deltas(pre, taus, th, 1)
        d_sh = grids.leaf_shardings(deltas, m, "x", skip_leading=1)
        deltas = jax.device_put(deltas, d_sh)
        rep = NamedSharding(m, P())
        p_sh = jax.tree.map(lambda _, r=rep: r, pre)
        sub_out = grids.leaf_shardings(jax.tree.map(lambda x: np.zeros((len(ind),) + np.shape(x)), pre), m, "x",
                                       skip_leading=1)
        sub = grids.subset_merge_kernel(in_shardings=(p_sh, d_sh, rep, rep), out_shardings=sub_out)(
            pre, deltas, ind, np.float32(0.5))
        if name == "eight":
            assert len(merged["w"].sharding.device_set) == 8 and len(sub["w"].sharding.device_set) == 8
            assert len(taus["w"].sharding.device_set) == 8
        outs[name] = (merged, sub)
    for k in ("w", "b", "q", "n"):
        for j in range(2):
            np.testing.assert_array_equal(np.asarray(outs["one"][j][k]), np.asarray(outs["eight"][j][k]), err_msg=k)
    # and the sharded grid merge is the core merge
    expect = bcjax.merge("breadcrumbs", pre, fts[:2], alpha=0.4, beta=0.5, gamma=0.99)
    np.testing.assert_array_equal(np.asarray(outs["eight"][0]["w"][0]), np.asarray(expect["w"]))
    ref = sweeps.subset_merges(pre, sweeps.task_deltas("breadcrumbs", pre, fts, beta=0.9, gamma=0.99), ind, 0.5)
    np.testing.assert_array_equal(np.asarray(outs["eight"][1]["w"]), np.asarray(ref["w"]))
