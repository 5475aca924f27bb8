"""The native CPU selection kernels (bcjax/_native) against the portable histogram path and
a numpy sort: they must be identical for every input, only faster."""
import os
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
from bcjax import _native, order_stats

# Only a machine without a C++ compiler skips; where one exists, a kernel that fails to build
# fails these tests instead of hiding behind the portable fallback.
pytestmark = pytest.mark.skipif(_native._compiler() is None, reason="no C++ compiler (the portable path is used)")


@pytest.fixture(autouse=True, scope="module")
def _kernel_registered():
    """The raw FFI calls below (``_native.select_*``) need the kernel's handlers registered,
    which ``available()`` does on first use: a test run on its own must not depend on an
    earlier test having loaded it."""
    _native.available()


def test_native_kernel_builds_where_a_compiler_exists():
    assert _native.available(), _native.unavailable_reason()

_portable = jax.jit(lambda b, r: order_stats._histogram_select(b, ranks=r))
_native_bits = jax.jit(_native.select_bits, static_argnames="sigmas")
_native_diff = jax.jit(lambda a, b, r, sigmas=_native.DEFAULT_SIGMAS: _native.select_diff_bits_multi(
    b, [a], r[None], sigmas=sigmas)[0], static_argnames="sigmas")


def _np_bits(x):
    """Magnitude bits as XLA:CPU computes them (denormals flushed to zero)."""
    return np.asarray(order_stats.magnitude_bits(jnp.asarray(x)))


def _sorted_ranks(bits, ranks):
    return np.sort(bits.ravel())[np.asarray(ranks)]


def _values(rng, n, kind):
    x = rng.standard_t(3, n).astype(np.float32)
    if kind == "ties":
        x = np.round(x * 2) / 2
    elif kind == "zeros":
        x[: n * 9 // 10] = 0
    elif kind == "denormal":
        x[::3] = rng.uniform(-1, 1, x[::3].shape).astype(np.float32) * np.float32(1e-39)
    elif kind == "constant":
        x[:] = 1.5
    return x


@pytest.mark.parametrize("n", [4097, 10_001, 65_536, 300_007])
@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "denormal", "constant"])
def test_native_select_equals_sort_and_portable(n, kind):
    rng = np.random.default_rng(n)
    bits = _np_bits(_values(rng, n, kind))
    ranks = np.array([0, int(0.9 * n), n - 1 - int(0.01 * n), n - 1, int(0.5 * n), 7], np.int32)
    for k in (1, 2, 4, 6):  # 6 ranks: two passes of the 4-bracket scan
        r = jnp.asarray(ranks[:k])
        want = _sorted_ranks(bits, ranks[:k])
        np.testing.assert_array_equal(np.asarray(_native_bits(bits, r)), want)
        np.testing.assert_array_equal(np.asarray(_portable(jnp.asarray(bits), r)), want)


@pytest.mark.parametrize("kind", ["normal", "ties", "denormal"])
def test_native_fallback_path_is_exact(kind):
    """sigmas=0 makes the sample brackets miss most ranks: the exact fallback must answer."""
    rng = np.random.default_rng(1)
    n = 50_001
    bits = _np_bits(_values(rng, n, kind))
    ranks = jnp.asarray(rng.integers(0, n, 4), jnp.int32)
    np.testing.assert_array_equal(np.asarray(_native_bits(bits, ranks, sigmas=0.0)),
                                  _sorted_ranks(bits, np.asarray(ranks)))


@pytest.mark.parametrize("kind", ["normal", "ties", "denormal"])
@pytest.mark.parametrize("n", [4099, 100_003])
def test_native_diff_matches_xla_difference(kind, n):
    """|a − b| computed inside the kernel equals XLA's, denormal flushing included."""
    rng = np.random.default_rng(n + len(kind))
    b = _values(rng, n, kind)
    a = b + _values(rng, n, kind) * np.float32(0.01)
    if kind == "denormal":  # differences that land in the subnormal range
        a[::5], b[::5] = np.float32(3e-39), np.float32(0)  # subnormal input: XLA reads it as 0
        a[1::7] = np.float32(2e-38)
        b[1::7] = np.float32(1e-38)
    bits = np.asarray(jax.jit(lambda x, y: order_stats.magnitude_bits(x - y))(a, b))
    ranks = jnp.asarray([0, int(0.9 * n), n - 1 - int(0.01 * n), n - 1], jnp.int32)
    want = _sorted_ranks(bits, np.asarray(ranks))
    np.testing.assert_array_equal(np.asarray(_native_diff(a, b, ranks)), want)
    np.testing.assert_array_equal(np.asarray(order_stats.select_diff_bits_multi(b, [a], ranks[None])[0]), want)
    np.testing.assert_array_equal(np.asarray(_native_diff(a, b, ranks, sigmas=0.0)), want)


@pytest.mark.parametrize("n", [4097, 70_001, 2_200_003])
@pytest.mark.parametrize("sigmas", [_native.DEFAULT_SIGMAS, 0.0])
def test_native_multi_task_selection(n, sigmas):
    """All tasks of a leaf in one cache-blocked pass (θ0 read once), each task with its own
    ranks; equal to XLA's |θt − θ0| sorted, also when every bracket misses (sigmas=0).
    2.2M elements exercise the threaded, chunked scan."""
    rng = np.random.default_rng(n)
    p0 = _values(rng, n, "normal")
    fts = [p0 + _values(rng, n, kind) * np.float32(0.01) for kind in ("normal", "ties", "denormal")]
    ranks = np.array([[int(0.9 * n), n - 1 - int(0.01 * n)], [0, n - 1], [n // 2, n // 2]], np.int32)
    got = np.asarray(_native.select_diff_bits_multi(p0, fts, ranks, sigmas=sigmas))
    diff_bits = jax.jit(lambda a, b: order_stats.magnitude_bits(a - b))
    want = np.stack([_sorted_ranks(np.asarray(diff_bits(f, p0)), ranks[t]) for t, f in enumerate(fts)])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(order_stats.select_diff_bits_multi(p0, fts, ranks)), want)


@pytest.mark.parametrize("n", [4099, 70_001, 2_200_003])
@pytest.mark.parametrize("sigmas", [_native.DEFAULT_SIGMAS, 0.0])
def test_native_bfloat16_leaves_select_the_float32_difference(n, sigmas):
    """bfloat16 leaves go into the kernel as they are (no float32 copy); the keys are the
    float32 difference after the upcast, exactly as XLA computes it (subnormal bf16 inputs
    and differences included), for one leaf and for a union of leaves."""
    import ml_dtypes

    rng = np.random.default_rng(n + 1)
    p0 = _values(rng, n, "normal")
    fts = [p0 + _values(rng, n, kind) * np.float32(0.01) for kind in ("normal", "ties", "denormal")]
    bf = np.dtype(ml_dtypes.bfloat16)
    p0, fts = p0.astype(bf), [f.astype(bf) for f in fts]
    tiny = np.array([1e-39, -5e-40, 2e-38, 1.5e-38], np.float32).astype(bf)  # subnormal bf16 and near it
    p0[::11] = tiny[0]
    fts[2][1::13], p0[1::13] = tiny[2], tiny[3]
    ranks = np.array([[int(0.9 * n), n - 1 - int(0.01 * n)], [0, n - 1], [n // 2, n // 2]], np.int32)
    diff_bits = jax.jit(lambda a, b: order_stats.magnitude_bits(a.astype(jnp.float32) - b.astype(jnp.float32)))
    want = np.stack([_sorted_ranks(np.asarray(diff_bits(f, p0)), ranks[t]) for t, f in enumerate(fts)])
    got = np.asarray(_native.select_diff_bits_leaves([p0], [[f] for f in fts], ranks, sigmas=sigmas))
    np.testing.assert_array_equal(got, want)
    k = n // 3  # the same tensor split into two leaves: a union of bfloat16 segments
    split = _native.select_diff_bits_leaves([p0[:k], p0[k:]], [[f[:k], f[k:]] for f in fts], ranks, sigmas=sigmas)
    np.testing.assert_array_equal(np.asarray(split), want)


@pytest.mark.parametrize("isa", sorted(_native.ISAS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_scan_instruction_set_selects_exactly(isa, dtype):
    """Each instruction set of the streaming pass (scalar, AVX2's 8 lanes, AVX-512's 16, and
    "auto"; asking for one the CPU lacks runs its best) gives the sorted answer: leaves whose
    sizes straddle the vector widths and the 2^16-key scan chunks, joined into one union, 1–4
    brackets per task (one union buffer per task holds all of them), ranks whose brackets
    overlap, all keys equal (every key inside every bracket), and brackets that all miss."""
    import ml_dtypes

    rng = np.random.default_rng(16)
    sizes = [1, 7, 9, 15, 17, 31, 65_536 + 13, 4_099]  # one union of 8 leaves, n = 69_715
    n = sum(sizes)
    p0 = _values(rng, n, "normal")
    fts = [p0 + _values(rng, n, kind) * np.float32(0.01) for kind in ("normal", "ties", "denormal")]
    fts.append(p0 + np.float32(0.25))  # every |τ| equal: all keys inside every bracket
    if dtype == "bfloat16":
        bf = np.dtype(ml_dtypes.bfloat16)
        p0, fts = p0.astype(bf), [f.astype(bf) for f in fts]
    cuts = np.cumsum(sizes)[:-1]
    leaves = lambda x: np.split(x, cuts)  # noqa: E731
    diff_bits = jax.jit(lambda a, b: order_stats.magnitude_bits(a.astype(jnp.float32) - b.astype(jnp.float32)))
    sorted_bits = [np.sort(np.asarray(diff_bits(f, p0))) for f in fts]
    all_ranks = np.array([[int(0.9 * n), n - 1 - int(0.01 * n), int(0.9 * n) + 3, 0],
                          [0, n - 1, n // 2, n // 2 + 1],
                          [n // 3, 5, n - 7, int(0.99 * n)],
                          [17, n - 1, n // 2, 1]], np.int32)
    for sigmas in (_native.DEFAULT_SIGMAS, 0.0):
        for k in (1, 2, 4):
            ranks = all_ranks[:, :k]
            want = np.stack([sb[r] for sb, r in zip(sorted_bits, ranks)])
            got = _native.select_diff_bits_leaves(leaves(p0), [leaves(f) for f in fts], ranks, sigmas=sigmas, isa=isa)
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"sigmas={sigmas}, K={k}")
    bits = np.asarray(diff_bits(fts[0], p0))  # keys given: select_bits' scan
    ranks = all_ranks[0, :3]
    np.testing.assert_array_equal(np.asarray(_native.select_bits(bits, ranks, isa=isa)), sorted_bits[0][ranks])
    np.testing.assert_array_equal(np.asarray(_native.select_bits(bits, ranks, sigmas=0.0, isa=isa)),
                                  sorted_bits[0][ranks])


@pytest.mark.parametrize("isa", ["auto", "scalar"])
def test_threads_split_a_large_union_and_join_their_keys(isa):
    """Above 2 × 2^21 keys the pass splits over threads (on a machine with 2+ cores); each
    thread's counts and bracket keys are joined before the selection: same answers as a sort,
    also for the exact fallback (sigmas=0), with the split falling inside a leaf."""
    rng = np.random.default_rng(22)
    sizes = [2**21 + 3, 2**21 + 101]  # one thread boundary lies inside the second leaf
    n = sum(sizes)
    p0 = rng.standard_normal(n, dtype=np.float32)
    fts = [p0 + rng.standard_normal(n, dtype=np.float32) * np.float32(0.01) for _ in range(2)]
    cut = sizes[0]
    ranks = np.array([[int(0.9 * n), int(0.99 * n)], [0, n // 2]], np.int32)
    diff_bits = jax.jit(lambda a, b: order_stats.magnitude_bits(a - b))
    want = np.stack([np.sort(np.asarray(diff_bits(f, p0)))[r] for f, r in zip(fts, ranks)])
    for sigmas in (_native.DEFAULT_SIGMAS, 0.0):
        got = _native.select_diff_bits_leaves([p0[:cut], p0[cut:]], [[f[:cut], f[cut:]] for f in fts], ranks,
                                              sigmas=sigmas, isa=isa)
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"sigmas={sigmas}")


def test_unknown_instruction_set_is_refused():
    with pytest.raises(ValueError, match="isa must be one of"):
        _native.select_bits(np.zeros(8, np.int32), np.zeros(1, np.int32), isa="neon")


def test_bfloat16_breadcrumbs_feeds_the_kernel_bfloat16():
    """The Breadcrumbs leaf kernel hands its bfloat16 leaves to the selection as they are:
    no float32 copies of the T + 1 leaves (memory of streaming merges, SPEC §7)."""
    from bcjax import merging

    p0 = jnp.zeros((64, 80), jnp.bfloat16)
    fts = (p0 + 1, p0 + 2)
    text = merging._breadcrumbs_tensor_leaf.lower(p0, fts, jnp.ones(2), jnp.int32(10), jnp.int32(5)).as_text()
    calls = [line for line in text.splitlines() if _native.MULTI_TARGET in line]
    assert calls and all("64x80xbf16" in line and "64x80xf32" not in line for line in calls), calls


@settings(max_examples=40, deadline=None)
@given(x=hnp.arrays(np.float32, st.integers(4097, 20_000),
                    elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=True)),
       qs=st.lists(st.floats(0, 1), min_size=1, max_size=5))
def test_native_select_property(x, qs):
    bits = _np_bits(x)
    n = bits.size
    ranks = np.array([min(int(q * n), n - 1) for q in qs], np.int32)
    np.testing.assert_array_equal(np.asarray(_native_bits(bits, jnp.asarray(ranks))), _sorted_ranks(bits, ranks))


def test_native_kernel_vmaps_over_ranks():
    rng = np.random.default_rng(3)
    bits = _np_bits(_values(rng, 20_000, "normal"))
    ranks = jnp.asarray([[1, 2], [100, 19_999], [5_000, 5_000]], jnp.int32)
    got = jax.vmap(lambda r: _native.select_bits(bits, r))(ranks)
    want = np.stack([_sorted_ranks(bits, np.asarray(r)) for r in ranks])
    np.testing.assert_array_equal(np.asarray(got), want)


def test_breadcrumbs_merge_lowers_to_the_native_kernel_on_cpu():
    """The CPU lowering of a Breadcrumbs merge uses the fused |θt − θ0| selection kernel."""
    from bcjax import merging

    p0 = jnp.zeros((64, 80), jnp.float32)
    fts = (p0 + 1.0, p0 + 2.0)
    text = merging._breadcrumbs_tensor_leaf.lower(p0, fts, jnp.ones(2), jnp.int32(10), jnp.int32(5)).as_text()
    assert _native.MULTI_TARGET in text


def _merge_script(extra_env_note: str) -> str:
    return textwrap.dedent(f"""
        # {extra_env_note}
        import warnings, numpy as np, bcjax
        rng = np.random.default_rng(0)
        p0 = {{"w": rng.standard_normal((96, 70)).astype(np.float32), "b": rng.standard_normal(40).astype(np.float32)}}
        fts = [{{k: v + rng.standard_t(3, v.shape).astype(np.float32) * 0.1 for k, v in p0.items()}} for _ in range(3)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = bcjax.merge("breadcrumbs", p0, fts, alpha=0.5, beta=0.8, gamma=0.97)
        from bcjax import _native
        print("NATIVE", _native.available(), "|", _native.unavailable_reason())
        print("WARN", [str(w.message) for w in caught if "native" in str(w.message)])
        np.save({{!r}}, np.asarray(out["w"]))
    """)


def test_portable_fallback_gives_identical_merges(tmp_path):
    """BCJAX_NATIVE=0 and a broken compiler both fall back to the portable path, and the
    merged parameters are bit-identical to the native ones."""
    outs = {}
    for name, env in {"native": {},
                      "disabled": {"BCJAX_NATIVE": "0"},
                      "nocompiler": {"CXX": "/bin/false", "BCJAX_CACHE": str(tmp_path / "fresh_cache")}}.items():
        path = tmp_path / f"{name}.npy"
        script = _merge_script(name).replace("{!r}", repr(str(path)))
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                              env={**os.environ, **env})
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[name] = (np.load(path), proc.stdout)
    assert "NATIVE True" in outs["native"][1]
    assert "NATIVE False | disabled by BCJAX_NATIVE=0" in outs["disabled"][1]
    assert "NATIVE False" in outs["nocompiler"][1] and "compiling select_bits.cc failed" in outs["nocompiler"][1]
    assert "portable XLA path" in outs["nocompiler"][1]  # the user is told, once, why it is slower
    np.testing.assert_array_equal(outs["native"][0], outs["disabled"][0])
    np.testing.assert_array_equal(outs["native"][0], outs["nocompiler"][0])


def test_merge_matches_numpy_reference_on_a_large_leaf():
    """End to end through bcjax.merge on a leaf big enough for the threaded scan."""
    import reference as ref

    rng = np.random.default_rng(5)
    p0 = {"w": rng.standard_normal((2100, 1024)).astype(np.float32)}
    fts = [{"w": p0["w"] + rng.standard_t(3, p0["w"].shape).astype(np.float32) * 0.01} for _ in range(2)]
    got = bcjax.merge("breadcrumbs", p0, fts, alpha=0.3, beta=0.9, gamma=0.99)
    want = ref.breadcrumbs(p0["w"], [f["w"] for f in fts], alpha=0.3, beta=0.9, gamma=0.99)
    np.testing.assert_allclose(np.asarray(got["w"]), want, rtol=0, atol=1e-6)
    # the mask itself must be exact: compare kept positions, not just values
    for f in fts:
        tau = f["w"] - p0["w"]
        np.testing.assert_array_equal(np.asarray(bcjax.breadcrumbs_mask({"w": tau}, 0.9, 0.99)["w"]),
                                      ref.breadcrumbs_mask(tau, 0.9, 0.99))
