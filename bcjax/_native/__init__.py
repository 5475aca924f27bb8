"""Optional native CPU kernels, compiled on first use (XLA FFI custom calls).

``select_bits.cc`` is an exact order-statistics kernel for the CPU backend: one streaming
pass (sample → bracket → count → select inside the bracket) instead of the portable
path's two scatter-add histogram passes, which XLA:CPU executes one element at a time.
Its results equal the portable path's exactly (tests/test_native.py); it only changes
speed. On GPU/TPU, or where no C++ compiler is found, bcjax uses the portable path.

The shared library is built with the system C++ compiler (``$CXX`` or ``g++``) against
the FFI headers shipped in jaxlib, once per (source, jaxlib, compiler) into
``$BCJAX_CACHE/native`` (default ``~/.cache/bcjax/native``), with an atomic rename so
concurrent processes never load a half-written file, and a sidecar recording its size and
sha256: a cached library that fails the check (truncated, altered) is rebuilt, never loaded. ``BCJAX_NATIVE=0`` disables it.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

__all__ = ["HISTOGRAM_TARGET", "MULTI_TARGET", "TARGET", "VIEWS_TARGET", "diff_histograms", "select_diff_bits_multi",
           "select_diff_bits_leaves", "select_diff_bits_per_leaf", "select_diff_bits_views", "masked_task_sum",
           "task_sum", "ties_merge", "available",
           "library_path", "select_bits", "unavailable_reason"]

TARGET = "bcjax_select_bits"
MULTI_TARGET = "bcjax_select_diff_bits_multi"
VIEWS_TARGET = "bcjax_select_diff_bits_views"
HISTOGRAM_TARGET = "bcjax_diff_histograms"
_SOURCE = Path(__file__).with_name("select_bits.cc")
#: Every source of the one shared library (its cache key hashes them all, in this order).
_SOURCES = (_SOURCE, Path(__file__).with_name("merge_kernels.cc"))
_lock = threading.Lock()
_state: dict = {}


def _cache_dir() -> Path:
    from bcjax.cache import cache_root

    return cache_root("native")


def _compiler() -> str | None:
    cxx = os.environ.get("CXX") or "g++"
    return shutil.which(cxx)


def _build(cxx: str) -> Path:
    """The cached library for this (source, jaxlib, compiler), built when absent or when it
    fails its integrity check (:func:`_verified`; a truncated or altered file would crash the
    loading process with SIGBUS, so it is rebuilt with a one-line :class:`CacheWarning`)."""
    include = jax.ffi.include_dir()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    sources = b"".join(src.read_bytes() for src in _SOURCES)
    key = hashlib.sha256(sources + include.encode() + jax.__version__.encode() + version.encode()).hexdigest()[:16]
    out = _cache_dir() / f"bcjax_select_bits_{key}.so"
    if out.is_file():
        problem = _verified(out)
        if problem is None:
            return out
        from bcjax.errors import CacheWarning

        warnings.warn(f"bcjax: cached native kernel {out} {problem}; rebuilding it", CacheWarning, stacklevel=4)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    # -ffp-contract=off: the compiler fuses no multiply-add by itself (merge_kernels.cc writes out
    # exactly the fused ones XLA:CPU forms, to equal it bit for bit)
    cmd = [cxx, "-O3", "-std=c++17", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp-simd", "-shared", "-fPIC",
           "-w", f"-I{include}", *map(str, _SOURCES), "-o", tmp, "-pthread"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {_SOURCE.name} failed (one library with "
                               f"{', '.join(src.name for src in _SOURCES[1:])}):\n{proc.stderr[-2000:]}")
        _write_atomic(_sidecar(out), json.dumps(_fingerprint(Path(tmp))))  # sidecar first, then the library
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _sidecar(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256.json")


def _fingerprint(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _verified(lib: Path) -> str | None:
    """None when ``lib`` matches the size and sha256 its build recorded in the sidecar
    (written atomically before the library is renamed into place), else what is wrong."""
    try:
        want = json.loads(_sidecar(lib).read_text())
    except (OSError, ValueError):
        return "has no readable checksum sidecar"
    got = _fingerprint(lib)
    if not isinstance(want, dict) or want.get("size") != got["size"]:
        return f"has {got['size']} bytes, expected {want.get('size') if isinstance(want, dict) else '?'} (truncated?)"
    if want.get("sha256") != got["sha256"]:
        return "fails its sha256 check"
    return None


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> None:
    """Build (if needed), load and register the kernel once per process."""
    with _lock:
        if "ok" in _state:
            return
        if os.environ.get("BCJAX_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
            _state.update(ok=False, reason="disabled by BCJAX_NATIVE=0")
            return
        cxx = _compiler()
        if cxx is None:
            _state.update(ok=False, reason="no C++ compiler found (set $CXX or install g++)")
        else:
            try:
                path = _build(cxx)
                lib = ctypes.cdll.LoadLibrary(str(path))
                jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.BcjaxSelectBits), platform="cpu")
                jax.ffi.register_ffi_target(MULTI_TARGET, jax.ffi.pycapsule(lib.BcjaxSelectDiffBitsMulti),
                                            platform="cpu")
                jax.ffi.register_ffi_target(VIEWS_TARGET, jax.ffi.pycapsule(lib.BcjaxSelectDiffBitsViews),
                                            platform="cpu")
                jax.ffi.register_ffi_target(HISTOGRAM_TARGET, jax.ffi.pycapsule(lib.BcjaxDiffHistograms),
                                            platform="cpu")
                lib.bcjax_task_sum.restype = lib.bcjax_ties_merge.restype = ctypes.c_int
                i64, ptr = ctypes.c_int64, ctypes.c_void_p
                lib.bcjax_task_sum.argtypes = [i64, ptr, ptr, ptr, ptr, i64, ptr, i64, i64]
                lib.bcjax_ties_merge.argtypes = [i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, i64, i64]
                lib.bcjax_masked_task_sum.restype = lib.bcjax_select_diff_bits_per_leaf.restype = ctypes.c_int
                lib.bcjax_masked_task_sum.argtypes = [i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr, i64]
                lib.bcjax_select_diff_bits_per_leaf.argtypes = [i64, ptr, ptr, ptr, i64, ptr, i64, ptr, i64,
                                                                ctypes.c_double, i64]
                lib.bcjax_select_diff_bits_model.restype = ctypes.c_int
                lib.bcjax_select_diff_bits_model.argtypes = lib.bcjax_select_diff_bits_per_leaf.argtypes
                _state.update(ok=True, reason=None, path=path, lib=lib)
            except (OSError, RuntimeError, AttributeError) as e:
                _state.update(ok=False, reason=f"{type(e).__name__}: {e}")
        if not _state["ok"] and "disabled" not in _state["reason"]:
            warnings.warn(f"bcjax: native CPU selection kernel unavailable ({_state['reason']}); "
                          "using the portable XLA path (exact, slower)", RuntimeWarning, stacklevel=3)


def available() -> bool:
    """True when the native kernel is built and registered for the CPU backend."""
    _load()
    return bool(_state["ok"])


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    _load()
    return _state["reason"]


def library_path() -> Path | None:
    _load()
    return _state.get("path")


@functools.cache
def _threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


#: Bracket margin in binomial standard deviations of the sample rank. Only speed depends on
#: it (a miss falls back to an exact full selection); tests set 0 to exercise that path.
DEFAULT_SIGMAS = 3.5

#: Instruction sets of the selection's streaming pass, by name (``isa`` arguments): "auto" is the
#: CPU's best; asking for more than the CPU has gives its best. Only speed depends on it (tests
#: run every one, e.g. the scalar code on a CPU with AVX-512).
ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}


def _isa(name: str) -> np.int64:
    if name not in ISAS:
        raise ValueError(f"isa must be one of {sorted(ISAS)}, got {name!r}")
    return np.int64(ISAS[name])


def select_bits(bits: jax.Array, ranks: jax.Array, *, sigmas: float = DEFAULT_SIGMAS, isa: str = "auto") -> jax.Array:
    """int32[K]: the ``ranks``-th smallest of the non-negative int32 ``bits`` (flattened).

    CPU only; call through :func:`bcjax.order_stats.select_bits`, which picks this kernel
    on the CPU backend and the portable path elsewhere. Traceable and vmappable (vmap
    runs the kernel once per batch element).
    """
    bits = jnp.ravel(jnp.asarray(bits, jnp.int32))
    ranks = jnp.asarray(ranks, jnp.int32)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(ranks.shape, jnp.int32), vmap_method="sequential")
    return call(bits, ranks, threads=_threads(), sigmas=np.float32(sigmas), isa=_isa(isa))


def select_diff_bits_multi(pretrained: jax.Array, finetuned, ranks: jax.Array, *,
                           sigmas: float = DEFAULT_SIGMAS, isa: str = "auto") -> jax.Array:
    """int32[T, K]: row t holds the ``ranks[t]``-th smallest magnitude bits of
    ``finetuned[t] − pretrained`` (float32), for all T tasks of a leaf in one cache-blocked
    pass that reads θ0 once. CPU only; see :func:`bcjax.order_stats.select_diff_bits_multi`."""
    return select_diff_bits_leaves([pretrained], [[f] for f in finetuned], ranks, sigmas=sigmas, isa=isa)


def select_diff_bits_leaves(pretrained, finetuned, ranks: jax.Array, *, sigmas: float = DEFAULT_SIGMAS,
                            isa: str = "auto") -> jax.Array:
    """int32[T, K]: row t holds the ``ranks[t]``-th smallest of |θt − θ0| (float32 bits of the
    float32 difference; bfloat16 leaves are upcast inside the kernel) over the union of L leaves: ``pretrained`` is θ0's L leaves, ``finetuned[t]`` task t's L leaves
    (same sizes). One cache-blocked pass over all leaves and tasks, reading θ0 once and
    never writing τ (TIES's model-wide threshold, SPEC §3). CPU only; see
    :func:`bcjax.order_stats.select_diff_bits_leaves`."""
    leaves = [*pretrained, *(f for task in finetuned for f in task)]
    # the kernel reads all-float32 or all-bfloat16 leaves (upcasting bf16 itself, so no float32
    # copy is written); any other mix is converted to float32 first. Any shape: no reshape.
    dtype = jnp.bfloat16 if all(x.dtype == jnp.bfloat16 for x in leaves) else jnp.float32
    leaves = [x if x.dtype == dtype else lax.convert_element_type(x, dtype) for x in leaves]
    p0, fts = leaves[:len(pretrained)], leaves[len(pretrained):]
    ranks = jnp.asarray(ranks, jnp.int32)
    call = jax.ffi.ffi_call(MULTI_TARGET, jax.ShapeDtypeStruct(ranks.shape, jnp.int32), vmap_method="sequential")
    return call(ranks, *p0, *fts, num_leaves=np.int64(len(p0)), threads=_threads(), sigmas=np.float32(sigmas),
                isa=_isa(isa))


def select_diff_bits_views(pretrained, finetuned, ranks: jax.Array, *, sizes, sigmas: float = DEFAULT_SIGMAS,
                           isa: str = "auto"):
    """:func:`select_diff_bits_leaves` on views: ``pretrained`` is θ0's L ``(padded, offset)``
    pairs and ``finetuned[t]`` task t's, each a float32 1-D buffer holding the leaf's ``sizes[l]``
    elements from element ``offset`` (bcjax.merging.HostView: NumPy memory adopted without a
    copy). Same result as on the leaves themselves. CPU only."""
    views = [*pretrained, *(v for task in finetuned for v in task)]
    offsets = jnp.stack([jnp.asarray(off, jnp.int32) for _, off in views])
    ranks = jnp.asarray(ranks, jnp.int32)
    call = jax.ffi.ffi_call(VIEWS_TARGET, jax.ShapeDtypeStruct(ranks.shape, jnp.int32), vmap_method="sequential")
    return call(ranks, offsets, *(buf for buf, _ in views), sizes=np.asarray(sizes, np.int64), threads=_threads(),
                sigmas=np.float32(sigmas), isa=_isa(isa))


def _leaf_pointers(p0, finetuned, out) -> tuple:
    """(L, sizes, θ0, θt task-major, out) as the C kernels of ``merge_kernels.cc`` take them."""
    pointers = lambda arrays: np.array([a.ctypes.data for a in arrays], np.uintp)  # noqa: E731
    sizes = np.array([a.size for a in p0], np.int64)
    return (len(p0), sizes, pointers(p0), pointers([a for task in finetuned for a in task]), pointers(out))


def _call(name: str, *args) -> None:
    """Call a ``merge_kernels.cc`` entry point (NumPy arguments by address; GIL released)."""
    _load()
    status = getattr(_state["lib"], name)(*(a.ctypes.data if isinstance(a, np.ndarray) else a for a in args))
    if status:
        raise RuntimeError(f"{name} failed ({status})")


def task_sum(p0, finetuned, out, alphas) -> None:
    """``out[l] = p0[l] + Σt alphas[t] · (finetuned[t][l] − p0[l])`` for L leaves, computed
    in place on host memory outside XLA (``merge_kernels.cc``: any sizes, nothing compiled,
    bit-identical to :func:`bcjax.merging._weighted_task_sum`, overflow rescue included).

    ``p0`` and ``out`` are L C-contiguous NumPy arrays, ``finetuned`` T lists of L, all of one
    dtype (float32 or float64) and each leaf's size; ``alphas`` the T float32 coefficients.
    Runs with the GIL released on up to 8 threads. CPU memory only; needs :func:`available`."""
    double = int(bool(p0) and np.dtype(p0[0].dtype) == np.float64)
    _call("bcjax_task_sum", *_leaf_pointers(p0, finetuned, out), len(finetuned),
          np.asarray(alphas, np.float32).astype(np.float64), double, _threads())


def ties_merge(p0, finetuned, out, thresholds, alpha) -> None:
    """TIES's trim, elect and disjoint mean given each task's threshold bits (``thresholds``,
    int32 (T,)) on float32 host leaves laid out as for :func:`task_sum`, outside XLA;
    bit-identical to :func:`bcjax.merging._ties_leaf` (overflow rescue, NaN where an input is
    not finite). ``alpha``: a scalar λ or T values λt (float32)."""
    alpha = np.asarray(alpha, np.float32)
    _call("bcjax_ties_merge", *_leaf_pointers(p0, finetuned, out), len(finetuned),
          np.ascontiguousarray(thresholds, np.int32), np.atleast_1d(alpha).astype(np.float64), int(alpha.ndim == 1),
          _threads())


def select_diff_bits_per_leaf(p0, finetuned, ranks, *, sigmas: float = DEFAULT_SIGMAS, isa: str = "auto"):
    """int32[L, T, K]: entry [l, t, k] is the ``ranks[l, t, k]``-th smallest magnitude bits of
    ``finetuned[t][l] − p0[l]`` — :func:`select_diff_bits_multi` of every leaf on its own (the
    same selection code), for L float32 host leaves laid out as for :func:`task_sum`, in one
    call outside XLA (nothing compiled per leaf shape; leaves spread over up to 8 threads)."""
    ranks = np.ascontiguousarray(ranks, np.int32)
    out = np.empty(ranks.shape, np.int32)
    _call("bcjax_select_diff_bits_per_leaf", *_leaf_pointers(p0, finetuned, [])[:4], len(finetuned), ranks,
          ranks.shape[-1], out, _threads(), float(sigmas), int(_isa(isa)))
    return out


def select_diff_bits_model(p0, finetuned, ranks, *, sigmas: float = DEFAULT_SIGMAS, isa: str = "auto"):
    """int32[T, K]: entry [t, k] is the ``ranks[t, k]``-th smallest magnitude bits of
    ``finetuned[t][l] − p0[l]`` over the union of all L leaves (TIES's model-wide threshold) —
    :func:`select_diff_bits_multi` over every leaf at once (the same selection code), for float32
    host leaves laid out as for :func:`task_sum` (fewer than 2^31 entries in all), in one call
    outside XLA (nothing compiled)."""
    ranks = np.ascontiguousarray(ranks, np.int32)
    out = np.empty(ranks.shape, np.int32)
    _call("bcjax_select_diff_bits_model", *_leaf_pointers(p0, finetuned, [])[:4], len(finetuned), ranks,
          ranks.shape[-1], out, _threads(), float(sigmas), int(_isa(isa)))
    return out


def masked_task_sum(p0, finetuned, out, lo, hi, alphas) -> None:
    """Breadcrumbs' combine ``out[l] = p0[l] + Σt alphas[t] · mt ⊙ (finetuned[t][l] − p0[l])``
    with ``mt = lo[l, t] ≤ bits(|τt|) < hi[l, t]`` (int32 magnitude bits, (L, T)), then NaN
    where an input is not finite, on float32 host leaves laid out as for :func:`task_sum`;
    bit-identical to :func:`bcjax.merging._masked_task_sum` + ``_nan_where_nonfinite``
    (overflow rescue included)."""
    _call("bcjax_masked_task_sum", *_leaf_pointers(p0, finetuned, out), len(finetuned),
          np.ascontiguousarray(lo, np.int32), np.ascontiguousarray(hi, np.int32),
          np.asarray(alphas, np.float32).astype(np.float64), _threads())


def diff_histograms(pretrained: jax.Array, finetuned, bins: jax.Array | None = None, *, offsets=None,
                    size: int = -1) -> jax.Array:
    """int32 additive histograms of the float32 bits of |θt − θ0| for all T tasks of one leaf
    in one pass reading θ0 once: coarse ``[T, 2^16]`` (``bins`` None) or fine
    ``[T, K · 2^15 + 1]`` for ``bins[t]``'s K coarse bins: the K rows of
    :func:`bcjax.order_stats.fine_histogram` back to back (identical counts; coarse ones equal
    :func:`~bcjax.order_stats.coarse_histogram`'s), then the count of keys whose coarse part
    exceeds every ``bins[t]``. Leaves all
    float32 or all bfloat16 (upcast inside the kernel), fewer than 2^31 elements. With
    ``offsets`` (int32, one per leaf) and ``size``, leaf j is ``size`` elements of buffer j
    from element ``offsets[j]`` (host views: NumPy memory read in place). CPU only; see
    :func:`bcjax.merging.tau_magnitude_histograms`."""
    from bcjax import order_stats

    leaves = [pretrained, *finetuned]
    num_tasks = len(finetuned)
    fine = bins is not None
    bins = jnp.zeros((num_tasks, 1), jnp.int32) if bins is None else jnp.asarray(bins, jnp.int32)
    shape = (num_tasks, bins.shape[1] * order_stats.N_FINE + 1) if fine else (num_tasks, order_stats.N_COARSE)
    call = jax.ffi.ffi_call(HISTOGRAM_TARGET, jax.ShapeDtypeStruct(shape, jnp.int32), vmap_method="sequential")
    offsets = jnp.zeros(len(leaves), jnp.int32) if offsets is None else jnp.asarray(offsets, jnp.int32)
    return call(bins, offsets, *leaves, fine=np.int64(fine), threads=_threads(), size=np.int64(size))
