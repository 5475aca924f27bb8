"""A tiny, fully offline CLIP setup: the real code paths of :mod:`bcjax.pipelines.clip` on a
random CLIP (hidden 32, 2 layers, 32-px images, 8-px patches), a locally built CLIP BPE
tokenizer and three small tfds data sets written as ``array_record``.

Used by the tests, by CI's run of ``notebooks/clip_8tasks.ipynb`` (``BCJAX_TINY=1``) and by
anyone who wants to try the pipeline without a model hub. Nothing here touches the network.
The tasks are learnable from pixels (dominant colour, stripe direction, brightness), so a
few fine-tuning steps move accuracy; the random text tower makes zero-shot heads arbitrary.
"""
from __future__ import annotations

import json
import os
import pathlib

import numpy as np
from bcjax._optional import requires

__all__ = ["TINY_TASKS", "tiny_clip_config", "write_tiny_tokenizer", "write_tiny_clip", "write_tiny_tfds",
           "tiny_config", "setup_tiny"]

#: name → class names of the tiny tasks (labels are learnable from the pixels).
TINY_TASKS = {
    "tiny_colors": ("red", "green", "blue"),
    "tiny_stripes": ("horizontal stripes", "vertical stripes", "checkerboard"),
    "tiny_light": ("dark", "bright"),
}
_SIZES = {"train": 40, "test": 16}


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


_MERGES = ("t h", "th e</w>", "o f</w>", "p h", "ph o", "pho t", "phot o</w>", "r e", "re d</w>",
           "i n", "in g</w>", "s t", "e s</w>")


def write_tiny_tokenizer(path: str | os.PathLike) -> str:
    """A CLIP BPE tokenizer over all 256 byte symbols (+ ``</w>`` forms), a few merges and
    the two special tokens (``<|endoftext|>`` has the largest id, as in CLIP); saved with
    ``CLIPTokenizer.save_pretrained``."""
    with requires("clip"):
        from transformers import CLIPTokenizer

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in _MERGES]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), pad_token="<|endoftext|>")
    tok.save_pretrained(str(path))
    return str(path)


def tiny_clip_config(vocab_size: int = 528, *, image_size: int = 32, patch_size: int = 8):
    """``CLIPConfig`` with hidden 32, 2 layers, 2 heads; ``eos_token_id`` is the last id."""
    with requires("clip"):
        from transformers import CLIPConfig

    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=24, bos_token_id=vocab_size - 2,
                eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, projection_dim=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=patch_size, projection_dim=16)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def write_tiny_clip(path: str | os.PathLike, *, seed: int = 0, framework: str = "flax") -> str:
    """A random tiny CLIP + tokenizer saved with ``save_pretrained`` in ``path``
    (``framework="flax"``: ``flax_model.msgpack``; ``"pytorch"``: ``model.safetensors``)."""
    path = pathlib.Path(path)
    write_tiny_tokenizer(path)
    with requires("clip"):
        from transformers import AutoTokenizer

    vocab_size = len(AutoTokenizer.from_pretrained(str(path)))
    config = tiny_clip_config(vocab_size)
    if framework == "flax":
        with requires("clip"):
            from transformers import FlaxCLIPModel

        model = FlaxCLIPModel(config, _do_init=False)
        model.save_pretrained(str(path), params=_random_params(model, seed))
    elif framework == "pytorch":
        with requires("torch"):
            import torch
            from transformers import CLIPModel

        torch.manual_seed(seed)
        CLIPModel(config).eval().save_pretrained(str(path))
    else:
        raise ValueError(f"framework must be 'flax' or 'pytorch', got {framework!r}")
    return str(path)


def _random_params(model, seed: int) -> dict:
    """Random weights from the module's abstract init (``jax.eval_shape``: no compilation):
    N(0, 0.02) matrices and embeddings, unit LayerNorm scales, zero biases, CLIP's
    logit-scale init."""
    import jax
    import jax.numpy as jnp

    size = model.config.vision_config.image_size
    shapes = jax.eval_shape(lambda: model.module.init(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, size, size, 3)), jnp.ones((1, 8), jnp.int32),
        jnp.zeros((1, 8), jnp.int32))["params"])
    rng = np.random.default_rng(seed)

    def init(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "logit_scale":
            return np.asarray(model.config.logit_scale_init_value, np.float32)
        if name == "scale":
            return np.ones(leaf.shape, np.float32)
        if name == "bias":
            return np.zeros(leaf.shape, np.float32)
        return rng.normal(0, 0.02, leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(init, shapes)


def _image(task: str, label: int, rng: np.random.Generator) -> np.ndarray:
    h, w = int(rng.integers(36, 48)), int(rng.integers(36, 48))  # non-square: exercises resize + crop
    noise = rng.normal(0, 25, (h, w, 3))
    if task == "tiny_colors":
        base = np.full((h, w, 3), 60.0)
        base[..., label] = 200.0
    elif task == "tiny_stripes":
        yy, xx = np.mgrid[:h, :w]
        pattern = [(yy // 4) % 2, (xx // 4) % 2, ((yy // 4) + (xx // 4)) % 2][label]
        base = np.repeat((60 + 140 * pattern)[..., None], 3, -1).astype(float)
    else:
        base = np.full((h, w, 3), [70.0, 185.0][label])
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _builder_class(task: str):
    with requires("clip"):
        import tensorflow_datasets as tfds
        from PIL import Image

    names = TINY_TASKS[task]

    class _Tiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=list(names))}))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split, n) for split, n in _SIZES.items()}

        def _generate_examples(self, split, n):
            rng = np.random.default_rng([len(task), len(split), n])
            for i in range(n):
                label = i % len(names)
                # PIL images: tfds encodes them with Pillow (numpy images would need TensorFlow)
                yield i, {"image": Image.fromarray(_image(task, label, rng)), "label": label}

    _Tiny.name = task
    _Tiny.__name__ = "".join(p.title() for p in task.split("_"))
    return _Tiny


def write_tiny_tfds(data_dir: str | os.PathLike, tasks=tuple(TINY_TASKS)) -> str:
    """Prepare the tiny tfds data sets (array_record) in ``data_dir`` (skips prepared ones)."""
    with requires("clip"):
        import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    for task in tasks:
        if (pathlib.Path(data_dir) / task / "1.0.0" / "dataset_info.json").is_file():
            continue
        builder = _builder_class(task)(data_dir=str(data_dir), file_format="array_record")
        builder.download_and_prepare(download_config=None)
    return str(data_dir)


def tiny_config(root: str | os.PathLike, *, steps: int = 6, batch_size: int = 8) -> dict:
    """A ``pipeline: clip`` config for the tiny setup under ``root`` (see :func:`setup_tiny`)."""
    root = pathlib.Path(root)
    return {
        "pipeline": "clip",
        "model": {"name": str(root / "model")},
        "data": {"data_dir": str(root / "tfds"), "seed": 0,
                 "tasks": [{"name": t, "tfds_name": t, "val_size": 8} for t in TINY_TASKS]},
        "train": {"steps": steps, "batch_size": batch_size, "learning_rate": 1e-3, "weight_decay": 0.1,
                  "warmup_steps": 1, "checkpoint_every": 3, "seed": 0},
        "eval": {"split": "test", "batch_size": 16, "models_per_call": 2,
                 "merges": [{"method": "task_arithmetic", "alpha": 0.5},
                            {"method": "breadcrumbs", "alpha": 0.5, "beta": 0.1, "gamma": 0.99}]},
        "cache_dir": str(root / "cache"),
    }


def setup_tiny(root: str | os.PathLike, **config_kwargs) -> dict:
    """Write the tiny model, tokenizer and data sets under ``root`` (idempotent) and return
    :func:`tiny_config`; also saved as ``root/clip_tiny.yaml``."""
    import yaml

    root = pathlib.Path(root)
    if not (root / "model" / "flax_model.msgpack").is_file():
        write_tiny_clip(root / "model")
    write_tiny_tfds(root / "tfds")
    cfg = tiny_config(root, **config_kwargs)
    (root / "clip_tiny.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg
