"""The six intervention primitives, per-row interventions and the presets, run through real models.

Every property is checked on a tiny random Llama (GQA: 4 query heads over 2 KV heads, built here)
and on the embedded SmolLM2 (30 layers x 9 heads over 3 KV heads).  Maps are taken in fp32 straight
from the attention function (a test recorder), so mass and row sums are checked to float precision.
"""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from capture.engine import attention
from capture.engine.edits import sink_mask
from capture.engine.session import session
from capture.text import presets
from core.errors import InterventionError
from core.interventions import HeadEdit, Intervention, ablate_heads, kv_group_edits, uniform_ablation

PROMPT = ("The lighthouse on the northern point was built in the last years of the old century, when the "
          "harbour still sent fishing boats out before dawn and brought them back after dark. Its keepers "
          "kept a log of every night: the state of the sea and the colour of the sky at sunset.")


# ---- models ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    from capture.engine import handle

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    model = LlamaForCausalLM(config)
    return handle.prepare("tiny-llama", model, None)


@pytest.fixture(params=["tiny", "smollm2"])
def handle(request):
    return request.getfixturevalue(request.param)


def prompt_ids(handle, n: int = 48) -> torch.Tensor:
    """ids  # [1, n]: SmolLM2 reads the English prompt, the tiny model a fixed random sequence."""
    if handle.tokenizer is None:
        return torch.randint(1, 128, (1, n), generator=torch.Generator().manual_seed(1))
    return torch.tensor([handle.tokenizer(PROMPT)["input_ids"][:n]])


def layer_and_head(handle) -> tuple[int, int]:
    return (1, 2) if handle.tokenizer is None else (5, 4)


class FullRecorder:
    """Keeps every layer's maps of batch row 0 as fp32 [head, query, key] (a test stand-in for Recorder)."""

    def __init__(self):
        self.maps: dict[int, np.ndarray] = {}

    def take(self, layer, first_head, first_row, n, weights):
        if layer not in self.maps:
            self.maps[layer] = np.zeros((weights.shape[0], n, n), dtype=np.float32)
        n_rows, k_end = weights.shape[1], weights.shape[2]
        self.maps[layer][first_head:first_head + weights.shape[0], first_row:first_row + n_rows, :k_end] = \
            weights.float().numpy()


def forward(handle, ids, intervention=Intervention(), record=False, **kwargs):
    """(logits, maps or None, session) of one full forward under `intervention`."""
    recorder = FullRecorder() if record else None
    n = ids.shape[1]
    spans = {"prompt": range(n), "response": range(n, n)}
    with session(intervention, recorder=recorder, spans=spans, **kwargs) as active, torch.inference_mode():
        logits = handle.model(input_ids=ids, use_cache=False).logits
    return logits, (recorder.maps if record else None), active


def generate(handle, ids, intervention=Intervention(), n_new=8):
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=n_new, do_sample=False, pad_token_id=0, eos_token_id=None)
    n = ids.shape[1]
    spans = {"prompt": range(n), "response": range(n, n + n_new)}
    with session(intervention, spans=spans) as active, torch.inference_mode():
        out = handle.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, n:].tolist(), active


# ---- output-level ops: scale and add ----------------------------------------------------------------

def _manual_hook(handle, layer, head, fn):
    """Register a plain o_proj pre-hook that edits one head's slice of the o_proj input with fn."""
    d = handle.meta.head_dim
    o_proj = handle.attention_modules[layer].o_proj

    def hook(_module, args):
        z = args[0].clone()
        z[..., head * d:(head + 1) * d] = fn(z[..., head * d:(head + 1) * d])
        return (z, *args[1:])

    return o_proj.register_forward_pre_hook(hook, prepend=True)


def test_scale_zero_equals_zeroing_the_o_proj_input_slice(handle):
    ids = prompt_ids(handle)
    layer, head = layer_and_head(handle)
    edited, _, _ = forward(handle, ids, ablate_heads([(layer, head)]))
    remove = _manual_hook(handle, layer, head, torch.zeros_like)
    try:
        with torch.inference_mode():
            manual = handle.model(input_ids=ids, use_cache=False).logits
    finally:
        remove.remove()
    plain, _, _ = forward(handle, ids)
    assert torch.equal(edited, manual)
    assert not torch.equal(edited, plain)


def test_add_direction_equals_adding_to_the_o_proj_input_slice(handle):
    ids = prompt_ids(handle)
    layer, head = layer_and_head(handle)
    d = handle.meta.head_dim
    direction = tuple(float(x) for x in torch.linspace(-1, 1, d))
    iv = Intervention((HeadEdit(layer, head, "add", 2.5, direction=direction),))
    edited, _, _ = forward(handle, ids, iv)
    delta = 2.5 * torch.tensor(direction)
    remove = _manual_hook(handle, layer, head, lambda z: z + delta)
    try:
        with torch.inference_mode():
            manual = handle.model(input_ids=ids, use_cache=False).logits
    finally:
        remove.remove()
    assert torch.allclose(edited, manual, atol=1e-6, rtol=0)


def test_output_edits_keep_the_sdpa_fast_path(handle, monkeypatch):
    def explicit(*_a, **_k):
        raise AssertionError("the explicit attention path ran")

    monkeypatch.setattr(attention, "AttentionCall", explicit)
    layer, head = layer_and_head(handle)
    iv = Intervention((HeadEdit(layer, head, "scale", 0.0),
                       HeadEdit(layer, head + 1, "add", 1.0, direction=(0.1,) * handle.meta.head_dim,
                                queries="last")))
    forward(handle, prompt_ids(handle), iv)
    generate(handle, prompt_ids(handle), iv, n_new=3)


# ---- attention-level ops -----------------------------------------------------------------------------

_BASELINE: dict[tuple[int, int], dict] = {}  # id(handle), tokens -> recorded baseline maps (computed once)


def baseline_maps(handle, ids) -> dict:
    key = (id(handle), ids.shape[1])
    if key not in _BASELINE:
        _BASELINE[key] = forward(handle, ids, record=True)[1]
    return _BASELINE[key]


def _edited_map(handle, edit_kwargs, ids=None):
    ids = prompt_ids(handle) if ids is None else ids
    layer, head = layer_and_head(handle)
    iv = Intervention((HeadEdit(layer, head, **edit_kwargs),))
    base = baseline_maps(handle, ids)
    _, after, active = forward(handle, ids, iv, record=True)
    return base[layer], after[layer], head, active


def test_redistribute_keeps_rows_stochastic_and_moves_exactly_the_asked_mass(handle):
    beta = 0.3
    base, after, head, _ = _edited_map(handle, dict(op="redistribute", value=beta, keys="1:4"))
    a0, a1 = base[head].astype(np.float64), after[head].astype(np.float64)
    np.testing.assert_allclose(a1.sum(-1), 1.0, atol=1e-5)
    taken = np.zeros(a0.shape[1], bool)
    taken[1:4] = True
    rows = np.arange(4, a0.shape[0])  # rows that see both the set and other keys
    m0, m1 = a0[rows][:, taken].sum(-1), a1[rows][:, taken].sum(-1)
    np.testing.assert_allclose(m1, beta * m0, rtol=1e-4, atol=1e-7)
    # the freed mass goes to the other visible keys in proportion: their ratios are unchanged
    others = ~taken
    for i in rows[::7]:
        visible = others[: i + 1]
        ratio = a1[i, : i + 1][visible] / a0[i, : i + 1][visible]
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)
        np.testing.assert_allclose(a1[i, : i + 1][visible].sum(), a0[i, : i + 1][visible].sum() + (1 - beta) * m0[i - 4],
                                   rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(a1[0], a0[0])  # row 0 sees only key 0 (not in the set): nothing to move


def test_mix_toward_identity_with_u_1_gives_the_identity_map(handle):
    _, after, head, _ = _edited_map(handle, dict(op="mix", value=1.0, keys="all"))
    np.testing.assert_array_equal(after[head], np.eye(after.shape[1], dtype=np.float32))


def test_mix_toward_uniform_with_u_1_gives_uniform_rows_over_visible_keys(handle):
    _, after, head, _ = _edited_map(handle, dict(op="mix", value=1.0, keys="uniform"))
    n = after.shape[1]
    expected = np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]
    np.testing.assert_allclose(after[head], expected, atol=1e-7)


def test_window_gives_zero_weight_outside_sinks_and_the_recent_window(handle):
    w, sinks = 5, 2
    _, after, head, _ = _edited_map(handle, dict(op="window", value=w, keys=f"0:{sinks}"))
    a = after[head]
    n = a.shape[0]
    i, j = np.indices((n, n))
    allowed = (j <= i) & ((j < sinks) | (i - j < w))
    assert np.all(a[~allowed] == 0)
    assert np.all(a[allowed] > 0)
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)


def test_window_with_a_mean_token_spreads_its_mass_evenly_over_the_dropped_keys(handle):
    w, sinks = 5, 2
    _, after, head, _ = _edited_map(handle, dict(op="window", value=w, keys=f"0:{sinks}", mode="mean"))
    a = after[head].astype(np.float64)
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)
    for i in range(sinks + w + 1, a.shape[0], 5):
        dropped = a[i, sinks: i - w + 1]
        assert dropped.min() > 0
        np.testing.assert_allclose(dropped, dropped[0], rtol=1e-5)


def test_window_on_sinks_keeps_the_detected_sinks(smollm2):
    _, after, head, active = _edited_map(smollm2, dict(op="window", value=4, keys="sinks"))
    layer, _ = layer_and_head(smollm2)
    scores = active.sink_scores[layer][0, head]
    keep = sink_mask(scores, 0.1, include_first=False).numpy()
    a = after[head]
    n = a.shape[0]
    i, j = np.indices((n, n))
    allowed = (j <= i) & (keep[j] | (i - j < 4))
    assert np.all(a[~allowed] == 0)
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)


def test_logit_minus_inf_on_a_key_set_gives_those_keys_zero_weight(handle):
    _, after, head, _ = _edited_map(handle, dict(op="logit", value=-math.inf, keys="2:6"))
    a = after[head]
    assert np.all(a[:, 2:6] == 0)
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)
    # a row that would see no key at all keeps its unedited scores (row 0 sees only key 0)
    _, after0, _, _ = _edited_map(handle, dict(op="logit", value=-math.inf, keys="0:1"))
    assert after0[head][0, 0] == 1.0 and np.all(after0[head][1:, 0] == 0)


def test_logit_bias_matches_a_shifted_softmax(handle):
    base, after, head, _ = _edited_map(handle, dict(op="logit", value=1.5, keys="0:3", queries="10:"))
    a0, a1 = base[head].astype(np.float64), after[head].astype(np.float64)
    np.testing.assert_array_equal(a1[:10], a0[:10])
    expected = a0.copy()
    expected[10:, :3] *= math.exp(1.5)
    expected[10:] /= expected[10:].sum(-1, keepdims=True)
    np.testing.assert_allclose(a1, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("edit", [
    dict(op="mix", value=1.0, keys="uniform"),
    dict(op="window", value=3, keys="0:1"),
    dict(op="redistribute", value=0.0, keys="0:2"),
])
def test_an_edit_on_one_head_leaves_every_other_head_equal(handle, edit):
    layer, head = layer_and_head(handle)
    base, after, head, _ = _edited_map(handle, edit)
    others = [h for h in range(handle.meta.n_heads) if h != head]
    np.testing.assert_array_equal(after[others], base[others])
    assert not np.array_equal(after[head], base[head])


def test_queries_restrict_an_edit_to_those_rows(handle):
    base, after, head, _ = _edited_map(handle, dict(op="mix", value=1.0, keys="uniform", queries="20:30"))
    np.testing.assert_array_equal(after[head][:20], base[head][:20])
    np.testing.assert_array_equal(after[head][30:], base[head][30:])
    np.testing.assert_allclose(after[head][25, :26], 1 / 26, atol=1e-7)


def test_edits_compose_in_the_documented_order(handle):
    """mix listed first still acts after redistribute: uniform (u=1) wins whatever came before it."""
    layer, head = layer_and_head(handle)
    ids = prompt_ids(handle)
    iv = Intervention((HeadEdit(layer, head, "mix", 1.0, keys="uniform"),
                       HeadEdit(layer, head, "redistribute", 0.0, keys="0:2")))
    _, maps, _ = forward(handle, ids, iv, record=True)
    n = ids.shape[1]
    np.testing.assert_allclose(maps[layer][head], np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None], atol=1e-7)


def test_kv_group_edits_cover_the_whole_group(handle):
    meta = handle.meta
    layer, _ = layer_and_head(handle)
    edits = kv_group_edits(layer, 1, meta.group_size, "mix", 1.0, keys="uniform")
    assert [e.head for e in edits] == list(range(meta.group_size, 2 * meta.group_size))
    base = baseline_maps(handle, prompt_ids(handle))
    _, after, _ = forward(handle, prompt_ids(handle), Intervention(edits), record=True)
    group = set(range(meta.group_size, 2 * meta.group_size))
    for h in range(meta.n_heads):
        same = np.array_equal(after[layer][h], base[layer][h])
        assert same == (h not in group)


# ---- baseline, determinism, generation -------------------------------------------------------------

def test_the_empty_intervention_reproduces_the_baseline_bit_for_bit(handle):
    ids = prompt_ids(handle)
    with torch.inference_mode():
        plain = handle.model(input_ids=ids, use_cache=False).logits
    empty, _, _ = forward(handle, ids, Intervention())
    assert torch.equal(plain, empty)
    _, maps_a, _ = forward(handle, ids, record=True)
    _, maps_b, _ = forward(handle, ids, Intervention(), record=True,
                           row_interventions=[Intervention()])
    for layer in maps_a:
        np.testing.assert_array_equal(maps_a[layer], maps_b[layer])
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        direct = handle.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    tokens, _ = generate(handle, ids, Intervention(), n_new=6)
    assert tokens == direct[0, ids.shape[1]:].tolist()


def _mixed(handle) -> Intervention:
    layer, head = layer_and_head(handle)
    d = handle.meta.head_dim
    return Intervention((
        HeadEdit(layer, head, "redistribute", 0.4, keys="sinks"),
        HeadEdit(layer, head + 1, "window", 6, keys="0:2", mode="mean"),
        HeadEdit(layer - 1, 0, "mix", 0.5, keys="uniform"),
        HeadEdit(layer - 1, 1, "logit", -1.0, keys="span:prompt", queries="span:response"),
        HeadEdit(layer, 0, "add", 2.0, direction=(0.3,) * d, queries="last"),
        HeadEdit(layer, 1, "scale", 0.5),
    ))


def test_the_same_intervention_twice_gives_the_same_tokens(handle):
    ids = prompt_ids(handle)
    first, _ = generate(handle, ids, _mixed(handle))
    second, _ = generate(handle, ids, _mixed(handle))
    assert first == second


def test_generation_with_the_kv_cache_agrees_with_one_full_pass(handle):
    """Decode steps reuse the prefill's sinks: the full (recorded-style) pass, handed the same sink
    scores or recomputing them from the prompt rows, predicts every generated token."""
    from capture.text.logprobs import continuation_logprobs

    ids = prompt_ids(handle)
    iv = _mixed(handle)
    tokens, active = generate(handle, ids, iv, n_new=8)
    assert active.sink_scores  # detected once, on the prefill
    full = ids[0].tolist() + tokens
    scored = continuation_logprobs(handle, full, ids.shape[1], iv)
    assert scored.top_ids.tolist() == tokens
    n = len(full)
    spans = {"prompt": range(ids.shape[1]), "response": range(ids.shape[1], n)}
    with session(iv, spans=spans) as fresh, torch.inference_mode():
        handle.model(input_ids=torch.tensor([full]), use_cache=False)
    for layer, scores in active.sink_scores.items():
        assert torch.allclose(fresh.sink_scores[layer], scores, atol=1e-6)


def test_run_hands_the_generation_sinks_to_the_recorded_pass(smollm2, store):
    from capture.api import run
    from core.types import RunSpec

    iv = presets.act(smollm2.meta, [(5, 4), (6, 1)])
    capture = run(RunSpec(model="smollm2", prompt=PROMPT, max_new_tokens=4, intervention=iv), store=store)
    assert len(capture.output.steps) == 4
    assert capture.spec.intervention.key() == iv.key()


# ---- per-row interventions ---------------------------------------------------------------------------

def test_per_row_interventions_in_a_batch_equal_running_each_row_alone(handle):
    ids = prompt_ids(handle, 32)
    layer, head = layer_and_head(handle)
    rows = [_mixed(handle), uniform_ablation([(layer, head)]), Intervention(), ablate_heads([(layer, 0)])]
    batch = ids.expand(len(rows), -1)
    together, _, _ = forward(handle, batch, row_interventions=rows)
    for b, iv in enumerate(rows):
        alone, _, _ = forward(handle, ids, iv)
        torch.testing.assert_close(together[b], alone[0], atol=2e-4, rtol=1e-4)


def test_row_interventions_stack_on_the_shared_one_and_check_the_batch(handle):
    ids = prompt_ids(handle, 24)
    layer, head = layer_and_head(handle)
    shared = ablate_heads([(layer, 0)])
    extra = uniform_ablation([(layer, head)])
    together, _, _ = forward(handle, ids.expand(2, -1), shared, row_interventions=[extra, Intervention()])
    alone, _, _ = forward(handle, ids, shared + extra)
    torch.testing.assert_close(together[0], alone[0], atol=2e-4, rtol=1e-4)
    with pytest.raises(InterventionError, match="one per batch row"):
        forward(handle, ids.expand(3, -1), row_interventions=[extra, Intervention()])


def test_batched_uniform_ablation_sweep(handle):
    """The analytics use: one forward per B single-head uniform ablations."""
    ids = prompt_ids(handle, 24)
    heads = [(0, h) for h in range(handle.meta.n_heads)]
    sweep = [uniform_ablation([lh]) for lh in heads]
    together, _, _ = forward(handle, ids.expand(len(sweep), -1), row_interventions=sweep)
    alone, _, _ = forward(handle, ids, sweep[-1])
    torch.testing.assert_close(together[-1], alone[0], atol=2e-4, rtol=1e-4)


# ---- presets -----------------------------------------------------------------------------------------

def test_act_lowers_the_mass_on_the_hidden_sinks_of_the_chosen_heads(smollm2):
    ids = prompt_ids(smollm2)
    chosen = [(l, h) for l in (2, 3, 8, 12) for h in range(smollm2.meta.n_heads)]
    iv = presets.act(smollm2.meta, chosen)
    assert iv.preset == "act" and {e.keys for e in iv.edits} == {"sinks"} and {e.value for e in iv.edits} == {0.4}
    base = baseline_maps(smollm2, ids)
    _, after, active = forward(smollm2, ids, iv, record=True)
    with_sinks = 0
    for layer, head in chosen:
        hidden = sink_mask(active.sink_scores[layer][0, head], 0.1, include_first=False).numpy()
        if not hidden.any():
            continue
        with_sinks += 1
        before = base[layer][head][:, hidden].sum()
        now = after[layer][head][:, hidden].sum()
        assert now < before, (layer, head)
        if layer == 2:  # the first edited layer sees unchanged inputs: exactly beta of the mass stays
            assert now == pytest.approx(0.4 * before, rel=1e-3)
    assert with_sinks >= 3


def test_every_preset_builds_and_runs(handle):
    from probes.steering import SteeringDirections

    meta = handle.meta
    rng = np.random.default_rng(0)
    theta = rng.normal(size=(meta.n_layers, meta.n_heads, meta.head_dim)).astype(np.float32)
    data = {
        "scores": rng.random((meta.n_layers, meta.n_heads)),
        "gates": rng.random((meta.n_layers, meta.n_kv_heads)),
        "directions": SteeringDirections(theta / np.linalg.norm(theta, axis=-1, keepdims=True),
                                         np.ones((meta.n_layers, meta.n_heads)),
                                         rng.random((meta.n_layers, meta.n_heads)), 2, 2),
    }
    heads = [layer_and_head(handle), (0, 1)]
    ids = prompt_ids(handle, 40)
    for name, preset in presets.PRESETS.items():
        extra = {k: data[k] for k in preset.needs}
        chosen = None if preset.needs or name in ("act", "var") else heads
        iv = presets.build(name, meta, chosen, **preset.defaults(), **extra)
        assert iv.preset == name and iv.edits, name
        iv.validate(meta.n_layers, meta.n_heads, meta.head_dim)
        assert Intervention.from_json(json.loads(json.dumps(iv.to_json()))) == iv
        tokens, _ = generate(handle, ids, iv, n_new=2)
        assert len(tokens) == 2
        assert preset.description and preset.title


def test_retrieval_mask_picks_top_k_or_seeded_random_non_retrieval_heads(smollm2):
    meta = smollm2.meta
    scores = np.zeros((meta.n_layers, meta.n_heads))
    scores[3, 1], scores[7, 2], scores[9, 0] = 0.9, 0.5, 0.3
    top = presets.retrieval_mask(meta, scores=scores, k=2)
    assert top.heads() == [(3, 1), (7, 2)]
    assert all(e.op == "mix" and e.keys == "uniform" and e.value == 1.0 for e in top.edits)
    rand_a = presets.retrieval_mask(meta, scores=scores, k=5, random=True, seed=3)
    rand_b = presets.retrieval_mask(meta, scores=scores, k=5, random=True, seed=3)
    assert rand_a == rand_b and len(rand_a.heads()) == 5
    assert not {(3, 1), (7, 2), (9, 0)} & set(rand_a.heads())
    assert presets.retrieval_mask(meta, scores=scores, k=5, random=True, seed=4) != rand_a


def test_duo_streaming_masks_whole_kv_groups(handle):
    meta = handle.meta
    layer, head = layer_and_head(handle)
    iv = presets.duo_streaming(meta, [(layer, head)], sink=2, recent=4)
    kv = head // meta.group_size
    assert iv.heads() == [(layer, kv * meta.group_size + g) for g in range(meta.group_size)]
    gates = np.ones((meta.n_layers, meta.n_kv_heads))
    gates[0, 0] = 0.1
    assert presets.duo_streaming(meta, gates=gates).heads() == [(0, g) for g in range(meta.group_size)]


def test_steering_directions_and_iti(smollm2):
    from probes.steering import steering_directions

    meta = smollm2.meta
    dirs = steering_directions(smollm2, ["I love this, it is wonderful.", "What a great and happy day."],
                               ["I hate this, it is awful.", "What a terrible and sad day."])
    assert dirs.directions.shape == (meta.n_layers, meta.n_heads, meta.head_dim)
    np.testing.assert_allclose(np.linalg.norm(dirs.directions, axis=-1), 1.0, atol=1e-5)
    iv = presets.iti(meta, directions=dirs, k=10, alpha=15.0)
    assert len(iv.edits) == 10 and all(e.queries == "last" and e.op == "add" for e in iv.edits)
    ids = prompt_ids(smollm2, 16)
    plain, _, _ = forward(smollm2, ids)
    steered, _, _ = forward(smollm2, ids, iv)
    assert torch.equal(plain[0, :-1], steered[0, :-1])  # only the last position is shifted
    assert not torch.equal(plain[0, -1], steered[0, -1])


# ---- data: keys, JSON, validation -------------------------------------------------------------------

def test_keys_of_plain_edits_are_unchanged_and_new_fields_round_trip():
    iv = Intervention((HeadEdit(3, 2, "scale", 0.0),), preset="prune")
    old_format = {"preset": "prune", "edits": [{"layer": 3, "head": 2, "op": "scale", "value": 0.0,
                                                "keys": "all", "queries": "all"}]}
    blob = json.dumps(old_format, sort_keys=True, separators=(",", ":"))
    assert iv.key() == hashlib.sha256(blob.encode()).hexdigest()[:16]
    rich = Intervention((HeadEdit(1, 0, "add", 2.0, direction=np.array([0.5, -0.25], dtype=np.float32)),
                         HeadEdit(1, 1, "window", 8, keys="0:4", mode="mean"),
                         HeadEdit(2, 0, "logit", -math.inf, keys="sinks:0.2")))
    back = Intervention.from_json(json.loads(json.dumps(rich.to_json())))
    assert back == rich and back.key() == rich.key()
    assert HeadEdit(0, 0, "scale", 0) == HeadEdit(0, 0, "scale", 0.0)


@pytest.mark.parametrize("kwargs", [
    dict(op="add", value=1.0),  # no direction
    dict(op="scale", value=1.0, direction=(1.0,)),
    dict(op="window", value=4, keys="all"),
    dict(op="window", value=0, keys="0:4"),
    dict(op="mix", value=1.5),
    dict(op="redistribute", value=0.5, keys="all"),
    dict(op="logit", value=1.0, keys="0:2", queries="sinks"),
    dict(op="window", value=4, keys="0:4", mode="max"),
])
def test_malformed_edits_are_refused(kwargs):
    with pytest.raises(InterventionError):
        HeadEdit(0, 0, **kwargs)


def test_a_direction_of_the_wrong_length_is_refused(handle):
    iv = Intervention((HeadEdit(0, 0, "add", 1.0, direction=(1.0, 2.0)),))
    with pytest.raises(InterventionError, match="dimensions"):
        iv.validate(handle.meta.n_layers, handle.meta.n_heads, handle.meta.head_dim)
    with pytest.raises(InterventionError):
        forward(handle, prompt_ids(handle, 8), iv)


# ---- retrieval-head masking on the needle harness ----------------------------------------------------

def test_masking_the_top_retrieval_heads_hurts_the_needle_answer_more_than_random_heads(smollm2):
    """Wu et al.'s masking (uniform attention, u = 1) on the top-10 retrieval heads vs 10 random
    non-retrieval heads (METHODS §1.1), on the needle harness of probes.needle (needle_prompt, the
    copy score of analytics.retrieval).  SmolLM2-135M rarely reaches ROUGE-1 > 0.5 on these needles,
    so no test would count: the copy score is taken on the teacher-forced true answer instead of a
    generated one, and the effect is measured as the teacher-forced log-prob of that answer."""
    probes = pytest.importorskip("probes.needle")
    from analytics import retrieval
    from capture.text.logprobs import continuation_logprobs

    meta, tok = smollm2.meta, smollm2.tokenizer
    needles = probes.load_needles()
    tests, per_test = [], []
    for which, depth in [(0, 30.0), (1, 60.0), (2, 50.0)]:
        ids, span = probes.needle_prompt(tok, needles[which], 200, depth, True)
        answer = tok(" " + needles[which]["answer"], add_special_tokens=False)["input_ids"]
        full = ids + answer
        top1 = np.zeros((meta.n_layers, meta.n_heads, len(answer)), np.int32)

        def on_layer(layer, rows, top1=top1, span=span):
            top1[layer] = retrieval.step_reductions(rows, span)[0]

        probes.decode_step_rows(smollm2, full, len(ids), len(answer), on_layer)
        per_test.append(retrieval.copy_score(top1, answer, full, span))
        tests.append((full, len(ids)))
    scores = np.mean(per_test, axis=0)  # [layer, head]
    assert (scores > retrieval.RETRIEVAL_THRESHOLD).sum() >= 3

    def answer_logprob(iv):
        return float(np.mean([continuation_logprobs(smollm2, full, n, iv).logprobs.sum() for full, n in tests]))

    top = answer_logprob(presets.retrieval_mask(meta, scores=scores, k=10))
    randoms = [answer_logprob(presets.retrieval_mask(meta, scores=scores, k=10, random=True, seed=s)) for s in (0, 1)]
    assert top < min(randoms) - 5.0, (top, randoms)


def test_remembered_interventions_are_recalled_by_key_and_nothing_else(tmp_path):
    from cache.interventions import recall, remember

    iv = Intervention((HeadEdit(2, 1, "logit", -math.inf, keys="0:3"),), preset="custom")
    key = remember(iv, tmp_path)
    assert recall(key, tmp_path) == iv
    assert recall("none", tmp_path) == Intervention()
    for bad in ("../../etc/passwd", "0123456789abcdeg", "ffffffffffffffff"):
        assert recall(bad, tmp_path) is None
    (tmp_path / f"{key}.json").write_text(json.dumps(ablate_heads([(0, 0)]).to_json()))
    assert recall(key, tmp_path) is None  # a file whose content does not hash to its name is refused
