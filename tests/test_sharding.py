"""Sharding invariance (SPEC §2): merged trees are bit-identical on 1 and 8 (fake CPU) devices."""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import bcjax


@pytest.fixture(scope="module")
def models():
    rng = np.random.default_rng(0)
    shapes = {"kernel": (256, 40), "big": (64, 96), "bias": (40,), "odd": (5, 3)}
    pre = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    fts = [{k: v + rng.standard_normal(v.shape).astype(np.float32) * (0.1 + t) for k, v in pre.items()} for t in range(3)]
    fs = [{k: rng.random(v.shape).astype(np.float32) for k, v in pre.items()} for _ in range(3)]
    return pre, fts, fs


def shard(tree, mesh):
    def put(x):
        spec = P("x") if x.ndim >= 1 and x.shape[0] % mesh.size == 0 else P()
        return jax.device_put(x, NamedSharding(mesh, spec))
    return jax.tree.map(put, tree)


CASES = [
    ("breadcrumbs", dict(alpha=0.4, beta=0.85, gamma=0.99)),
    ("breadcrumbs", dict(alpha=0.4, beta=0.5, gamma=0.9, granularity="row", axis=0)),
    ("task_arithmetic", dict(alpha=0.3)),
    ("simple_average", {}),
    ("ties", dict(density=0.2, alpha=1.0)),
    ("dare", dict(keep=0.3, alpha=0.5, key="key")),
    ("random_sparse", dict(keep=0.3, alpha=0.5, key="key")),
    ("fisher", dict(fishers="fs")),
    ("gradient_matching", dict(fishers="fs", alpha=0.5, h0=0.1)),
]


@pytest.mark.parametrize("method,hp", CASES, ids=[c[0] + str(i) for i, c in enumerate(CASES)])
def test_merge_is_bit_identical_on_1_and_8_devices(models, method, hp):
    assert jax.device_count() == 8, "tests/conftest.py configures 8 fake CPU devices"
    pre, fts, fs = models
    mesh = Mesh(np.array(jax.devices()), ("x",))
    one_device = jax.devices()[0]

    def resolve(hp, place):
        out = dict(hp)
        if out.get("key") == "key":
            out["key"] = jax.random.key(7)
        if out.get("fishers") == "fs":
            out["fishers"] = [place(f) for f in fs]
        return out

    single = bcjax.merge(method, jax.device_put(pre, one_device), [jax.device_put(f, one_device) for f in fts],
                         **resolve(hp, lambda t: jax.device_put(t, one_device)))
    sharded = bcjax.merge(method, shard(pre, mesh), [shard(f, mesh) for f in fts],
                          **resolve(hp, lambda t: shard(t, mesh)))
    assert len(sharded["kernel"].sharding.device_set) == 8
    for k in pre:
        np.testing.assert_array_equal(np.asarray(single[k]), np.asarray(sharded[k]), err_msg=f"{method}: {k}")


def test_breadcrumbs_mask_is_bit_identical_when_sharded(models):
    pre, fts, _ = models
    mesh = Mesh(np.array(jax.devices()), ("x",))
    tv = bcjax.task_vector(fts[0], pre)
    a = bcjax.breadcrumbs_mask(tv, 0.9, 0.99)
    b = bcjax.breadcrumbs_mask(shard(tv, mesh), 0.9, 0.99)
    for k in pre:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
