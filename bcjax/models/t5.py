"""T5 / Flan-T5 in Flax: loading (hub name or local path, PyTorch import, LoRA), and pure
jitted text-to-text functions (loss, rank-classification scores, greedy generation).

The model is transformers' ``FlaxT5ForConditionalGeneration`` (4.57.6); its parameters are
a plain nested dict, so every bcjax merge applies to them directly (SPEC §1: one leaf per
state-dict entry; the shared embedding is one leaf, tied to the LM head as in T5 v1.0).

**jax ≥ 0.10 shim.** jax 0.10 removed the ``a_min=`` / ``a_max=`` keywords of
``jnp.clip``; Flax T5's relative-position bucketing still calls ``jnp.clip(x, a_max=...)``.
Importing this module installs :func:`install_clip_shim`: the ``jnp`` global *of
transformers' T5 module only* is replaced by a thin proxy of ``jax.numpy`` whose ``clip``
also accepts ``a_min`` / ``a_max``. ``jax.numpy`` itself is untouched, the shim is
idempotent, and it is a no-op on a jax whose ``clip`` still takes the old keywords. (Flax
T5 has no fp16 activation clamp — that is only in the PyTorch model — so the shim's one
call site is the bucketing, exercised by every forward pass.)

**PyTorch checkpoints** load with ``from_pt=True`` (auto-detected for local folders that
hold only ``model.safetensors`` / ``pytorch_model.bin``); torch (CPU) must be installed.

**LoRA fine-tunes** (PEFT adapters) are merged into the base weights *before* import, so
the result is an ordinary T5 checkpoint with the base's tree (a merge needs identical
trees, SPEC §1): for every adapted linear layer ``W ← W + scale · B @ A`` with
``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA), A of shape [r, in] and
B of shape [out, r] as PEFT stores them. :func:`merge_lora_state_dict` does this on a
state dict; :func:`merge_lora_checkpoint` writes a merged checkpoint folder from a base
folder and an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``),
which :func:`load_t5` then imports like any PyTorch T5.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import types
import weakref
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from bcjax.errors import BcjaxError
from bcjax._optional import requires

__all__ = [
    "T5LoadError",
    "LoraMergeError",
    "clip_compat",
    "install_clip_shim",
    "load_t5",
    "load_tokenizer",
    "merge_lora_state_dict",
    "merge_lora_checkpoint",
    "T5Functions",
    "t5_functions",
    "jit_loss",
    "jit_rank_scores",
    "jit_greedy",
]


class T5LoadError(BcjaxError):
    """A T5 model or tokenizer could not be loaded from the given name or path."""


class LoraMergeError(BcjaxError):
    """A LoRA adapter does not fit its base checkpoint (missing base weight, bad shapes)."""


# --------------------------------------------------------------------------- jnp.clip shim
def clip_compat(a, a_min=None, a_max=None, *, min=None, max=None):  # noqa: A002 - jnp.clip's names
    """``jnp.clip`` accepting both the new (``min``/``max``) and the removed (``a_min``/
    ``a_max``) keywords; giving both spellings of one bound is an error."""
    if a_min is not None and min is not None or a_max is not None and max is not None:
        raise TypeError("clip: pass either a_min/a_max or min/max, not both")
    return jnp.clip(a, min=a_min if a_min is not None else min, max=a_max if a_max is not None else max)


class _JnpWithLegacyClip(types.ModuleType):
    """``jax.numpy`` as seen by transformers' T5 module: every attribute is jax.numpy's,
    except ``clip`` (:func:`clip_compat`)."""

    def __init__(self):
        super().__init__("jax.numpy", "jax.numpy with a_min/a_max-compatible clip (bcjax T5 shim)")
        self.clip = clip_compat

    def __getattr__(self, name):
        return getattr(jnp, name)


def _clip_needs_shim() -> bool:
    try:
        jnp.clip(jnp.zeros(1), a_max=0)
        return False
    except TypeError:
        return True


def install_clip_shim() -> bool:
    """Give transformers' Flax T5 module (and nothing else) a ``jnp`` whose ``clip`` takes
    ``a_min``/``a_max``. Idempotent; returns whether the shim is (now) installed."""
    with requires("t5"):
        from transformers.models.t5 import modeling_flax_t5 as mod

    if isinstance(mod.jnp, _JnpWithLegacyClip):
        return True
    if not _clip_needs_shim():
        return False
    mod.jnp = _JnpWithLegacyClip()
    return True


# No import-time patching: load_t5 and t5_functions apply the shim (idempotently) before any
# transformers T5 code runs.


# --------------------------------------------------------------------------- loading
_PT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
_FLAX_FILES = ("flax_model.msgpack", "flax_model.msgpack.index.json")


def _detect_from_pt(name_or_path: str) -> bool | None:
    """True/False for a local folder (PyTorch-only / has Flax weights); None for a hub name."""
    if not os.path.isdir(name_or_path):
        return None
    files = set(os.listdir(name_or_path))
    if files & set(_FLAX_FILES):
        return False
    if files & set(_PT_FILES):
        return True
    raise T5LoadError(f"{name_or_path}: no T5 weights found (expected one of {_FLAX_FILES + _PT_FILES})")


def load_t5(name_or_path: str, *, from_pt: bool | None = None, dtype: str = "float32", local_only: bool | None = None):
    """``(model, params)`` of a ``FlaxT5ForConditionalGeneration`` from a hub name (e.g.
    ``google-t5/t5-base``, ``google/flan-t5-base``) or a local folder.

    Args:
      from_pt: import PyTorch weights (needs torch). ``None``: auto — local folders by their
        files; hub names try Flax weights first, then PyTorch.
      dtype: computation dtype (``float32``, ``bfloat16``); parameters stay float32.
      local_only: never touch the network (default: ``HF_HUB_OFFLINE`` / on for local folders).
    """
    install_clip_shim()
    with requires("t5"):
        from transformers import FlaxT5ForConditionalGeneration

    if from_pt is None:
        from_pt = _detect_from_pt(os.fspath(name_or_path))
    if from_pt and os.path.isdir(name_or_path) and _single_pt_file(name_or_path):
        return _load_pt_folder(os.fspath(name_or_path), dtype)
    kwargs = dict(dtype=getattr(jnp, dtype))
    if local_only is not None:
        kwargs["local_files_only"] = local_only
    tries = [from_pt] if from_pt is not None else [False, True]
    errors = []
    for pt in tries:
        try:
            # Flax weights load without a random init; the PyTorch conversion needs one
            loaded = FlaxT5ForConditionalGeneration.from_pretrained(os.fspath(name_or_path), from_pt=pt,
                                                                    _do_init=pt, **kwargs)
            model, params = (loaded, loaded.params) if pt else loaded
            return model, jax.tree.map(jnp.asarray, params)
        except (OSError, ValueError, ImportError) as e:
            errors.append(f"from_pt={pt}: {type(e).__name__}: {e}")
    raise T5LoadError(f"cannot load T5 {name_or_path!r} (no network? not a T5 checkpoint?): " + " | ".join(errors))


def _single_pt_file(folder: str) -> str | None:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def _load_pt_folder(folder: str, dtype: str):
    """PyTorch weights of a local folder → Flax params without the random initialisation
    transformers' ``from_pt`` does first (minutes for T5-large on a CPU): the parameter
    shapes come from ``jax.eval_shape`` and transformers' own key/layout conversion is used.
    Entries absent from the Flax tree (tied ``lm_head`` / ``embed_tokens`` copies) are
    dropped; a missing or mis-shaped entry is a :class:`T5LoadError` naming it."""
    with requires("t5"):
        from flax.traverse_util import flatten_dict, unflatten_dict
        from transformers import FlaxT5ForConditionalGeneration, T5Config
        from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    path = _single_pt_file(folder)
    try:
        config = T5Config.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise T5LoadError(f"{folder}: no usable config.json: {e}") from None
    model = FlaxT5ForConditionalGeneration(config, dtype=getattr(jnp, dtype), _do_init=False)
    shapes = flatten_dict(model.params_shape_tree)
    if path.endswith(".safetensors"):
        with requires("t5"):
            from safetensors.flax import load_file

        state = dict(load_file(path))
    else:
        with requires("torch"):
            import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
    stand_in = types.SimpleNamespace(params=unflatten_dict(shapes), base_model_prefix=model.base_model_prefix)
    flat = flatten_dict(convert_pytorch_state_dict_to_flax(state, stand_in))
    out = {}
    for key, spec in shapes.items():
        if key not in flat:
            raise T5LoadError(f"{path}: no weight for Flax parameter {'/'.join(key)}")
        value = jnp.asarray(flat[key])
        if value.shape != spec.shape:
            raise T5LoadError(f"{path}: {'/'.join(key)} has shape {value.shape}, the model expects {spec.shape}")
        out[key] = value
    return model, unflatten_dict(out)


def load_tokenizer(name_or_path: str):
    """The model's tokenizer (a T5 SentencePiece tokenizer, fast when available)."""
    with requires("t5"):
        from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.fspath(name_or_path))
    except (OSError, ValueError) as e:
        raise T5LoadError(f"cannot load the tokenizer of {name_or_path!r}: {e}") from None


# --------------------------------------------------------------------------- LoRA
def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor (bf16 has no numpy dtype: go through float32)
        x = x.detach().cpu()
        x = (x.float() if str(x.dtype) == "torch.bfloat16" else x).numpy()
    return np.asarray(x)


def merge_lora_state_dict(state_dict: Mapping[str, Any], *, lora_alpha: float, r: int, use_rslora: bool = False,
                          prefix: str = "base_model.model.") -> dict[str, np.ndarray]:
    """Fold PEFT LoRA adapters into their base weights: ``W ← W + scale · B @ A``.

    ``state_dict`` holds the base weights and the adapters, PEFT-style:
    ``<module>.weight`` (or ``<module>.base_layer.weight``), ``<module>.lora_A.weight``
    [r, in] and ``<module>.lora_B.weight`` [out, r] (an optional adapter name, e.g.
    ``lora_A.default.weight``, is accepted); keys may carry ``prefix``. ``scale =
    lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``. Returns a plain
    state dict (numpy, float32 for adapted weights) with the prefix, ``base_layer.`` and
    all ``lora_*`` entries removed: an ordinary checkpoint of the base architecture.
    """
    if r < 1:
        raise LoraMergeError(f"LoRA rank r must be >= 1, got {r}")
    scale = lora_alpha / (math.sqrt(r) if use_rslora else r)
    plain: dict[str, np.ndarray] = {}
    a_mats: dict[str, np.ndarray] = {}
    b_mats: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        k = key[len(prefix):] if prefix and key.startswith(prefix) else key
        parts = k.split(".")
        if "lora_A" in parts or "lora_B" in parts:
            which = "lora_A" if "lora_A" in parts else "lora_B"
            module = ".".join(parts[:parts.index(which)])
            (a_mats if which == "lora_A" else b_mats)[module] = _np(value)
            continue
        if "lora_embedding_A" in parts or "lora_embedding_B" in parts or "lora_dropout" in parts:
            raise LoraMergeError(f"{key}: only LoRA on linear layers is supported")
        plain[k.replace(".base_layer.", ".")] = _np(value)
    if set(a_mats) != set(b_mats):
        raise LoraMergeError(f"LoRA A/B mismatch: A without B {sorted(set(a_mats) - set(b_mats))}, "
                             f"B without A {sorted(set(b_mats) - set(a_mats))}")
    for module in sorted(a_mats):
        wkey = f"{module}.weight"
        if wkey not in plain:
            raise LoraMergeError(f"LoRA adapter for {module!r} but no base weight {wkey!r} in the state dict")
        w, a, b = plain[wkey], a_mats[module], b_mats[module]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != w.shape:
            raise LoraMergeError(f"{module}: LoRA shapes A {a.shape}, B {b.shape} do not fit weight {w.shape}")
        merged = w.astype(np.float32) + scale * (b.astype(np.float32) @ a.astype(np.float32))
        plain[wkey] = merged.astype(w.dtype)
    return plain


def merge_lora_checkpoint(base_dir: str, adapter_dir: str, out_dir: str) -> str:
    """Write ``out_dir``: the base PyTorch T5 checkpoint (``model.safetensors`` + config)
    with the PEFT adapter in ``adapter_dir`` merged in (:func:`merge_lora_state_dict`).
    Load the result with :func:`load_t5` (``from_pt`` is auto-detected)."""
    import shutil

    with requires("t5"):
        from safetensors.numpy import load_file, save_file

    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise LoraMergeError(f"{adapter_dir}: no adapter_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        acfg = json.load(f)
    base_file = os.path.join(base_dir, "model.safetensors")
    if not os.path.isfile(base_file):
        raise LoraMergeError(f"{base_dir}: expected a PyTorch checkpoint as model.safetensors")
    state = dict(load_file(base_file))
    adapter = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    if any(k in state for k in adapter):
        raise LoraMergeError("adapter keys collide with base keys")
    merged = merge_lora_state_dict({**{f"base_model.model.{k}": v for k, v in state.items()}, **adapter},
                                   lora_alpha=float(acfg.get("lora_alpha", acfg.get("r", 8))),
                                   r=int(acfg.get("r", 8)), use_rslora=bool(acfg.get("use_rslora", False)))
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in merged.items()}, os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    for name in os.listdir(base_dir):
        if name.endswith(".json") or name.endswith(".model"):
            shutil.copy(os.path.join(base_dir, name), os.path.join(out_dir, name))
    return out_dir


# --------------------------------------------------------------------------- pure functions
@dataclasses.dataclass(frozen=True, eq=False)
class T5Functions:
    """Pure text-to-text functions of one loaded model (identity-hashed, so a jitted step
    that takes them as static arguments compiles once per model).

    Batches are dicts of int32 arrays: ``input_ids`` / ``attention_mask`` [B, Lin],
    ``labels`` / ``label_mask`` [B, Lt] (targets end with ``</s>``, padded with pad).
    """

    model: Any

    @property
    def pad_id(self) -> int:
        return int(self.model.config.pad_token_id)

    @property
    def start_id(self) -> int:
        return int(self.model.config.decoder_start_token_id)

    def _shift_right(self, labels):
        start = jnp.full((labels.shape[0], 1), self.start_id, labels.dtype)
        return jnp.concatenate([start, labels[:, :-1]], axis=1)

    def logits(self, params, input_ids, attention_mask, decoder_input_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                          params=params, train=False).logits

    def hidden_states(self, params, input_ids, attention_mask, decoder_input_ids):
        """The decoder's last hidden states [B, Ld, d] (encoder, then decoder, no LM head):
        every Dense layer of ``params`` applied once, none outside it — the pass RegMean's
        Gram matrices are collected on (:func:`bcjax.models.grams.collect_grams`); the logits
        would add the tied LM head, whose kernel is the shared embedding, not a leaf."""
        def body(module, ids, mask, dec):
            enc = module.encoder(input_ids=ids, attention_mask=mask, deterministic=True)
            return module.decoder(input_ids=dec, attention_mask=jnp.ones_like(dec), encoder_hidden_states=enc[0],
                                  encoder_attention_mask=mask,
                                  deterministic=True)[0]

        return self.model.module.apply({"params": params}, input_ids, attention_mask, decoder_input_ids, method=body)

    def token_logprobs(self, params, batch):
        """log p(label token | input, previous label tokens), [B, Lt] (0 where masked)."""
        logits = self.logits(params, batch["input_ids"], batch["attention_mask"], self._shift_right(batch["labels"]))
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        tok = jnp.take_along_axis(lp, batch["labels"][..., None].astype(jnp.int32), axis=-1)[..., 0]
        return tok * batch["label_mask"]

    def loss(self, params, batch):
        """Text-to-text cross-entropy: mean over the non-padding target tokens of the batch
        (teacher forcing, dropout off)."""
        tok = self.token_logprobs(params, batch)
        return -jnp.sum(tok) / jnp.maximum(jnp.sum(batch["label_mask"]), 1)

    def rank_scores(self, params, input_ids, attention_mask, choice_ids, choice_mask):
        """Rank classification: the sequence log-likelihood Σ log p(choice tokens | input)
        of every label string, [B, K]. The encoder runs once per input; ``choice_ids`` /
        ``choice_mask`` are [K, Lt] (each choice ends with ``</s>``)."""
        enc = self.model.encode(input_ids=input_ids, attention_mask=attention_mask, params=params, train=False)
        b, k = input_ids.shape[0], choice_ids.shape[0]
        hidden = jnp.repeat(enc.last_hidden_state, k, axis=0)  # [B*K, Lin, d]
        enc_mask = jnp.repeat(attention_mask, k, axis=0)
        labels = jnp.tile(choice_ids, (b, 1))
        mask = jnp.tile(choice_mask, (b, 1))
        out = self.model.decode(decoder_input_ids=self._shift_right(labels), encoder_outputs=(hidden,),
                                encoder_attention_mask=enc_mask, params=params, train=False)
        lp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
        tok = jnp.take_along_axis(lp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0] * mask
        return jnp.sum(tok, axis=-1).reshape(b, k)

    def greedy(self, params, input_ids, attention_mask, max_new_tokens: int):
        """Greedy decoding of ``max_new_tokens`` tokens, [B, max_new_tokens] (after ``</s>``
        the tokens are pad). A fixed-size buffer is re-decoded each step (causal masking
        makes later positions irrelevant): no cache, fully jittable, fine for label-length
        outputs."""
        enc = self.model.encode(input_ids=input_ids, attention_mask=attention_mask, params=params, train=False)
        b = input_ids.shape[0]
        eos = int(self.model.config.eos_token_id)
        buf = jnp.full((b, max_new_tokens + 1), self.pad_id, jnp.int32).at[:, 0].set(self.start_id)

        def step(i, state):
            buf, done = state
            out = self.model.decode(decoder_input_ids=buf[:, :-1], encoder_outputs=(enc.last_hidden_state,),
                                    encoder_attention_mask=attention_mask, params=params, train=False)
            nxt = jnp.argmax(out.logits[:, i], axis=-1).astype(jnp.int32)
            nxt = jnp.where(done, self.pad_id, nxt)
            return buf.at[:, i + 1].set(nxt), done | (nxt == eos)

        buf, _ = jax.lax.fori_loop(0, max_new_tokens, step, (buf, jnp.zeros((b,), bool)))
        return buf[:, 1:]


_FUNCTIONS: "weakref.WeakKeyDictionary[Any, T5Functions]" = weakref.WeakKeyDictionary()


def t5_functions(model) -> T5Functions:
    """The :class:`T5Functions` of ``model``: the same object for the same model while the
    model lives, so jitted code keyed on it is compiled once. Held weakly (a dropped model is
    not kept alive); also applies the ``jnp.clip`` shim (:func:`install_clip_shim`)."""
    install_clip_shim()
    fns = _FUNCTIONS.get(model)
    if fns is None:
        fns = _FUNCTIONS[model] = T5Functions(model)
    return fns


@functools.partial(jax.jit, static_argnums=0)
def jit_rank_scores(fns: T5Functions, params, input_ids, attention_mask, choice_ids, choice_mask):
    return fns.rank_scores(params, input_ids, attention_mask, choice_ids, choice_mask)


@functools.partial(jax.jit, static_argnums=(0, 4))
def jit_greedy(fns: T5Functions, params, input_ids, attention_mask, max_new_tokens: int):
    return fns.greedy(params, input_ids, attention_mask, max_new_tokens)


@functools.partial(jax.jit, static_argnums=0)
def jit_loss(fns: T5Functions, params, batch):
    return fns.loss(params, batch)
