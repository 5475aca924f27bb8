"""bench/vit_s14.py (the GPU bench's transformers-free ViT-S/14) is the embedded DINOv2: same
parameter tree and the same features on the same weights."""
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import vit_s14  # noqa: E402
from bcjax import leaf_paths  # noqa: E402
from bcjax.models import dinov2  # noqa: E402


def test_standin_equals_transformers_dinov2_vit_s14():
    from transformers import Dinov2Config

    config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                          image_size=518, layerscale_value=1.0, use_mask_token=False, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, drop_path_rate=0.0)
    params = vit_s14.init_params(0)
    expected = dict(dinov2.flatten_params(dinov2.param_shapes(config)))
    got = {tuple(k.split("/")): tuple(np.shape(v)) for k, v in zip(leaf_paths(params), jax.tree.leaves(params))}
    assert got == {k: tuple(v) for k, v in expected.items()}
    assert sum(int(np.prod(s)) for s in got.values()) == 22_056_192
    x = np.random.default_rng(0).random((2, 28, 28, 3), dtype=np.float32)
    np.testing.assert_allclose(np.asarray(vit_s14.features(params, x)),
                               np.asarray(dinov2.features(params, x, config=config)), rtol=1e-5, atol=1e-5)
