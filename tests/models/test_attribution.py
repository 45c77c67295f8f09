"""Activation patching, path patching and direct logit attribution on tiny random models (issue 24).

Exactness: patching every head from clean into corrupted gives the clean metric, patching none the
corrupted one, the batched sweep equals one-head-at-a-time passes, and DLA's terms sum to the model's
logit (difference).  The frozen-norm approximation: with the final norm's scale frozen at its value in
the run the decomposition is exact, so the bound on |sum of terms - logit| is float32 rounding:
SUM_RTOL of the terms' total size.  The SmolLM2 rank agreement is in test_attribution_smollm2.py.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, ViTConfig, ViTForImageClassification

from analytics.attribution import TEXT_FAMILIES, head_graph, patching_effect, rank_agreement
from capture import registry
from capture.engine.handle import prepare
from capture.engine.session import session
from conftest import one_head_at_a_time
from core.errors import InputError, InterventionError
from probes.dla import attribute
from probes.patch_runs import Answer, head_outputs, last_logits
from probes.patching import patching_sweep
from probes.path_patching import path_patching_sweep

VOCAB = 120
CLEAN = [1, 17, 40, 23, 9, 17, 55, 61, 8, 23, 77, 5]
CORRUPTED = [1, 17, 40, 23, 9, 17, 55, 61, 8, 40, 77, 5]  # one token changed, the last one the same
ANSWER = Answer(target=40, foil=23, metric="logit_diff")
SUM_RTOL = 1e-5  # |sum of DLA terms - logit| <= SUM_RTOL * sum of |terms| (+ 1e-5): float32 rounding only
EXACT = 1e-5  # metric equality across batch shapes (float32 matmuls of different widths)


SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, vocab_size=VOCAB,
             max_position_embeddings=64, initializer_range=0.2)
# the other families DLA knows (analytics.attribution.TEXT_FAMILIES), and some it must refuse
FAMILIES = {
    "qwen3": lambda: transformers.Qwen3Config(num_key_value_heads=2, head_dim=16, **SMALL),
    "phi3": lambda: transformers.Phi3Config(num_key_value_heads=4, pad_token_id=0, **SMALL),
    "stablelm": lambda: transformers.StableLmConfig(num_key_value_heads=2, **SMALL),
    "starcoder2": lambda: transformers.Starcoder2Config(num_key_value_heads=2, **SMALL),
    "phi": lambda: transformers.PhiConfig(**SMALL),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**SMALL),  # Pythia: attention and MLP in parallel
    "gpt_neox-sequential": lambda: transformers.GPTNeoXConfig(use_parallel_residual=False, **SMALL),
    "gptj": lambda: transformers.GPTJConfig(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                            rotary_dim=8, initializer_range=0.2),
    # post-norms (Gemma 2 / 3, OLMo 2), a (1 + w) norm (Gemma), Gemma 2's logit soft-capping
    "gemma": lambda: transformers.GemmaConfig(num_key_value_heads=2, head_dim=16, **SMALL),
    "gemma2": lambda: transformers.Gemma2Config(num_key_value_heads=2, head_dim=16, **SMALL),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(num_key_value_heads=2, head_dim=16, **SMALL),
    "olmo2": lambda: transformers.Olmo2Config(num_key_value_heads=2, **SMALL),
    # refused: residual and logit multipliers (Granite), a LayerNorm without weights (OLMo)
    "granite": lambda: transformers.GraniteConfig(num_key_value_heads=2, residual_multiplier=0.5,
                                                  embedding_multiplier=2.0, logits_scaling=2.0, **SMALL),
    "olmo": lambda: transformers.OlmoConfig(num_key_value_heads=2, **SMALL),
}
INEXACT = ("granite", "olmo")


def tiny(kind: str):
    torch.manual_seed(0)
    if kind in FAMILIES:
        return prepare(f"tiny-{kind}", AutoModelForCausalLM.from_config(FAMILIES[kind]()), None)
    if kind == "llama-gqa":
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.2)
    else:
        config = GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=64, initializer_range=0.2,
                            bos_token_id=0, eos_token_id=0)
    return prepare(f"tiny-{kind}", AutoModelForCausalLM.from_config(config), None)


@pytest.fixture(scope="module", params=["llama-gqa", "gpt2", "gpt_neox", "gemma2", "phi"])
def handle(request):
    return tiny(request.param)


def metric(handle, ids, patches=None) -> float:
    with torch.inference_mode(), session(head_patches=patches or {}):
        return float(ANSWER.score(last_logits(handle, torch.tensor([ids])))[0])


def test_patching_every_head_gives_the_clean_metric_and_none_the_corrupted(handle):
    z_clean, clean = head_outputs(handle, CLEAN, ANSWER)
    corrupted = metric(handle, CORRUPTED)
    assert abs(clean - corrupted) > 1e-3  # the corruption matters
    every = {l: (torch.ones(1, handle.meta.n_heads, dtype=torch.bool), z) for l, z in enumerate(z_clean)}
    assert metric(handle, CORRUPTED, every) == pytest.approx(clean, abs=EXACT)
    none = {l: (torch.zeros(1, handle.meta.n_heads, dtype=torch.bool), z) for l, z in enumerate(z_clean)}
    assert metric(handle, CORRUPTED, none) == pytest.approx(corrupted, abs=EXACT)


def test_batched_sweep_equals_one_head_at_a_time(handle):
    clean, corrupted, batched = patching_sweep(handle, CLEAN, CORRUPTED, ANSWER)
    z_clean, _ = head_outputs(handle, CLEAN, ANSWER)
    single = one_head_at_a_time(handle.meta, lambda patches: metric(handle, CORRUPTED, patches), z_clean)
    np.testing.assert_allclose(batched, single, atol=EXACT)
    _, _, by_one = patching_sweep(handle, CLEAN, CORRUPTED, ANSWER, batch_size=1)
    np.testing.assert_allclose(by_one, single, atol=EXACT)
    assert clean == pytest.approx(metric(handle, CLEAN), abs=EXACT)
    assert corrupted == pytest.approx(metric(handle, CORRUPTED), abs=EXACT)
    effect = patching_effect(batched, clean, corrupted, "denoise")
    assert np.isfinite(effect).all() and np.abs(effect).max() > 0.01


def test_noising_is_the_reverse_sweep(handle):
    corrupted_value, clean_value, noised = patching_sweep(handle, CORRUPTED, CLEAN, ANSWER)
    assert clean_value == pytest.approx(metric(handle, CLEAN), abs=EXACT)
    effect = patching_effect(noised, clean_value, corrupted_value, "noise")  # share of the gap destroyed
    assert np.isfinite(effect).all()


def test_path_patching_batched_equals_single_and_leaves_earlier_layers_unmeasured(handle):
    if handle.meta.family == "gpt_neox":  # one fused query_key_value projection: no q / k / v of its own
        with pytest.raises(InputError, match="Path patching reaches the q / k / v projections"):
            path_patching_sweep(handle, CLEAN, CORRUPTED, ANSWER, (0, 1), "q")
        return
    for receivers in ("q", "k", "v"):
        _, _, batched = path_patching_sweep(handle, CLEAN, CORRUPTED, ANSWER, (0, 1), receivers)
        _, _, single = path_patching_sweep(handle, CLEAN, CORRUPTED, ANSWER, (0, 1), receivers, batch_size=1)
        assert np.isnan(batched[0]).all() and np.isfinite(batched[1:]).all()
        np.testing.assert_allclose(batched, single, atol=EXACT)
    # a sender whose source and destination outputs agree sends nothing: every receiver keeps the metric
    _, dest, same = path_patching_sweep(handle, CORRUPTED, CORRUPTED, ANSWER, (1, 2), "q")
    np.testing.assert_allclose(same[2:], dest, atol=EXACT)


@pytest.mark.parametrize("kind", ["llama-gqa", "gpt2", "gemma2", "phi"])  # not GPT-NeoX: its fused q / k / v is refused
def test_path_patching_to_every_receiver_input_of_the_last_layer_equals_the_sender_path_through_it(kind):
    """Sender in layer L-2, the only later layer L-1: the sender's effect through layer L-1's q of a head is
    the same as patching that q by hand from the frozen run (independent check of step 2 and step 3)."""
    handle = tiny(kind)
    meta = handle.meta
    sender, receiver = (meta.n_layers - 2, 0), (meta.n_layers - 1, 3)
    _, _, patched = path_patching_sweep(handle, CLEAN, CORRUPTED, ANSWER, sender, "q")
    z_clean, _ = head_outputs(handle, CLEAN, ANSWER)
    z_corr, _ = head_outputs(handle, CORRUPTED, ANSWER)
    values = z_corr[sender[0]].clone()
    values[:, :, sender[1]] = z_clean[sender[0]][:, :, sender[1]]
    attn = handle.attention_modules[receiver[0]]
    q_module = getattr(attn, "q_proj", None) or attn.c_attn
    seen = {}
    hook = q_module.register_forward_hook(lambda _m, _a, out: seen.__setitem__("q", out.clone()))
    metric(handle, CORRUPTED, {sender[0]: (torch.ones(1, meta.n_heads, dtype=torch.bool), values)})
    hook.remove()
    hd = meta.head_dim
    cols = slice(receiver[1] * hd, (receiver[1] + 1) * hd)

    def put(_m, _a, out):
        out = out.clone()
        out[:, :, cols] = seen["q"][:, :, cols]
        return out

    hook = q_module.register_forward_hook(put)
    by_hand = metric(handle, CORRUPTED)
    hook.remove()
    assert patched[receiver] == pytest.approx(by_hand, abs=EXACT)


@pytest.mark.parametrize("kind", ["llama-gqa", "gpt2", "vit", *[k for k in FAMILIES if k not in INEXACT]])
def test_dla_terms_sum_to_the_logit_difference(kind):
    if kind == "vit":
        torch.manual_seed(0)
        model = ViTForImageClassification(ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                    num_attention_heads=4, image_size=32, patch_size=8, num_labels=5,
                                                    initializer_range=0.2))
        handle = prepare("tiny-vit", model, None, modality="vision")
        inputs = {"pixel_values": torch.randn(1, 3, 32, 32)}
        n, foil = 17, torch.full((17,), 2)
    else:
        handle = tiny(kind)
        inputs = {"input_ids": torch.tensor([CLEAN]), "use_cache": False}
        n, foil = len(CLEAN), torch.full((len(CLEAN),), 23)
    for foils in (None, foil):
        terms = attribute(handle, inputs, None, foils)
        parts = [terms["heads"].sum((0, 1)), terms["mlps"].sum(0), terms["embed"], terms["bias"]]
        size = np.abs(terms["heads"]).sum((0, 1)) + np.abs(terms["mlps"]).sum(0) + np.abs(terms["embed"]) + 1e-5
        assert terms["heads"].shape == (handle.meta.n_layers, handle.meta.n_heads, n)
        assert (np.abs(sum(parts) - terms["logit"]) <= SUM_RTOL * size + 1e-5).all()
        assert terms["residual_error"] < 1e-5  # the components are the residual stream
    with torch.inference_mode():
        logits = handle.model(**inputs).logits[0].float()  # the model's own logits
    if kind == "vit":
        assert terms["logit"][0] == pytest.approx(float(logits[terms["targets"][0]] - logits[2]), abs=1e-4)
    else:
        target_logit = logits[torch.arange(n), torch.as_tensor(terms["targets"])]  # [token]
        cap = getattr(handle.model.config, "final_logit_softcapping", None)
        if cap:  # Gemma 2's logits are c * tanh(x / c): the terms decompose x, the logit before the cap
            alone = attribute(handle, inputs, torch.as_tensor(terms["targets"]))
            np.testing.assert_allclose(cap * np.tanh(alone["logit"] / cap), target_logit.numpy(), atol=1e-4)
        else:
            np.testing.assert_allclose(terms["logit"], (target_logit - logits[:, 23]).numpy(), atol=1e-4)
        assert list(terms["targets"][:-1]) == CLEAN[1:]  # the next token of the text
        assert terms["targets"][-1] == int(logits[-1].argmax())  # the top prediction at the last position


@pytest.mark.parametrize("kind", INEXACT)
def test_dla_refuses_a_family_whose_terms_do_not_rebuild_its_logit(kind, monkeypatch):
    """Granite and OLMo are not in TEXT_FAMILIES: one sentence naming the families.  With the family check opened (as a
    new family would be), the exactness guard still refuses every one of them: DLA of these would not
    decompose the model's own logit."""
    handle = tiny(kind)
    inputs = {"input_ids": torch.tensor([CLEAN]), "use_cache": False}
    with pytest.raises(InputError, match="knows the causal LMs"):
        attribute(handle, inputs)
    monkeypatch.setattr("probes.dla.TEXT_FAMILIES", (*TEXT_FAMILIES, handle.meta.family))
    with pytest.raises(InputError, match="is not the sum of its heads"):
        attribute(handle, inputs)


def test_rank_agreement_and_effect():
    a = np.arange(12.0).reshape(3, 4)
    assert rank_agreement(a, a)["spearman"] == pytest.approx(1.0)
    assert rank_agreement(a, -a)["spearman"] == pytest.approx(-1.0)
    assert rank_agreement(a, a, k=3)["top_overlap"] == 1.0
    b = a.copy()
    b[0, 0] = np.nan
    assert rank_agreement(a, b)["n"] == 11
    np.testing.assert_allclose(patching_effect(np.array([[2.0, 1.0]]), 2.0, 1.0), [[1.0, 0.0]])
    np.testing.assert_allclose(patching_effect(np.array([[2.0, 1.0]]), 2.0, 1.0, "noise"), [[0.0, 1.0]])
    assert np.isnan(patching_effect(np.ones((2, 2)), 1.0, 1.0)).all()


def test_head_graph_keeps_the_top_components_and_their_reads():
    heads = np.zeros((3, 4))
    heads[2, 1], heads[1, 0], heads[0, 3] = 2.0, -1.0, 0.01
    rows = {(2, 1): np.array([0.0, 0.7, 0.25, 0.05]), (1, 0): np.array([0.9, 0.05, 0.05, 0.0])}
    graph = head_graph(heads, 3, ["a", "b", "c", "d"], lambda l, h: rows.get((l, h), np.full(4, 0.25)),
                       mlps=np.array([0.0, 0.5, 0.0]), k=3, paths={(1, 0): np.where(heads > 1, 0.3, 0.0)})
    ids = {n.id for n in graph.nodes}
    assert {"out", "L2H1", "L1H0", "MLP1", "tok1", "tok0", "tok2"} <= ids and "L0H3" not in ids
    reads = {(e.source, e.target): e.weight for e in graph.edges if e.kind == "attention"}
    assert reads[("tok1", "L2H1")] == pytest.approx(1.4) and ("tok3", "L2H1") not in reads  # 0.05 < min_attention
    assert [(e.source, e.target) for e in graph.edges if e.kind == "path"] == [("L1H0", "L2H1")]


# ---- through run_probe, the CLI and the metrics, with a tokenizer --------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory, smollm2):
    """A tiny random Llama with SmolLM2's tokenizer, loadable by path."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         max_position_embeddings=128, initializer_range=0.2)
    path = tmp_path_factory.mktemp("attribution") / "tiny-llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    smollm2.tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def astore(tmp_path_factory):
    from cache.store import Store

    s = Store(tmp_path_factory.mktemp("astore") / "cache", size_limit=2**30)
    yield s
    s.close()


def test_probes_are_cached_and_read_back_as_metrics(folder, astore):
    import analytics
    from capture.api import run
    from core.types import RunSpec
    from probes.runner import run_probe

    result = run_probe("patching", folder, {}, store=astore)
    again = run_probe("patching", folder, {}, store=astore)
    assert again.key == result.key and result.array("patched").shape == (2, 4)
    assert result.record["differs"] == [9] and result.summary["direction"] == "denoise"
    where = {"store": astore, "revision": registry.revision(folder), "model": folder}
    effect = analytics.compute("patching", None, **where)
    expected = patching_effect(result.array("patched"), result.summary["clean"], result.summary["corrupted"])
    np.testing.assert_allclose(effect, expected, rtol=1e-6)
    cap = run(RunSpec(model=folder, prompt="When Mary and John went to the store, John gave a drink to"), store=astore)
    with pytest.raises(analytics.ProbeMissing, match="python -m headscope probe dla"):
        analytics.compute("dla", cap)
    dla = run_probe("dla", folder, {"capture": cap.key, "target": " Mary", "foil": " John"}, store=astore)
    assert dla.record["answer_position"] == cap.n_tokens - 1 and dla.summary["sum_error"] < 1e-4
    values = analytics.compute("dla", cap, target=" Mary", foil=" John")
    np.testing.assert_allclose(values, dla.array("heads")[:, :, -1])
    with pytest.raises(InputError, match="outside the capture"):
        analytics.compute("dla", cap, target=" Mary", foil=" John", position=cap.n_tokens)


@pytest.mark.parametrize("params, sentence", [
    ({"corrupted": "When Mary and John went to the store, John gave a drink"}, "the same number of tokens"),
    ({"target": " Maryanne"}, "not one"),
    ({"foil": ""}, "needs a foil"),
    ({"foil": " Mary"}, "same token"),
    ({"corrupted": "When Mary and John went to the store, John gave a drink to"}, "same tokens"),
    ({"metric": "rank"}, "metric logit_diff or prob"),
    ({"sender": [1]}, "two numbers"),
    ({"sender": [1, 3]}, "last layer"),
    ({"sender": [0, 9]}, "(layer, head) pair"),
])
def test_bad_input_is_one_sentence(folder, astore, params, sentence):
    from probes.runner import run_probe

    with pytest.raises(InputError) as info:
        run_probe("patching", folder, params, store=astore)
    message = str(info.value)
    assert sentence in message and message.count(". ") == 0 and message.endswith(".")


def test_engine_refuses_patches_that_do_not_fit():
    handle = tiny("llama-gqa")
    z, _ = head_outputs(handle, CLEAN, ANSWER)
    with pytest.raises(InterventionError, match="positions"):
        metric(handle, CLEAN[:-1], {0: (torch.ones(1, 4, dtype=torch.bool), z[0])})


def test_cli_runs_patching_and_dla(folder, astore, capsys, monkeypatch):
    from capture.api import run
    from core.types import RunSpec
    from headscope import cli

    monkeypatch.setattr("capture.api.default_store", lambda: astore)
    assert cli.main(["probe", "patching", "--model", folder, "--direction", "noise", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["summary"]["direction"] == "noise" and record["arrays"] == ["patched"]
    cap = run(RunSpec(model=folder, prompt="When Mary and John went to the store, John gave a drink to"), store=astore)
    assert cli.main(["probe", "dla", cap.key, "--target", " Mary"]) == 0
    assert "answer:" in capsys.readouterr().out
