"""capture.registry: any transformers causal LM or encoder from a local folder, captured exactly as
transformers' eager attention computes it; clear one-sentence errors for models that cannot be had."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, BertConfig, GemmaConfig, GPT2Config, LlamaConfig, Qwen2Config

from capture import registry
from capture.api import run
from capture.engine import attention
from capture.engine.session import session
from core.errors import ModelUnavailable
from core.interventions import HeadEdit, Intervention
from core.types import RunSpec

PROMPT = "The quick brown fox jumps over the lazy dog, again and again."
ATOL = 2e-3  # maps are stored as float16
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128, initializer_range=0.2)  # a wide init: peaked, non-uniform maps
CAUSAL_IDS = dict(vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=2)  # the SmolLM2 tokenizer's


def tiny_config(kind: str):
    """(config, causal) for a small random model of each family; shapes chosen to be unlike each other."""
    if kind == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2,
                          **CAUSAL_IDS), True
    if kind == "llama":
        return LlamaConfig(**SMALL, **CAUSAL_IDS), True
    if kind == "llama-gqa":
        return LlamaConfig(**dict(SMALL, num_attention_heads=8, num_key_value_heads=2), **CAUSAL_IDS), True
    if kind == "qwen2":
        return Qwen2Config(**dict(SMALL, num_key_value_heads=2), **CAUSAL_IDS), True
    if kind == "gemma":  # head_dim != hidden / heads, one KV head (MQA)
        return GemmaConfig(**dict(SMALL, head_dim=24, num_key_value_heads=1), **CAUSAL_IDS), True
    if kind == "bert":
        return BertConfig(**SMALL, vocab_size=30522), False
    raise ValueError(kind)


def out_projection(model, kind: str, layer: int):
    """The module whose input is the concatenated head outputs, found by hand for each family."""
    if kind == "gpt2":
        return model.transformer.h[layer].attn.c_proj
    if kind == "bert":
        return model.encoder.layer[layer].attention.output.dense
    return model.model.layers[layer].self_attn.o_proj


@pytest.fixture
def tiny(tmp_path, smollm2, minilm):
    """Build a random model of `kind`, save it with a tokenizer into a fresh folder, load it by path."""

    def build(kind: str):
        config, causal = tiny_config(kind)
        torch.manual_seed(0)
        model = (AutoModelForCausalLM if causal else AutoModel).from_config(config)
        folder = tmp_path / kind  # a distinct path per model: registry.load caches by name
        model.save_pretrained(folder)  # writes config.architectures
        (smollm2 if causal else minilm).tokenizer.save_pretrained(folder)
        assert json.loads((folder / "config.json").read_text())["architectures"]
        return registry.load(str(folder)), str(folder)

    return build


def eager_attentions(handle, ids: list[int]) -> list[np.ndarray]:
    """transformers' own eager attention weights, per layer [head, query, key]."""
    input_ids = torch.tensor([ids])
    handle.model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = handle.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                               output_attentions=True)
    finally:
        handle.model.set_attn_implementation(attention.IMPLEMENTATION)
    return [a[0].float().numpy() for a in out.attentions]


def assert_capture_equals_eager(handle, capture) -> None:
    eager = eager_attentions(handle, capture.output.token_ids)
    assert len(eager) == capture.meta.n_layers
    n = capture.n_tokens
    for layer, expected in enumerate(eager):
        got = capture.attention(layer).astype(np.float32)  # [head, query, key]
        assert got.shape == expected.shape == (capture.meta.n_heads, n, n)
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0, err_msg=f"layer {layer}")
        np.testing.assert_allclose(got.sum(-1), 1.0, atol=2e-3)
    # guard: the maps are peaked enough that a wrong scale or mask would show
    first = eager[0]
    visible = np.tril(np.ones((n, n))) if capture.meta.causal else np.ones((n, n))
    uniform = visible / visible.sum(-1, keepdims=True)
    assert np.abs(first - uniform).max() > 0.2


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2", "gemma", "bert"])
def test_tiny_model_capture_equals_eager(tiny, store, kind):
    handle, folder = tiny(kind)
    causal = kind != "bert"
    assert handle.meta.causal is causal
    assert handle.meta.family == tiny_config(kind)[0].model_type
    assert handle.meta.n_layers == 2 and handle.meta.n_heads == 4
    assert handle.model.config._attn_implementation == attention.IMPLEMENTATION
    capture = run(RunSpec(model=folder, prompt=PROMPT, max_new_tokens=3 if causal else 0), store=store)
    assert capture.layout == ("tril" if causal else "full")
    n_prompt = len(handle.tokenizer(PROMPT)["input_ids"])
    assert capture.n_tokens == n_prompt + (3 if causal else 0)
    assert_capture_equals_eager(handle, capture)
    if causal:
        # and the continuation is plain greedy generate's
        ids = torch.tensor([capture.output.token_ids[:n_prompt]])
        handle.model.set_attn_implementation("sdpa")
        try:
            with torch.inference_mode():
                plain = handle.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                              do_sample=False, pad_token_id=2)
        finally:
            handle.model.set_attn_implementation(attention.IMPLEMENTATION)
        assert capture.output.token_ids == plain[0].tolist()
    else:
        attn = capture.attention(1).astype(np.float32)
        assert np.triu(attn, 1).max() > 0.01  # bidirectional: later keys are seen


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma", "bert"])
def test_tiny_model_scale_edit_hits_the_output_projection(tiny, kind):
    """scale 0 on one head equals zeroing that head's slice of the projection input found by hand."""
    handle, _ = tiny(kind)
    layer, head, d = 1, 2, handle.meta.head_dim
    ids = torch.tensor([handle.tokenizer(PROMPT)["input_ids"]])

    def forward():
        with torch.inference_mode():
            out = handle.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        return (out.logits if hasattr(out, "logits") else out.last_hidden_state)[0].float()

    base = forward()
    with session(Intervention(edits=(HeadEdit(layer=layer, head=head, op="scale", value=0.0),))):
        edited = forward()

    def zero_head(_module, args):
        z = args[0].clone()  # [batch, query, head * head_dim]
        z[..., head * d : (head + 1) * d] = 0
        return (z, *args[1:])

    hook = out_projection(handle.model, kind, layer).register_forward_pre_hook(zero_head)
    try:
        by_hand = forward()
    finally:
        hook.remove()
    assert (edited - base).abs().max() > 1e-4
    torch.testing.assert_close(edited, by_hand, atol=1e-5, rtol=0)


def test_gqa_tiny_llama_reports_both_counts(tiny, store):
    handle, folder = tiny("llama-gqa")
    assert (handle.meta.n_heads, handle.meta.n_kv_heads, handle.meta.head_dim) == (8, 2, 8)
    assert handle.meta.group_size == 4
    capture = run(RunSpec(model=folder, prompt=PROMPT), store=store)
    assert (capture.meta.n_heads, capture.meta.n_kv_heads) == (8, 2)
    assert_capture_equals_eager(handle, capture)
    # the four query heads of one KV group still have their own maps
    attn = capture.attention(0).astype(np.float32)
    assert np.abs(attn[0] - attn[1]).max() > 0.05


def test_minilm_capture_equals_eager(minilm, store):
    assert (minilm.meta.family, minilm.meta.causal, minilm.meta.n_layers, minilm.meta.n_heads) == ("bert", False, 6, 12)
    capture = run(RunSpec(model="minilm", prompt=PROMPT, max_new_tokens=4), store=store)
    ids = minilm.tokenizer(PROMPT)["input_ids"]
    assert capture.output.token_ids == ids and capture.n_tokens == len(ids)
    assert capture.tokens[0] == "[CLS]" and capture.tokens[-1] == "[SEP]"
    assert capture.output.notes  # it says it did not generate
    assert capture.layout == "full"
    eager = eager_attentions(minilm, ids)
    for layer in range(6):
        np.testing.assert_allclose(capture.attention(layer).astype(np.float32), eager[layer], atol=ATOL, rtol=0,
                                   err_msg=f"layer {layer}")


# ---- errors ------------------------------------------------------------------------------------

def assert_one_sentence(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text
    assert text.rstrip().endswith("."), text
    assert len(text) < 400, text
    return text


@pytest.mark.parametrize("name", ["headscope-test/no-such-model-9f3c", "no-such-model-9f3c"])
def test_unknown_hub_id(name):
    with pytest.raises(ModelUnavailable) as info:
        registry.load(name)
    assert name in assert_one_sentence(info.value)


@pytest.mark.parametrize("path", ["/nonexistent/headscope/model", "./no/such/folder", "~/no-such-headscope-model/x"])
def test_nonexistent_local_path(path):
    with pytest.raises(ModelUnavailable) as info:
        registry.load(path)
    assert path in assert_one_sentence(info.value)


@pytest.mark.parametrize("content", ["{this is not json", '{"model_type": "no-such-architecture"}', "[]", ""])
def test_folder_with_garbage_config(tmp_path, content):
    folder = tmp_path / "garbage"
    folder.mkdir()
    (folder / "config.json").write_text(content)
    with pytest.raises(ModelUnavailable) as info:
        registry.load(str(folder))
    assert_one_sentence(info.value)


def test_empty_folder(tmp_path):
    with pytest.raises(ModelUnavailable) as info:
        registry.load(str(tmp_path))
    assert_one_sentence(info.value)


@pytest.mark.parametrize("name", ["", "   "])
def test_no_model_name(name):
    with pytest.raises(ModelUnavailable) as info:
        registry.load(name)
    assert "smollm2" in assert_one_sentence(info.value)
