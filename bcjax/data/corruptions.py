"""Common image corruptions for the robustness protocol (SPEC §4 "Robustness").

The seven corruptions FusionBench evaluates merged models on (its Table 6), following
Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations" (ICLR 2019, the ImageNet-C code), at severities 1-5 (default 3). With
``x`` the image in ``[0, 1]`` and ``c`` the severity's parameter:

==================  ==========================================  ===========================
name                definition                                  c for severity 1..5
==================  ==========================================  ===========================
``gaussian_noise``  clip(x + ε), ε ~ N(0, c²) per pixel/channel  .08 .12 .18 .26 .38
``impulse_noise``   each pixel/channel independently set to 0   .03 .06 .09 .17 .27
                    or 1 (each with probability c/2)
``motion_blur``     one-sided Gaussian line kernel (radius r,   (r, σ) = (10, 3) (15, 5)
                    std σ) at a random angle in [-45°, 45°],     (15, 8) (15, 12) (20, 15)
                    edge pixels replicated                       at 224 px (scaled, below)
``pixelate``        box-downsample to ⌊c·W⌋ x ⌊c·H⌋, nearest-    .6 .5 .4 .3 .25
                    neighbour upsample back
``spatter``         water drops (severities 1-3, additive pale   ImageNet-C's table
                    turquoise) or mud (4-5, opaque brown)        (see ``_SPATTER``)
``contrast``        (x - μ)·c + μ, μ the per-image, per-channel  .4 .3 .2 .1 .05
                    mean over pixels, clipped to [0, 1]
``jpeg``            JPEG encode/decode with Pillow at quality c  25 18 15 10 7
==================  ==========================================  ===========================

**Image size.** ImageNet-C's spatial parameters assume 224-px images; the embedded suite
uses 28-56 px. ``pixelate`` is already relative (a fraction of the side). ``motion_blur``
scales its kernel by ``s = min(H, W) / 224``: radius ``max(1, ceil(r·s))``, std ``σ·s``
(exactly the original at 224 px). ``spatter`` synthesises its liquid layer on the grid
the image would have at the 224-px scale (``round(H·224/min(H, W))`` x ...), with the
original parameters, and box-resizes the layer to the image (no resize at 224 px), so
drop size and coverage are relative to the image as in ImageNet-C. The noise levels,
contrast factors and JPEG qualities are not spatial and are used unchanged.

**Deviations from the reference code** (which needs OpenCV and the removed
``pkg_resources`` / scikit-image ``multichannel`` APIs, so the ``imagecorruptions``
package does not import under this project's numpy 2 / scikit-image 0.26 / setuptools):
spatter's edge map uses scikit-image's Canny (no smoothing, thresholds 50/150, L2 gradient)
instead of OpenCV's (L1 gradient), and SciPy's exact Euclidean distance transform instead
of OpenCV's 5x5 mask approximation; OpenCV's ``blur``, ``equalizeHist`` and ``filter2D``
are re-implemented exactly in numpy/SciPy. One-channel JPEG is encoded as a greyscale
(``L``) JPEG rather than via RGB. Results are returned with the input's dtype: uint8 by
rounding (the reference truncates), float unchanged in [0, 1].

**Determinism.** Image ``i`` of a call draws its randomness from
``numpy.random.default_rng(SeedSequence([seed, crc32(name), start_index + i]))``, so the
corrupted image depends only on ``(seed, corruption, image index, severity)`` — never on
the batch it came in or the order of calls. Pass ``start_index`` when corrupting a data
set in chunks.

Public API: :data:`CORRUPTIONS`, :data:`SEVERITIES`, :func:`corrupt`,
:func:`corrupt_task`, :class:`UnknownCorruptionError`.
"""
from __future__ import annotations

import dataclasses
import io
import math
import zlib

import numpy as np

from bcjax.errors import BcjaxError, HyperparameterError, NonFiniteError

__all__ = ["CORRUPTIONS", "SEVERITIES", "DEFAULT_SEVERITY", "corrupt", "corrupt_task",
           "UnknownCorruptionError"]

#: The seven corruptions of SPEC §4 "Robustness", in FusionBench's order.
CORRUPTIONS: tuple[str, ...] = ("motion_blur", "impulse_noise", "gaussian_noise", "pixelate",
                                "spatter", "contrast", "jpeg")
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
DEFAULT_SEVERITY = 3
_REFERENCE_SIDE = 224  # the image side ImageNet-C's spatial parameters were set for

# Parameter tables of Hendrycks & Dietterich's ImageNet-C code, index = severity - 1.
_GAUSSIAN_NOISE = (0.08, 0.12, 0.18, 0.26, 0.38)
_IMPULSE_NOISE = (0.03, 0.06, 0.09, 0.17, 0.27)
_MOTION_BLUR = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))  # (radius, sigma) at 224 px
_PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.25)
# (loc, scale, sigma, threshold, intensity, mud): liquid layer ~ N(loc, scale²), blurred
# with sigma, cut at threshold; water drops (mud = 0) scaled by intensity, mud blurred by it.
_SPATTER = ((0.65, 0.3, 4, 0.69, 0.6, 0),
            (0.65, 0.3, 3, 0.68, 0.6, 0),
            (0.65, 0.3, 2, 0.68, 0.5, 0),
            (0.65, 0.3, 1, 0.65, 1.5, 1),
            (0.67, 0.4, 1, 0.65, 1.5, 1))
_CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)
_JPEG_QUALITY = (25, 18, 15, 10, 7)

_WATER_RGB = np.array([175, 238, 238], np.float64) / 255.0  # pale turquoise
_MUD_RGB = np.array([63, 42, 20], np.float64) / 255.0  # mud brown
_GREY_WEIGHTS = np.array([0.2125, 0.7154, 0.0721])  # scikit-image's rgb2gray


class UnknownCorruptionError(BcjaxError, KeyError):
    """:func:`corrupt` was asked for a corruption name that is not in :data:`CORRUPTIONS`."""

    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


# =======================================================================================
# One image, float64 [H, W, C] in [0, 1], C in {1, 3}
# =======================================================================================

def _gaussian_noise(x, c, rng):
    return np.clip(x + rng.normal(0.0, c, size=x.shape), 0.0, 1.0)


def _impulse_noise(x, c, rng):
    # scikit-image's random_noise(mode="s&p", amount=c, salt_vs_pepper=0.5)
    flipped = rng.random(x.shape) < c
    salted = rng.random(x.shape) < 0.5
    out = x.copy()
    out[flipped & salted] = 1.0
    out[flipped & ~salted] = 0.0
    return out


def _shift_replicate(img, dx, dy):
    """``img`` shifted by (dx, dy) pixels, the uncovered border replicated (the reference's
    ``shift``)."""
    h, w = img.shape[:2]
    rows = np.clip(np.arange(h) - dy, 0, h - 1)
    cols = np.clip(np.arange(w) - dx, 0, w - 1)
    return img[rows][:, cols]


def _motion_blur(x, params, rng):
    radius, sigma = params
    s = min(x.shape[0], x.shape[1]) / _REFERENCE_SIDE
    radius = max(1, math.ceil(radius * s))
    sigma = sigma * s
    angle = rng.uniform(-45.0, 45.0)
    width = 2 * radius + 1
    kernel = np.exp(-np.arange(width) ** 2 / (2.0 * sigma ** 2))
    kernel /= kernel.sum()
    py, px = math.sin(math.radians(angle)), math.cos(math.radians(angle))  # unit direction
    out = np.zeros_like(x)
    for i in range(width):
        dy = -math.ceil(i * py - 0.5)
        dx = -math.ceil(i * px - 0.5)
        if abs(dy) >= x.shape[0] or abs(dx) >= x.shape[1]:
            break  # the motion left the image (the reference stops here too)
        out += kernel[i] * _shift_replicate(x, dx, dy)
    return np.clip(out, 0.0, 1.0)


def _pil_float(channel):
    from PIL import Image
    return Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32))


def _pixelate(x, c, rng):
    from PIL import Image
    h, w = x.shape[:2]
    small = (max(1, int(w * c)), max(1, int(h * c)))
    out = np.empty_like(x)
    for ch in range(x.shape[2]):
        im = _pil_float(x[..., ch]).resize(small, Image.Resampling.BOX)
        out[..., ch] = np.asarray(im.resize((w, h), Image.Resampling.NEAREST))
    return np.clip(out, 0.0, 1.0)


def _box3(a):
    """OpenCV ``blur(a, (3, 3))`` (border reflect-101)."""
    from scipy import ndimage
    return ndimage.uniform_filter(a.astype(np.float64), size=3, mode="mirror")


def _equalize_hist(a):
    """OpenCV ``equalizeHist`` of a uint8 image."""
    hist = np.bincount(a.ravel(), minlength=256)
    nonzero = np.flatnonzero(hist)
    if len(nonzero) <= 1:
        return a.copy()
    cdf = np.cumsum(hist)
    cdf_min = cdf[nonzero[0]]
    lut = np.rint((cdf - cdf_min) * 255.0 / (a.size - cdf_min)).clip(0, 255).astype(np.uint8)
    return lut[a]


def _spatter_layers(shape, params, rng):
    """(water, mud) layers of the image's shape: ``water`` is added times the water colour,
    ``mud`` alpha-blends the mud colour."""
    from PIL import Image
    from scipy import ndimage
    from skimage.feature import canny
    loc, scale, sigma, threshold, intensity, is_mud = params
    h, w = shape
    k = _REFERENCE_SIDE / min(h, w)
    gh, gw = max(1, round(h * k)), max(1, round(w * k))
    liquid = rng.normal(loc, scale, size=(gh, gw))
    liquid = ndimage.gaussian_filter(liquid, sigma, mode="nearest", truncate=4.0)
    liquid[liquid < threshold] = 0.0
    if is_mud:
        m = ndimage.gaussian_filter((liquid > threshold).astype(np.float64), intensity,
                                    mode="nearest", truncate=4.0)
        m[m < 0.8] = 0.0
        water, mud = np.zeros_like(m), m
    else:
        liquid_u8 = np.clip(liquid * 255.0, 0, 255).astype(np.uint8)
        edges = canny(liquid_u8.astype(np.float64), sigma=0.0, low_threshold=50,
                      high_threshold=150, mode="nearest")
        if edges.any():
            dist = ndimage.distance_transform_edt(~edges)
        else:
            dist = np.full((gh, gw), np.inf)
        dist = np.minimum(dist, 20.0)  # threshold(..., 20, 20, THRESH_TRUNC)
        dist = _box3(dist).astype(np.uint8)
        dist = _equalize_hist(dist)
        ker = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], np.float64)
        dist = ndimage.correlate(dist.astype(np.float64), ker, mode="mirror")
        dist = np.clip(np.rint(dist), 0, 255).astype(np.uint8)  # filter2D to CV_8U
        dist = _box3(dist)
        m = liquid_u8.astype(np.float64) * dist
        peak = m.max()
        m = m / peak * intensity if peak > 0 else m
        water, mud = m, np.zeros_like(m)
    if (gh, gw) != (h, w):
        water, mud = (np.asarray(_pil_float(a).resize((w, h), Image.Resampling.BOX), np.float64)
                      for a in (water, mud))
    return water, mud


def _spatter(x, params, rng):
    water, mud = _spatter_layers(x.shape[:2], params, rng)
    if x.shape[2] == 3:
        water_c, mud_c = _WATER_RGB, _MUD_RGB
    else:
        water_c, mud_c = _WATER_RGB @ _GREY_WEIGHTS, _MUD_RGB @ _GREY_WEIGHTS
    water, mud = water[..., None], mud[..., None]
    return np.clip(x * (1.0 - mud) + mud * mud_c + water * water_c, 0.0, 1.0)


def _contrast(x, c, rng):
    means = x.mean(axis=(0, 1), keepdims=True)
    return np.clip((x - means) * c + means, 0.0, 1.0)


def _jpeg(x, quality, rng):
    from PIL import Image
    u8 = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    im = Image.fromarray(u8[..., 0] if u8.shape[2] == 1 else u8)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    out = np.asarray(Image.open(buf), np.float64) / 255.0
    return out.reshape(x.shape)


_FUNCTIONS = {
    "motion_blur": (_motion_blur, _MOTION_BLUR),
    "impulse_noise": (_impulse_noise, _IMPULSE_NOISE),
    "gaussian_noise": (_gaussian_noise, _GAUSSIAN_NOISE),
    "pixelate": (_pixelate, _PIXELATE),
    "spatter": (_spatter, _SPATTER),
    "contrast": (_contrast, _CONTRAST),
    "jpeg": (_jpeg, _JPEG_QUALITY),
}
assert tuple(_FUNCTIONS) == CORRUPTIONS


def _check_name_severity(name, severity):
    if name not in _FUNCTIONS:
        raise UnknownCorruptionError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) \
            or int(severity) not in SEVERITIES:
        raise HyperparameterError(f"corruption {name!r}: severity must be an integer in 1..5, "
                                  f"got {severity!r}")
    return int(severity)


def _check_index(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 0:
        raise HyperparameterError(f"{what} must be an integer >= 0, got {value!r}")
    return int(value)


def corrupt(images, name: str, severity: int = DEFAULT_SEVERITY, seed: int = 0,
            start_index: int = 0) -> np.ndarray:
    """Corrupt a batch of images with one of :data:`CORRUPTIONS` (SPEC §4 "Robustness").

    Args:
      images: ``[N, H, W, C]`` (C = 1 or 3) or ``[N, H, W]`` array, either uint8 in
        [0, 255] or floating point in [0, 1]; any H, W (see the module docstring for how
        the 224-px parameters are scaled).
      name: one of :data:`CORRUPTIONS`.
      severity: 1..5 (default 3), indexing Hendrycks & Dietterich's parameter tables.
      seed, start_index: image ``i`` of the batch is corrupted with the generator seeded by
        ``(seed, crc32(name), start_index + i)``: the result never depends on the batch
        composition or call order.

    Returns:
      A new array with the input's shape and dtype (uint8: rounded; float: in [0, 1]).

    Raises:
      UnknownCorruptionError: ``name`` is not a corruption.
      HyperparameterError: bad severity, seed or start_index.
      BcjaxError / NonFiniteError: bad shape, dtype, range or non-finite pixels.
    """
    severity = _check_name_severity(name, severity)
    seed = _check_index(seed, "seed")
    start_index = _check_index(start_index, "start_index")
    x = np.asarray(images)
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[3] not in (1, 3)):
        raise BcjaxError(f"corrupt({name!r}): images must be [N, H, W] or [N, H, W, C] with "
                         f"C in (1, 3), got shape {x.shape}")
    if x.dtype == np.uint8:
        xf = x.astype(np.float64) / 255.0
    elif np.issubdtype(x.dtype, np.floating):
        if not np.all(np.isfinite(x)):
            raise NonFiniteError(f"corrupt({name!r}): images contain NaN or Inf")
        if x.size and (x.min() < 0.0 or x.max() > 1.0):
            raise BcjaxError(f"corrupt({name!r}): float images must lie in [0, 1], got "
                             f"[{float(x.min())}, {float(x.max())}]")
        xf = x.astype(np.float64)
    else:
        raise BcjaxError(f"corrupt({name!r}): images must be uint8 or floating, got {x.dtype}")
    grey_2d = x.ndim == 3
    if grey_2d:
        xf = xf[..., None]
    fn, table = _FUNCTIONS[name]
    param = table[severity - 1]
    name_key = zlib.crc32(name.encode())
    out = np.empty_like(xf)
    for i in range(xf.shape[0]):
        rng = np.random.default_rng(np.random.SeedSequence([seed, name_key, start_index + i]))
        out[i] = fn(xf[i], param, rng)
    if grey_2d:
        out = out[..., 0]
    if x.dtype == np.uint8:
        return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
    return out.astype(x.dtype)


def corrupt_task(task, name: str, severity: int = DEFAULT_SEVERITY, seed: int = 0):
    """A copy of a suite task whose *test* split is corrupted with :func:`corrupt`; the
    other splits (and labels) are the same arrays, untouched.

    ``task`` is any frozen dataclass with a ``splits`` mapping ``{"test": (images, labels),
    ...}`` (e.g. :class:`bcjax.data.task.Task`). Test image ``i`` is seeded by
    ``(seed, name, i)``, so the corrupted test set is fixed by ``(task, name, severity, seed)``.
    """
    if not dataclasses.is_dataclass(task) or "test" not in getattr(task, "splits", {}):
        raise BcjaxError(f"corrupt_task: expected a task dataclass with a 'test' split, "
                         f"got {type(task).__name__}")
    images, labels = task.splits["test"]
    corrupted = corrupt(images, name, severity=severity, seed=seed)
    corrupted.flags.writeable = False
    return dataclasses.replace(task, splits={**task.splits, "test": (corrupted, labels)})
