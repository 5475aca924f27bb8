"""Corruptions of the robustness protocol (SPEC §4 "Robustness"): numpy/Pillow references,
determinism, severity ordering, dtype handling and errors. Small images only (28 px)."""
import io

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image
from scipy import ndimage

from bcjax.data.corruptions import (CORRUPTIONS, SEVERITIES, UnknownCorruptionError, corrupt,
                                    corrupt_task)
from bcjax.data.task import Task
from bcjax.errors import BcjaxError, HyperparameterError, NonFiniteError

RANDOM = ("motion_blur", "impulse_noise", "gaussian_noise", "spatter")  # draw from the rng


def smooth_images(n=6, side=28, channels=3, seed=0):
    """Smooth random images spanning [0, 1] (like blurred natural images)."""
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.random((n, side, side, channels)), (0, 2, 2, 0))
    x = (x - x.min(axis=(1, 2, 3), keepdims=True)) / np.ptp(x, axis=(1, 2, 3), keepdims=True)
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def images():
    return smooth_images()


def test_names_match_spec():
    assert set(CORRUPTIONS) == {"motion_blur", "impulse_noise", "gaussian_noise", "pixelate",
                                "spatter", "contrast", "jpeg"}
    assert SEVERITIES == (1, 2, 3, 4, 5)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_deterministic_and_independent_of_batching(name, images):
    full = corrupt(images, name, severity=3, seed=7)
    np.testing.assert_array_equal(full, corrupt(images, name, severity=3, seed=7))
    # image i depends only on (seed, name, start_index + i): chunks and single images agree
    chunks = np.concatenate([corrupt(images[:2], name, seed=7),
                             corrupt(images[2:], name, seed=7, start_index=2)])
    np.testing.assert_array_equal(full, chunks)
    for i in (4, 1):  # out of order
        np.testing.assert_array_equal(full[i], corrupt(images[i:i + 1], name, seed=7,
                                                       start_index=i)[0])
    if name in RANDOM:
        assert not np.array_equal(full, corrupt(images, name, severity=3, seed=8))
        # two identical images at different indices get different noise
        twins = corrupt(np.stack([images[0], images[0]]), name, seed=7)
        assert not np.array_equal(twins[0], twins[1])


@settings(max_examples=10, deadline=None)
@given(split=st.integers(0, 5), seed=st.integers(0, 2**31), name=st.sampled_from(RANDOM[1:3]))
def test_any_split_point_gives_the_same_images(split, seed, name):
    x = smooth_images(n=5, side=14)
    np.testing.assert_array_equal(
        corrupt(x, name, seed=seed),
        np.concatenate([corrupt(x[:split], name, seed=seed),
                        corrupt(x[split:], name, seed=seed, start_index=split)]))


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_dtype_shape_and_range_preserved(name, images):
    for x in (images, images.astype(np.float64), images[..., :1], images[..., 0]):
        y = corrupt(x, name)
        assert y.dtype == x.dtype and y.shape == x.shape
        assert y.min() >= 0.0 and y.max() <= 1.0
    u8 = np.rint(images * 255).astype(np.uint8)
    y8 = corrupt(u8, name, seed=3)
    assert y8.dtype == np.uint8 and y8.shape == u8.shape
    # uint8 is the float path on x / 255, rounded back
    ref = np.rint(corrupt(u8.astype(np.float64) / 255.0, name, seed=3) * 255).astype(np.uint8)
    np.testing.assert_array_equal(y8, ref)
    assert not np.array_equal(y8, u8)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_damage_grows_with_severity(name, images):
    dmg = [float(np.abs(corrupt(images, name, s) - images).mean()) for s in SEVERITIES]
    assert dmg[0] > 0
    if name == "spatter":
        # ImageNet-C switches from water drops (1-3) to mud (4-5): increasing within each
        assert dmg[0] < dmg[1] < dmg[2] and dmg[3] < dmg[4] and dmg[2] < dmg[4]
    else:
        assert all(a < b for a, b in zip(dmg, dmg[1:])), dmg


@pytest.mark.parametrize("severity", SEVERITIES)
def test_contrast_is_the_documented_formula(severity, images):
    c = (0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1]
    x = images.astype(np.float64)
    mu = x.mean(axis=(1, 2), keepdims=True)
    np.testing.assert_array_equal(corrupt(x, "contrast", severity), np.clip((x - mu) * c + mu, 0, 1))


@pytest.mark.parametrize("severity", SEVERITIES)
def test_jpeg_is_pillows_round_trip(severity, images):
    quality = (25, 18, 15, 10, 7)[severity - 1]
    u8 = np.rint(images * 255).astype(np.uint8)
    for i in range(2):
        for arr in (u8[i], u8[i, ..., 0]):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
            ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
            np.testing.assert_array_equal(corrupt(arr[None], "jpeg", severity)[0], ref)


def test_pixelate_matches_block_means():
    x = smooth_images(n=2, side=28).astype(np.float64)  # severity 2: c = 0.5 -> 14 px, 2x2 boxes
    blocks = x.reshape(2, 14, 2, 14, 2, 3).mean(axis=(2, 4))
    ref = blocks.repeat(2, axis=1).repeat(2, axis=2)
    np.testing.assert_allclose(corrupt(x, "pixelate", 2), ref, atol=1e-6)


@pytest.mark.parametrize("name", ["motion_blur", "pixelate", "contrast"])
def test_constant_image_is_a_fixed_point(name):
    x = np.full((2, 28, 28, 3), 0.375)
    np.testing.assert_allclose(corrupt(x, name, 5), x, atol=1e-6)


@pytest.mark.parametrize("severity", [1, 2])
def test_gaussian_noise_statistics(severity):
    sigma = (0.08, 0.12)[severity - 1]
    x = np.full((4, 64, 64, 3), 0.5)  # far from the clip at 0 and 1 (>= 4 sigma)
    eps = corrupt(x, "gaussian_noise", severity, seed=1) - x
    assert abs(eps.mean()) < 0.01 * sigma * 10
    assert abs(eps.std() / sigma - 1) < 0.03
    # independent across channels (the reference draws per pixel and channel)
    assert abs(np.corrcoef(eps[..., 0].ravel(), eps[..., 1].ravel())[0, 1]) < 0.05


@pytest.mark.parametrize("severity", SEVERITIES)
def test_impulse_noise_statistics(severity):
    amount = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]
    x = np.full((4, 64, 64, 3), 0.5)
    y = corrupt(x, "impulse_noise", severity, seed=2)
    assert set(np.unique(y)) <= {0.0, 0.5, 1.0}
    n = y.size
    salt, pepper = (y == 1.0).mean(), (y == 0.0).mean()
    tol = 4 * np.sqrt(amount / 2 * (1 - amount / 2) / n)
    assert abs(salt - amount / 2) < tol and abs(pepper - amount / 2) < tol


def test_spatter_on_one_channel_and_large_images():
    x = smooth_images(n=1, side=56, channels=1)
    for s in (3, 5):
        y = corrupt(x, "spatter", s)
        assert y.shape == x.shape and not np.array_equal(x, y)
    big = smooth_images(n=1, side=256)  # larger than 224 px: layer is synthesised smaller
    assert corrupt(big, "spatter", 5).shape == big.shape


def test_clear_errors(images):
    with pytest.raises(UnknownCorruptionError, match="known: motion_blur") as e:
        corrupt(images, "fog")
    assert isinstance(e.value, KeyError) and isinstance(e.value, BcjaxError)
    for bad in (0, 6, 3.0, True, "3"):
        with pytest.raises(HyperparameterError, match="severity"):
            corrupt(images, "contrast", bad)
    with pytest.raises(HyperparameterError, match="seed"):
        corrupt(images, "contrast", seed=-1)
    with pytest.raises(HyperparameterError, match="start_index"):
        corrupt(images, "contrast", start_index=1.5)
    with pytest.raises(BcjaxError, match=r"\[0, 1\]"):
        corrupt(images * 255, "jpeg")
    with pytest.raises(BcjaxError, match="shape"):
        corrupt(images[..., :2], "jpeg")
    with pytest.raises(BcjaxError, match="dtype|uint8"):
        corrupt(images.astype(np.int32), "jpeg")
    bad = images.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(NonFiniteError):
        corrupt(bad, "jpeg")


def _tiny_task():
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        x = smooth_images(n=n, side=14, seed=int(rng.integers(100)))
        x.flags.writeable = False
        splits[split] = (x, np.arange(n, dtype=np.int32) % 2)
    return Task(name="tiny", class_names=("a", "b"), splits=splits)


def test_corrupt_task_replaces_only_the_test_images():
    task = _tiny_task()
    test_x = task.splits["test"][0].copy()
    out = corrupt_task(task, "gaussian_noise", severity=4, seed=5)
    assert isinstance(out, Task) and out.name == task.name
    for split in ("train", "val"):
        assert out.splits[split] is task.splits[split]
    assert out.splits["test"][1] is task.splits["test"][1]
    np.testing.assert_array_equal(out.splits["test"][0],
                                  corrupt(test_x, "gaussian_noise", severity=4, seed=5))
    assert not out.splits["test"][0].flags.writeable
    np.testing.assert_array_equal(task.splits["test"][0], test_x)  # original untouched
    with pytest.raises(BcjaxError, match="task"):
        corrupt_task({"test": (test_x, None)}, "jpeg")


def test_robustness_doc_block_executes():
    import pathlib
    import re
    doc = pathlib.Path(__file__).resolve().parent.parent / "docs" / "robustness.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert len(blocks) == 1
    ns: dict = {}
    exec(compile(blocks[0], str(doc), "exec"), ns)  # noqa: S102
    assert set(ns["corrupted"]) == set(CORRUPTIONS)


def _reference_shift(image, dx, dy):
    """imagecorruptions' ``shift`` (np.roll, then replicate the wrapped border)."""
    if dx < 0:
        shifted = np.roll(image, shift=image.shape[1] + dx, axis=1)
        shifted[:, dx:] = shifted[:, dx - 1:dx]
    elif dx > 0:
        shifted = np.roll(image, shift=dx, axis=1)
        shifted[:, :dx] = shifted[:, dx:dx + 1]
    else:
        shifted = image
    if dy < 0:
        shifted = np.roll(shifted, shift=image.shape[0] + dy, axis=0)
        shifted[dy:, :] = shifted[dy - 1:dy, :]
    elif dy > 0:
        shifted = np.roll(shifted, shift=dy, axis=0)
        shifted[:dy, :] = shifted[dy:dy + 1, :]
    return shifted


@pytest.mark.parametrize("severity", [1, 5])
def test_motion_blur_at_224_px_is_the_reference_kernel(severity):
    import math
    import zlib
    radius, sigma = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))[severity - 1]
    x = smooth_images(n=1, side=224).astype(np.float64)
    seed, index = 4, 9
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(b"motion_blur"), index]))
    angle = rng.uniform(-45, 45)
    width = 2 * radius + 1
    k = np.exp(-np.arange(width) ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    point = (width * np.sin(np.deg2rad(angle)), width * np.cos(np.deg2rad(angle)))
    hypot = math.hypot(*point)
    ref = np.zeros_like(x[0])
    for i in range(width):
        dy = -math.ceil(((i * point[0]) / hypot) - 0.5)
        dx = -math.ceil(((i * point[1]) / hypot) - 0.5)
        ref += k[i] * _reference_shift(x[0], dx, dy)
    out = corrupt(x, "motion_blur", severity, seed=seed, start_index=index)[0]
    np.testing.assert_allclose(out, np.clip(ref, 0, 1), atol=1e-12)
