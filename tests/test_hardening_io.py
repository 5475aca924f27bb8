"""Issue 11 part B: nothing silently non-finite (overflow rescued or named), validated public
helpers, complex leaves and device mismatches named, self-healing caches (native kernel,
fine-tune checkpoints, results store), config keys checked before any work, ``--out`` errors."""
import json
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bcjax
from bcjax.errors import (BcjaxError, CacheWarning, ComplexLeafWarning, DeviceMismatchError, HyperparameterError,
                          NonFiniteError, OverflowMergeError)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG = np.float32(3e38)


# ----------------------------------------------------------------------------- fine-tune checkpoints
def _tiny_problem():
    import flax.linen as nn
    import optax

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(x)

    model = Tiny()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    params = model.init(jax.random.key(0), x[:1])["params"]

    def loss_fn(p, batch, *unused):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, batch["x"]), batch["y"]).mean()

    return loss_fn, params, {"x": x, "y": y}


def _largest_file(folder):
    files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f != "bcjax_manifest.json"]
    return max(files, key=os.path.getsize)


def _flip_bit(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _remove_metadata(folder):
    victims = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if "metadata" in f.lower()]
    assert victims, os.listdir(folder)
    os.unlink(victims[0])


@pytest.mark.parametrize("damage", [_flip_bit, _truncate, "metadata"], ids=["bit_flip", "truncated", "metadata"])
def test_corrupt_finetune_checkpoint_is_rebuilt_with_a_warning(tmp_path, damage):
    from bcjax import train

    loss_fn, params, data = _tiny_problem()
    cfg = train.TrainConfig(steps=6, batch_size=8, learning_rate=1e-2, weight_decay=0.0, warmup_steps=1, seed=0)
    ckpt = tmp_path / "ckpt"
    first = train.finetune(loss_fn, params, data, cfg, checkpoint_dir=str(ckpt), progress=False)
    step_dir = ckpt / "6"
    assert json.loads((step_dir / "bcjax_manifest.json").read_text())["files"]  # written after the save
    assert train.verify_manifest(str(step_dir)) is None
    again = train.finetune(loss_fn, params, data, cfg, checkpoint_dir=str(ckpt), progress=False)
    assert again.resumed_from == 6 and again.losses == []  # a sound checkpoint is restored
    if damage == "metadata":
        _remove_metadata(str(step_dir))
    else:
        damage(_largest_file(str(step_dir)))
    assert train.verify_manifest(str(step_dir)) is not None
    with pytest.warns(CacheWarning, match=r"fine-tune checkpoint .*ckpt/6 .*rebuilding"):
        rebuilt = train.finetune(loss_fn, params, data, cfg, checkpoint_dir=str(ckpt), progress=False)
    assert rebuilt.resumed_from is None and len(rebuilt.losses) == 6  # retrained from scratch
    for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(rebuilt.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert train.verify_manifest(str(step_dir)) is None  # and saved again, verified
