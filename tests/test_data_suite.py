"""The offline 8-task image suite (bcjax.data.suite): contracts, determinism, disjoint
splits, errors, cache robustness. Small caps and 28 px keep the whole file fast."""
from __future__ import annotations

import gzip
import pickle
import struct
import types
from pathlib import Path

import numpy as np
import pytest

from bcjax.data import _sources as src
from bcjax.data import suite
from bcjax.data.suite import (
    SUITE_TASKS,
    TASK_INFO,
    MissingDataSourceError,
    UnknownTaskError,
    load_suite,
    load_task,
)
from bcjax.data.task import Task
from bcjax.errors import BcjaxError

RES = 28
CAPS = dict(max_train=50, max_val=20, max_test=30)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """No test writes to ~/.cache: every test gets its own cache root."""
    monkeypatch.setenv("BCJAX_CACHE", str(tmp_path / "bcjax-cache"))


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BCJAX_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def tasks(module_cache):
    """Every task, built cold once at 28 px with small caps."""
    return {t.name: t for t in load_suite(resolution=RES, **CAPS)}


def _keys(x: np.ndarray) -> set[bytes]:
    return {r.tobytes() for r in np.ascontiguousarray(x.reshape(len(x), -1))}


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

def test_registry_lists_eight_documented_tasks():
    assert len(SUITE_TASKS) == 8 and len(set(SUITE_TASKS)) == 8
    assert tuple(TASK_INFO) == SUITE_TASKS
    for name, info in TASK_INFO.items():
        assert info.name == name
        assert len(info.class_names) >= 2 and len(set(info.class_names)) == len(info.class_names)
        assert info.provenance and info.license and info.source and info.requires
        assert name in suite.__doc__  # the module docstring's table lists every task
    with pytest.raises(TypeError):
        TASK_INFO["x"] = None  # read-only mapping


# --------------------------------------------------------------------------------------
# Per-task contract
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SUITE_TASKS)
def test_task_contract(tasks, name):
    t = tasks[name]
    assert isinstance(t, Task) and t.name == name
    assert t.class_names == TASK_INFO[name].class_names
    assert t.num_classes == len(t.class_names)
    assert t.provenance == TASK_INFO[name].provenance and t.license == TASK_INFO[name].license
    assert tuple(t.splits) == ("train", "val", "test")
    caps = {"train": CAPS["max_train"], "val": CAPS["max_val"], "test": CAPS["max_test"]}
    for split, (x, y) in t.splits.items():
        assert x.dtype == np.float32 and x.shape == (len(y), RES, RES, 3), (split, x.shape)
        assert y.dtype == np.int32 and y.ndim == 1
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert float(x.max()) > 0.5  # not blank
        assert np.all(np.isfinite(x))
        assert y.min() >= 0 and y.max() < t.num_classes
        counts = np.bincount(y, minlength=t.num_classes)
        assert np.all(counts > 0), (split, counts)  # every class in every split
        assert counts.max() - counts.min() <= 1, (split, counts)  # class-balanced caps
        assert len(y) <= caps[split]
        # every split is full unless the source's val carve (10 %) is smaller than the cap
        assert len(y) == caps[split] or split == "val"
        assert not x.flags.writeable and not y.flags.writeable
    assert t.resolution == RES
    assert t.sizes == {s: len(t.splits[s][1]) for s in t.splits}


@pytest.mark.parametrize("name", SUITE_TASKS)
def test_splits_are_disjoint(tasks, name):
    t = tasks[name]
    k = {s: _keys(x) for s, (x, _) in t.splits.items()}
    assert not k["train"] & k["test"]
    assert not k["val"] & k["test"]
    assert not k["train"] & k["val"]


def test_mnist_and_rotated_mnist_share_no_image(tasks):
    a = np.concatenate([x for x, _ in tasks["mnist"].splits.values()])
    b = np.concatenate([x for x, _ in tasks["mnist_rot90"].splits.values()])
    b_back = np.rot90(b, k=-1, axes=(1, 2))  # undo the rotation
    assert not _keys(a) & _keys(np.ascontiguousarray(b_back))


@pytest.mark.parametrize("name", SUITE_TASKS)
def test_deterministic_cold_and_warm(tasks, name):
    first = tasks[name]
    cold = load_task(name, resolution=RES, **CAPS)  # this test's cache dir is empty: cold
    uncached = load_task(name, resolution=RES, **CAPS, cache=False)
    warm = load_task(name, resolution=RES, **CAPS)  # read back from this test's cache
    for other in (cold, uncached, warm):
        for s in first.splits:
            np.testing.assert_array_equal(first.splits[s][0], other.splits[s][0])
            np.testing.assert_array_equal(first.splits[s][1], other.splits[s][1])


@pytest.mark.parametrize("name", ["mnist", "photo_patches", "font_letters"])
def test_seed_moves_train_and_val_but_not_test(tasks, name):
    t0 = tasks[name]
    t1 = load_task(name, resolution=RES, **CAPS, seed=1, cache=False)
    np.testing.assert_array_equal(t0.splits["test"][0], t1.splits["test"][0])
    np.testing.assert_array_equal(t0.splits["test"][1], t1.splits["test"][1])
    assert not np.array_equal(t0.splits["train"][0], t1.splits["train"][0])


def test_uncapped_array_task_uses_whole_source():
    t = load_task("digits", resolution=RES, cache=False)
    n = sum(t.sizes.values())
    assert n == 1797  # sklearn's digits have no exact duplicates
    assert t.sizes["test"] == round(0.2 * 1797)


def test_fashion_mnist_test_split_is_the_official_one():
    x_official, _ = src.fashion_mnist()["test"]
    t = load_task("fashion_mnist", resolution=28, max_train=20, max_val=10, max_test=40)
    got = np.rint(t.splits["test"][0][..., 0] * 255).astype(np.uint8)  # 28 px: no resize
    assert _keys(got) <= _keys(x_official)


@pytest.mark.parametrize("res", [42, 56])
def test_other_resolutions(res):
    t = load_task("font_letters", resolution=res, max_train=10, max_val=10, max_test=10)
    for x, _ in t.splits.values():
        assert x.shape[1:] == (res, res, 3)
    t = load_task("digits", resolution=res, max_train=10, max_val=10, max_test=10)
    assert t.splits["train"][0].shape[1:] == (res, res, 3)


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------

def test_unknown_task_lists_known_ones():
    with pytest.raises(UnknownTaskError) as e:
        load_task("cifar10")
    msg = str(e.value)
    assert "cifar10" in msg and all(n in msg for n in SUITE_TASKS)
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)
    with pytest.raises(UnknownTaskError):
        load_suite(["mnist", "nope"])


@pytest.mark.parametrize("bad", [0, -14, 13, 30, 50, 14 * 100, 28.0, True, "56", None])
def test_bad_resolution(bad):
    with pytest.raises(BcjaxError, match="resolution"):
        load_task("digits", resolution=bad)


@pytest.mark.parametrize("kw", [dict(max_train=3), dict(max_val=0), dict(max_test=-5),
                                dict(max_train=12.5), dict(max_val=True), dict(seed=-1),
                                dict(seed=1.5)])
def test_bad_caps_and_seed(kw):
    with pytest.raises(BcjaxError):
        load_task("digits", resolution=RES, **kw)


def _no_tfds():
    raise ImportError("No module named 'tensorflow_datasets'")


def test_missing_fashion_mnist_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(src.FASHION_MNIST_ENV, str(tmp_path / "empty"))
    monkeypatch.setattr(src, "FASHION_MNIST_DIRS", (str(tmp_path / "nowhere"),))
    monkeypatch.setattr(src, "_import_tfds", _no_tfds)
    src.fashion_mnist.cache_clear()
    try:
        with pytest.raises(MissingDataSourceError) as e:
            load_task("fashion_mnist", resolution=RES, **CAPS)
    finally:
        src.fashion_mnist.cache_clear()
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "tensorflow-datasets" in msg and src.FASHION_MNIST_ENV in msg
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, BcjaxError)


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(arr, np.uint8).tobytes())


def test_fashion_mnist_from_env_dir(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    d = tmp_path / "fm"
    d.mkdir()
    data = {"train": (rng.integers(0, 256, (300, 28, 28)), np.arange(300) % 10),
            "test": (rng.integers(0, 256, (100, 28, 28)), np.arange(100) % 10)}
    for split, (img, lab) in src._FASHION_FILES.items():
        _write_idx(d / (img + ".gz"), data[split][0])
        _write_idx(d / (lab + ".gz"), data[split][1])
    monkeypatch.setenv(src.FASHION_MNIST_ENV, str(d))
    src.fashion_mnist.cache_clear()
    try:
        got = src.fashion_mnist()
        t = load_task("fashion_mnist", resolution=RES, cache=False)
    finally:
        src.fashion_mnist.cache_clear()
    np.testing.assert_array_equal(got["train"][0], data["train"][0])
    np.testing.assert_array_equal(got["test"][1], data["test"][1])
    assert t.sizes == {"train": 270, "val": 30, "test": 100}


def test_fashion_mnist_tfds_fallback(tmp_path, monkeypatch):
    """The tensorflow-datasets path (used where the network exists), with a fake tfds."""
    rng = np.random.default_rng(1)
    fake_data = {"train": (rng.integers(0, 256, (200, 28, 28, 1), dtype=np.uint8), np.arange(200) % 10),
                 "test": (rng.integers(0, 256, (50, 28, 28, 1), dtype=np.uint8), np.arange(50) % 10)}
    calls = []

    def load(name, split, batch_size, as_supervised):
        calls.append((name, split, batch_size, as_supervised))
        return fake_data[split]

    fake = types.SimpleNamespace(load=load, as_numpy=lambda ds: ds)
    monkeypatch.delenv(src.FASHION_MNIST_ENV, raising=False)
    monkeypatch.setattr(src, "FASHION_MNIST_DIRS", (str(tmp_path / "nowhere"),))
    monkeypatch.setattr(src, "_import_tfds", lambda: fake)
    src.fashion_mnist.cache_clear()
    try:
        got = src.fashion_mnist()
    finally:
        src.fashion_mnist.cache_clear()
    assert [c[:2] for c in calls] == [("fashion_mnist", "train"), ("fashion_mnist", "test")]
    assert got["train"][0].shape == (200, 28, 28) and got["test"][0].shape == (50, 28, 28)


def test_missing_animal_shapes_says_what_to_install(monkeypatch):
    monkeypatch.delenv(src.ANIMAL_SHAPES_ENV, raising=False)
    monkeypatch.setattr(src, "ANIMAL_SHAPES_PACKAGES", (("no_such_pkg_bcjax", "data"),))
    src.animal_shapes.cache_clear()
    try:
        with pytest.raises(MissingDataSourceError, match=r"pip install animal-shape-mnist==0\.39"):
            load_task("animal_shapes", resolution=RES, **CAPS)
    finally:
        src.animal_shapes.cache_clear()


def test_pickled_source_refuses_anything_but_arrays(tmp_path):
    evil = tmp_path / "evil.gz"
    with gzip.open(evil, "wb") as f:
        f.write(pickle.dumps(types.SimpleNamespace(a=1)))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        src._load_np_pickle_gz(evil)
    ok = tmp_path / "ok.gz"
    with gzip.open(ok, "wb") as f:
        f.write(pickle.dumps(np.arange(6, dtype=np.uint8).reshape(2, 3)))
    np.testing.assert_array_equal(src._load_np_pickle_gz(ok), np.arange(6).reshape(2, 3))


def test_task_rejects_malformed_splits():
    x = np.zeros((2, 28, 28, 3), np.float32)
    y = np.zeros(2, np.int32)
    with pytest.raises(BcjaxError):
        Task("t", ("a", "b"), {"train": (x, y), "test": (x, y)})
    with pytest.raises(BcjaxError):
        Task("t", ("a", "b"), {"train": (x, y), "val": (x[..., :1], y), "test": (x, y)})
    with pytest.raises(BcjaxError, match="labels outside"):
        Task("t", ("a", "b"), {"train": (x, y + 2), "val": (x, y), "test": (x, y)})
    t = Task("t", ("a", "b"), {"train": (x, y), "val": (x, y), "test": (x, y)})
    assert t.num_classes == 2 and t.resolution == 28 and "sizes" in repr(t)
    # one label dtype for every adapter (DINOv2 suite, CLIP, GLUE): int32
    with pytest.raises(BcjaxError, match="labels must be int32"):
        Task("t", ("a", "b"), {"train": (x, y.astype(np.int64)), "val": (x, y), "test": (x, y)})
    with pytest.raises(BcjaxError, match="splits must be"):  # one split vocabulary: GLUE's "validation" is mapped
        Task("t", ("a", "b"), {"train": (x, y), "validation": (x, y), "test": (x, y)})
    with pytest.raises(BcjaxError, match="column 'idx' has 1 values"):
        Task("t", ("a", "b"), {"train": (x, y), "val": (x, y), "test": (x, y)}, columns={"val": {"idx": [0]}})
    text = Task("t", ("a", "b"), {s: (["p", "q"], y) for s in ("train", "val", "test")})
    assert text.resolution is None and text.sizes == {"train": 2, "val": 2, "test": 2}


# --------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------

def _only_cache_file(root: Path) -> Path:
    files = sorted((root / "data").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz", files  # no stray temp files
    return files[0]


def _corrupt(path: Path, how: str) -> None:
    if how == "garbage":
        path.write_bytes(b"this is not an npz file")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "wrong_keys":
        np.savez(path, images=np.zeros(3))
    elif how == "wrong_shape":
        with np.load(path) as z:
            d = {k: z[k] for k in z.files}
        d["x_train"] = d["x_train"][:, :-1]  # 27 px where 28 are asked for
        np.savez(path, **d)
    elif how == "bad_labels":
        with np.load(path) as z:
            d = {k: z[k] for k in z.files}
        d["y_test"] = d["y_test"] + 100
        np.savez(path, **d)
    else:  # pragma: no cover
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["garbage", "truncated", "wrong_keys", "wrong_shape", "bad_labels"])
def test_corrupt_cache_is_rebuilt_with_a_warning(tmp_path, how):
    root = tmp_path / "bcjax-cache"
    t0 = load_task("digits", resolution=RES, **CAPS)
    path = _only_cache_file(root)
    good = path.read_bytes()
    _corrupt(path, how)
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        t1 = load_task("digits", resolution=RES, **CAPS)
    for s in t0.splits:
        np.testing.assert_array_equal(t0.splits[s][0], t1.splits[s][0])
        np.testing.assert_array_equal(t0.splits[s][1], t1.splits[s][1])
    assert _only_cache_file(root) == path and path.read_bytes() == good  # rewritten, atomically


def test_cache_one_file_per_request_and_cache_root(tmp_path):
    root = tmp_path / "bcjax-cache"
    load_task("digits", resolution=RES, **CAPS)
    load_task("digits", resolution=RES, **CAPS, seed=3)
    load_task("digits", resolution=42, **CAPS)
    names = sorted(p.name for p in (root / "data").iterdir())
    assert len(names) == 3 and all(n.startswith("digits-") and n.endswith(".npz") for n in names)
    assert suite.cache_dir() == root / "data"
    other = tmp_path / "elsewhere"
    load_task("digits", resolution=RES, **CAPS, cache_root=other)
    assert len(list(other.iterdir())) == 1


def test_unwritable_cache_warns_and_still_loads(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("BCJAX_CACHE", str(blocker))  # <file>/data cannot be created
    with pytest.warns(RuntimeWarning, match="not caching"):
        t = load_task("digits", resolution=RES, **CAPS)
    assert t.sizes == {"train": 50, "val": 20, "test": 30}
