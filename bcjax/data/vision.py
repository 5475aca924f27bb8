"""Image classification tasks for CLIP (SPEC §5): the paper's 8 tasks through
tensorflow-datasets, users' own tasks from image folders or numpy arrays, CLIP
preprocessing, deterministic validation splits, class names and prompt templates.

Reading never needs TensorFlow: data sets are read with ``builder.as_data_source``
(random access to ``array_record`` files; images are decoded here with Pillow).
*Preparing* a tfds data set (``download_and_prepare``) must write ``array_record``
(``file_format="array_record"``) and needs TensorFlow only for the few builders that
encode numpy images (e.g. ``mnist``, ``svhn_cropped``) -- prepare those once where
TensorFlow is installed (Colab has it)::

    import tensorflow_datasets as tfds
    tfds.builder("mnist", data_dir=DATA_DIR, file_format="array_record").download_and_prepare()

The 8 tasks (:data:`TASKS`; paper sizes train/val/test in SPEC §5):

======== ================================ ================================================
task     tfds source                      splits (train / val / test)
======== ================================ ================================================
cars     ``cars196``                      train minus 814 val / 814 from train / test
dtd      ``dtd``                          train+validation minus 376 val / 376 / test
eurosat  ``eurosat/rgb`` (one split)      21,600 / 2,700 / 2,700, all carved from train
gtsrb    not in tfds: image folders       see :data:`GTSRB_HELP` (``data.gtsrb_dir``)
mnist    ``mnist``                        55,000 / 5,000 from train / test
resisc45 ``resisc45`` (one split)         17,010 / 1,890 / 6,300 carved (6,300 left out)
sun397   ``sun397/standard-part1-120k``   train minus 1,985 val / 1,985 / test
svhn     ``svhn_cropped``                 68,257 / 5,000 from train / test
======== ================================ ================================================

Carved splits (:func:`carve`) are a seeded permutation of the source split's indices
(``numpy.random.default_rng([seed, 1])``), test first (when carved), then the unused part
(RESISC45 only: the 6,300 images of its official validation split, which the paper's
sizes leave out), then validation; the rest is train. EuroSAT and RESISC45 therefore
differ from Ilharco et al.'s fixed files (same sizes, other images); the other tasks use
the sources' own test splits.

Class names and templates follow Ilharco et al. (``task_vectors/src/datasets``):
CLIP's OpenAI prompts for GTSRB and EuroSAT, ``_`` → space elsewhere, digits for
MNIST/SVHN. Templates are stored as format strings with ``{c}``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pathlib
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from bcjax.data.task import LABEL_DTYPE, SPLITS, Task
from bcjax.errors import BcjaxError
from bcjax._optional import requires

__all__ = [
    "TASKS", "TEMPLATES", "GTSRB_CLASSNAMES", "GTSRB_HELP", "TaskSpec", "ImageArray", "materialize",
    "VisionDataError", "UnknownDatasetError", "clip_preprocess", "carve", "load_task", "load_tfds_task",
    "load_folder_task", "numpy_task", "classnames_for",
]


class VisionDataError(BcjaxError):
    """A vision data set is missing, unprepared, malformed or lacks class names."""


class UnknownDatasetError(VisionDataError, KeyError):
    """A task name that is neither one of :data:`TASKS` nor given with a source."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------- templates
#: Ilharco et al.'s per-data-set templates (``src/datasets/templates.py``), as ``{c}`` strings.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "cars": ("a photo of a {c}.", "a photo of the {c}.", "a photo of my {c}.", "i love my {c}!",
             "a photo of my dirty {c}.", "a photo of my clean {c}.", "a photo of my new {c}.",
             "a photo of my old {c}."),
    "dtd": ("a photo of a {c} texture.", "a photo of a {c} pattern.", "a photo of a {c} thing.",
            "a photo of a {c} object.", "a photo of the {c} texture.", "a photo of the {c} pattern.",
            "a photo of the {c} thing.", "a photo of the {c} object."),
    "eurosat": ("a centered satellite photo of {c}.", "a centered satellite photo of a {c}.",
                "a centered satellite photo of the {c}."),
    "gtsrb": ('a zoomed in photo of a "{c}" traffic sign.', 'a centered photo of a "{c}" traffic sign.',
              'a close up photo of a "{c}" traffic sign.'),
    "mnist": ('a photo of the number: "{c}".',),
    "resisc45": (
        "satellite imagery of {c}.", "aerial imagery of {c}.", "satellite photo of {c}.", "aerial photo of {c}.",
        "satellite view of {c}.", "aerial view of {c}.", "satellite imagery of a {c}.", "aerial imagery of a {c}.",
        "satellite photo of a {c}.", "aerial photo of a {c}.", "satellite view of a {c}.", "aerial view of a {c}.",
        "satellite imagery of the {c}.", "aerial imagery of the {c}.", "satellite photo of the {c}.",
        "aerial photo of the {c}.", "satellite view of the {c}.", "aerial view of the {c}."),
    "sun397": ("a photo of a {c}.", "a photo of the {c}."),
    "svhn": ('a photo of the number: "{c}".',),
    "default": ("a photo of a {c}.",),
}

#: GTSRB class names: CLIP's OpenAI prompts (as used by Ilharco et al.), class id order.
GTSRB_CLASSNAMES = (
    "red and white circle 20 kph speed limit", "red and white circle 30 kph speed limit",
    "red and white circle 50 kph speed limit", "red and white circle 60 kph speed limit",
    "red and white circle 70 kph speed limit", "red and white circle 80 kph speed limit",
    "end / de-restriction of 80 kph speed limit", "red and white circle 100 kph speed limit",
    "red and white circle 120 kph speed limit", "red and white circle red car and black car no passing",
    "red and white circle red truck and black car no passing", "red and white triangle road intersection warning",
    "white and yellow diamond priority road", "red and white upside down triangle yield right-of-way", "stop",
    "empty red and white circle", "red and white circle no truck entry",
    "red circle with white horizonal stripe no entry", "red and white triangle with exclamation mark warning",
    "red and white triangle with black left curve approaching warning",
    "red and white triangle with black right curve approaching warning",
    "red and white triangle with black double curve approaching warning",
    "red and white triangle rough / bumpy road warning", "red and white triangle car skidding / slipping warning",
    "red and white triangle with merging / narrow lanes warning",
    "red and white triangle with person digging / construction / road work warning",
    "red and white triangle with traffic light approaching warning",
    "red and white triangle with person walking warning",
    "red and white triangle with child and person walking warning", "red and white triangle with bicyle warning",
    "red and white triangle with snowflake / ice warning", "red and white triangle with deer warning",
    "white circle with gray strike bar no speed limit", "blue circle with white right turn arrow mandatory",
    "blue circle with white left turn arrow mandatory", "blue circle with white forward arrow mandatory",
    "blue circle with white forward or right turn arrow mandatory",
    "blue circle with white forward or left turn arrow mandatory",
    "blue circle with white keep right arrow mandatory", "blue circle with white keep left arrow mandatory",
    "blue circle with white arrows indicating a traffic circle",
    "white circle with gray strike bar indicating no passing for cars has ended",
    "white circle with gray strike bar indicating no passing for trucks has ended",
)

#: tfds EuroSAT label → CLIP's OpenAI prompt name (Ilharco et al.'s ``ours_to_open_ai``).
_EUROSAT_NAMES = {
    "AnnualCrop": "annual crop land", "Forest": "forest", "HerbaceousVegetation": "brushland or shrubland",
    "Highway": "highway or road", "Industrial": "industrial buildings or commercial buildings",
    "Pasture": "pasture land", "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings or homes or apartments", "River": "river", "SeaLake": "lake or sea",
}

GTSRB_HELP = (
    "GTSRB is not in tensorflow-datasets. Use image folders instead (data.gtsrb_dir or a task entry with "
    "source: folder): <dir>/train/<class id 00000..00042>/*.ppm from the official GTSRB-Training_fixed.zip "
    "(26,640 images; what torchvision and Ilharco et al. use) and <dir>/test/<class id>/*.ppm built from "
    "GTSRB_Final_Test_Images.zip + GT-final_test.csv (12,630 images; move each file into its ClassId folder). "
    "2,664 validation images are carved from train (SPEC §5)."
)


def _underscores(names):
    return [n.replace("_", " ") for n in names]


def _sun397(names):
    # tfds: '/a/abbey', '/a/apartment_building/outdoor' → 'abbey', 'apartment building outdoor'
    return [re.sub(r"^/[a-z]/", "", n).replace("/", " ").replace("_", " ") for n in names]


def _eurosat(names):
    missing = [n for n in names if n not in _EUROSAT_NAMES]
    if missing:
        raise VisionDataError(f"eurosat: unexpected tfds labels {missing}")
    return [_EUROSAT_NAMES[n] for n in names]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Where a task's data lives and how its splits are made (see the module table)."""

    name: str
    tfds_name: str | None
    train_splits: tuple[str, ...] = ("train",)
    test_split: str | None = "test"
    val_size: int = 0
    test_size: int = 0  # > 0: test carved from train (sources with one split)
    unused_size: int = 0  # carved from train after test and left out (RESISC45's official val split)
    num_classes: int | None = None
    classnames: Callable[[list[str]], list[str]] | tuple[str, ...] | None = None  # from tfds names, or fixed
    image_key: str = "image"
    label_key: str = "label"


_DIGITS = tuple(str(i) for i in range(10))

#: The paper's 8 tasks (SPEC §5).
TASKS: dict[str, TaskSpec] = {
    "cars": TaskSpec("cars", "cars196", val_size=814, num_classes=196, classnames=_underscores),
    "dtd": TaskSpec("dtd", "dtd", train_splits=("train", "validation"), val_size=376, num_classes=47,
                    classnames=_underscores),
    "eurosat": TaskSpec("eurosat", "eurosat/rgb", test_split=None, val_size=2700, test_size=2700, num_classes=10,
                        classnames=_eurosat),
    "gtsrb": TaskSpec("gtsrb", None, val_size=2664, num_classes=43, classnames=GTSRB_CLASSNAMES),
    "mnist": TaskSpec("mnist", "mnist", val_size=5000, num_classes=10, classnames=_DIGITS),
    "resisc45": TaskSpec("resisc45", "resisc45", test_split=None, val_size=1890, test_size=6300, unused_size=6300,
                         num_classes=45, classnames=_underscores),
    "sun397": TaskSpec("sun397", "sun397/standard-part1-120k", val_size=1985, num_classes=397,
                       classnames=_sun397),
    "svhn": TaskSpec("svhn", "svhn_cropped", val_size=5000, num_classes=10, classnames=_DIGITS),
}


# ----------------------------------------------------------------------------- preprocessing
def _to_pil(image):
    with requires("clip"):
        from PIL import Image

    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image)).convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise VisionDataError(f"expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {a.shape}")
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.size and a.max() <= 1.0:
            a = a * 255.0
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return Image.fromarray(a).convert("RGB")


def clip_preprocess(image, size: int) -> np.ndarray:
    """CLIP's eval transform: resize the shorter side to ``size`` (bicubic), center crop
    ``size``×``size``, RGB → uint8 (size, size, 3). Mean/std normalization happens in the
    model forward (:func:`bcjax.models.clip.normalize_pixels`), so stored images stay uint8.

    Accepts encoded bytes, PIL images, or arrays (grey, RGB, RGBA; uint8 or float in [0, 1]).
    """
    with requires("clip"):
        from PIL import Image

    img = _to_pil(image)
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    return np.asarray(img.crop((left, top, left + size, top + size)), np.uint8)


class ImageArray:
    """A lazy ``uint8[N, size, size, 3]`` array: indexing (int, slice, index array) decodes
    and preprocesses only the requested images, so :func:`bcjax.train.finetune` and
    :func:`bcjax.evaluate.accuracy` can stream from disk. :meth:`materialize` reads all.
    """

    def __init__(self, source: Sequence, indices: np.ndarray, size: int, image_key: str | None = "image",
                 ident: str | None = None):
        self.source, self.indices, self.size, self.image_key = source, np.asarray(indices, np.int64), size, image_key
        self.ident = ident  # names the source for the on-disk cache (None: not cacheable)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), self.size, self.size, 3)

    @property
    def dtype(self):
        return np.dtype(np.uint8)

    def _one(self, i: int) -> np.ndarray:
        item = self.source[int(i)]
        if self.image_key is not None:
            item = item[self.image_key]
        return clip_preprocess(item, self.size)

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            return self._one(self.indices[idx])
        sel = self.indices[idx]
        if len(sel) == 0:
            return np.zeros((0, self.size, self.size, 3), np.uint8)
        if len(sel) >= 16:  # Pillow releases the GIL while decoding and resizing
            from concurrent.futures import ThreadPoolExecutor

            # a pool per call, shut down before returning: no threads outlive the read
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, len(sel))) as pool:
                return np.stack(list(pool.map(self._one, sel)))
        return np.stack([self._one(i) for i in sel])

    def __array__(self, dtype=None, copy=None):
        a = self[:]
        return a if dtype is None else a.astype(dtype)

    def materialize(self) -> np.ndarray:
        return self[:]

    def cache_key(self) -> str | None:
        if self.ident is None:
            return None
        h = hashlib.sha256(f"{self.ident}|{self.size}|{self.image_key}".encode())
        h.update(self.indices.tobytes())
        return h.hexdigest()[:20]

    def to_disk(self, folder: str | os.PathLike, chunk: int = 512) -> np.ndarray:
        """Preprocess every image once into ``<folder>/<cache_key>.npy`` and return it
        memory-mapped (later calls just map the file). Written atomically."""
        key = self.cache_key()
        if key is None:
            raise VisionDataError("this image array has no source identity; it cannot be cached on disk")
        path = pathlib.Path(folder) / f"{key}.npy"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=self.shape)
            for s in range(0, len(self), chunk):
                out[s:s + chunk] = self[s:s + chunk]
            out.flush()
            del out
            os.replace(tmp, path)
        return np.load(path, mmap_mode="r")


def _task(name: str, classnames: Sequence[str], templates: Sequence[str], splits: Mapping[str, tuple]) -> Task:
    """The :class:`~bcjax.data.task.Task` of ``splits`` (labels cast to int32)."""
    return Task(name, tuple(classnames), {k: (x, np.asarray(y, LABEL_DTYPE)) for k, (x, y) in splits.items()},
                templates=tuple(templates))


def materialize(task: Task, max_bytes: int = 2 << 30, cache_dir: str | os.PathLike | None = None) -> Task:
    """``task`` with its lazy :class:`ImageArray` splits decoded into memory when all of them
    fit in ``max_bytes``; otherwise, with ``cache_dir``, preprocessed once into memory-mapped
    ``.npy`` files there (keyed by source, indices and size), else still streaming."""
    total = sum(int(np.prod(x.shape)) for x, _ in task.splits.values())
    if total <= max_bytes:
        conv = np.asarray
    elif cache_dir is not None:
        def conv(x):
            return x.to_disk(pathlib.Path(cache_dir) / "images" / task.name) if x.cache_key() else x
    else:
        return task
    splits = {k: (conv(x) if isinstance(x, ImageArray) else x, y) for k, (x, y) in task.splits.items()}
    return dataclasses.replace(task, splits=splits)


def carve(n: int, sizes: Sequence[int], seed: int) -> list[np.ndarray]:
    """Deterministic disjoint parts of ``range(n)``: a permutation seeded by
    ``[seed, 1]``, cut into ``sizes`` in order, then the rest; each part sorted."""
    if sum(sizes) >= n:
        raise VisionDataError(f"cannot carve {list(sizes)} examples out of a split of {n}: nothing left to train on")
    perm = np.random.default_rng([seed, 1]).permutation(n)
    out, start = [], 0
    for s in sizes:
        out.append(np.sort(perm[start:start + s]))
        start += s
    out.append(np.sort(perm[start:]))
    return out


def _limit(idx: np.ndarray, max_n: int | None, seed: int) -> np.ndarray:
    if max_n is None or len(idx) <= max_n:
        return idx
    return np.sort(np.random.default_rng([seed, 2]).choice(idx, size=max_n, replace=False))


class _Concat:
    """Random access over several sources, as one."""

    def __init__(self, parts: Sequence[Sequence]):
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, i):
        j = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.parts[j][int(i - self.offsets[j])]


def classnames_for(spec: TaskSpec, source_names: Sequence[str] | None) -> list[str]:
    """Class names of a task: a fixed list, or derived from the source's label names."""
    if isinstance(spec.classnames, tuple):
        return list(spec.classnames)
    if source_names is None:
        raise VisionDataError(f"task {spec.name!r}: the source has no label names; give 'classnames' in the config")
    names = list(source_names)
    return spec.classnames(names) if callable(spec.classnames) else names


def _read_labels(source: Sequence, label_key: str) -> np.ndarray:
    return np.fromiter((int(source[i][label_key]) for i in range(len(source))), LABEL_DTYPE, count=len(source))


def _finish(spec: TaskSpec, classnames, templates, train_src, test_src, *, size, seed, max_train, max_eval,
            label_key, image_key, train_ident=None, test_ident=None) -> Task:
    y_pool = _read_labels(train_src, label_key)
    cuts = ([spec.test_size] if spec.test_size else []) + [spec.unused_size, spec.val_size]
    parts = carve(len(y_pool), cuts, seed)
    if spec.test_size:
        test_idx, _, val_idx, train_idx = parts
        test_src, y_test_all, test_ident = train_src, y_pool, train_ident
    else:
        _, val_idx, train_idx = parts
        if test_src is None:
            raise VisionDataError(f"task {spec.name!r}: no test split and test_size is 0")
        y_test_all = _read_labels(test_src, label_key)
        test_idx = np.arange(len(y_test_all))
    train_idx = _limit(train_idx, max_train, seed)
    val_idx, test_idx = _limit(val_idx, max_eval, seed), _limit(test_idx, max_eval, seed)
    ys = np.concatenate([y_pool, y_test_all])
    if ys.size and (ys.min() < 0 or ys.max() >= len(classnames)):
        raise VisionDataError(f"task {spec.name!r}: labels span [{ys.min()}, {ys.max()}] but there are "
                              f"{len(classnames)} class names")
    splits = {
        "train": (ImageArray(train_src, train_idx, size, image_key, train_ident), y_pool[train_idx]),
        "val": (ImageArray(train_src, val_idx, size, image_key, train_ident), y_pool[val_idx]),
        "test": (ImageArray(test_src, test_idx, size, image_key, test_ident), y_test_all[test_idx]),
    }
    return _task(spec.name, classnames, templates, splits)


def load_tfds_task(spec: TaskSpec | str, *, data_dir: str | None = None, image_size: int = 224, seed: int = 0,
                   max_train: int | None = None, max_eval: int | None = None, prepare: bool = False,
                   classnames: Sequence[str] | None = None, templates: Sequence[str] | None = None) -> Task:
    """A task read by tfds name with ``builder.as_data_source`` (array_record, no TensorFlow).

    ``spec`` is a :data:`TASKS` name or a :class:`TaskSpec` (users' own tfds data sets).
    ``prepare=True`` runs ``download_and_prepare(file_format="array_record")`` when the data
    set is not prepared yet (network; TensorFlow for some builders); otherwise an
    unprepared data set is an error saying how to prepare it.
    """
    with requires("clip"):
        import tensorflow_datasets as tfds

    if isinstance(spec, str):
        if spec not in TASKS:
            raise UnknownDatasetError(f"unknown vision task {spec!r}; known: {sorted(TASKS)} (or give a tfds_name)")
        spec = TASKS[spec]
    if spec.tfds_name is None:
        raise VisionDataError(f"task {spec.name!r}: {GTSRB_HELP if spec.name == 'gtsrb' else 'no tfds source'}")
    try:
        builder = tfds.builder(spec.tfds_name, data_dir=data_dir, file_format="array_record")
    except Exception as e:  # tfds raises its own DatasetNotFoundError, or ValueError on bad configs
        raise UnknownDatasetError(f"task {spec.name!r}: tensorflow-datasets has no data set {spec.tfds_name!r} "
                                  f"(data_dir={data_dir}): {str(e).splitlines()[0]}") from None
    if not builder.is_prepared():
        if prepare:
            builder.download_and_prepare(file_format="array_record")
        else:
            raise VisionDataError(
                f"task {spec.name!r}: tfds data set {spec.tfds_name!r} is not prepared in "
                f"{data_dir or '~/tensorflow_datasets'}; prepare it once with tfds.builder({spec.tfds_name!r}, "
                f"data_dir=..., file_format='array_record').download_and_prepare() (or data.prepare: true)")
    label_feature = builder.info.features[spec.label_key]
    names = getattr(label_feature, "names", None)
    if classnames is None:
        classnames = classnames_for(spec, names)
    if spec.num_classes is not None and len(classnames) != spec.num_classes:
        raise VisionDataError(f"task {spec.name!r}: {len(classnames)} class names, expected {spec.num_classes}")
    available = set(builder.info.splits)
    wanted = list(spec.train_splits) + ([spec.test_split] if spec.test_split else [])
    missing = [s for s in wanted if s not in available]
    if missing:
        raise VisionDataError(f"task {spec.name!r}: tfds data set {spec.tfds_name!r} lacks split(s) {missing}; "
                              f"it has {sorted(available)}")
    decoders = {spec.image_key: tfds.decode.SkipDecoding()}
    train_src = _Concat([builder.as_data_source(s, decoders=decoders) for s in spec.train_splits])
    test_src = builder.as_data_source(spec.test_split, decoders=decoders) if spec.test_split else None
    return _finish(spec, classnames, templates or TEMPLATES.get(spec.name, TEMPLATES["default"]), train_src,
                   test_src, size=image_size, seed=seed, max_train=max_train, max_eval=max_eval,
                   label_key=spec.label_key, image_key=spec.image_key,
                   train_ident=f"tfds:{builder.info.full_name}:{data_dir}:{'+'.join(spec.train_splits)}",
                   test_ident=f"tfds:{builder.info.full_name}:{data_dir}:{spec.test_split}")


_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class _Files:
    def __init__(self, files):
        self.files = list(files)
        h = hashlib.sha256()
        for f in self.files:
            st = os.stat(f)
            h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        self.ident = "files:" + h.hexdigest()[:20]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return pathlib.Path(self.files[i]).read_bytes()


def _scan(folder: pathlib.Path, classes: list[str] | None):
    if not folder.is_dir():
        raise VisionDataError(f"image folder {folder} does not exist")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise VisionDataError(f"{folder}: class folders {unknown[:5]} are not in the train classes")
    files, labels = [], []
    for c, name in enumerate(classes):
        d = folder / name
        if d.is_dir():
            fs = sorted(p for p in d.rglob("*") if p.suffix.lower() in _IMAGE_EXT)
            files += fs
            labels += [c] * len(fs)
    if not files:
        raise VisionDataError(f"image folder {folder} holds no images ({', '.join(_IMAGE_EXT)}) in class folders")
    return classes, files, np.asarray(labels, LABEL_DTYPE)


def load_folder_task(root: str | os.PathLike, name: str | None = None, *, image_size: int = 224, seed: int = 0,
                     val_size: int | float = 0.1, max_train: int | None = None, max_eval: int | None = None,
                     classnames: Sequence[str] | Mapping[str, str] | None = None,
                     templates: Sequence[str] | None = None) -> Task:
    """A task from image folders ``<root>/train/<class>/*.png`` and ``<root>/test/<class>/...``
    (class order = sorted train folder names). ``classnames`` renames classes (a list in that
    order, or a ``{folder: name}`` map; default: folder names with ``_`` → space).
    A ``<root>/val`` folder is used when present, otherwise ``val_size`` (count, or fraction
    of train) is carved from train deterministically."""
    root = pathlib.Path(root)
    name = name or root.name
    folders, train_files, y_train = _scan(root / "train", None)
    _, test_files, y_test = _scan(root / "test", folders)
    if isinstance(classnames, Mapping):
        names = [classnames.get(f, f.replace("_", " ")) for f in folders]
    elif classnames is not None:
        names = list(classnames)
        if len(names) != len(folders):
            raise VisionDataError(f"{root}: {len(names)} class names for {len(folders)} class folders")
    else:
        names = _underscores(folders)
    tpl = tuple(templates or TEMPLATES.get(name, TEMPLATES["default"]))
    if (root / "val").is_dir():
        _, val_files, y_val = _scan(root / "val", folders)
        tr, va = np.arange(len(train_files)), np.arange(len(val_files))
        tr, va, te = _limit(tr, max_train, seed), _limit(va, max_eval, seed), _limit(np.arange(len(test_files)),
                                                                                   max_eval, seed)
        ftr, fva, fte = _Files(train_files), _Files(val_files), _Files(test_files)
        splits = {"train": (ImageArray(ftr, tr, image_size, None, ftr.ident), y_train[tr]),
                  "val": (ImageArray(fva, va, image_size, None, fva.ident), y_val[va]),
                  "test": (ImageArray(fte, te, image_size, None, fte.ident), y_test[te])}
        return _task(name, names, tpl, splits)
    n_val = int(round(val_size * len(train_files))) if isinstance(val_size, float) else int(val_size)
    spec = TaskSpec(name, None, val_size=n_val)
    return _finish_files(spec, names, tpl, train_files, y_train, test_files, y_test, image_size, seed,
                         max_train, max_eval)


def _finish_files(spec, names, tpl, train_files, y_train, test_files, y_test, size, seed, max_train, max_eval):
    val_idx, train_idx = carve(len(y_train), [spec.val_size], seed)
    train_idx, val_idx = _limit(train_idx, max_train, seed), _limit(val_idx, max_eval, seed)
    test_idx = _limit(np.arange(len(y_test)), max_eval, seed)
    tr, te = _Files(train_files), _Files(test_files)
    return _task(spec.name, names, tpl, {
        "train": (ImageArray(tr, train_idx, size, None, tr.ident), y_train[train_idx]),
        "val": (ImageArray(tr, val_idx, size, None, tr.ident), y_train[val_idx]),
        "test": (ImageArray(te, test_idx, size, None, te.ident), y_test[test_idx]),
    })


def numpy_task(name: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], *,
               classnames: Sequence[str], templates: Sequence[str] | None = None, image_size: int = 224,
               val: tuple[np.ndarray, np.ndarray] | None = None, val_size: int | float = 0.1,
               seed: int = 0) -> Task:
    """A task from in-memory arrays (N, H, W[, C]) + int labels; images are CLIP-preprocessed
    now. Without ``val``, ``val_size`` (count or fraction) is carved from train."""
    if not classnames:
        raise VisionDataError(f"task {name!r}: class names are required for zero-shot heads")
    parts = {"train": train, "test": test} | ({"val": val} if val is not None else {})
    prepped = {}
    for split, (x, y) in parts.items():
        x, y = np.asarray(x), np.asarray(y).astype(LABEL_DTYPE)
        if x.ndim not in (3, 4) or len(x) != len(y):
            raise VisionDataError(f"task {name!r} {split}: expected images (N, H, W[, C]) and N labels, "
                                  f"got {x.shape} and {y.shape}")
        if y.size and (y.min() < 0 or y.max() >= len(classnames)):
            raise VisionDataError(f"task {name!r} {split}: labels span [{y.min()}, {y.max()}] but there are "
                                  f"{len(classnames)} class names")
        prepped[split] = (np.stack([clip_preprocess(im, image_size) for im in x]) if len(x) else
                          np.zeros((0, image_size, image_size, 3), np.uint8), y)
    if val is None:
        n_val = int(round(val_size * len(prepped["train"][1]))) if isinstance(val_size, float) else int(val_size)
        v, t = carve(len(prepped["train"][1]), [n_val], seed)
        x, y = prepped["train"]
        prepped["val"], prepped["train"] = (x[v], y[v]), (x[t], y[t])
    tpl = tuple(templates or TEMPLATES.get(name, TEMPLATES["default"]))
    return _task(name, classnames, tpl, {k: prepped[k] for k in SPLITS})


def load_task(entry: str | Mapping, *, data_dir: str | None = None, image_size: int = 224, seed: int = 0,
              max_train: int | None = None, max_eval: int | None = None, prepare: bool = False,
              gtsrb_dir: str | None = None) -> Task:
    """A task from a config entry: a :data:`TASKS` name, or a mapping

    * ``{name, tfds_name, [train_splits, test_split, val_size, test_size, classnames, templates,
      image_key, label_key]}`` -- any tfds data set;
    * ``{name, source: folder, path, [classnames, templates, val_size]}`` -- image folders.

    ``gtsrb`` with ``gtsrb_dir`` set reads the GTSRB image folders (:data:`GTSRB_HELP`).
    """
    common = dict(image_size=image_size, seed=seed, max_train=max_train, max_eval=max_eval)
    if isinstance(entry, str):
        if entry == "gtsrb":
            if not gtsrb_dir:
                raise VisionDataError(f"task 'gtsrb': {GTSRB_HELP}")
            return load_folder_task(gtsrb_dir, "gtsrb", val_size=TASKS["gtsrb"].val_size,
                                    classnames=GTSRB_CLASSNAMES, templates=TEMPLATES["gtsrb"], **common)
        return load_tfds_task(entry, data_dir=data_dir, prepare=prepare, **common)
    if not isinstance(entry, Mapping) or "name" not in entry:
        raise VisionDataError(f"a task entry must be a name or a mapping with 'name', got {entry!r}")
    e = dict(entry)
    name = e.pop("name")
    templates = e.pop("templates", None)
    classnames = e.pop("classnames", None)
    source = e.pop("source", "tfds")
    if source == "folder":
        if "path" not in e:
            raise VisionDataError(f"task {name!r}: source 'folder' needs 'path'")
        return load_folder_task(e.pop("path"), name, classnames=classnames, templates=templates,
                                val_size=e.pop("val_size", 0.1), **common)
    if source != "tfds":
        raise VisionDataError(f"task {name!r}: unknown source {source!r}; use 'tfds' or 'folder'")
    if "tfds_name" not in e:
        if name in TASKS:
            spec = TASKS[name]
        else:
            raise UnknownDatasetError(f"unknown vision task {name!r}: not one of {sorted(TASKS)} and no tfds_name "
                                      "given")
    else:
        allowed = {f.name for f in dataclasses.fields(TaskSpec)} - {"name", "classnames"}
        bad = sorted(set(e) - allowed)
        if bad:
            raise VisionDataError(f"task {name!r}: unknown key(s) {bad}; allowed: {sorted(allowed)}")
        for k in ("train_splits",):
            if k in e:
                e[k] = tuple(e[k]) if not isinstance(e[k], str) else (e[k],)
        base = TASKS.get(name)
        spec = dataclasses.replace(base, **e) if base else TaskSpec(name=name, **e)
    return load_tfds_task(spec, data_dir=data_dir, prepare=prepare, classnames=classnames, templates=templates,
                          **common)
