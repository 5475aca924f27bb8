"""Merge configs for checkpoints on disk (SPEC §7): bcjax's own form and mergekit's YAML.

bcjax form (every registered method)::

    method: breadcrumbs
    hparams: {alpha: 0.3, beta: 0.85, gamma: 0.99}
    pretrained: path/or/hub-name
    finetuned: [path1, path2]
    exclude: ["classifier", "pooler"]    # optional regexes on tensor names (SPEC §1)
    dtype: bfloat16                       # optional output dtype (default: the base's, per tensor)
    seed: 0                               # methods that take a PRNG key: key = jax.random.key(seed)

mergekit form (``merge_method``, ``base_model``, ``models[].parameters``, ``parameters``,
``dtype``) for ``linear``, ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``,
``breadcrumbs``, ``breadcrumbs_ties``, converted per SPEC §7 (see :func:`from_mergekit`);
every semantic difference is recorded in :attr:`MergePlan.notes` and the model card.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import yaml

from bcjax.config import ConfigError
from bcjax.masks import breadcrumbs_from_mergekit
from bcjax.merging import get_method

__all__ = ["MergePlan", "load_merge_config", "parse_merge_config", "from_mergekit", "MERGEKIT_METHODS"]

BCJAX_KEYS = {"method", "hparams", "pretrained", "finetuned", "exclude", "dtype", "seed"}
MERGEKIT_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
                 "seed", "name"}
MERGEKIT_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties")
_MK_MODEL_PARAMS = {"weight", "density", "gamma"}
_MK_GLOBAL_PARAMS = _MK_MODEL_PARAMS | {"lambda", "normalize", "rescale", "int8_mask"}
_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64"}


@dataclasses.dataclass
class MergePlan:
    """A merge to run: a registered ``method`` with ``hparams`` (``seed`` becomes the PRNG
    key), base ``pretrained``, ``finetuned`` locations, ``exclude`` regexes, optional output
    ``dtype``; ``form`` is "bcjax" or "mergekit", ``source`` the config as given, ``notes``
    the semantic differences from the source form (written into the model card)."""

    method: str
    hparams: dict[str, Any]
    pretrained: str
    finetuned: list[str]
    exclude: list[str] = dataclasses.field(default_factory=list)
    dtype: str | None = None
    seed: int | None = None
    form: str = "bcjax"
    source: dict = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    source_text: str | None = None

    def method_hparams(self) -> dict[str, Any]:
        """Keyword arguments for :func:`bcjax.merge` (``key`` made from ``seed``)."""
        hp = dict(self.hparams)
        if "key" in get_method(self.method).hparams:
            import jax

            hp["key"] = jax.random.key(self.seed)
        return hp


def load_merge_config(path: str) -> MergePlan:
    """Read a YAML merge config (either form) from ``path``; relative model paths are
    resolved against the config's folder when they exist there."""
    if not os.path.isfile(path):
        raise ConfigError(f"merge config not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    plan = parse_merge_config(cfg, source=path)
    plan.source_text = text  # the model card quotes the file verbatim
    return plan


def _resolve(loc, where: str, base_dir: str | None) -> str:
    if not isinstance(loc, str) or not loc:
        raise ConfigError(f"{where}: a model location must be a non-empty string, got {loc!r}")
    if base_dir and not os.path.isabs(loc):
        cand = os.path.join(base_dir, loc)
        if os.path.exists(cand):
            return cand
    return loc


def parse_merge_config(cfg: dict, source: str = "<config>") -> MergePlan:
    """A :class:`MergePlan` from a config mapping of either form (detected by
    ``merge_method`` vs ``method``). Unknown keys are errors naming the key."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(cfg).__name__}")
    cfg = dict(cfg)
    source = cfg.pop("_source", source)  # bcjax.config.load_config (--set overrides) names the file here
    base_dir = os.path.dirname(os.path.abspath(source)) if os.path.isfile(source) else None
    if "merge_method" in cfg:
        return from_mergekit(cfg, source, base_dir)
    if "method" not in cfg:
        raise ConfigError(f"{source}: needs `method` (bcjax form) or `merge_method` (mergekit form)")
    unknown = sorted(set(cfg) - BCJAX_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; the bcjax form accepts {sorted(BCJAX_KEYS)}")
    method = cfg["method"]
    m = get_method(method)
    hparams = dict(cfg.get("hparams") or {})
    if not isinstance(hparams, dict):
        raise ConfigError(f"{source}: hparams must be a mapping")
    bad = sorted(set(hparams) - set(m.hparams))
    if bad:
        raise ConfigError(f"{source}: hparams.{bad[0]}: not a hyper-parameter of {m!r}")
    if "key" in hparams:
        raise ConfigError(f"{source}: hparams.key: give an integer `seed` instead (key = jax.random.key(seed))")
    for fk in ("fishers", "h0") if method in ("fisher", "gradient_matching") else ():
        if fk in hparams or fk == "fishers":
            raise ConfigError(f"{source}: method {method!r} needs per-model Fisher trees (`fishers`), which "
                              "`bcjax merge` does not read from disk; merge in Python with bcjax.merge(..., fishers=...)")
    seed = cfg.get("seed")
    if "key" in m.hparams:
        if seed is None:
            raise ConfigError(f"{source}: method {method!r} draws random masks: give an integer `seed`")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ConfigError(f"{source}: seed must be an integer, got {seed!r}")
    if "pretrained" not in cfg:
        raise ConfigError(f"{source}: missing `pretrained` (the base model)")
    ft = cfg.get("finetuned")
    if not isinstance(ft, list) or not ft:
        raise ConfigError(f"{source}: `finetuned` must be a non-empty list of model locations")
    exclude = cfg.get("exclude") or []
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    return MergePlan(method=method, hparams=hparams, pretrained=_resolve(cfg["pretrained"], "pretrained", base_dir),
                     finetuned=[_resolve(f, f"finetuned[{i}]", base_dir) for i, f in enumerate(ft)],
                     exclude=exclude, dtype=_dtype(cfg.get("dtype"), source), seed=seed, form="bcjax",
                     source=dict(cfg))


def _dtype(value, source):
    if value is None:
        return None
    d = _DTYPES.get(str(value).lower())
    if d is None:
        raise ConfigError(f"{source}: dtype {value!r} is not one of {sorted(set(_DTYPES))}")
    return d


def _model_entry(entry, i, source):
    if isinstance(entry, str):
        return entry, {}
    if not isinstance(entry, dict) or "model" not in entry:
        raise ConfigError(f"{source}: models[{i}] must be a model name or a mapping with `model`")
    extra = sorted(set(entry) - {"model", "parameters"})
    if extra:
        raise ConfigError(f"{source}: models[{i}].{extra[0]}: unknown key (accepted: model, parameters)")
    model = entry["model"]
    if isinstance(model, dict):
        model = model.get("model") or model.get("path")
    params = entry.get("parameters") or {}
    bad = sorted(set(params) - _MK_MODEL_PARAMS)
    if bad:
        raise ConfigError(f"{source}: models[{i}].parameters.{bad[0]}: not supported "
                          f"(per-model parameters: {sorted(_MK_MODEL_PARAMS)})")
    return model, params


def _scalar(v, where, source):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{source}: {where} must be a finite number (mergekit gradients/filters are not supported),"
                          f" got {v!r}")
    return float(v)


def from_mergekit(cfg: dict, source: str = "<config>", base_dir: str | None = None) -> MergePlan:
    """Convert a mergekit YAML mapping to a SPEC method (SPEC §7):

    ======================  =============================================================
    mergekit                bcjax
    ======================  =============================================================
    linear                  task_arithmetic, θ0 = base_model (or the first model), every
                            listed model a task, αt = wt/Σw (normalize) — Σt wt θt / Σw
    task_arithmetic         task_arithmetic, αt = wt·λ (/Σw with normalize: true)
    breadcrumbs             breadcrumbs, β = 1 − density − gamma, γ = 1 − gamma, αt = wt·λ
    breadcrumbs_ties        as breadcrumbs (no sign election: a recorded difference)
    ties                    ties, density, α = λ (equal weights; normalize: true)
    dare_linear, dare_ties  dare (rescale 1/keep) or random_sparse (rescale: false),
                            keep = density, αt = wt·λ, key from ``seed`` (default 0)
    ======================  =============================================================
    """
    method = cfg.get("merge_method")
    unknown = sorted(set(cfg) - MERGEKIT_KEYS)
    if unknown:
        hint = " (mergekit `slices` are not supported: merge whole models)" if "slices" in unknown else ""
        raise ConfigError(f"{source}: unknown key(s) {unknown} for the mergekit form{hint}")
    if method not in MERGEKIT_METHODS:
        raise ConfigError(f"{source}: merge_method {method!r}: supported mergekit methods are {list(MERGEKIT_METHODS)}")
    gparams = cfg.get("parameters") or {}
    bad = sorted(set(gparams) - _MK_GLOBAL_PARAMS)
    if bad:
        raise ConfigError(f"{source}: parameters.{bad[0]}: not supported (accepted: {sorted(_MK_GLOBAL_PARAMS)})")
    if cfg.get("tokenizer_source") not in (None, "base"):
        raise ConfigError(f"{source}: tokenizer_source {cfg['tokenizer_source']!r}: only `base` is supported "
                          "(tokenizer files are copied from the base model)")
    entries = [_model_entry(e, i, source) for i, e in enumerate(cfg.get("models") or [])]
    base = cfg.get("base_model")
    if isinstance(base, dict):
        base = base.get("model")
    notes = []
    seed = cfg.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{source}: seed must be an integer, got {seed!r}")

    yaml_index = list(range(len(entries)))

    def param(name, params, i, default):
        v = params.get(name, gparams.get(name, default))
        return _scalar(v, f"models[{yaml_index[i]}].parameters.{name}", source)

    if method == "linear":
        if not entries:
            raise ConfigError(f"{source}: linear needs `models`")
        models = [m for m, _ in entries]
        weights = [param("weight", p, i, None if "weight" not in gparams else gparams["weight"])
                   if ("weight" in p or "weight" in gparams) else _missing_weight(source, i) for i, (_, p) in
                   enumerate(entries)]
        normalize = bool(gparams.get("normalize", True))
        total = sum(weights)
        if normalize:
            if abs(total) < 1e-8:
                raise ConfigError(f"{source}: linear weights sum to 0; cannot normalize")
            alphas = [w / total for w in weights]
        else:
            if abs(total - 1.0) > 1e-6:
                raise ConfigError(f"{source}: linear with normalize: false and weights summing to {total} (≠ 1) "
                                  "has no SPEC equivalent (it rescales the model); use normalize: true")
            alphas = weights
        pre = base if base is not None else models[0]
        notes.append(f"mergekit `linear` (Σt wt θt / Σt wt) is computed as task arithmetic around the base "
                     f"θ0 = {pre}: θ0 + Σt (wt/Σw)(θt − θ0), equal in exact arithmetic; results agree with "
                     "mergekit to float32 rounding.")
        return _plan("task_arithmetic", {"alpha": alphas}, pre, models, cfg, source, base_dir, notes, None)
    if base is None:
        raise ConfigError(f"{source}: {method} needs `base_model`")
    yaml_index = [i for i, (m, _) in enumerate(entries) if m != base]  # mergekit: the base is not a task
    entries = [entries[i] for i in yaml_index]
    if not entries:
        raise ConfigError(f"{source}: {method} needs at least one model besides base_model")
    models = [m for m, _ in entries]
    lam = _scalar(gparams.get("lambda", 1.0), "parameters.lambda", source)
    default_normalize = method == "ties"
    normalize = bool(gparams.get("normalize", default_normalize))
    weights = [param("weight", p, i, None) if ("weight" in p or "weight" in gparams)
               else _missing_weight(source, yaml_index[i]) for i, (_, p) in enumerate(entries)]
    if any(k in gparams for k in ("rescale",)) and not method.startswith("dare"):
        raise ConfigError(f"{source}: parameters.rescale only applies to dare_* methods")

    def uniform(name, default):
        vals = {param(name, p, i, default) for i, (_, p) in enumerate(entries)}
        if len(vals) > 1:
            raise ConfigError(f"{source}: {name} differs between models ({sorted(vals)}); bcjax's {method} takes one "
                              f"{name} for all models")
        return vals.pop()

    def alphas():
        if normalize and method != "ties":
            total = sum(weights)
            div = total if abs(total) >= 1e-8 else 1.0
            return [w * lam / div for w in weights]
        return [w * lam for w in weights]

    if method == "task_arithmetic":
        return _plan("task_arithmetic", {"alpha": alphas()}, base, models, cfg, source, base_dir, notes, None)
    if method in ("breadcrumbs", "breadcrumbs_ties"):
        density, gamma = uniform("density", 1.0), uniform("gamma", 0.01)
        beta, gam = breadcrumbs_from_mergekit(density, gamma)
        notes.append(f"mergekit breadcrumbs(density={density}, gamma={gamma}) → SPEC §2 β = 1 − density − gamma = "
                     f"{beta:.6g}, γ = 1 − gamma = {gam:.6g}. Counts: bcjax keeps ranks ⌊βn+1e-6⌋ … n − "
                     "⌊(1−γ)n+1e-6⌋ − 1 of |τ| per tensor, mergekit keeps int(density·n) after dropping the top "
                     "int(gamma·n) (may differ by one entry per tensor, ties resolved by value not by sort order); "
                     "mergekit zeroes the whole tensor when gamma·n < 1, bcjax does not.")
        if method == "breadcrumbs_ties":
            notes.append("mergekit breadcrumbs_ties adds TIES sign election and a weighted disjoint mean after the "
                         "Breadcrumbs masks; SPEC §7 has no such method: this merge is plain Breadcrumbs "
                         "(θ0 + Σt αt mt ⊙ τt, no election, no mean).")
        return _plan("breadcrumbs", {"alpha": alphas(), "beta": beta, "gamma": gam}, base, models, cfg, source,
                     base_dir, notes, None)
    if method == "ties":
        if not normalize:
            raise ConfigError(f"{source}: ties with normalize: false is a disjoint *sum*, which SPEC §3 TIES does not "
                              "define; use normalize: true")
        if len(set(weights)) > 1:
            raise ConfigError(f"{source}: ties with unequal weights {weights} is a weighted disjoint mean; SPEC §3 TIES "
                              "weighs models equally (the weights cancel when equal)")
        density = uniform("density", 1.0)
        notes.append(f"mergekit ties trims each *tensor* to its top int(density·n) |τ| entries; SPEC §3 TIES trims each "
                     f"*model* with one global threshold over all merged tensors (⌊density·N+1e-6⌋ entries, ties at "
                     f"the threshold kept). Sign election and disjoint mean agree (sign(0) = +1). density = {density}, "
                     f"λ = {lam}.")
        return _plan("ties", {"density": density, "alpha": lam}, base, models, cfg, source, base_dir, notes, None)
    # dare_linear / dare_ties
    density = uniform("density", 1.0)
    rescale = bool(gparams.get("rescale", True))
    notes.append(f"mergekit {method} draws its masks with torch's RNG; bcjax draws mt ~ Bernoulli(keep = {density}) from "
                 f"jax.random.key({seed}) folded with (task, tensor index in sorted-name order), so masks differ.")
    if rescale:
        notes.append("mergekit rescales the kept deltas to preserve their L1 norm; SPEC §3 DARE rescales by 1/keep.")
    if normalize:
        notes.append("normalize: true → αt = wt·λ/Σw.")
    if method == "dare_ties":
        notes.append("mergekit dare_ties adds TIES sign election and a weighted disjoint mean after the DARE masks; "
                     "SPEC §7 maps it to DARE (no election, no mean).")
    return _plan("dare" if rescale else "random_sparse", {"keep": density, "alpha": alphas()}, base, models, cfg,
                 source, base_dir, notes, seed)


def _missing_weight(source, i):
    raise ConfigError(f"{source}: models[{i}].parameters.weight is required (mergekit has no default weight)")


def _plan(method, hparams, pre, models, cfg, source, base_dir, notes, seed) -> MergePlan:
    _dtype(cfg.get("dtype"), source)  # checked, but only the output dtype is used
    out_dtype = _dtype(cfg.get("out_dtype"), source)
    if cfg.get("dtype") is not None:
        notes.append(f"mergekit `dtype: {cfg['dtype']}` is its compute (and default output) dtype; bcjax computes "
                     f"in float32 (SPEC §1) and writes tensors in {out_dtype or 'the base model dtype'}"
                     + ("" if out_dtype else " (set out_dtype to change it)") + ".")
    return MergePlan(method=method, hparams=hparams, pretrained=_resolve(pre, "base_model", base_dir),
                     finetuned=[_resolve(m, f"models[{i}]", base_dir) for i, m in enumerate(models)],
                     dtype=out_dtype, seed=seed, form="mergekit",
                     source=dict(cfg), notes=notes)
