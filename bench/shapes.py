"""Parameter shapes of real models' vision towers, for benchmarks (no weights needed)."""
from __future__ import annotations

import numpy as np


def clip_vision_shapes(width: int, layers: int, patch: int, grid: int, embed: int) -> dict[str, tuple]:
    """open_clip / OpenAI CLIP ViT vision tower (state-dict layout)."""
    s = {
        "conv1/weight": (width, 3, patch, patch),
        "class_embedding": (width,),
        "positional_embedding": (grid * grid + 1, width),
        "ln_pre/weight": (width,), "ln_pre/bias": (width,),
        "ln_post/weight": (width,), "ln_post/bias": (width,),
        "proj": (width, embed),
    }
    for i in range(layers):
        p = f"transformer/resblocks/{i}/"
        s.update({
            p + "attn/in_proj_weight": (3 * width, width), p + "attn/in_proj_bias": (3 * width,),
            p + "attn/out_proj/weight": (width, width), p + "attn/out_proj/bias": (width,),
            p + "ln_1/weight": (width,), p + "ln_1/bias": (width,),
            p + "mlp/c_fc/weight": (4 * width, width), p + "mlp/c_fc/bias": (4 * width,),
            p + "mlp/c_proj/weight": (width, 4 * width), p + "mlp/c_proj/bias": (width,),
            p + "ln_2/weight": (width,), p + "ln_2/bias": (width,),
        })
    return s


VIT_B_32 = clip_vision_shapes(768, 12, 32, 7, 512)
VIT_L_14 = clip_vision_shapes(1024, 24, 14, 16, 768)


def num_params(shapes: dict[str, tuple]) -> int:
    return int(sum(np.prod(s) for s in shapes.values()))


def random_models(shapes: dict[str, tuple], num_tasks: int, seed: int = 0, scale: float = 1.0):
    """(θ0, [θt]) as flat dicts of float32 numpy arrays: θ0 ~ N(0, 0.02²), τt ~ N(0, (1e-3·scale)²)
    with a heavy tail (a few large entries), like fine-tuning deltas."""
    rng = np.random.default_rng(seed)
    n = {k: int(np.prod(v)) for k, v in shapes.items()}
    pre = {k: (0.02 * rng.standard_normal(n[k], dtype=np.float32)).reshape(v) for k, v in shapes.items()}
    fts = []
    for _ in range(num_tasks):
        ft = {}
        for k, v in shapes.items():
            d = rng.standard_normal(n[k], dtype=np.float32) * np.float32(1e-3 * scale)
            d *= np.where(rng.random(n[k], dtype=np.float32) < 0.01, np.float32(10), np.float32(1))
            ft[k] = pre[k] + d.reshape(v)
        fts.append(ft)
    return pre, fts
