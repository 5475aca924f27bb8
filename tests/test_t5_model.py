"""Flax T5 loading: the jnp.clip shim, PyTorch import (logits equal transformers' PyTorch
T5), save/reload, LoRA merging."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcjax.errors import BcjaxError
from bcjax.models import t5 as t5m
from bcjax.testing.t5_offline import make_tiny_t5

import torch  # noqa: E402  (the test extra installs it: a missing torch must fail, not skip)


def test_clip_shim_is_scoped_idempotent_and_correct():
    from transformers.models.t5 import modeling_flax_t5 as mod

    assert t5m.install_clip_shim() and t5m.install_clip_shim()
    shimmed = mod.jnp
    assert shimmed is mod.jnp and shimmed.clip is t5m.clip_compat  # idempotent: one proxy
    assert shimmed.float32 is jnp.float32 and shimmed.einsum is jnp.einsum  # everything else is jax.numpy
    x = jnp.arange(-3, 4)
    np.testing.assert_array_equal(shimmed.clip(x, a_max=0), jnp.minimum(x, 0))
    np.testing.assert_array_equal(shimmed.clip(x, a_min=-1, a_max=2), jnp.clip(x, -1, 2))
    np.testing.assert_array_equal(shimmed.clip(x, min=1), jnp.maximum(x, 1))
    with pytest.raises(TypeError):
        shimmed.clip(x, a_max=0, max=1)
    with pytest.raises(TypeError):  # jax.numpy itself is untouched
        jnp.clip(x, a_max=0)


@pytest.fixture(scope="module")
def pt_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("t5_pt"))
    make_tiny_t5(path, vocab_size=120, seed=3, pytorch=True)
    return path


def test_pytorch_import_matches_pytorch_logits(pt_checkpoint):
    from transformers import T5ForConditionalGeneration

    assert "model.safetensors" in os.listdir(pt_checkpoint)
    model, params = t5m.load_t5(pt_checkpoint)  # from_pt auto-detected
    pt = T5ForConditionalGeneration.from_pretrained(pt_checkpoint).eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 120, (3, 40))  # 40 > relative_attention_max_distance: the clipped buckets are used
    ids[:, -1] = 1
    mask = np.ones_like(ids)
    mask[1, 25:] = 0
    dec = rng.integers(3, 120, (3, 9))
    fns = t5m.t5_functions(model)
    assert t5m.t5_functions(model) is fns
    flax_logits = np.asarray(jax.jit(fns.logits)(params, ids, mask, dec))
    with torch.no_grad():
        ref = pt(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 decoder_input_ids=torch.tensor(dec)).logits.numpy()
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(flax_logits, ref, atol=2e-4, rtol=1e-4)


def test_flax_save_and_reload_roundtrip(pt_checkpoint, tmp_path):
    model, params = t5m.load_t5(pt_checkpoint, from_pt=True)
    params = jax.tree.map(lambda x: x + 0.5, params)
    model.save_pretrained(tmp_path, params=params)
    _, back = t5m.load_t5(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_load_errors_are_bcjax_errors(tmp_path):
    with pytest.raises(t5m.T5LoadError, match="no T5 weights"):
        t5m.load_t5(str(tmp_path))
    with pytest.raises(BcjaxError):
        t5m.load_t5(str(tmp_path / "nope"), local_only=True)


def test_merge_lora_state_dict_formula_and_errors():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 5)).astype(np.float32)
    a, b = rng.normal(size=(2, 5)).astype(np.float32), rng.normal(size=(6, 2)).astype(np.float32)
    other = rng.normal(size=(3,)).astype(np.float32)
    sd = {"base_model.model.enc.q.base_layer.weight": w, "base_model.model.enc.q.lora_A.default.weight": a,
          "base_model.model.enc.q.lora_B.default.weight": b, "base_model.model.enc.norm.weight": other}
    out = t5m.merge_lora_state_dict(sd, lora_alpha=16, r=2)
    assert sorted(out) == ["enc.norm.weight", "enc.q.weight"]
    np.testing.assert_allclose(out["enc.q.weight"], w + 8.0 * b @ a, rtol=1e-6)
    np.testing.assert_array_equal(out["enc.norm.weight"], other)
    rs = t5m.merge_lora_state_dict(sd, lora_alpha=16, r=2, use_rslora=True)
    np.testing.assert_allclose(rs["enc.q.weight"], w + 16 / np.sqrt(2) * b @ a, rtol=1e-6)
    torch_sd = {k: torch.from_numpy(v) for k, v in sd.items()}
    np.testing.assert_allclose(t5m.merge_lora_state_dict(torch_sd, lora_alpha=16, r=2)["enc.q.weight"],
                               out["enc.q.weight"], rtol=1e-6)
    with pytest.raises(t5m.LoraMergeError, match="no base weight"):
        t5m.merge_lora_state_dict({"x.lora_A.weight": a, "x.lora_B.weight": b}, lora_alpha=1, r=2)
    with pytest.raises(t5m.LoraMergeError, match="do not fit"):
        t5m.merge_lora_state_dict({"x.weight": w.T, "x.lora_A.weight": a, "x.lora_B.weight": b}, lora_alpha=1, r=2)
    with pytest.raises(t5m.LoraMergeError, match="A without B"):
        t5m.merge_lora_state_dict({"x.weight": w, "x.lora_A.weight": a}, lora_alpha=1, r=2)


def test_merge_lora_checkpoint_imports_into_flax(pt_checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    base = load_file(os.path.join(pt_checkpoint, "model.safetensors"))
    key = "encoder.block.0.layer.0.SelfAttention.q"
    w = base[f"{key}.weight"]  # [out, in]
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, w.shape[1])).astype(np.float32), rng.normal(size=(w.shape[0], 4)).astype(np.float32)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({f"base_model.model.{key}.lora_A.weight": a, f"base_model.model.{key}.lora_B.weight": b},
              str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    merged_dir = t5m.merge_lora_checkpoint(pt_checkpoint, str(adapter), str(tmp_path / "merged"))
    _, p_base = t5m.load_t5(pt_checkpoint)
    _, p = t5m.load_t5(merged_dir)
    kernel = p["encoder"]["block"]["0"]["layer"]["0"]["SelfAttention"]["q"]["kernel"]  # Flax: [in, out]
    np.testing.assert_allclose(np.asarray(kernel), (w + 2.0 * b @ a).T, rtol=1e-5, atol=1e-6)
    # every other leaf is the base's
    flat, flat_base = jax.tree_util.tree_leaves_with_path(p), jax.tree.leaves(p_base)
    changed = [jax.tree_util.keystr(k) for (k, x), y in zip(flat, flat_base, strict=True) if not np.array_equal(x, y)]
    assert changed == ["['encoder']['block']['0']['layer']['0']['SelfAttention']['q']['kernel']"]


def test_pytorch_bin_checkpoint_and_bfloat16_compute(pt_checkpoint, tmp_path):
    from transformers import T5ForConditionalGeneration

    T5ForConditionalGeneration.from_pretrained(pt_checkpoint).save_pretrained(tmp_path, safe_serialization=False)
    assert "pytorch_model.bin" in os.listdir(tmp_path)
    _, p_bin = t5m.load_t5(str(tmp_path))
    model, p_st = t5m.load_t5(pt_checkpoint)
    jax.tree.map(np.testing.assert_array_equal, p_bin, p_st)
    # bfloat16 computation (parameters stay float32): the shimmed bucketing runs, logits stay close
    model16, p16 = t5m.load_t5(pt_checkpoint, dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype("float32")}
    ids = np.arange(2, 42).reshape(2, 20)
    mask, dec = np.ones_like(ids), ids[:, :6]
    f32 = np.asarray(jax.jit(t5m.t5_functions(model).logits)(p_st, ids, mask, dec))
    b16 = np.asarray(jax.jit(t5m.t5_functions(model16).logits)(p16, ids, mask, dec), np.float32)
    assert np.isfinite(b16).all() and np.abs(b16 - f32).max() < 0.1 * np.abs(f32).max()


def test_flan_t5_architecture_imports_exactly(tmp_path):
    """T5 v1.1 / Flan-T5: gated-GELU feed-forward and an untied LM head."""
    from transformers import T5ForConditionalGeneration

    make_tiny_t5(str(tmp_path), vocab_size=90, seed=5, pytorch=True, feed_forward_proj="gated-gelu",
                 tie_word_embeddings=False)
    model, params = t5m.load_t5(str(tmp_path))
    assert "lm_head" in params and "wi_0" in params["encoder"]["block"]["0"]["layer"]["1"]["DenseReluDense"]
    pt = T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    ids = np.arange(3, 33).reshape(2, 15) % 90
    dec = ids[:, :5]
    with torch.no_grad():
        ref = pt(input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor(dec)).logits.numpy()
    got = np.asarray(jax.jit(t5m.t5_functions(model).logits)(params, ids, np.ones_like(ids), dec))
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)
