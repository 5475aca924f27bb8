"""A pure-Flax ViT-S/14 with the embedded DINOv2's exact parameter tree (names, shapes: 22,056,192
parameters) and forward semantics (patch conv, [CLS], bicubic-resized position embeddings,
pre-norm blocks with LayerScale, exact GELU, final LayerNorm), without transformers — for
benchmarks on machines whose transformers has no Flax models. Weights are random: timing
does not depend on them.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bcjax.models.dinov2 import interpolate_position_embeddings, normalize_images

HIDDEN, LAYERS, HEADS, MLP, PATCH, POSITIONS = 384, 12, 6, 1536, 14, 1370


class _Scale(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x * self.param("lambda1", nn.initializers.ones, (HIDDEN,))


class _SelfAttention(nn.Module):
    @nn.compact
    def __call__(self, x):
        b, n, _ = x.shape
        split = lambda y: y.reshape(b, n, HEADS, HIDDEN // HEADS)  # noqa: E731
        q, k, v = (split(nn.Dense(HIDDEN, name=nm)(x)) for nm in ("query", "key", "value"))
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(HIDDEN // HEADS), axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, n, HIDDEN)


class _Output(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(HIDDEN, name="dense")(x)


class _Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _Output(name="output")(_SelfAttention(name="attention")(x))


class _Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(HIDDEN, name="fc2")(nn.gelu(nn.Dense(MLP, name="fc1")(x), approximate=False))


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x + _Scale(name="layer_scale1")(_Attention(name="attention")(nn.LayerNorm(1e-6, name="norm1")(x)))
        return x + _Scale(name="layer_scale2")(_Mlp(name="mlp")(nn.LayerNorm(1e-6, name="norm2")(x)))


class _Layers(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(LAYERS):
            x = _Layer(name=str(i))(x)
        return x


class _Encoder(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _Layers(name="layer")(x)


class _PatchEmbeddings(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(HIDDEN, (PATCH, PATCH), strides=(PATCH, PATCH), padding="VALID", name="projection")(x)


class _Embeddings(nn.Module):
    @nn.compact
    def __call__(self, pixels):
        b, h, w, _ = pixels.shape
        tokens = _PatchEmbeddings(name="patch_embeddings")(pixels).reshape(b, -1, HIDDEN)
        cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, HIDDEN))
        pos = self.param("position_embeddings", nn.initializers.normal(0.02), (1, POSITIONS, HIDDEN))
        tokens = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, HIDDEN)), tokens], axis=1)
        return tokens + interpolate_position_embeddings(pos, (h // PATCH, w // PATCH))


class ViTS14(nn.Module):
    """images NHWC in [0, 1] → [CLS] features (B, 384), like ``bcjax.models.dinov2.features``."""

    @nn.compact
    def __call__(self, images):
        x = _Embeddings(name="embeddings")(normalize_images(images))
        x = _Encoder(name="encoder")(x)
        return nn.LayerNorm(1e-6, name="layernorm")(x)[:, 0]


def init_params(seed: int = 0, resolution: int = 28):
    return ViTS14().init(jax.random.key(seed), jnp.zeros((1, resolution, resolution, 3)))["params"]


def features(params, images):
    return ViTS14().apply({"params": params}, images)
