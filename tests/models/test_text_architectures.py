"""Every transformers text architecture HeadScope serves (issue 20), on tiny random models built here.

For each of the 24 decoder and encoder architectures and the two encoder-decoders (T5, BART): the
captured maps equal transformers' eager `output_attentions` on every layer (prefill and generated
rows), greedy generation equals plain `generate`, `scale` 0 on a head equals zeroing its slice of the
output projection's input, and a `redistribute` edit keeps every row's mass.  GPT-OSS is held against
eager attention with its sink logit, and its stored sink share against the rows' missing mass; Falcon
with ALiBi against the model's own SDPA computation.  No hub: each model is saved with a word-level
tokenizer into a temporary folder and loaded by path (capture.registry).

Module-scoped: each architecture is built, captured and checked once; the whole matrix takes about a
minute on two cores.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as tf
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from capture import registry
from capture.api import run
from capture.engine.session import session
from core.interventions import HeadEdit, Intervention
from core.types import RunSpec

WORDS = "the quick brown fox jumps over lazy dog again and a cat sat on mat".split()
PROMPT = "the quick brown fox jumps over the lazy dog again and again the cat sat on the mat"
VOCAB = 96
NEW = 3  # generated tokens
ATOL = 2e-3  # maps are stored as float16
IDS = dict(vocab_size=VOCAB, pad_token_id=0, eos_token_id=1, bos_token_id=2)
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128, initializer_range=0.2, **IDS)
PARTIAL = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}


def _configs() -> dict[str, tuple[object, str]]:
    """name -> (config, kind) with kind "causal", "encoder" or "seq2seq"; shapes unlike each other."""
    gqa = dict(SMALL, num_key_value_heads=2)
    return {
        "llama": (tf.LlamaConfig(**gqa), "causal"),
        "qwen2": (tf.Qwen2Config(**gqa), "causal"),
        "qwen3": (tf.Qwen3Config(**gqa, head_dim=24), "causal"),
        "mistral": (tf.MistralConfig(**gqa, sliding_window=6), "causal"),  # a window shorter than the input
        "gemma3_text": (tf.Gemma3TextConfig(**gqa, head_dim=16, sliding_window=6,
                                            layer_types=["sliding_attention", "full_attention"]), "causal"),
        "gpt2": (tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2, **IDS), "causal"),
        "olmo2": (tf.Olmo2Config(**gqa), "causal"),
        "deepseek_v3": (tf.DeepseekV3Config(**dict(SMALL, num_key_value_heads=4), kv_lora_rank=16, q_lora_rank=24,
                                            qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4,
                                            num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=32,
                                            first_k_dense_replace=1), "causal"),  # MLA, MoE in layer 1
        "bert": (tf.BertConfig(**SMALL, type_vocab_size=1), "encoder"),
        "roberta": (tf.RobertaConfig(**dict(SMALL, max_position_embeddings=130)), "encoder"),
        "opt": (tf.OPTConfig(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=128, init_std=0.2, word_embed_proj_dim=64, **IDS), "causal"),
        "gptj": (tf.GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128, initializer_range=0.2,
                               **IDS), "causal"),
        "starcoder2": (tf.Starcoder2Config(**gqa), "causal"),
        "stablelm": (tf.StableLmConfig(**gqa, rope_parameters=dict(PARTIAL, partial_rotary_factor=0.25)), "causal"),
        "smollm3": (tf.SmolLM3Config(**gqa, no_rope_layers=[1, 0]), "causal"),  # NoPE in layer 1
        "granite": (tf.GraniteConfig(**gqa, attention_multiplier=0.2), "causal"),
        "mixtral": (tf.MixtralConfig(**gqa, num_local_experts=4, num_experts_per_tok=2), "causal"),
        "gpt_neox": (tf.GPTNeoXConfig(**dict(SMALL, rope_parameters=dict(PARTIAL, partial_rotary_factor=0.25))),
                     "causal"),  # Pythia: fused query_key_value, output `dense`
        "phi3": (tf.Phi3Config(**gqa), "causal"),  # fused qkv_proj
        "phi": (tf.PhiConfig(**dict(SMALL, rope_parameters=PARTIAL)), "causal"),  # output `dense`
        "falcon": (tf.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=True,
                                   num_kv_heads=2, initializer_range=0.2, max_position_embeddings=128, **IDS), "causal"),
        "gemma2": (tf.Gemma2Config(**gqa, head_dim=16, sliding_window=6, attn_logit_softcapping=5.0), "causal"),
        "gpt_oss": (tf.GptOssConfig(**gqa, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=6,
                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), "causal"),
        "bloom": (tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, initializer_range=0.2, **IDS), "causal"),
        "t5": (tf.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2, num_heads=4,
                           relative_attention_num_buckets=8, initializer_factor=2.0, pad_token_id=0, eos_token_id=1,
                           decoder_start_token_id=0), "seq2seq"),
        "bart": (tf.BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                               decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, init_std=0.2,
                               max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                               decoder_start_token_id=1, forced_eos_token_id=None), "seq2seq"),
    }


CONFIGS = _configs()
AUTO = {"causal": AutoModelForCausalLM, "encoder": AutoModel, "seq2seq": AutoModelForSeq2SeqLM}


def tiny_tokenizer():
    """A word-level tokenizer over WORDS padded to VOCAB entries (ids 0-3: <pad>, </s>, <s>, <unk>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<s>", "<unk>"] + WORDS
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """Every architecture saved once (random weights, seed 0) with the tiny tokenizer."""
    root = tmp_path_factory.mktemp("architectures")
    tokenizer = tiny_tokenizer()
    out = {}
    for name, (config, kind) in CONFIGS.items():
        torch.manual_seed(0)
        model = AUTO[kind].from_config(config)
        if name == "gpt_oss":  # learned sink logits that take a visible share (they start at zero)
            for layer in model.model.layers:
                layer.self_attn.sinks.data.normal_(0.0, 1.5)
        folder = root / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)  # (transformers gives Qwen2 its own tokenizer class: other ids, same test)
        assert json.loads((folder / "config.json").read_text())["architectures"]
        out[name] = str(folder)
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from cache.store import Store

    s = Store(tmp_path_factory.mktemp("cache"), size_limit=2**30)
    yield s
    s.close()


def fresh(folder: str, kind: str, implementation: str | None = None):
    """The plain transformers model of a folder, never touched by HeadScope."""
    extra = {} if implementation is None else {"attn_implementation": implementation}
    return AUTO[kind].from_pretrained(folder, dtype=torch.float32, **extra).eval()


def eager_maps(folder: str, kind: str, capture) -> list[np.ndarray]:
    """Eager `output_attentions` per layer, in HeadScope's order, as [head, query, key] over the capture's axis."""
    model = fresh(folder, kind, "eager")
    ids = capture.output.token_ids
    with torch.inference_mode():
        if kind != "seq2seq":
            t = torch.tensor([ids])
            out = model(input_ids=t, attention_mask=torch.ones_like(t), output_attentions=True)
            return [a[0].float().numpy() for a in out.attentions]
        n_enc = len(capture.spans["encoder"])
        enc, dec = torch.tensor([ids[:n_enc]]), torch.tensor([ids[n_enc:]])
        out = model(input_ids=enc, attention_mask=torch.ones_like(enc), decoder_input_ids=dec, output_attentions=True)
    n = len(ids)
    maps = []
    for attentions, rows, keys in ((out.encoder_attentions, slice(0, n_enc), slice(0, n_enc)),
                                   (out.decoder_attentions, slice(n_enc, n), slice(n_enc, n)),
                                   (out.cross_attentions, slice(n_enc, n), slice(0, n_enc))):
        for a in attentions:
            full = np.zeros((a.shape[1], n, n), dtype=np.float32)
            full[:, rows, keys] = a[0].float().numpy()
            maps.append(full)
    return maps


@pytest.fixture(scope="module")
def captures(folders, store) -> dict[str, object]:
    """One capture per architecture: the prompt plus NEW generated tokens (encoders: the prompt)."""
    return {name: run(RunSpec(model=folders[name], prompt=PROMPT, max_new_tokens=0 if kind == "encoder" else NEW),
                      store=store)
            for name, (_config, kind) in CONFIGS.items()}


NAMES = list(CONFIGS)
DIFFERENCES: dict[str, float] = {}


@pytest.mark.parametrize("name", NAMES)
def test_maps_equal_eager(name, folders, captures):
    kind = CONFIGS[name][1]
    capture = captures[name]
    if name == "falcon_alibi":
        pytest.skip("held against SDPA below")
    meta = capture.meta
    eager = eager_maps(folders[name], kind, capture)
    assert len(eager) == meta.n_layers
    assert meta.family == CONFIGS[name][0].model_type
    n = capture.n_tokens
    if kind == "causal":
        assert capture.layout == "tril" and n > len(capture.spans["prompt"])  # generated rows are in the maps
    worst = 0.0
    for layer, expected in enumerate(eager):
        got = capture.attention(layer).astype(np.float32)
        assert got.shape == expected.shape == (meta.n_heads, n, n), layer
        worst = max(worst, float(np.abs(got - expected).max()))
    DIFFERENCES[name] = worst
    print(f"{name}: max |capture - eager| = {worst:.2e} over {meta.n_layers} layers x {meta.n_heads} heads, {n} tokens")
    assert worst <= ATOL
    # guard: the maps are far from uniform, so a wrong scale, bias or mask would show
    first = eager[0][:, : len(capture.spans["prompt"]) - 1]
    assert np.abs(first - first.mean(-1, keepdims=True) * (first > 0)).max() > 0.05


@pytest.mark.parametrize("name", [n for n in NAMES if CONFIGS[n][1] != "encoder"])
def test_generation_equals_plain_generate(name, folders, captures):
    kind = CONFIGS[name][1]
    capture = captures[name]
    model = fresh(folders[name], kind)
    ids = capture.output.token_ids
    with torch.inference_mode():
        if kind == "seq2seq":
            n_enc = len(capture.spans["encoder"])
            enc = torch.tensor([ids[:n_enc]])
            plain = model.generate(input_ids=enc, attention_mask=torch.ones_like(enc), max_new_tokens=NEW,
                                   do_sample=False)[0].tolist()
            assert ids[n_enc:] == plain
        else:
            n_prompt = len(capture.spans["prompt"])
            t = torch.tensor([ids[:n_prompt]])
            plain = model.generate(input_ids=t, attention_mask=torch.ones_like(t), max_new_tokens=NEW, do_sample=False,
                                   pad_token_id=0)[0].tolist()
            assert ids == plain


def _output(handle, folder_kind: str, ids: list[int], n_enc: int | None = None) -> torch.Tensor:
    model = handle.model
    with torch.inference_mode():
        if folder_kind == "seq2seq":
            enc, dec = torch.tensor([ids[:n_enc]]), torch.tensor([ids[n_enc:]])
            out = model(input_ids=enc, attention_mask=torch.ones_like(enc), decoder_input_ids=dec)
        else:
            t = torch.tensor([ids])
            out = model(input_ids=t, attention_mask=torch.ones_like(t))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state)[0].float()


@pytest.mark.parametrize("name", NAMES)
def test_scale_zero_equals_zeroing_the_head_slice(name, folders, captures):
    """scale 0 on one head equals zeroing that head's slice of its output projection's input, found by
    hand from the module tree (the last layer: for encoder-decoders a cross-attention layer)."""
    kind = CONFIGS[name][1]
    capture = captures[name]
    handle = registry.load(folders[name])
    layer, head = handle.meta.n_layers - 1, 1
    ids = capture.output.token_ids
    n_enc = len(capture.spans["encoder"]) if kind == "seq2seq" else None
    spans = dict(capture.spans)
    base = _output(handle, kind, ids, n_enc)
    with session(Intervention(edits=(HeadEdit(layer=layer, head=head, op="scale", value=0.0),)), spans=spans):
        edited = _output(handle, kind, ids, n_enc)
    projection = _out_projection(handle.model, name)
    width = projection.in_features if hasattr(projection, "in_features") else projection.weight.shape[0]
    d = width // handle.meta.n_heads

    def zero_head(_module, args):
        z = args[0].clone()  # [batch, query, head * head_dim]
        z[..., head * d : (head + 1) * d] = 0
        return (z, *args[1:])

    hook = projection.register_forward_pre_hook(zero_head)
    try:
        by_hand = _output(handle, kind, ids, n_enc)
    finally:
        hook.remove()
    assert (edited - base).abs().max() > 1e-4
    torch.testing.assert_close(edited, by_hand, atol=1e-5, rtol=0)


def _out_projection(model, name: str):
    """The last layer's output projection, by each family's own module names (not HeadScope's search)."""
    if name == "t5":
        return model.decoder.block[-1].layer[1].EncDecAttention.o
    if name == "bart":
        return model.model.decoder.layers[-1].encoder_attn.out_proj
    if name in ("gpt2",):
        return model.transformer.h[-1].attn.c_proj
    if name == "gptj":
        return model.transformer.h[-1].attn.out_proj
    if name in ("bloom", "falcon"):
        return model.transformer.h[-1].self_attention.dense
    if name == "gpt_neox":
        return model.gpt_neox.layers[-1].attention.dense
    if name == "phi":
        return model.model.layers[-1].self_attn.dense
    if name in ("bert", "roberta"):
        return model.encoder.layer[-1].attention.output.dense
    if name == "opt":
        return model.model.decoder.layers[-1].self_attn.out_proj
    return model.model.layers[-1].self_attn.o_proj


@pytest.mark.parametrize("name", NAMES)
def test_redistribute_keeps_row_mass(name, folders, store, captures):
    """Moving half the mass of keys 0:2 elsewhere on every head of every layer: each row keeps its mass
    (1, or 1 - the sink share for GPT-OSS), and the edit changed the maps."""
    capture = captures[name]
    meta = capture.meta
    edits = tuple(HeadEdit(layer=layer, head=h, op="redistribute", value=0.5, keys="0:2")
                  for layer in range(meta.n_layers) for h in range(meta.n_heads))
    kind = CONFIGS[name][1]
    edited = run(RunSpec(model=folders[name], prompt=PROMPT, max_new_tokens=0 if kind == "encoder" else NEW,
                         intervention=Intervention(edits=edits)), store=store)
    moved = 0.0
    for layer in range(meta.n_layers):
        maps = edited.attention(layer).astype(np.float32)  # [head, query, key]
        mass = maps.sum(-1)
        share = edited.sink_share(layer)
        expected = np.ones_like(mass) if share is None else 1 - share
        if meta.groups:  # rows outside the layer's block are zero
            start, stop = (0, len(capture.spans["encoder"])) if meta.group_of(layer) == "encoder" else \
                (len(capture.spans["encoder"]), capture.n_tokens)
            expected[:, :start] = 0
            expected[:, stop:] = 0
        np.testing.assert_allclose(mass, expected, atol=3e-3, err_msg=f"layer {layer}")
        n = min(edited.n_tokens, capture.n_tokens)
        moved = max(moved, float(np.abs(maps[:, :n, :n] - capture.attention(layer).astype(np.float32)[:, :n, :n]).max()))
    assert moved > 0.01


def test_gpt_oss_sink_share(folders, captures):
    """GPT-OSS: the maps are softmax(scores, sink)'s real keys (eager attention with the sink logit: the
    matrix above), and Capture.sink_share holds the sink's share, computed here independently."""
    capture = captures["gpt_oss"]
    model = fresh(folders["gpt_oss"], "causal", "eager")
    ids = torch.tensor([capture.output.token_ids])
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True)
    for layer, attentions in enumerate(out.attentions):
        share = capture.sink_share(layer)
        assert share.shape == (capture.meta.n_heads, capture.n_tokens)
        np.testing.assert_allclose(share, 1 - attentions[0].float().sum(-1).numpy(), atol=1e-5)
        assert share.max() > 0.05  # the sinks take a visible share
    assert captures["llama"].sink_share(0) is None


def test_meta_groups_of_encoder_decoders(captures):
    for name in ("t5", "bart"):
        capture = captures[name]
        meta = capture.meta
        assert meta.groups == {"encoder": (0, 2), "decoder": (2, 4), "cross": (4, 6)}
        assert (meta.n_layers, meta.causal, capture.layout) == (6, False, "full")
        n_enc = len(capture.spans["encoder"])
        assert capture.spans["decoder"] == range(n_enc, capture.n_tokens)
        assert capture.spans["prompt"] == range(0, n_enc + 1)
        assert capture.spans["response"].stop == capture.n_tokens
        assert "groups" in capture.record()["meta"]
    assert "groups" not in captures["llama"].record()["meta"]


def test_falcon_alibi_equals_the_models_own_computation(tmp_path, store):
    """Falcon with ALiBi (falcon-rw): the maps equal softmax(q kᵀ / sqrt(d) + alibi / sqrt(d), causal), computed
    here from the plain SDPA model's own query_key_value outputs, and the recorded pass's output is the
    SDPA model's.  (transformers' eager branch adds ALiBi twice for this family, so it is not the reference:
    capture.text.families.falcon.)"""
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor

    config = tf.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True, multi_query=False,
                             parallel_attn=False, bias=True, initializer_range=0.2, max_position_embeddings=128, **IDS)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    capture = run(RunSpec(model=str(tmp_path), prompt=PROMPT, max_new_tokens=NEW), store=store)
    model = fresh(str(tmp_path), "causal")
    assert model.config._attn_implementation == "sdpa"
    fused = []
    hooks = [block.self_attention.query_key_value.register_forward_hook(lambda _m, _a, out: fused.append(out[0]))
             for block in model.transformer.h]
    ids = torch.tensor([capture.output.token_ids])
    n, heads, d = ids.shape[1], 4, 16
    try:
        with torch.inference_mode():
            plain = model(input_ids=ids).logits
    finally:
        for hook in hooks:
            hook.remove()
    alibi = build_alibi_tensor(torch.ones(1, n, dtype=torch.long), heads, torch.float32).view(heads, 1, n)
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    for layer, qkv in enumerate(fused):
        qkv = qkv.view(n, heads, 3, d)
        q, k = qkv[:, :, 0].transpose(0, 1), qkv[:, :, 1].transpose(0, 1)  # [head, n, d]
        scores = (q @ k.transpose(1, 2) + alibi) / d**0.5
        expected = torch.softmax(scores.masked_fill(future, float("-inf")), -1).numpy()
        np.testing.assert_allclose(capture.attention(layer).astype(np.float32), expected, atol=ATOL, rtol=0)
    handle = registry.load(str(tmp_path))
    with torch.inference_mode(), session(Intervention(), recorder=_Discard()):
        recorded = handle.model(input_ids=ids).logits
    torch.testing.assert_close(recorded, plain, atol=1e-4, rtol=0)


class _Discard:
    """A recorder that keeps nothing: makes every layer take HeadScope's explicit path."""

    def take(self, *args) -> None:
        pass

    def sink_share(self, *args) -> None:
        pass


def test_sink_logit_share_metric(captures):
    """analytics' sink_logit_share reads the stored shares (torch-free): the mean share per head; 0 without sinks."""
    from analytics import METRICS, compute

    assert METRICS["sink_logit_share"].kind == "head"
    capture = captures["gpt_oss"]
    scores = compute("sink_logit_share", capture)
    assert scores.shape == (capture.meta.n_layers, capture.meta.n_heads)
    np.testing.assert_allclose(scores[1], capture.sink_share(1).mean(-1), rtol=1e-6)
    assert scores.min() > 0
    assert not compute("sink_logit_share", captures["llama"]).any()
