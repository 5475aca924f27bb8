r"""Scalar hyper-parameters: the one place where they are read, checked and counted (SPEC §2–3).

Every registered merge method declares its hyper-parameters once (``register_method(...,
hparams={"beta": Real(0, 1), ...})``); :func:`normalize` reads them before the method runs,
and :func:`bcjax.breadcrumbs_mask`, :mod:`bcjax.grids` and the config layer
(:mod:`bcjax.experiments.settings`) use the same functions. Core room: nothing here knows
models or data.

**How a value is read.** A hyper-parameter is a *real number*: a Python ``int``/``float``/
``Fraction``/``Decimal``, a NumPy integer or floating scalar (``np.float16`` … ``np.float64``,
``np.int64``), a 0-d NumPy/JAX array of such a dtype (an element of an array, e.g. a grid
row), or a value traced under ``jit``/``vmap``. Its meaning is its float32 rounding — the
shortest decimal that rounds to the same float32 (SPEC §2): ``np.float32(0.9)``, a traced
0.9 and the Python float 0.9 all mean the decimal 0.9, so every form gives the same merge.
Checks (finiteness, range) apply to that value; a concrete value is passed on as the Python
float of that decimal (whose float32 is the input's), a traced one as a float32 tracer.

**What is rejected** (:class:`~bcjax.errors.HyperparameterTypeError`, a ``TypeError`` and a
``ValueError``; or :class:`~bcjax.errors.HyperparameterError` for values): ``str`` (YAML 1.1
reads ``9e-1`` as a string), ``None`` where no default behaviour is documented, ``bool`` and
``np.bool_`` (not numbers here), complex numbers, arrays of any other shape than the
method documents (a per-task list has shape (T,)), NaN/±Inf (also after float32 rounding, e.g.
1e39), and values outside the method's range. Messages name the method and the argument.
Traced values are checked for dtype and shape only (their values are unknown while tracing);
their counts are clipped into [0, n].

**Counts** (SPEC §2): n_bot = ⌊β·n + 10⁻⁶⌋, n_top = ⌊(1 − γ)·n + 10⁻⁶⌋ are evaluated in exact
rational arithmetic (:class:`fractions.Fraction`) from the decimals above — 10⁻⁶ is the
exact decimal too — for any n (Python integers: leaves beyond 2³¹ entries are exact).
Traced values are counted the same way on the host (``jax.pure_callback``, vmappable), so
``jit(vmap(merge))`` grids reproduce point merges bit for bit.
"""
from __future__ import annotations

import dataclasses
import decimal
import functools
import numbers
from fractions import Fraction
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bcjax.errors import HyperparameterError, HyperparameterTypeError

__all__ = ["Real", "Integer", "Choice", "PRNGKey", "Spec", "real", "real_per_task", "integer", "prng_key",
           "HyperparameterError", "HyperparameterTypeError", "leaf_axis", "normalize", "beta_gamma", "decimal_value", "decimal_float", "exact_count", "count", "INT32_MAX"]

INT32_MAX = int(np.iinfo(np.int32).max)
_EPS = Fraction(1, 10 ** 6)  # SPEC §2's "+ 1e-6", read as the exact decimal


# --------------------------------------------------------------------------- specs
@dataclasses.dataclass(frozen=True)
class Real:
    """A real hyper-parameter in [low, high] (``low_open``/``high_open``: the open end),
    finite. ``per_task``: a scalar or one value per task (shape (T,)). ``optional``: ``None``
    is accepted and passed on (the method documents what it means). ``at_least``: another
    hyper-parameter this one must not be below (γ ≥ β)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    per_task: bool = False
    optional: bool = False
    at_least: str | None = None

    def describe(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        br = ("(" if self.low_open or self.low is None else "[") + f"{lo}, {hi}" + \
             (")" if self.high_open or self.high is None else "]")
        return f"a finite real number in {br}"


@dataclasses.dataclass(frozen=True)
class Integer:
    """An integer hyper-parameter in [low, high] (a real of integral value such as ``5.0``
    is refused: counts and seeds are integers)."""

    low: int | None = None
    high: int | None = None
    optional: bool = False


@dataclasses.dataclass(frozen=True)
class Choice:
    """One of a fixed set of values (e.g. ``granularity``)."""

    options: tuple


@dataclasses.dataclass(frozen=True)
class PRNGKey:
    """A JAX PRNG key: ``jax.random.key(seed)`` (typed, shape ()) or a legacy
    ``jax.random.PRNGKey(seed)`` (uint32, shape (2,)). An integer seed is refused: configs
    give ``seed`` and the runner makes the key; a bare ``key=0`` is an error, not a seed."""


Spec = Real | Integer | Choice | PRNGKey


def _label(name: str, method: str | None) -> str:
    return f"{method}: {name}" if method else name


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- scalars
def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _real_dtype(dtype) -> bool:
    return (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)) \
        and not jnp.issubdtype(dtype, jnp.bool_)


def _type_error(label: str, value, what: str = "a real number"):
    return HyperparameterTypeError(f"{label} must be {what}, got {type(value).__name__} {_show(value)}")


def _float32_scalar(value, label: str):
    """The float32 rounding of one concrete real scalar, or a float32 tracer (type and
    shape checked); raises for every other input."""
    if isinstance(value, (bool, np.bool_)) or value is None or isinstance(value, (str, bytes)):
        raise _type_error(label, value)
    if _is_tracer(value) or isinstance(value, (np.ndarray, jax.Array)):
        if not _real_dtype(value.dtype):
            raise _type_error(label, value, f"a real number (integer or floating dtype, got dtype {value.dtype})")
        if np.shape(value) != ():
            raise HyperparameterError(f"{label} must be a scalar, got an array of shape {np.shape(value)}")
        if _is_tracer(value):
            return value.astype(jnp.float32)
        value = np.asarray(value)[()]
    elif isinstance(value, np.generic):
        if not _real_dtype(value.dtype):
            raise _type_error(label, value)
    elif not isinstance(value, (numbers.Real, decimal.Decimal)):
        raise _type_error(label, value)
    try:
        with np.errstate(over="ignore"):
            return np.float32(float(value))
    except (OverflowError, ValueError, TypeError):
        raise HyperparameterError(f"{label} must be finite in float32, got {_show(value)}") from None


def _check_range(v: float, label: str, spec: Real, shown) -> None:
    if not np.isfinite(v):
        raise HyperparameterError(f"{label} must be finite (as a float32), got {_show(shown)}")
    bad = (spec.low is not None and (v < spec.low or (spec.low_open and v == spec.low))) or \
          (spec.high is not None and (v > spec.high or (spec.high_open and v == spec.high)))
    if bad:
        raise HyperparameterError(f"{label} must be {spec.describe()}, got {_show(shown)}")


def real(value, name: str, *, method: str | None = None, low: float | None = None, high: float | None = None,
         low_open: bool = False, high_open: bool = False):
    """One real scalar hyper-parameter, read as the shortest decimal of its float32 rounding
    (module docstring): a Python float of that decimal for concrete values (``np.float32(0.9)``
    → 0.9; its float32 is the input's), a float32 tracer under ``jit``/``vmap``. Raises
    naming ``method`` and ``name``."""
    return _real(value, name, method, Real(low, high, low_open, high_open))


def _real(value, name, method, spec: Real):
    label = _label(name, method)
    v = _float32_scalar(value, label)
    if _is_tracer(v):
        return v
    _check_range(float(v), label, spec, value)
    return float(_decimal_of_float32(float(v)))


def real_per_task(value, num_tasks: int | None, name: str, *, method: str | None = None,
                  low: float | None = None, high: float | None = None, low_open: bool = False,
                  high_open: bool = False):
    """A scalar (returned as a float32 scalar) or one real per task (a float32 array of shape
    (T,): ``np.ndarray`` when concrete, traced otherwise). ``num_tasks=None`` skips the length
    check (a config read before the models are known)."""
    return _real_per_task(value, num_tasks, name, method, Real(low, high, low_open, high_open, per_task=True))


def _real_per_task(value, num_tasks, name, method, spec: Real):
    label = _label(name, method)
    if isinstance(value, (list, tuple)) or (isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 1):
        if isinstance(value, (list, tuple)):
            items = [_float32_scalar(v, f"{label}[{i}]") for i, v in enumerate(value)]
            traced = any(_is_tracer(v) for v in items)
            arr = jnp.stack([jnp.asarray(v, jnp.float32) for v in items]) if traced else \
                np.asarray(items, np.float32).reshape(len(items))
        else:
            if not _real_dtype(value.dtype):
                raise _type_error(label, value, f"real numbers (got dtype {value.dtype})")
            arr = value.astype(jnp.float32) if _is_tracer(value) else np.asarray(value, np.float32)
            traced = _is_tracer(arr)
        if num_tasks is not None and arr.shape != (num_tasks,):
            raise HyperparameterError(f"{label} must be a scalar or have one value per task ({num_tasks}), "
                                      f"got {arr.shape[0]} values")
        if not traced:
            for i, v in enumerate(arr.tolist()):
                _check_range(v, f"{label}[{i}]", spec, value[i] if isinstance(value, (list, tuple)) else v)
        return arr
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) > 1:
        raise HyperparameterError(f"{label} must be a scalar or have one value per task"
                                  f"{f' ({num_tasks})' if num_tasks is not None else ''}, got an array of shape "
                                  f"{np.shape(value)}")
    if isinstance(value, (dict, set)) or (not _is_tracer(value) and hasattr(value, "keys")):
        raise _type_error(label, value, "a real number or a list of one per task")
    return _real(value, name, method, spec)


def integer(value, name: str, *, method: str | None = None, low: int | None = None, high: int | None = None) -> int:
    """An integer hyper-parameter (Python/NumPy integer or 0-d integer array) as a Python int."""
    return _integer(value, name, method, Integer(low, high))


def _integer(value, name, method, spec: Integer):
    label = _label(name, method)
    if isinstance(value, (np.ndarray, jax.Array)) and not _is_tracer(value) and np.ndim(value) == 0 \
            and jnp.issubdtype(value.dtype, jnp.integer):
        value = np.asarray(value)[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise _type_error(label, value, "an integer")
    v = int(value)
    if (spec.low is not None and v < spec.low) or (spec.high is not None and v > spec.high):
        rng = f"[{'-inf' if spec.low is None else spec.low}, {'inf' if spec.high is None else spec.high}]"
        raise HyperparameterError(f"{label} must be an integer in {rng}, got {v}")
    return v


def prng_key(value, name: str = "key", *, method: str | None = None):
    """A JAX PRNG key, returned unchanged (see :class:`PRNGKey` for what is accepted)."""
    label = _label(name, method)
    hint = "(e.g. key=jax.random.key(0))"
    if value is None:
        raise HyperparameterError(f"{label}: an explicit PRNG key is needed {hint}")
    if isinstance(value, (jax.Array, np.ndarray)) or _is_tracer(value):
        dt = value.dtype
        if jnp.issubdtype(dt, jax.dtypes.prng_key):
            if np.shape(value) != ():
                raise HyperparameterError(f"{label} must be a single PRNG key, got an array of keys of shape "
                                          f"{np.shape(value)}")
            return value
        if dt == jnp.uint32 and np.ndim(value) == 1 and np.shape(value)[0] in (2, 4):
            return value  # a legacy raw key (jax.random.PRNGKey)
    raise _type_error(label, value, f"a PRNG key from jax.random.key(seed) or jax.random.PRNGKey(seed) {hint}; an "
                                    "integer seed is not a key")


def leaf_axis(value, ndim: int, *, method: str | None, path: str = "") -> int:
    """An axis of a leaf with ``ndim`` dimensions (a 0-d leaf counts as 1-D), in
    [−ndim, ndim), as a non-negative int; out of range is an error naming the key path (it
    never wraps)."""
    where = f" (key path {path!r}, shape of {ndim} dimension{'s' if ndim != 1 else ''})" if path else ""
    ax = _integer(value, f"axis{where}", method, Integer())
    nd = max(int(ndim), 1)
    if not -nd <= ax < nd:
        raise HyperparameterError(f"{_label('axis', method)} = {ax} is out of range for a leaf of {nd} "
                                  f"dimension{'s' if nd != 1 else ''}{where}; expected -{nd} <= axis < {nd}")
    return ax % nd


# --------------------------------------------------------------------------- declared specs
def normalize(method: str, specs: Mapping[str, Spec], values: Mapping[str, Any], *,
              num_tasks: int | None = None) -> dict:
    """``values`` with every declared hyper-parameter read and checked per its spec (names
    without a spec pass through unchanged), then the cross checks (``at_least``). Raises
    :class:`~bcjax.errors.HyperparameterError` (or its TypeError subclass) naming ``method``
    and the argument."""
    out = dict(values)
    for name, spec in specs.items():
        if name not in out:
            continue
        v = out[name]
        if isinstance(spec, Real):
            if v is None and spec.optional:
                continue
            out[name] = _real_per_task(v, num_tasks, name, method, spec) if spec.per_task \
                else _real(v, name, method, spec)
        elif isinstance(spec, Integer):
            if v is None and spec.optional:
                continue
            out[name] = _integer(v, name, method, spec)
        elif isinstance(spec, Choice):
            if isinstance(v, (bool, np.bool_)) or not any(v is o or (type(v) is type(o) and v == o)
                                                           for o in spec.options):
                raise HyperparameterError(f"{method}: {name} must be one of {list(spec.options)}, got {_show(v)}")
        elif isinstance(spec, PRNGKey):
            out[name] = prng_key(v, name, method=method)
    for name, spec in specs.items():
        if isinstance(spec, Real) and spec.at_least and name in out and spec.at_least in out:
            lo, hi = out[spec.at_least], out[name]
            if lo is not None and hi is not None and not _is_tracer(lo) and not _is_tracer(hi) \
                    and np.any(np.asarray(lo) > np.asarray(hi)):
                raise HyperparameterError(f"{method}: need {spec.at_least} <= {name}, got {spec.at_least}="
                                          f"{_show(values[spec.at_least])}, {name}={_show(values[name])}")
    return out


#: SPEC §2's (β, γ): 0 ≤ β ≤ γ ≤ 1.
BETA_GAMMA = {"beta": Real(0.0, 1.0), "gamma": Real(0.0, 1.0, at_least="beta")}


def beta_gamma(beta, gamma, *, method: str | None = "breadcrumbs"):
    """(β, γ) read and checked (0 ≤ β ≤ γ ≤ 1, SPEC §2) as float32 scalars or tracers."""
    out = normalize(method, BETA_GAMMA, {"beta": beta, "gamma": gamma})
    return out["beta"], out["gamma"]


# --------------------------------------------------------------------------- exact counts
@functools.lru_cache(maxsize=4096)
def _decimal_of_float32(x: float) -> Fraction:
    return Fraction(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def decimal_value(value) -> Fraction:
    """The shortest decimal that rounds to float32(``value``), as an exact fraction
    (``np.float32(0.9)`` → 9/10; SPEC §2). ``value``: a concrete real scalar."""
    v = _float32_scalar(value, "value")
    if _is_tracer(v):
        raise HyperparameterError("decimal_value needs a concrete value (use count() for traced ones)")
    if not np.isfinite(v):
        raise HyperparameterError(f"value must be finite, got {_show(value)}")
    return _decimal_of_float32(float(v))


def decimal_float(value) -> float:
    """The Python float nearest to :func:`decimal_value` (``np.float32(0.9)`` → 0.9): the
    same float32, printed as the decimal it means (grid points, reports)."""
    return float(decimal_value(value))


def exact_count(n: int, const, terms: Sequence[tuple[Any, Any]]) -> int:
    """⌊x·n + 10⁻⁶⌋ clipped to [0, n], x = const + Σ coefᵢ·dᵢ with dᵢ = :func:`decimal_value`
    of fᵢ, ``terms = [(coefᵢ, fᵢ)]``; exact rational arithmetic, a Python int for any n."""
    x = Fraction(const) + sum((Fraction(c) * decimal_value(f) for c, f in terms), Fraction(0))
    return min(max(int((x * n + _EPS) // 1), 0), int(n))


def count(n: int, const, terms: Sequence[tuple[Any, Any]]):
    """:func:`exact_count` for concrete fᵢ (a Python int); for traced fᵢ the same exact count
    computed on the host (``pure_callback``, vmappable): int32, or int64 under
    ``jax_enable_x64`` (needed for n > 2³¹ − 1, otherwise a clear error)."""
    n = int(n)
    fs = [f for _, f in terms]
    if not any(_is_tracer(f) for f in fs):
        return exact_count(n, const, terms)
    coefs = [Fraction(c) for c, _ in terms]
    if n > INT32_MAX and not jax.config.jax_enable_x64:
        raise HyperparameterError(f"counts of a leaf of {n} entries (> 2^31 - 1) from traced hyper-parameters need "
                                  "int64: enable jax_enable_x64 or pass concrete values")
    dtype = np.int32 if n <= INT32_MAX else np.int64
    args = jnp.broadcast_arrays(*[jax.lax.stop_gradient(jnp.asarray(f, jnp.float32)) for f in fs])

    def host(*vals):
        vals = np.broadcast_arrays(*[np.asarray(v, np.float32) for v in vals])
        out = np.empty(vals[0].shape, dtype)
        for idx in np.ndindex(out.shape):
            xs = [float(v[idx]) for v in vals]
            if all(np.isfinite(xs)):
                out[idx] = exact_count(n, const, list(zip(coefs, xs)))
            else:  # a traced NaN/Inf cannot be refused while tracing: count nothing
                out[idx] = 0
        return out

    return jax.pure_callback(host, jax.ShapeDtypeStruct(args[0].shape, dtype), *args, vmap_method="expand_dims")
