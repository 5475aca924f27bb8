"""Tiny offline T5 assets: a synthetic GLUE-shaped data set prepared with tfds (ArrayRecord,
no TensorFlow, no network), a SentencePiece tokenizer trained locally, and a random tiny T5.

Used by the T5 notebook's tiny mode (``BCJAX_TINY=1``) and the tests; the real runs use hub
models and tfds' own GLUE. The synthetic tasks follow simple rules a tiny model learns in a
few dozen steps (sentiment keywords, copy/paraphrase, word subsets, overlap scores).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from bcjax._optional import requires

__all__ = ["TINY_WORDS", "tiny_corpus", "train_tiny_tokenizer", "make_tiny_t5", "prepare_tiny_glue", "tiny_assets"]

_POS, _NEG = ("good", "great", "fine"), ("bad", "awful", "poor")
_OK, _BAD = ("cat", "dog", "bird"), ("xq", "zz", "qx")
TINY_WORDS = ("the", "a", "movie", "plot", "actor", "scene", "story", "film", "is", "was", "very", "quite", "red",
              "blue", "green", "house", "tree", "car", "road", "sun", "moon") + _POS + _NEG + _OK + _BAD


def _sentence(rng, n: int, extra: Sequence[str] = ()) -> list[str]:
    words = list(rng.choice(TINY_WORDS[:21], n))
    for w in extra:
        words.insert(int(rng.integers(0, len(words) + 1)), w)
    return words


def _example(task: str, rng, i: int) -> dict:
    y = int(rng.integers(0, 2))
    if task == "sst2":
        return {"sentence": " ".join(_sentence(rng, 4, [rng.choice(_POS if y else _NEG)])), "label": y}
    if task == "cola":
        return {"sentence": " ".join(_sentence(rng, 4, [rng.choice(_OK if y else _BAD)])), "label": y}
    s1 = _sentence(rng, 5)
    if task == "mrpc":  # 1 = equivalent: the same sentence
        s2 = list(s1) if y else _sentence(rng, 5)
        return {"sentence1": " ".join(s1), "sentence2": " ".join(s2), "label": y}
    if task == "rte":  # 0 = entailment: sentence2 is a sub-sequence of sentence1
        s2 = s1[1:4] if y == 0 else s1[1:3] + [str(rng.choice(_OK + _BAD))]
        return {"sentence1": " ".join(s1), "sentence2": " ".join(s2), "label": y}
    if task == "stsb":
        k = int(rng.integers(0, 6))
        s2 = s1[:k] + _sentence(rng, 5 - k)
        return {"sentence1": " ".join(s1), "sentence2": " ".join(s2), "label": float(k)}
    raise ValueError(task)


def tiny_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: every word, prompt prefix and label word."""
    from bcjax.data.glue import TASKS

    lines = [" ".join(TINY_WORDS)] * 4
    for t in TASKS.values():
        lines.append(t.template.format(**{f: " ".join(TINY_WORDS[:6]) for f in t.text_fields}))
        lines.extend(" ".join(t.label_words[i:i + 8]) for i in range(0, len(t.label_words), 8))
    rng = np.random.default_rng(0)
    lines.extend(" ".join(_sentence(rng, 8)) for _ in range(50))
    return lines


def train_tiny_tokenizer(out_dir: str, vocab_size: int = 200) -> str:
    """Train a SentencePiece unigram model on :func:`tiny_corpus` (pad 0, eos 1, unk 2, as T5;
    every word, prompt prefix and label word a user-defined piece) and save it as a
    ``T5TokenizerFast`` in ``out_dir``."""
    with requires("t5"):
        import sentencepiece as spm
        from transformers import T5TokenizerFast

    from bcjax.data.glue import TASKS

    words = set(TINY_WORDS)
    for t in TASKS.values():
        words |= set(t.label_words) | set(t.template.replace("{", " ").replace("}", " ").split())
        words -= set(t.text_fields)

    os.makedirs(out_dir, exist_ok=True)
    corpus = os.path.join(out_dir, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("\n".join(tiny_corpus()) + "\n")
    prefix = os.path.join(out_dir, "spiece")
    spm.SentencePieceTrainer.train(input=corpus, model_prefix=prefix, vocab_size=vocab_size, model_type="unigram",
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
                                   hard_vocab_limit=False, minloglevel=2, num_threads=1,
                                   user_defined_symbols=sorted(words))
    os.remove(corpus)
    tok = T5TokenizerFast(vocab_file=prefix + ".model", extra_ids=0, legacy=False)
    tok.save_pretrained(out_dir)
    return out_dir


def make_tiny_t5(out_dir: str, vocab_size: int, *, seed: int = 0, pytorch: bool = False, **config) -> str:
    """Save a random T5 (d_model 32, 2 layers, 2 heads) to ``out_dir``: Flax weights, or
    PyTorch ``model.safetensors`` with ``pytorch=True`` (needs torch). ``config`` overrides
    ``T5Config`` fields (e.g. Flan-T5's ``feed_forward_proj="gated-gelu"``,
    ``tie_word_embeddings=False``)."""
    with requires("t5"):
        from transformers import T5Config

    cfg = T5Config(vocab_size=vocab_size, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **config)
    if pytorch:
        with requires("torch"):
            import torch
            from transformers import T5ForConditionalGeneration

        torch.manual_seed(seed)
        T5ForConditionalGeneration(cfg).save_pretrained(out_dir)
    else:
        from bcjax.models.t5 import install_clip_shim

        with requires("t5"):
            from flax.traverse_util import flatten_dict, unflatten_dict
            from transformers import FlaxT5ForConditionalGeneration
        install_clip_shim()

        # random weights straight from the parameter shapes (numpy, instant; running the
        # model's init on a 2-core CPU takes tens of seconds): kernels N(0, 1/fan_in),
        # embeddings N(0, 1), layer norms 1
        model = FlaxT5ForConditionalGeneration(cfg, _do_init=False)
        rng = np.random.default_rng(seed)

        def init(key, shape):
            if key[-1] == "weight":
                return np.ones(shape, np.float32)
            scale = 1.0 if key[-1] == "embedding" else 1 / np.sqrt(shape[0])
            return (scale * rng.standard_normal(shape)).astype(np.float32)

        params = {k: init(k, v.shape) for k, v in flatten_dict(model.params_shape_tree).items()}
        model.save_pretrained(out_dir, params=unflatten_dict(params))
    return out_dir


def prepare_tiny_glue(data_dir: str, tasks: Sequence[str] = ("mrpc", "rte", "cola", "sst2", "stsb"), *,
                      n_train: int = 64, n_validation: int = 24, n_test: int = 8, seed: int = 0) -> str:
    """Prepare synthetic ``glue/<task>`` data in ``data_dir`` with a subclass of tfds' own
    GLUE builder (same name, features and version; ``file_format='array_record'``), so
    ``tfds.data_source('glue/<task>', data_dir=data_dir)`` reads it by name. ``test`` has
    hidden labels (-1), as GLUE's."""
    with requires("t5"):
        import tensorflow_datasets as tfds
        from tensorflow_datasets.core import registered
        from tensorflow_datasets.text import glue as tfds_glue

    with registered.skip_registration():
        class Glue(tfds_glue.Glue):  # noqa: B903
            def _split_generators(self, dl_manager):
                sizes = {"train": n_train, "validation": n_validation, "test": n_test}
                return {s: self._tiny(s, n) for s, n in sizes.items()}

            def _tiny(self, split, n):
                name = self.builder_config.name
                rng = np.random.default_rng([seed, sum(map(ord, name)), sum(map(ord, split))])
                for i in range(n):
                    ex = _example(name, rng, i)
                    if split == "test":
                        ex["label"] = -1.0 if name == "stsb" else -1
                    ex["idx"] = i
                    yield i, ex

    for task in tasks:
        Glue(config=task, data_dir=data_dir, file_format="array_record").download_and_prepare(
            download_config=tfds.download.DownloadConfig(verify_ssl=False))
    return data_dir


def tiny_assets(root: str, tasks: Sequence[str] = ("mrpc", "rte", "cola", "sst2", "stsb"), **data_kwargs) -> dict:
    """Tokenizer + random tiny Flax T5 (in ``root/tiny_t5``) and tiny GLUE data
    (``root/tfds``); idempotent. Returns ``{"model": path, "data_dir": path}``."""
    with requires("t5"):
        from transformers import AutoTokenizer

    model_dir, data_dir = os.path.join(root, "tiny_t5"), os.path.join(root, "tfds")
    if not os.path.isfile(os.path.join(model_dir, "flax_model.msgpack")):
        train_tiny_tokenizer(model_dir)
        make_tiny_t5(model_dir, len(AutoTokenizer.from_pretrained(model_dir)))
    missing = [t for t in tasks if not os.path.isdir(os.path.join(data_dir, "glue", t))]
    if missing:
        prepare_tiny_glue(data_dir, missing, **data_kwargs)
    return {"model": model_dir, "data_dir": data_dir}
