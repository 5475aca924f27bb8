"""Task arithmetic's native host kernel (bcjax/_native/merge_kernels.cc) against the XLA kernel
it replaces for concrete CPU inputs (``bcjax.merging._weighted_task_sum``): bit-identical for
every input — overflow rescue, NaN/Inf propagation, signed zeros, per-task α, float64 — and
used only where it may be (not under tracing, not for sharded arrays or 16-bit floats)."""
import subprocess
import sys
import textwrap

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bcjax
from bcjax import _native, merging
from bcjax.errors import NonFiniteError, OverflowMergeError

pytestmark = pytest.mark.skipif(_native._compiler() is None, reason="no C++ compiler (the XLA path is used)")


def _bits(x):
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


def _xla(p0, fts, alpha):
    """The XLA kernel itself, leaf by leaf (what the native kernel must equal bit for bit), with
    α read as ``merge`` reads it (e.g. −0.0 is the decimal 0)."""
    alpha = bcjax.get_method("task_arithmetic").normalize({"alpha": alpha}, len(fts))["alpha"]
    alphas = jnp.asarray(merging._per_task(alpha, len(fts), "alpha"))
    return {k: merging._weighted_task_sum(jnp.asarray(p0[k]), tuple(jnp.asarray(f[k]) for f in fts), None, alphas)
            if np.size(p0[k]) else p0[k] for k in p0}


def _native_direct(p0, fts, alpha):
    out = [np.empty_like(p) for p in p0]
    _native.task_sum(p0, fts, out, np.asarray(merging._per_task(alpha, len(fts), "alpha")))
    return out


def _with_specials(rng, dtype, n, num_tasks):
    """θ0 and θt with signed zeros, NaN/Inf, denormals and entries whose τ or Σ overflows
    although the merged value is representable (the rescue) or is not (stays Inf)."""
    p = rng.standard_normal(n).astype(dtype)
    fts = [(p + rng.standard_normal(n).astype(dtype) * dtype(1e-3)).astype(dtype) for _ in range(num_tasks)]
    big = np.finfo(dtype).max
    if n >= 12:
        p[0], fts[0][0] = -0.0, -0.0
        p[1] = -big * dtype(0.9)
        for f in fts:
            f[1] = big * dtype(0.9)  # τ = 1.8·max overflows; θ0 + α Σ τ is finite for small α
        p[2] = np.nan
        fts[-1][3] = np.inf
        fts[0][4], fts[-1][4] = np.inf, -np.inf
        p[5], fts[0][5] = big, big * dtype(0.5)
        p[6:9] = np.finfo(dtype).smallest_subnormal * np.arange(1, 4, dtype=dtype)
        p[9], fts[0][9] = big, -big
        p[10] = -big
        fts[0][10] = big
        fts[-1][11] = -big
    return p, fts


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("num_tasks", [1, 2, 3, 8, 17])  # 17: past the unrolled task counts
@pytest.mark.parametrize("n", [1, 5, 1023, 1025, 70_001])
def test_native_task_sum_is_bit_identical_to_the_xla_kernel(dtype, num_tasks, n):
    rng = np.random.default_rng(n * 10 + num_tasks)
    with jax.enable_x64(dtype == np.float64):
        for alpha in (0.3, -1.0, [float(a) for a in rng.uniform(-2, 2, num_tasks)], 1e-30, 0.0):
            p, fts = _with_specials(rng, dtype, n, num_tasks)
            want = _xla({"x": p}, [{"x": f} for f in fts], alpha)["x"]
            got = _native_direct([p], [[f] for f in fts], alpha)[0]
            assert got.dtype == np.asarray(want).dtype
            np.testing.assert_array_equal(_bits(got), _bits(want))


def test_native_task_sum_splits_leaves_and_chunks_like_one_leaf():
    """Many leaves of assorted sizes (chunk and block boundaries) in one call equal the leaves
    merged one by one."""
    rng = np.random.default_rng(0)
    sizes = [1, 7, 1024, 1025, 65_536, 65_537, 200_000, 3]
    p0 = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    fts = [[p + rng.standard_normal(p.size).astype(np.float32) for p in p0] for _ in range(4)]
    together = _native_direct(p0, fts, [0.5, -0.25, 1.0, 2.0])
    for i in range(len(sizes)):
        alone = _native_direct([p0[i]], [[task[i]] for task in fts], [0.5, -0.25, 1.0, 2.0])[0]
        np.testing.assert_array_equal(_bits(together[i]), _bits(alone))


def _models(rng, shapes, num_tasks, dtype=np.float32):
    p0 = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    fts = [{k: (v + rng.standard_normal(v.shape).astype(dtype) * dtype(0.01)).astype(dtype) for k, v in p0.items()}
           for _ in range(num_tasks)]
    return p0, fts


SHAPES = {"w": (33, 17), "b": (17,), "s": (), "e": (4, 0), "c": (2, 3, 5, 7)}


@pytest.mark.parametrize("inputs", ["numpy", "device", "mixed"])
def test_merge_uses_the_native_kernel_for_concrete_cpu_inputs(inputs, monkeypatch):
    rng = np.random.default_rng(1)
    p0, fts = _models(rng, SHAPES, 3)
    want = _xla(p0, fts, [0.3, -0.7, 1.5])
    if inputs == "device":
        p0, fts = jax.device_put((p0, fts))
    elif inputs == "mixed":
        fts = [jax.device_put(fts[0]), *fts[1:]]
    calls = []
    real = _native.task_sum
    monkeypatch.setattr(_native, "task_sum", lambda *a: calls.append(len(a[0])) or real(*a))
    got = bcjax.merge("task_arithmetic", p0, fts, alpha=[0.3, -0.7, 1.5])
    assert calls == [4]  # one call for every merged non-empty leaf
    for k in SHAPES:
        assert np.shape(got[k]) == SHAPES[k]
        if np.size(got[k]):
            assert isinstance(got[k], jax.Array) and got[k].dtype == jnp.float32
        np.testing.assert_array_equal(_bits(got[k]), _bits(want[k]))


def test_merge_native_output_follows_committed_inputs():
    rng = np.random.default_rng(2)
    p0, fts = _models(rng, {"w": (8, 8)}, 2)
    dev = jax.devices()[-1]
    got = bcjax.merge("task_arithmetic", jax.device_put(p0, dev), [jax.device_put(f, dev) for f in fts], alpha=0.5)
    assert got["w"].committed and got["w"].devices() == {dev}
    loose = bcjax.merge("task_arithmetic", p0, fts, alpha=0.5)["w"]
    assert not loose.committed and loose.devices() == {jax.devices()[0]}
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(loose))


def test_merge_native_reads_strided_and_misaligned_numpy_views():
    rng = np.random.default_rng(3)
    base = [rng.standard_normal(2 * 40 * 30 + 3).astype(np.float32) for _ in range(4)]
    strided = [{"w": b[:2400].reshape(40, 60)[:, ::2]} for b in base]  # non-contiguous
    shifted = [{"w": b[3:3 + 1200].reshape(40, 30)} for b in base]  # 12 bytes past the start
    for views in (strided, shifted):
        want = _xla(views[0], views[1:], 0.4)["w"]
        got = bcjax.merge("task_arithmetic", views[0], views[1:], alpha=0.4)["w"]
        np.testing.assert_array_equal(_bits(got), _bits(want))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_merge_16_bit_leaves_keep_the_xla_kernel(dtype, monkeypatch):
    rng = np.random.default_rng(4)
    p0, fts = _models(rng, {"w": (16, 9)}, 3)
    p0, fts = jax.tree.map(lambda x: np.asarray(x, dtype), (p0, fts))
    monkeypatch.setattr(_native, "task_sum", lambda *a: pytest.fail("16-bit leaves reached the native kernel"))
    got = bcjax.merge("task_arithmetic", p0, fts, alpha=0.3)["w"]
    assert got.dtype == dtype
    np.testing.assert_array_equal(_bits(got), _bits(_xla(p0, fts, 0.3)["w"]))


def test_merge_float64_with_x64_uses_the_native_kernel_and_without_it_float32():
    rng = np.random.default_rng(5)
    p0, fts = _models(rng, {"w": (10, 3)}, 2, dtype=np.float64)
    with jax.enable_x64(True):
        got = bcjax.merge("task_arithmetic", p0, fts, alpha=0.3)["w"]
        assert got.dtype == jnp.float64
        np.testing.assert_array_equal(_bits(got), _bits(_xla(p0, fts, 0.3)["w"]))
    got32 = bcjax.merge("task_arithmetic", p0, fts, alpha=0.3)["w"]  # as JAX reads float64 without x64
    assert got32.dtype == jnp.float32
    np.testing.assert_array_equal(_bits(got32), _bits(_xla(p0, fts, 0.3)["w"]))


def test_traced_merges_keep_the_xla_kernel_jit_vmap_grad(monkeypatch):
    rng = np.random.default_rng(6)
    p0, fts = _models(rng, {"w": (6, 5), "b": (5,)}, 3)
    eager = bcjax.merge("task_arithmetic", p0, fts, alpha=0.3)
    eager_b = bcjax.merge("task_arithmetic", p0, fts, alpha=0.2)["b"]
    monkeypatch.setattr(_native, "task_sum", lambda *a: pytest.fail("a traced merge reached the native kernel"))
    jitted = jax.jit(lambda p, f: bcjax.merge("task_arithmetic", p, f, alpha=0.3))(p0, fts)
    for k in eager:
        np.testing.assert_array_equal(_bits(jitted[k]), _bits(eager[k]))
    alphas = jnp.array([0.1, 0.2, 0.3])
    batched = jax.vmap(lambda a: bcjax.merge("task_arithmetic", p0, fts, alpha=a * jnp.ones(3))["b"])(alphas)
    np.testing.assert_allclose(batched[1], eager_b, rtol=1e-6)
    grad = jax.grad(lambda a: bcjax.merge("task_arithmetic", p0, fts, alpha=a)["w"].sum())(0.5)
    want = sum(float(np.sum(f["w"] - p0["w"])) for f in fts)
    np.testing.assert_allclose(grad, want, rtol=1e-4)


def test_sharded_inputs_keep_the_xla_kernel_and_their_sharding(monkeypatch):
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    rng = np.random.default_rng(7)
    p0, fts = _models(rng, {"w": (len(jax.devices()) * 4, 3)}, 2)
    want = bcjax.merge("task_arithmetic", p0, fts, alpha=0.3)["w"]
    p0s, ftss = jax.device_put((p0, fts), sharding)
    monkeypatch.setattr(_native, "task_sum", lambda *a: pytest.fail("a sharded merge reached the native kernel"))
    got = bcjax.merge("task_arithmetic", p0s, ftss, alpha=0.3)["w"]
    assert got.sharding == sharding
    np.testing.assert_array_equal(_bits(got), _bits(want))


def test_validation_on_native_outputs_names_model_path_and_overflow():
    p0 = {"a": np.zeros(4, np.float32), "b": np.ones(3, np.float32)}
    fts = [{"a": np.ones(4, np.float32), "b": np.ones(3, np.float32)} for _ in range(2)]
    fts[1]["b"] = np.array([1, np.nan, 1], np.float32)
    with pytest.raises(NonFiniteError, match=r"fine-tuned model 1.*'b'"):
        bcjax.merge("task_arithmetic", p0, fts, alpha=1.0)
    big = np.finfo(np.float32).max
    p0 = {"w": np.array([-big * 0.9, big * 0.9], np.float32)}
    fts = [{"w": np.array([big * 0.9, big * 0.9], np.float32)}]
    rescued = bcjax.merge("task_arithmetic", p0, fts, alpha=0.5)["w"]  # τ overflows, θ* does not
    np.testing.assert_array_equal(_bits(rescued), _bits(_xla(p0, fts, 0.5)["w"]))
    assert np.all(np.isfinite(np.asarray(rescued)))
    with pytest.raises(OverflowMergeError, match="'w'"):
        bcjax.merge("task_arithmetic", p0, fts * 3, alpha=2.0)


@settings(max_examples=40, deadline=None)
@given(shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9),
       num_tasks=st.integers(1, 5), data=st.data())
def test_merge_native_equals_xla_kernel_and_numpy_reference(shape, num_tasks, data):
    floats = st.floats(-1e3, 1e3, width=32, allow_subnormal=True)
    p = data.draw(hnp.arrays(np.float32, shape, elements=floats))
    fts = [data.draw(hnp.arrays(np.float32, shape, elements=floats)) for _ in range(num_tasks)]
    alpha = data.draw(st.one_of(st.floats(-3, 3, width=32), st.lists(st.floats(-3, 3, width=32),
                                                                      min_size=num_tasks, max_size=num_tasks)))
    got = bcjax.merge("task_arithmetic", {"x": p}, [{"x": f} for f in fts], alpha=alpha)["x"]
    np.testing.assert_array_equal(_bits(got), _bits(_xla({"x": p}, [{"x": f} for f in fts], alpha)["x"]))
    a = np.broadcast_to(np.asarray(alpha, np.float64), (num_tasks,))
    ref = p.astype(np.float64) + sum(a[t] * (fts[t].astype(np.float64) - p) for t in range(num_tasks))
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("method, hparams", [("task_arithmetic", "alpha=0.3"),
                                             ("breadcrumbs", "alpha=0.3, beta=0.5, gamma=0.9"),
                                             ("ties", "density=0.2, alpha=0.7")])
def test_first_merge_in_a_fresh_process_compiles_no_xla_program(method, hparams):
    """What makes a process's first merge as fast as its second: nothing is compiled (the
    native kernels are built beforehand, once per machine): task arithmetic's sum, and
    Breadcrumbs' (tensor granularity) per-leaf selection and masked sum, TIES's model-wide
    threshold selection and merge pass, leaves above and below order_stats.SORT_BELOW."""
    code = textwrap.dedent(f"""
        import logging, numpy as np, jax, bcjax
        from bcjax import _native
        assert _native.available()
        rng = np.random.default_rng(0)
        p0 = {{"w": rng.standard_normal((64, 32), dtype=np.float32), "b": np.zeros(32, np.float32),
              "big": rng.standard_normal(5000, dtype=np.float32)}}
        fts = [{{k: v + rng.standard_normal(v.shape, dtype=np.float32) for k, v in p0.items()}} for _ in range(3)]
        dev = jax.device_put((p0, fts)); jax.block_until_ready(dev)
        records = []
        handler = logging.Handler(); handler.emit = records.append
        logging.getLogger("jax").addHandler(handler)
        jax.config.update("jax_log_compiles", True)
        for models in (dev, (p0, fts)):
            jax.block_until_ready(bcjax.merge("{method}", models[0], models[1], {hparams}))
        compiled = [r.getMessage() for r in records if "Compiling" in r.getMessage()]
        print(len(compiled), compiled[:3])
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split()[0] == "0", res.stdout


# --------------------------------------------------------------------------- TIES's merge pass
def _ties_inputs(rng, num_tasks, n):
    p = rng.standard_normal(n).astype(np.float32)
    fts = [(p + rng.standard_t(3, n).astype(np.float32) * np.float32(1e-2)).astype(np.float32)
           for _ in range(num_tasks)]
    big = np.finfo(np.float32).max
    if n >= 13:
        p[0], fts[0][0] = -0.0, -0.0
        p[1] = -big * np.float32(0.9)
        for f in fts:
            f[1] = big * np.float32(0.9)  # τ overflows: the rescue
        p[2] = np.nan
        fts[-1][3] = np.inf
        fts[0][4] = -np.inf
        p[5:8] = np.float32(1e-40)  # denormals
        fts[0][6] = np.float32(3e-40)
        fts[0][9] = p[9]  # τ = 0
        if num_tasks > 1:  # opposite signs: the election
            fts[1][10], fts[0][10] = p[10] + 0.5, p[10] - 0.5
    with np.errstate(over="ignore", invalid="ignore"):
        bits = [np.asarray(merging.order_stats.magnitude_bits(jnp.asarray(f - p))) for f in fts]
    thresholds = np.array([np.quantile(b, 0.7) for b in bits], np.int32)
    return p, fts, thresholds


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 8, 17])  # 17: past the unrolled task counts
@pytest.mark.parametrize("n", [1, 13, 1025, 70_001])
def test_native_ties_merge_is_bit_identical_to_the_xla_kernel(num_tasks, n):
    rng = np.random.default_rng(n + num_tasks)
    for alpha in (1.0, 0.7, [float(a) for a in rng.uniform(-2, 2, num_tasks)]):
        p, fts, thresholds = _ties_inputs(rng, num_tasks, n)
        alphas = np.asarray(alpha, np.float32) if isinstance(alpha, list) else alpha
        want = merging._ties_leaf(p, tuple(fts), jnp.asarray(thresholds), alphas)
        got = np.empty_like(p)
        _native.ties_merge([p], [[f] for f in fts], [got], thresholds, alphas)
        np.testing.assert_array_equal(_bits(got), _bits(want))


@pytest.mark.parametrize("num_tasks, kk", [(1, 1), (3, 1), (8, 2), (2, 5)])  # kk 5: two scans of ≤ 4 brackets
def test_native_model_selection_equals_a_sort_over_all_leaves(num_tasks, kk):
    """TIES's model-wide selection on host memory (one C call) against a NumPy sort of the keys
    |θt − θ0| of all leaves together (XLA's denormal flushing), ties and special values included."""
    rng = np.random.default_rng(num_tasks * 10 + kk)
    sizes = [1, 7, 2048, 2049, 5000, 70_001]
    p0 = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    fts = [[(p + rng.standard_t(3, p.size).astype(np.float32) * np.float32(1e-2)).astype(np.float32) for p in p0]
           for _ in range(num_tasks)]
    fts[0][4][:100] = p0[4][:100]  # τ = 0: many tied keys
    fts[0][5][:50] = p0[5][:50] + np.float32(0.25)  # equal magnitudes
    p0[3][:10] = np.float32(1e-40)  # denormals (flushed as XLA:CPU does)
    total = sum(sizes)
    ranks = np.sort(rng.integers(0, total, size=(num_tasks, kk)), axis=1).astype(np.int32)
    ranks[0, 0], ranks[-1, -1] = 0, total - 1  # the extremes
    got = _native.select_diff_bits_model(p0, fts, ranks)
    for t in range(num_tasks):
        keys = np.sort(np.concatenate([np.asarray(merging.order_stats.magnitude_bits(jnp.asarray(f - p)))
                                       for p, f in zip(p0, fts[t])]))
        np.testing.assert_array_equal(got[t], keys[ranks[t]])
    with pytest.raises(RuntimeError):  # a rank outside [0, N)
        _native.select_diff_bits_model(p0, fts, np.full((num_tasks, kk), total, np.int32))


@pytest.mark.parametrize("density", [1e-5, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("inputs", ["numpy", "device"])
def test_ties_thresholds_natively_equal_the_xla_path(density, inputs, monkeypatch):
    """Concrete float32 CPU leaves get TIES's thresholds from one native call (no XLA program);
    traced ones from the XLA FFI handler; both the same bits."""
    rng = np.random.default_rng(3)
    p0, fts = _models(rng, {"w": (40, 30), "b": (30,), "s": (), "big": (3000,)}, 3)
    if inputs == "device":
        p0, fts = jax.device_put((p0, fts))
    flags = [True] * 4
    calls = []
    real = _native.select_diff_bits_model
    monkeypatch.setattr(_native, "select_diff_bits_model", lambda *a: calls.append(1) or real(*a))
    got = merging.ties_thresholds(p0, fts, flags, density)
    assert calls == [1]
    want = jax.jit(lambda p, f: merging.ties_thresholds(p, f, flags, density))(p0, fts)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("inputs", ["numpy", "device"])
def test_ties_uses_the_native_merge_pass_for_concrete_cpu_inputs(inputs, monkeypatch):
    rng = np.random.default_rng(8)
    p0, fts = _models(rng, {"w": (40, 30), "b": (30,), "s": ()}, 3)
    if inputs == "device":
        p0, fts = jax.device_put((p0, fts))
    thresholds = merging.ties_thresholds(p0, fts, [True] * 3, 0.2)
    want = {k: merging._ties_leaf(jnp.asarray(p0[k]), tuple(jnp.asarray(f[k]) for f in fts), thresholds, 1.0)
            for k in p0}
    calls = []
    real = _native.ties_merge
    monkeypatch.setattr(_native, "ties_merge", lambda *a: calls.append(len(a[0])) or real(*a))
    got = bcjax.merge("ties", p0, fts, density=0.2)
    assert calls == [3]
    for k in p0:
        np.testing.assert_array_equal(_bits(got[k]), _bits(want[k]))
    monkeypatch.setattr(_native, "ties_merge", lambda *a: pytest.fail("a traced merge reached the native kernel"))
    jitted = jax.jit(lambda p, f: bcjax.merge("ties", p, f, density=0.2))(p0, fts)
    for k in p0:
        np.testing.assert_array_equal(_bits(jitted[k]), _bits(want[k]))


# --------------------------------------------------------------------------- Breadcrumbs (tensor granularity)
def _breadcrumbs_xla(p0, fts, alpha, beta, gamma):
    """The XLA leaf kernel itself, leaf by leaf (device arrays: its own selection), with the
    hyper-parameters read as ``merge`` reads them."""
    hp = bcjax.get_method("breadcrumbs").normalize({"alpha": alpha, "beta": beta, "gamma": gamma}, len(fts))
    alphas = jnp.asarray(merging._per_task(hp["alpha"], len(fts), "alpha"))
    out = {}
    for k in p0:
        if not np.size(p0[k]):
            out[k] = p0[k]
            continue
        n_bot, n_top = merging.breadcrumbs_counts(int(np.size(p0[k])), hp["beta"], hp["gamma"])
        out[k] = merging._breadcrumbs_tensor_leaf(jnp.asarray(p0[k]), tuple(jnp.asarray(f[k]) for f in fts), alphas,
                                                  n_bot, n_top)
    return out


def _breadcrumbs_native(p0, fts, alpha, beta, gamma):
    """The native path directly on NumPy leaves (selection + masked sum), one call for all leaves."""
    hp = bcjax.get_method("breadcrumbs").normalize({"alpha": alpha, "beta": beta, "gamma": gamma}, len(fts))
    alphas = merging._per_task(hp["alpha"], len(fts), "alpha")
    return merging._native_breadcrumbs(alphas, hp["beta"], hp["gamma"], p0, fts, None)


def _numpy_breadcrumbs(p, fts, alphas, beta, gamma):
    """Plain NumPy reference of SPEC §2 (tensor granularity) in float64 for the sum."""
    n = p.size
    n_bot, n_top = merging.breadcrumbs_counts(n, beta, gamma)
    out = p.astype(np.float64)
    for t, f in enumerate(fts):
        tau = (f - p).astype(np.float32)
        mag = np.abs(tau).view(np.int32)
        srt = np.sort(mag.ravel())
        lo = srt[min(n_bot, n - 1)] if n_bot < n else np.iinfo(np.int32).max
        hi = srt[min(max(n - n_top, 0), n - 1)] if n_top >= 1 else np.iinfo(np.int32).max
        keep = (mag >= lo) & (mag < hi)
        out = out + np.where(keep, np.float64(alphas[t]) * tau, 0.0)
    return out


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 8, 17])  # 17: past the unrolled task counts
@pytest.mark.parametrize("n", [1, 13, 2048, 2049, 4097, 70_001])  # ≤ SORT_BELOW: the sort path on both sides
def test_native_breadcrumbs_is_bit_identical_to_the_xla_kernel(num_tasks, n):
    rng = np.random.default_rng(n * 7 + num_tasks)
    for alpha, beta, gamma in ((0.3, 0.9, 0.99), (1.0, 0.0, 1.0), (-0.7, 0.5, 0.5),
                               ([float(a) for a in rng.uniform(-2, 2, num_tasks)], 0.2, 0.8)):
        p, fts = _with_specials(rng, np.float32, n, num_tasks)
        with np.errstate(over="ignore", invalid="ignore"):
            if n >= 20:  # ties at the thresholds: repeated magnitudes, both signs, and τ = 0
                for f in fts:
                    f[12:20] = p[12:20] + np.float32(0.25) * np.array([1, -1, 1, -1, 1, -1, 0, 0], np.float32)
        want = _breadcrumbs_xla({"x": p}, [{"x": f} for f in fts], alpha, beta, gamma)["x"]
        got = _breadcrumbs_native([p], [[f] for f in fts], alpha, beta, gamma)[0]
        np.testing.assert_array_equal(_bits(got), _bits(want))


def test_native_breadcrumbs_many_leaves_in_one_call_equal_each_leaf_alone():
    rng = np.random.default_rng(11)
    sizes = [1, 7, 1024, 1025, 2048, 4096, 65_537, 200_000, 3]
    p0 = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    fts = [[p + rng.standard_normal(p.size).astype(np.float32) for p in p0] for _ in range(4)]
    together = _breadcrumbs_native(p0, fts, [0.5, -0.25, 1.0, 2.0], 0.6, 0.95)
    for i in range(len(sizes)):
        want = _breadcrumbs_xla({"x": p0[i]}, [{"x": task[i]} for task in fts], [0.5, -0.25, 1.0, 2.0], 0.6, 0.95)
        np.testing.assert_array_equal(_bits(together[i]), _bits(want["x"]))


def test_native_breadcrumbs_denormals_signed_zeros_and_overflow_near_the_float32_limit():
    rng = np.random.default_rng(12)
    n = 5000
    tiny = np.finfo(np.float32).smallest_subnormal
    p = (rng.standard_normal(n) * 3e38 / 4).astype(np.float32)
    fts = [(rng.standard_normal(n) * 3e38 / 4).astype(np.float32) for _ in range(3)]
    p[:100] = tiny * np.arange(100, dtype=np.float32)  # denormal θ0 and τ
    for f in fts:
        f[:100] = -tiny * np.arange(100, dtype=np.float32)
        f[100:200] = -0.0
    p[100:200] = 0.0
    with np.errstate(over="ignore"):
        assert not all(np.all(np.isfinite(f - p)) for f in fts)  # some τ overflow: the rescue runs
    overflowed = False
    for alpha, gamma in ((0.3, 0.95), (1.0, 1.0), ([0.9, 0.9, 0.9], 1.0)):
        want = _breadcrumbs_xla({"x": p}, [{"x": f} for f in fts], alpha, 0.1, gamma)["x"]
        got = _breadcrumbs_native([p], [[f] for f in fts], alpha, 0.1, gamma)[0]
        overflowed |= not np.all(np.isfinite(np.asarray(want)))
        np.testing.assert_array_equal(_bits(got), _bits(want))
    assert overflowed  # and some merged values exceed float32 even after the rescue


@settings(max_examples=40, deadline=None)
@given(shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=9),
       num_tasks=st.integers(1, 5), beta=st.floats(0, 1, width=32), width=st.floats(0, 1, width=32),
       data=st.data())
def test_breadcrumbs_native_equals_xla_kernel_and_numpy_reference(shape, num_tasks, beta, width, data):
    gamma = float(np.float32(min(1.0, beta + width)))
    floats = st.floats(-1e3, 1e3, width=32, allow_subnormal=True)
    p = data.draw(hnp.arrays(np.float32, shape, elements=floats))
    fts = [data.draw(hnp.arrays(np.float32, shape, elements=floats)) for _ in range(num_tasks)]
    alpha = data.draw(st.one_of(st.floats(-3, 3, width=32), st.lists(st.floats(-3, 3, width=32),
                                                                      min_size=num_tasks, max_size=num_tasks)))
    got = bcjax.merge("breadcrumbs", {"x": p}, [{"x": f} for f in fts], alpha=alpha, beta=beta, gamma=gamma)["x"]
    want = _breadcrumbs_xla({"x": p}, [{"x": f} for f in fts], alpha, beta, gamma)["x"]
    np.testing.assert_array_equal(_bits(got), _bits(want))
    hp = bcjax.get_method("breadcrumbs").normalize({"alpha": alpha, "beta": beta, "gamma": gamma}, num_tasks)
    a = np.broadcast_to(np.asarray(hp["alpha"], np.float32), (num_tasks,))
    ref = _numpy_breadcrumbs(p, fts, a, hp["beta"], hp["gamma"])
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("inputs", ["numpy", "device", "mixed"])
def test_breadcrumbs_uses_the_native_kernels_for_concrete_cpu_inputs(inputs, monkeypatch):
    rng = np.random.default_rng(13)
    p0, fts = _models(rng, SHAPES, 3)
    want = _breadcrumbs_xla(p0, fts, [0.3, -0.7, 1.5], 0.4, 0.9)
    if inputs == "device":
        p0, fts = jax.device_put((p0, fts))
    elif inputs == "mixed":
        fts = [jax.device_put(fts[0]), *fts[1:]]
    calls = []
    real_select, real_sum = _native.select_diff_bits_per_leaf, _native.masked_task_sum
    monkeypatch.setattr(_native, "select_diff_bits_per_leaf", lambda *a: calls.append(("select", len(a[0])))
                        or real_select(*a))
    monkeypatch.setattr(_native, "masked_task_sum", lambda *a: calls.append(("sum", len(a[0]))) or real_sum(*a))
    got = bcjax.merge("breadcrumbs", p0, fts, alpha=[0.3, -0.7, 1.5], beta=0.4, gamma=0.9)
    assert calls == [("select", 4), ("sum", 4)]  # one call each for every merged non-empty leaf
    for k in SHAPES:
        assert np.shape(got[k]) == SHAPES[k]
        if np.size(got[k]):
            assert isinstance(got[k], jax.Array) and got[k].dtype == jnp.float32
        np.testing.assert_array_equal(_bits(got[k]), _bits(want[k]))


@pytest.mark.parametrize("case", ["bfloat16", "float16", "jit", "sharded", "row"])
def test_breadcrumbs_keeps_the_xla_kernel_where_the_native_one_must_not_run(case, monkeypatch):
    rng = np.random.default_rng(14)
    p0, fts = _models(rng, {"w": (len(jax.devices()) * 8, 9)}, 3)
    kwargs = dict(alpha=0.3, beta=0.3, gamma=0.9)
    if case in ("bfloat16", "float16"):
        p0, fts = jax.tree.map(lambda x: np.asarray(x, getattr(jnp, case)), (p0, fts))
    want = {k: np.asarray(v) for k, v in _breadcrumbs_xla(p0, fts, 0.3, 0.3, 0.9).items()}
    fail = lambda *a: pytest.fail(f"{case}: the native Breadcrumbs kernel ran")  # noqa: E731
    monkeypatch.setattr(_native, "select_diff_bits_per_leaf", fail)
    monkeypatch.setattr(_native, "masked_task_sum", fail)
    if case == "jit":
        got = jax.jit(lambda p, f: bcjax.merge("breadcrumbs", p, f, **kwargs))(p0, fts)
    elif case == "sharded":
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
        got = bcjax.merge("breadcrumbs", *jax.device_put((p0, fts), sharding), **kwargs)
        assert got["w"].sharding == sharding
    elif case == "row":
        got = bcjax.merge("breadcrumbs", p0, fts, granularity="row", axis=0, **kwargs)
        want = {"w": np.asarray(merging._breadcrumbs_row_leaf(
            jnp.asarray(p0["w"]), tuple(jnp.asarray(f["w"]) for f in fts), jnp.full(3, 0.3, jnp.float32),
            np.float32(0.3), np.float32(0.9), 0))}
    else:
        got = bcjax.merge("breadcrumbs", p0, fts, **kwargs)
    np.testing.assert_array_equal(_bits(got["w"]), _bits(want["w"]))


def test_breadcrumbs_native_validation_names_model_path_and_overflow():
    p0 = {"a": np.zeros(4, np.float32), "b": np.ones(3, np.float32)}
    fts = [{"a": np.arange(4, dtype=np.float32), "b": np.ones(3, np.float32)} for _ in range(2)]
    fts[1]["b"] = np.array([1, np.nan, 1], np.float32)
    with pytest.raises(NonFiniteError, match=r"fine-tuned model 1.*'b'"):
        bcjax.merge("breadcrumbs", p0, fts, alpha=1.0, beta=0.0, gamma=1.0)
    big = np.finfo(np.float32).max
    p0 = {"w": np.array([-big * 0.9, big * 0.9], np.float32)}
    fts = [{"w": np.array([big * 0.9, big * 0.9], np.float32)}]
    rescued = bcjax.merge("breadcrumbs", p0, fts, alpha=0.5, beta=0.0, gamma=1.0)["w"]  # τ overflows, θ* does not
    np.testing.assert_array_equal(_bits(rescued), _bits(_breadcrumbs_xla(p0, fts, 0.5, 0.0, 1.0)["w"]))
    assert np.all(np.isfinite(np.asarray(rescued)))
    with pytest.raises(OverflowMergeError, match="'w'"):
        bcjax.merge("breadcrumbs", p0, fts * 3, alpha=2.0, beta=0.0, gamma=1.0)
