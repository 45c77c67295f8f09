"""capture.engine.linears: the recorded passes' oneDNN-packed linear layers give torch's numbers to float32
rounding, leave the model as it was, and step aside where they must (gradients, budget, edits)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from capture.api import run
from capture.engine import linears
from core.types import RunSpec


@pytest.fixture
def qwen2():
    """A tiny random Qwen2: linear layers with biases (q, k, v) and without (o, MLP, lm_head)."""
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=500, max_position_embeddings=64, initializer_range=0.2)
    return AutoModelForCausalLM.from_config(config).eval()


IDS = torch.tensor([[5, 17, 99, 3, 250, 41, 7, 7, 12, 480, 33]])


def _logits(model) -> torch.Tensor:
    return model(input_ids=IDS, use_cache=False).logits


def test_the_pinned_torch_has_onednn_packed_linears():
    assert linears.supported()


def test_packed_pass_equals_torch_to_rounding_and_leaves_nothing_behind(qwen2, monkeypatch):
    weights = sum(m.weight.numel() * 4 for m in qwen2.modules() if isinstance(m, torch.nn.Linear))
    assert linears.bytes_to_pack(qwen2) == weights  # what the memory estimate sets aside for the first pass
    calls = []
    onednn = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *args: calls.append(1) or onednn(*args))
    with torch.inference_mode():
        stock = _logits(qwen2)
        with linears.packed(qwen2):
            packed = _logits(qwen2)
        after = _logits(qwen2)
    n_linears = sum(isinstance(m, torch.nn.Linear) for m in qwen2.modules())
    assert n_linears == 2 * 7 + 1
    assert len(calls) == n_linears  # every linear layer of the packed pass ran on oneDNN, none outside it
    assert linears.packed_bytes(qwen2) >= weights * 0.9
    assert linears.bytes_to_pack(qwen2) == 0
    torch.testing.assert_close(packed, stock, atol=1e-4, rtol=1e-4)  # torch's numbers to float32 rounding
    torch.testing.assert_close(after, stock, atol=0, rtol=0)
    assert not any("forward" in vars(m) for m in qwen2.modules())


def test_gradients_take_torchs_own_path(qwen2):
    with linears.packed(qwen2):
        logits = _logits(qwen2)
        logits[0, -1].logsumexp(-1).backward()
    stock = _logits(qwen2)
    torch.testing.assert_close(logits, stock, atol=0, rtol=0)
    assert qwen2.model.layers[0].mlp.up_proj.weight.grad is not None


def test_a_weight_edited_in_place_is_packed_again(qwen2):
    with torch.inference_mode(), linears.packed(qwen2):
        _logits(qwen2)
    with torch.no_grad():
        qwen2.model.layers[1].mlp.down_proj.weight.mul_(-2.0)
    with torch.inference_mode():
        stock = _logits(qwen2)
        with linears.packed(qwen2):
            packed = _logits(qwen2)
    torch.testing.assert_close(packed, stock, atol=1e-4, rtol=1e-4)


def test_a_model_over_the_budget_is_not_packed(qwen2, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_PACKED_MB", "0.01")
    with torch.inference_mode():
        stock = _logits(qwen2)
        with linears.packed(qwen2):
            same = _logits(qwen2)
    assert linears.packed_bytes(qwen2) == 0 and linears.bytes_to_pack(qwen2) == 0
    torch.testing.assert_close(same, stock, atol=0, rtol=0)


def test_turned_off_it_takes_torchs_path_even_once_packed(qwen2, monkeypatch):
    with torch.inference_mode(), linears.packed(qwen2):
        _logits(qwen2)
    monkeypatch.setenv("HEADSCOPE_PACKED", "0")
    with torch.inference_mode():
        stock = _logits(qwen2)
        with linears.packed(qwen2):
            same = _logits(qwen2)
    torch.testing.assert_close(same, stock, atol=0, rtol=0)


def test_the_smollm2_capture_runs_packed(smollm2, store):
    run(RunSpec(model="smollm2", prompt="Packed linear layers, once.", seed=11), store=store)
    assert linears.packed_bytes(smollm2.model) > 400 * 2**20  # its 30 layers' linears and the lm_head
