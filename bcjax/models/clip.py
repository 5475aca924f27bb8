"""CLIP (transformers' Flax port) for the paper's main setting: only the vision tower is
fine-tuned and merged, the text tower builds frozen zero-shot heads (SPEC §5).

Model
    :func:`load_clip` loads a :class:`~transformers.FlaxCLIPModel` by hub name
    (``openai/clip-vit-base-patch32``, ``openai/clip-vit-base-patch16``,
    ``openai/clip-vit-large-patch14``) or local folder; a folder/repo with PyTorch weights
    only is converted on the fly (``from_pt``). The result is a :class:`Clip`: the
    ``CLIPConfig``, the full parameter tree and (when one is found next to the weights)
    the tokenizer.

Vision tree (what is fine-tuned and merged)
    ``{"vision_model": ...}`` -- exactly the tree of transformers' ``FlaxCLIPVisionModel``
    and the ``vision_model.*`` weights of PyTorch ``CLIPVisionModel``, so fine-tunes from
    elsewhere import one to one (:func:`vision_params`, :func:`with_vision`). The visual
    projection and ``logit_scale`` stay frozen with the pretrained model, like the heads.

Imports
    * HF PyTorch ``CLIPVisionModel`` fine-tunes (e.g. FusionBench's
      ``tanganke/clip-vit-base-patch32_<task>``, :func:`fusionbench_name`):
      :func:`load_vision_finetune` (``from_pt``), checked against the pretrained tree.
    * open_clip state dicts (the task-vectors checkpoints of Ilharco et al.; those are
      pickled ``ImageEncoder`` modules whose ``state_dict()`` keys start ``model.visual.``):
      :func:`openclip_visual_to_flax` / :func:`load_openclip_checkpoint`, mapping documented
      at :data:`OPENCLIP_MAPPING`. Use the HF ``openai/clip-vit-*`` model of the same
      architecture as θ0 and for the heads (same OpenAI weights); only the fine-tuned
      image towers need the mapping.

Exports
    :func:`export_vision` writes a merged vision tower as HF Flax (``save_pretrained`` of
    ``FlaxCLIPVisionModel``: ``flax_model.msgpack`` + ``config.json``) and/or as a PyTorch
    ``CLIPVisionModel`` checkpoint (``model.safetensors`` written with numpy, no torch
    needed); ``CLIPVisionModel.from_pretrained(dir)`` loads either folder.

Zero-shot heads (SPEC §5)
    For each class, every template of the data set is encoded with the text tower,
    L2-normalized, averaged and L2-normalized again (:func:`zero_shot_head`); logits =
    exp(logit_scale) · normalize(image_embeds) · Wᵀ (:func:`clip_logits`). Heads are cached
    on disk per (model, data set, class names, templates) (:func:`cached_zero_shot_head`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bcjax.errors import BcjaxError, TreeMismatchError
from bcjax._optional import requires

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "HUB_NAMES", "FUSIONBENCH_TASKS", "OPENCLIP_MAPPING", "Clip", "ClipModelError",
    "load_clip", "load_tokenizer", "vision_params", "with_vision", "head_args", "normalize_pixels",
    "image_embeds", "clip_logits", "make_classifier", "zero_shot_head", "cached_zero_shot_head",
    "fusionbench_name", "load_vision_finetune", "openclip_visual_to_flax", "load_openclip_checkpoint",
    "flax_vision_to_torch_state",
    "export_vision", "check_vision_tree",
]

#: CLIP's image normalization (OpenAI), applied inside the forward to [0, 1] images.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: config shorthand → hub name (the paper's three backbones).
HUB_NAMES = {
    "ViT-B-32": "openai/clip-vit-base-patch32",
    "ViT-B-16": "openai/clip-vit-base-patch16",
    "ViT-L-14": "openai/clip-vit-large-patch14",
}

#: FusionBench's task names for its per-task CLIP fine-tunes (``tanganke/<model>_<task>``).
FUSIONBENCH_TASKS = {
    "cars": "stanford-cars", "dtd": "dtd", "eurosat": "eurosat", "gtsrb": "gtsrb", "mnist": "mnist",
    "resisc45": "resisc45", "sun397": "sun397", "svhn": "svhn",
}


class ClipModelError(BcjaxError):
    """A CLIP model, checkpoint or input does not fit (wrong image shape, missing tokenizer,
    unmappable state-dict entry, ...)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Clip:
    """A loaded CLIP: ``config`` (``CLIPConfig``), full Flax ``params``, optional tokenizer,
    and ``name`` (hub name or path; it keys the head cache)."""

    config: Any
    params: Any
    tokenizer: Any = None
    name: str = ""

    @property
    def image_size(self) -> int:
        return int(self.config.vision_config.image_size)

    @property
    def vision(self):
        return vision_params(self.params)


# ----------------------------------------------------------------------------- loading
def _resolve(name_or_path: str) -> str:
    return HUB_NAMES.get(name_or_path, name_or_path)


def _has_flax_weights(path: str) -> bool | None:
    """True/False for a local folder, None for a hub name (unknown until asked)."""
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "flax_model.msgpack"))
    return None


def load_tokenizer(name_or_path: str):
    """``CLIPTokenizer`` (or fast) from a hub name or folder; ``None`` when there is none."""
    with requires("clip"):
        from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(_resolve(name_or_path))
    except (OSError, ValueError, TypeError):
        return None


def _from_pretrained(cls, path, from_pt: bool, dtype):
    """(model, params). Flax weights load without a random init (``_do_init=False``: no
    compilation); transformers' PyTorch conversion needs the initialized model."""
    if from_pt:
        model = cls.from_pretrained(path, from_pt=True, dtype=dtype)
        return model, model.params
    return cls.from_pretrained(path, dtype=dtype, _do_init=False)


def load_clip(name_or_path: str, *, dtype=jnp.float32, from_pt: bool | None = None, tokenizer: bool = True) -> Clip:
    """Load a CLIP by hub name (or a :data:`HUB_NAMES` shorthand) or local folder.

    ``from_pt=None`` picks Flax weights when present and otherwise converts PyTorch ones.
    """
    with requires("clip"):
        from transformers import FlaxCLIPModel

    path = _resolve(name_or_path)
    if from_pt is None:
        has_flax = _has_flax_weights(path)
        from_pt = has_flax is False
    try:
        model, params = _from_pretrained(FlaxCLIPModel, path, from_pt, dtype)
    except OSError as e:
        if from_pt or _has_flax_weights(path) is not None:
            raise ClipModelError(f"cannot load CLIP {name_or_path!r}: {e}") from None
        try:  # a hub repo with PyTorch weights only
            model, params = _from_pretrained(FlaxCLIPModel, path, True, dtype)
        except OSError as e2:
            raise ClipModelError(f"cannot load CLIP {name_or_path!r}: {e2}") from None
    tok = load_tokenizer(path) if tokenizer else None
    return Clip(config=model.config, params=jax.tree.map(jnp.asarray, params), tokenizer=tok, name=str(path))


def vision_params(params: Mapping) -> dict:
    """The fine-tuned/merged part of a full ``FlaxCLIPModel`` tree: ``{"vision_model": ...}``."""
    if "vision_model" not in params:
        raise ClipModelError(f"not a CLIP parameter tree: top-level keys {sorted(params)} lack 'vision_model'")
    return {"vision_model": params["vision_model"]}


def with_vision(params: Mapping, vision: Mapping) -> dict:
    """The full tree with its vision tower replaced by ``vision`` (e.g. a merged one)."""
    out = dict(params)
    out["vision_model"] = vision["vision_model"]
    return out


def head_args(clip: Clip) -> tuple:
    """The frozen, non-merged inputs of the image classifier: (visual projection kernel,
    logit scale)."""
    return (clip.params["visual_projection"]["kernel"], clip.params["logit_scale"])


# ----------------------------------------------------------------------------- forward
def normalize_pixels(images):
    """NHWC images in [0, 1] (float) or uint8 [0, 255] → CLIP-normalized float32."""
    x = jnp.asarray(images)
    x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
    return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


def _check_images(images, vision_config) -> None:
    s = int(vision_config.image_size)
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[1:] != (s, s, vision_config.num_channels):
        raise ClipModelError(f"expected NHWC images of shape (batch, {s}, {s}, {vision_config.num_channels}) "
                             f"for this CLIP (image_size {s}), got {shape}; preprocess with "
                             f"bcjax.data.vision.clip_preprocess(image, {s})")


def image_embeds(vision: Mapping, images, proj_kernel, *, vision_config, dtype=jnp.float32):
    """Projected, *unnormalized* image embeddings (B, projection_dim).

    ``vision`` is the ``{"vision_model": ...}`` tree (an argument: it is differentiated and
    merged); ``images`` NHWC uint8 or [0, 1] float at the model's image size.
    """
    with requires("clip"):
        from transformers.models.clip.modeling_flax_clip import FlaxCLIPVisionTransformer

    _check_images(images, vision_config)
    module = FlaxCLIPVisionTransformer(vision_config, dtype=dtype)
    pooled = module.apply({"params": vision["vision_model"]}, normalize_pixels(images), return_dict=False)[1]
    return pooled.astype(jnp.float32) @ proj_kernel.astype(jnp.float32)


def _l2n(x, axis=-1):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def clip_logits(embeds, logit_scale, head_w, head_valid=None):
    """exp(logit_scale) · normalize(embeds) · Wᵀ (SPEC §5); padded classes at −1e9."""
    logits = jnp.exp(logit_scale) * _l2n(embeds) @ head_w.T
    return logits if head_valid is None else jnp.where(head_valid[None], logits, -1e9)


@functools.lru_cache(maxsize=16)
def _classifier(vision_config_json: str, dtype_name: str):
    with requires("clip"):
        from transformers import CLIPVisionConfig

    vcfg = CLIPVisionConfig.from_dict(json.loads(vision_config_json))
    dtype = jnp.dtype(dtype_name)

    def predict(vision, images, proj_kernel, logit_scale, head_w, head_valid):
        e = image_embeds(vision, images, proj_kernel, vision_config=vcfg, dtype=dtype)
        return clip_logits(e, logit_scale, head_w, head_valid)

    def loss(vision, batch, proj_kernel, logit_scale, head_w, head_valid):
        with requires("clip"):
            import optax

        logits = predict(vision, batch["x"], proj_kernel, logit_scale, head_w, head_valid)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    return predict, loss


def make_classifier(config, dtype=jnp.float32) -> tuple[Callable, Callable]:
    """``(predict, loss)`` for :mod:`bcjax.evaluate` / :mod:`bcjax.train`:

    * ``predict(vision, images, proj_kernel, logit_scale, head_w, head_valid) -> logits``
    * ``loss(vision, batch, proj_kernel, logit_scale, head_w, head_valid) -> scalar``
      (cross-entropy; ``batch = {"x": images, "y": labels}``)

    The frozen inputs go in as traced arguments (``predict_args`` / ``loss_args`` =
    ``head_args(clip) + (head_w, head_valid)``), so every task shares one compilation.
    The same function objects are returned for equal configs (jit caches hit).
    """
    vcfg = getattr(config, "vision_config", config)
    return _classifier(vcfg.to_json_string(use_diff=False), jnp.dtype(dtype).name)


# ----------------------------------------------------------------------------- zero-shot heads
@functools.lru_cache(maxsize=8)
def _text_embed_fn(config_json: str):
    with requires("clip"):
        from transformers import CLIPConfig
        from transformers.models.clip.modeling_flax_clip import FlaxCLIPModule

    module = FlaxCLIPModule(CLIPConfig.from_dict(json.loads(config_json)))

    def fn(params, input_ids, attention_mask):
        return module.apply({"params": params}, input_ids, attention_mask,
                            jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape),
                            method=lambda m, i, a, p: m.text_projection(m.text_model(i, a, p, return_dict=False)[1]))

    return jax.jit(fn)


def zero_shot_head(clip: Clip, classnames: Sequence[str], templates: Sequence[Callable[[str], str] | str], *,
                   batch_size: int = 256) -> np.ndarray:
    """float32[C, projection_dim] zero-shot head (SPEC §5): per class, encode every
    template, L2-normalize, average, L2-normalize again.

    ``templates`` are callables ``c -> text`` or format strings with ``{c}``.
    """
    if clip.tokenizer is None:
        raise ClipModelError(f"CLIP {clip.name!r} has no tokenizer: zero-shot heads need one "
                             "(save it next to the weights, or pass tokenizer=...)")
    if not classnames:
        raise ClipModelError("zero-shot head: no class names given")
    if not templates:
        raise ClipModelError("zero-shot head: no templates given")
    fmt = [t if callable(t) else (lambda c, t=t: t.format(c=c)) for t in templates]
    texts = [f(c) for c in classnames for f in fmt]
    max_len = int(clip.config.text_config.max_position_embeddings)
    fn = _text_embed_fn(clip.config.to_json_string(use_diff=False))
    out = []
    for s in range(0, len(texts), batch_size):
        chunk = texts[s:s + batch_size]
        n = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - n) if len(texts) > batch_size else chunk
        tok = clip.tokenizer(chunk, padding="max_length", truncation=True, max_length=max_len, return_tensors="np")
        e = fn(clip.params, jnp.asarray(tok["input_ids"], jnp.int32), jnp.asarray(tok["attention_mask"], jnp.int32))
        out.append(np.asarray(e, np.float32)[:n])
    e = _l2n(jnp.asarray(np.concatenate(out)).reshape(len(classnames), len(fmt), -1))
    return np.asarray(_l2n(e.mean(1)), np.float32)


def _template_strings(templates) -> list[str]:
    return [t("{c}") if callable(t) else str(t) for t in templates]


def cached_zero_shot_head(clip: Clip, dataset: str, classnames: Sequence[str], templates: Sequence, *,
                          cache_dir: str | os.PathLike) -> np.ndarray:
    """:func:`zero_shot_head` cached as ``<cache_dir>/heads/<model>/<dataset>-<hash>.npy``;
    the hash covers the class names, the templates and the text tower's weights checksum,
    so a changed list or model never reuses a stale head."""
    text_sum = hashlib.sha256()
    for leaf in jax.tree.leaves(clip.params["text_model"]) + [clip.params["text_projection"]["kernel"]]:
        text_sum.update(np.asarray(leaf, np.float32).tobytes()[:4096])
    key = json.dumps(dict(classes=list(classnames), templates=_template_strings(templates),
                          text=text_sum.hexdigest()), sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    model_tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", clip.name.strip("/"))[-80:] or "model"
    path = pathlib.Path(cache_dir) / "heads" / model_tag / f"{dataset}-{digest}.npy"
    if path.is_file():
        w = np.load(path)
        if w.shape[0] == len(classnames):
            return w
    w = zero_shot_head(clip, classnames, templates)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, w)
    os.replace(tmp, path)
    return w


# ----------------------------------------------------------------------------- imports
def fusionbench_name(task: str, model: str = "clip-vit-base-patch32") -> str:
    """Hub name of FusionBench's ``CLIPVisionModel`` fine-tune of ``model`` on ``task``
    (bcjax task names, e.g. ``cars`` → ``tanganke/clip-vit-base-patch32_stanford-cars``)."""
    if task not in FUSIONBENCH_TASKS:
        raise ClipModelError(f"no FusionBench name for task {task!r}; known: {sorted(FUSIONBENCH_TASKS)}")
    return f"tanganke/{model.split('/')[-1]}_{FUSIONBENCH_TASKS[task]}"


def check_vision_tree(vision: Mapping, reference: Mapping, what: str) -> None:
    """Same key paths, shapes and dtypes as ``reference``, else :class:`TreeMismatchError`
    naming the first offending key path."""
    flat = dict(jax.tree_util.tree_flatten_with_path(vision)[0])
    ref = dict(jax.tree_util.tree_flatten_with_path(reference)[0])
    for path, leaf in ref.items():
        name = jax.tree_util.keystr(path)
        if path not in flat:
            raise TreeMismatchError(f"{what}: missing {name} (expected shape {tuple(leaf.shape)})")
        if tuple(flat[path].shape) != tuple(leaf.shape):
            raise TreeMismatchError(f"{what}: {name} has shape {tuple(flat[path].shape)}, "
                                    f"expected {tuple(leaf.shape)}")
    extra = sorted(jax.tree_util.keystr(p) for p in flat if p not in ref)
    if extra:
        raise TreeMismatchError(f"{what}: unexpected entries {extra[:5]}")


def load_vision_finetune(name_or_path: str, reference: Mapping | None = None, *, from_pt: bool | None = None,
                         dtype=jnp.float32) -> dict:
    """Vision tree of a fine-tuned ``CLIPVisionModel`` (HF; PyTorch or Flax weights),
    e.g. :func:`fusionbench_name` ``("mnist")``; checked against ``reference`` (the
    pretrained :func:`vision_params`) when given. Dtypes follow ``reference``."""
    with requires("clip"):
        from transformers import FlaxCLIPVisionModel

    if from_pt is None:
        has_flax = _has_flax_weights(name_or_path)
        from_pt = has_flax is not True
    try:
        _, params = _from_pretrained(FlaxCLIPVisionModel, name_or_path, from_pt, dtype)
    except OSError as e:
        raise ClipModelError(f"cannot load CLIP vision fine-tune {name_or_path!r}: {e}") from None
    vision = {"vision_model": jax.tree.map(jnp.asarray, params["vision_model"])}
    if reference is not None:
        check_vision_tree(vision, reference, f"fine-tune {name_or_path!r}")
        vision = jax.tree.map(lambda x, r: x.astype(r.dtype), vision, reference)
    return vision


#: open_clip ``visual.*`` state-dict entry → (Flax key path under the full CLIP tree, transform).
#: ``{i}`` is the layer index. Transforms: ``T`` transpose a Linear weight [out, in] → Dense
#: kernel [in, out]; ``conv`` OIHW → HWIO; ``qkv`` splits ``in_proj_*`` (3·D rows: q, k, v)
#: and transposes; ``=`` unchanged. open_clip's ``visual.proj`` is already [width, embed]
#: (it computes ``x @ proj``), so it is copied as the Dense kernel untransposed.
OPENCLIP_MAPPING = {
    "class_embedding": ("vision_model/embeddings/class_embedding", "="),
    "positional_embedding": ("vision_model/embeddings/position_embedding/embedding", "="),
    "conv1.weight": ("vision_model/embeddings/patch_embedding/kernel", "conv"),
    "ln_pre.weight": ("vision_model/pre_layrnorm/scale", "="),
    "ln_pre.bias": ("vision_model/pre_layrnorm/bias", "="),
    "transformer.resblocks.{i}.ln_1.weight": ("vision_model/encoder/layers/{i}/layer_norm1/scale", "="),
    "transformer.resblocks.{i}.ln_1.bias": ("vision_model/encoder/layers/{i}/layer_norm1/bias", "="),
    "transformer.resblocks.{i}.attn.in_proj_weight": ("vision_model/encoder/layers/{i}/self_attn/{q,k,v}_proj/kernel",
                                                     "qkv"),
    "transformer.resblocks.{i}.attn.in_proj_bias": ("vision_model/encoder/layers/{i}/self_attn/{q,k,v}_proj/bias",
                                                   "qkv"),
    "transformer.resblocks.{i}.attn.out_proj.weight": ("vision_model/encoder/layers/{i}/self_attn/out_proj/kernel",
                                                      "T"),
    "transformer.resblocks.{i}.attn.out_proj.bias": ("vision_model/encoder/layers/{i}/self_attn/out_proj/bias", "="),
    "transformer.resblocks.{i}.ln_2.weight": ("vision_model/encoder/layers/{i}/layer_norm2/scale", "="),
    "transformer.resblocks.{i}.ln_2.bias": ("vision_model/encoder/layers/{i}/layer_norm2/bias", "="),
    "transformer.resblocks.{i}.mlp.c_fc.weight": ("vision_model/encoder/layers/{i}/mlp/fc1/kernel", "T"),
    "transformer.resblocks.{i}.mlp.c_fc.bias": ("vision_model/encoder/layers/{i}/mlp/fc1/bias", "="),
    "transformer.resblocks.{i}.mlp.c_proj.weight": ("vision_model/encoder/layers/{i}/mlp/fc2/kernel", "T"),
    "transformer.resblocks.{i}.mlp.c_proj.bias": ("vision_model/encoder/layers/{i}/mlp/fc2/bias", "="),
    "ln_post.weight": ("vision_model/post_layernorm/scale", "="),
    "ln_post.bias": ("vision_model/post_layernorm/bias", "="),
    "proj": ("visual_projection/kernel", "="),
}

_OPENCLIP_PREFIXES = ("module.", "model.", "visual.")


def _set(tree: dict, path: str, value) -> None:
    parts = path.split("/")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    if parts[-1] in node:
        raise ClipModelError(f"open_clip state dict: {path} is set twice")
    node[parts[-1]] = value


def openclip_visual_to_flax(state_dict: Mapping[str, Any], *, reference: Mapping | None = None) -> dict:
    """Map an open_clip ViT state dict (``visual.*``; a ``model.``/``module.`` prefix is
    stripped; text-tower entries are ignored) onto the Flax CLIP tree.

    Returns ``{"vision_model": ..., "visual_projection": {"kernel": ...}}`` (the projection
    only when ``visual.proj`` is present). With ``reference`` (a Flax tree with those
    keys) the result is checked against its shapes and cast to its dtypes. Every ``visual.``
    entry must map (:data:`OPENCLIP_MAPPING`), else :class:`ClipModelError` names it; the
    ResNet (``visual.layer1...``) variants and attention pooling are not supported.
    """
    out: dict = {}
    seen = 0
    for raw_key, value in state_dict.items():
        key = raw_key
        while key.startswith(("module.", "model.")):
            key = key.split(".", 1)[1]
        if not key.startswith("visual."):
            continue
        key = key[len("visual."):]
        seen += 1
        v = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key)
        pattern, i = (f"transformer.resblocks.{{i}}.{m.group(2)}", m.group(1)) if m else (key, None)
        if pattern not in OPENCLIP_MAPPING:
            raise ClipModelError(f"open_clip state dict: cannot map entry {raw_key!r} (shape {v.shape}) onto Flax "
                                 "CLIP; only ViT image towers are supported (see OPENCLIP_MAPPING)")
        target, how = OPENCLIP_MAPPING[pattern]
        target = target.replace("{i}", i) if i is not None else target
        if how == "=":
            _set(out, target, v)
        elif how == "T":
            _set(out, target, v.T)
        elif how == "conv":
            _set(out, target, v.transpose(2, 3, 1, 0))
        elif how == "qkv":
            if v.shape[0] % 3:
                raise ClipModelError(f"open_clip state dict: {raw_key!r} has {v.shape[0]} rows, not 3·width")
            for name, part in zip("qkv", np.split(v, 3, axis=0), strict=True):
                _set(out, target.replace("{q,k,v}", name), part.T if part.ndim == 2 else part)
    if not seen:
        raise ClipModelError(f"open_clip state dict has no 'visual.*' entries (first keys: {list(state_dict)[:5]})")
    if reference is not None:
        ref = {k: reference[k] for k in out}
        check_vision_tree(out, ref, "open_clip state dict")
        out = jax.tree.map(lambda x, r: jnp.asarray(x, r.dtype), out, ref)
    return out


def load_openclip_checkpoint(path: str | os.PathLike, reference: Mapping | None = None) -> dict:
    """:func:`openclip_visual_to_flax` of a checkpoint file: a ``.safetensors`` state dict,
    or a ``torch.save`` file holding a state dict or a module (the task-vectors
    checkpoints are pickled ``ImageEncoder`` modules: unpickling them needs ``open_clip``
    and the task-vectors ``src`` package importable -- torch's rule, not ours; only load
    files you trust). With the pretrained HF model of the same architecture as
    ``reference`` (its ``vision_model`` and ``visual_projection``), the fine-tune becomes a
    Flax tree ready to merge."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        with requires("clip"):
            from safetensors.numpy import load_file

        state = load_file(path)
    else:
        with requires("torch"):
            import torch

        obj = torch.load(path, map_location="cpu", weights_only=False)
        state = obj.state_dict() if hasattr(obj, "state_dict") else obj
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]  # open_clip training checkpoints
    if not isinstance(state, Mapping):
        raise ClipModelError(f"{path}: expected a state dict or a module, got {type(state).__name__}")
    return openclip_visual_to_flax(state, reference=reference)


# ----------------------------------------------------------------------------- exports
def flax_vision_to_torch_state(vision: Mapping) -> dict[str, np.ndarray]:
    """PyTorch ``CLIPVisionModel`` state dict (numpy float32) of a ``{"vision_model": ...}``
    tree: Dense kernels transposed, the patch conv HWIO → OIHW, ``scale``/``embedding`` →
    ``weight``."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(vision)[0]:
        keys = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
        a = np.asarray(leaf, np.float32)
        last = keys[-1]
        if last == "kernel":
            a = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
            last = "weight"
        elif last in ("scale", "embedding"):
            last = "weight"
        out[".".join(keys[:-1] + [last])] = np.ascontiguousarray(a)
    return out


def export_vision(vision: Mapping, config, out_dir: str | os.PathLike, *, formats: Sequence[str] = ("flax", "pytorch")
                  ) -> dict[str, str]:
    """Save a (merged) vision tower; returns ``{format: folder}``.

    * ``flax``: ``<out_dir>/flax`` via ``FlaxCLIPVisionModel.save_pretrained``;
    * ``pytorch``: ``<out_dir>/pytorch`` with ``config.json`` + ``model.safetensors`` in
      PyTorch ``CLIPVisionModel`` names (loads with ``CLIPVisionModel.from_pretrained``).
    """
    with requires("clip"):
        from transformers import FlaxCLIPVisionModel

    vcfg = getattr(config, "vision_config", config)
    unknown = sorted(set(formats) - {"flax", "pytorch"})
    if unknown:
        raise ClipModelError(f"export formats {unknown} unknown; use 'flax' and/or 'pytorch'")
    out_dir = pathlib.Path(out_dir)
    written = {}
    if "flax" in formats:
        d = out_dir / "flax"
        model = FlaxCLIPVisionModel(vcfg, _do_init=False)
        model.save_pretrained(d, params=jax.tree.map(np.asarray, dict(vision)))
        written["flax"] = str(d)
    if "pytorch" in formats:
        with requires("clip"):
            from safetensors.numpy import save_file

        d = out_dir / "pytorch"
        d.mkdir(parents=True, exist_ok=True)
        cfg = vcfg.to_dict()
        cfg["architectures"] = ["CLIPVisionModel"]
        cfg["model_type"] = "clip_vision_model"
        (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        save_file(flax_vision_to_torch_state(vision), str(d / "model.safetensors"), metadata={"format": "pt"})
        written["pytorch"] = str(d)
    return written
