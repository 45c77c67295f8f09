"""Head analytics on hand-built maps with known answers (pure numpy; no model)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from analytics import METRICS, ProbeMissing, heads, importance, locality, retrieval, sinks
from analytics.summary import head_summary
from core import probe_results as stored

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


# ---- hand-built maps --------------------------------------------------------------------------

def uniform_causal(n: int) -> np.ndarray:
    """attn  # [query, key]: each row uniform over its visible keys."""
    a = np.tril(np.ones((n, n)))
    return a / a.sum(axis=1, keepdims=True)


def previous_token(n: int) -> np.ndarray:
    a = np.zeros((n, n))
    a[0, 0] = 1
    a[np.arange(1, n), np.arange(n - 1)] = 1
    return a


def first_column(n: int) -> np.ndarray:
    a = np.zeros((n, n))
    a[:, 0] = 1
    return a


def induction_map(n: int, period: int, offset: int = 1) -> np.ndarray:
    """Rows in repetition >= 2 attend to the token after the previous copy; others to themselves."""
    a = np.eye(n)
    for i in range(offset + period, n):
        a[i] = 0
        a[i, i - period + 1] = 1
    return a


def repeat_ids(period: int, repeats: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    period_ids = list(rng.permutation(1000)[:period] + 100)  # distinct ids: no accidental repeats
    return [1] + period_ids * repeats


# ---- registry ----------------------------------------------------------------------------------

def test_registry_has_the_fixed_names_and_fields():
    for name in ("sink_alpha", "act_sink", "lookback", "entropy", "waad", "fai", "prev_token", "induction",
                 "echo", "duplicate_token", "retrieval", "semantic_retrieval", "ablation", "grad_gate", "duo_gate"):
        m = METRICS[name]
        assert m.name == name and m.title and m.paper and m.explanation and callable(m.compute)
        assert m.kind in ("head", "token") and m.modalities
    assert {m.name for m in METRICS.values() if m.multi_pass} >= {"prev_token", "induction", "echo", "retrieval",
                                                                     "ablation", "grad_gate", "duo_gate"}


def test_analytics_imports_neither_torch_nor_streamlit():
    code = ("import sys, analytics, analytics.heads, analytics.retrieval, analytics.importance, analytics.sinks, "
            "analytics.locality, core.probe_results; "
            "bad = [m for m in ('torch', 'streamlit', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---- sinks ---------------------------------------------------------------------------------------

def test_all_mass_on_column_zero_is_a_sink():
    a = np.stack([first_column(12), uniform_causal(12)])  # [head, query, key]
    alpha = sinks.sink_alpha(a[None])  # [layer, head]
    assert alpha.shape == (1, 2)
    assert alpha[0, 0] == pytest.approx(1.0)
    assert alpha[0, 1] == pytest.approx(np.mean(1 / np.arange(1, 13)))
    assert sinks.sink_heads(alpha).tolist() == [[True, False]]
    assert sinks.sink_ratio(alpha) == 0.5
    s = sinks.received_attention(a[None])
    assert s[0, 0, 0] == pytest.approx(1.0) and np.allclose(s[0, 0, 1:], 0)
    sets = sinks.act_sink_sets(s)
    assert sets.first[0, 0] == 0 and not sets.hidden[0, 0].any()  # the first sink is kept, nothing hidden


def test_act_hidden_sinks_exclude_the_first():
    n = 10
    a = np.tril(np.ones((n, n))) * 0.01
    a[:, 0] += 1.0
    a[4:, 4] += 1.0  # a second, "hidden" sink at token 4
    a = np.tril(a)
    a /= a.sum(axis=1, keepdims=True)
    s = sinks.received_attention(a[None, None])
    sets = sinks.act_sink_sets(s, tau=0.1)
    assert sets.first[0, 0] == 0
    assert np.flatnonzero(sets.hidden[0, 0]).tolist() == [4]
    assert sets.per_token()[4] == 1.0


def test_act_received_attention_of_uniform_map():
    n = 6
    s = sinks.received_attention(uniform_causal(n)[None, None])[0, 0]
    expected = [sum(1 / (i + 1) for i in range(j, n)) / (n - j) for j in range(n)]
    assert np.allclose(s, expected, atol=1e-6)


def test_massive_activations_find_the_planted_dimension():
    rng = np.random.default_rng(0)
    # [token, dim] per layer; phi <= sqrt(dim), so tau = 20 needs dim > 400
    hidden = [rng.normal(size=(8, 1024)).astype(np.float32) for _ in range(5)]
    for x in hidden[2:]:
        x[0, 7] = 2000.0  # token 0, dim 7: a massive activation
    assert sinks.massive_dims(hidden) == [7]
    phi = sinks.massive_scores(hidden)
    assert phi[0] > sinks.VAR_TAU and (phi[1:] < sinks.VAR_TAU).all()
    assert sinks.massive_sink_tokens(hidden) == [0]
    x = np.array([[3.0, 4.0]])
    assert np.allclose(sinks.rms_normalised(x), np.abs(x) / np.sqrt(12.5), atol=1e-5)


# ---- locality --------------------------------------------------------------------------------------

def test_uniform_causal_lookback_and_entropy_known_values():
    n = 16
    a = uniform_causal(n)[None, None]
    assert locality.lookback(a)[0, 0] == pytest.approx((n - 1) / 4, rel=1e-5)
    assert locality.entropy(a)[0, 0] == pytest.approx(np.mean(np.log(np.arange(2, n + 1))), rel=1e-5)


def test_previous_token_map_looks_back_one():
    n = 20
    a = previous_token(n)[None, None]
    assert locality.lookback(a)[0, 0] == pytest.approx((n - 1) / n)  # row 0 looks back 0
    assert locality.entropy(a)[0, 0] == pytest.approx(0.0, abs=1e-7)


def test_streaming_in_blocks_equals_one_block():
    rng = np.random.default_rng(1)
    n = 37
    logits = rng.normal(size=(2, 3, n, n))
    logits[..., np.triu_indices(n, 1)[0], np.triu_indices(n, 1)[1]] = -np.inf
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    one = head_summary(a, block_rows=1000)
    many = head_summary(a, block_rows=5)
    for field in ("received", "lookback", "entropy", "waad", "fai"):
        assert np.allclose(getattr(one, field), getattr(many, field), equal_nan=True, atol=1e-5), field


def test_waad_and_fai_on_hand_maps():
    n, w = 15, 4
    a = uniform_causal(n)
    expected_waad = [np.mean([min(k, w) for k in range(t + 1)]) for t in range(n)]
    assert np.allclose(locality.waad_of_map(a, w), expected_waad)
    expected_fai = [np.mean([1 / (t + 1) for t in range(s, n)]) for s in range(n)]
    assert np.allclose(locality.fai_of_map(a), expected_fai)
    # the streaming metric over 2 heads: local = the previous-token head, global = the uniform head
    maps = np.stack([previous_token(n), a])[None]  # [layer, head, query, key]
    assert np.allclose(locality.waad(maps, window=w, frac=0.5), locality.waad_of_map(previous_token(n), w))
    assert np.allclose(locality.fai(maps, frac=0.5), expected_fai)


def test_waad_fai_use_response_rows():
    n, w = 12, 10
    a = uniform_causal(n)
    from analytics.maps import ArrayMaps

    maps = ArrayMaps(a[None, None], {"prompt": range(0, 8), "response": range(8, 12)})
    waad = locality.waad(maps, window=w)
    assert np.isnan(waad[:8]).all()
    assert np.allclose(waad[8:], locality.waad_of_map(a, w)[8:])
    fai = locality.fai(maps)
    assert np.allclose(fai, locality.fai_of_map(a, rows=range(8, 12)))
    assert locality.lookback(maps)[0, 0] == pytest.approx(np.mean([t / 2 for t in range(8, 12)]))


def test_head_split_thirty_percent():
    d = np.arange(20, dtype=float).reshape(2, 10)
    split = locality.head_split(d)
    assert split.local.sum() == 6 and split.global_.sum() == 6
    assert split.local.ravel()[:6].all() and split.global_.ravel()[-6:].all()


def test_token_sets_top_forty_percent():
    waad = np.array([0, 5, 5, 0, 0, 9, 9, 9, 9, 9], dtype=float)
    fai = np.arange(10, dtype=float)
    preplan, anchors = locality.token_sets(waad, fai)
    assert preplan.sum() == 4 and anchors.sum() == 4
    assert anchors[6:].all()
    assert preplan[[0, 2, 4]].all()


# ---- pattern detectors ------------------------------------------------------------------------

def test_previous_token_map_scores_one_on_prev_token_and_zero_on_induction():
    period, repeats = 8, 3
    ids = repeat_ids(period, repeats)
    n = len(ids)
    scores = heads.pattern_scores(previous_token(n)[None, None], ids, period)
    assert scores["prev_token"][0, 0] == pytest.approx(1.0)
    assert scores["induction"][0, 0] == pytest.approx(0.0)
    assert scores["echo"][0, 0] == pytest.approx(0.0)


def test_induction_map_scores_one_on_induction():
    period, repeats = 8, 3
    ids = repeat_ids(period, repeats)
    n = len(ids)
    maps = np.stack([induction_map(n, period), uniform_causal(n)])[None]
    scores = heads.pattern_scores(maps, ids, period)
    assert scores["induction"][0, 0] == pytest.approx(1.0)
    assert scores["prev_token"][0, 0] < 0.1
    assert 0 < scores["induction"][0, 1] < 0.2  # uniform: a little of everything
    tm = heads.token_match_scores(maps, ids, offset=1)
    assert tm["induction"][0, 0] == pytest.approx(1.0)


def test_echo_and_duplicate_token_agree_on_distinct_ids():
    period, repeats = 6, 3
    ids = repeat_ids(period, repeats)
    n = len(ids)
    a = np.zeros((n, n))
    a[np.arange(n), np.arange(n)] = 1
    for i in range(1 + period, n):
        a[i] = 0
        a[i, i - period] = 1  # the previous copy of itself
    scores = heads.pattern_scores(a[None, None], ids, period)
    assert scores["echo"][0, 0] == pytest.approx(1.0)
    assert scores["duplicate_token"][0, 0] == pytest.approx(1.0)
    assert scores["induction"][0, 0] == pytest.approx(0.0)


def test_gqa_group_max_and_razor_selection():
    s = np.array([[0.1, 0.9, 0.2, 0.3, 0.0, 0.4]])
    assert heads.group_max(s, 3).tolist() == [[0.9, 0.4]]
    echo = np.array([[0.0, 0.1], [0.9, 0.2]])
    induction = np.array([[0.8, 0.0], [0.1, 0.0]])
    assert heads.razor_heads(echo, induction).tolist() == [[True, False], [True, False]]


# ---- retrieval -------------------------------------------------------------------------------------

def test_rouge1_recall():
    assert retrieval.rouge1_recall("purple otter seventeen", "The password was Purple otter, seventeen.") == 1.0
    assert retrieval.rouge1_recall("purple otter seventeen", "purple cat") == pytest.approx(1 / 3)
    assert retrieval.rouge1_recall("", "anything") == 0.0


def test_retrieval_score_on_synthetic_copy_trace():
    prompt = [5, 6, 7, 100, 101, 102, 103, 8, 9, 10]  # needle at [3, 7)
    span = range(3, 7)
    emitted = [101, 102, 103]
    n = len(prompt) + len(emitted)
    ids = prompt + emitted
    steps = len(emitted)
    rows = np.zeros((3, steps, n))  # [head, step, key]
    for t, y in enumerate(emitted):
        j = prompt.index(y)
        rows[0, t, j] = 0.9; rows[0, t, 0] = 0.1          # copies the needle token it emits
        rows[1, t, 0] = 0.8; rows[1, t, span.start] = 0.2  # a sink head, some needle mass
        rows[2, t, j - 1] = 1.0                           # attends to the needle, wrong token
    argmax, mass = retrieval.step_reductions(rows, span)
    score = retrieval.copy_score(argmax, emitted, ids, span)
    assert score.tolist() == pytest.approx([3 / 4, 0.0, 0.0])
    assert ((0 <= score) & (score <= 1)).all()
    semantic = retrieval.semantic_score(mass, emitted, ids, span)
    assert semantic.tolist() == pytest.approx([0.9 * 3 / 4, 0.2 * 3 / 4, 1.0 * 3 / 4])
    per_test = np.stack([score[None], np.zeros((1, 3))])  # [test, layer, head]
    assert np.allclose(retrieval.mean_over_counted(per_test, [True, False]), score[None])
    assert retrieval.mean_over_counted(per_test, [False, False]).tolist() == [[0, 0, 0]]
    assert retrieval.retrieval_heads(score[None]) == [(0, 0)]


# ---- importance -------------------------------------------------------------------------------------

def test_importance_arrays_and_rankings():
    ablated = np.array([[-10.0, -12.0], [-10.5, -9.0]])
    drop = importance.ablation_importance(-10.0, ablated)
    assert drop.tolist() == [[0.0, 2.0], [0.5, -1.0]]
    ranked = importance.rank_heads(drop)
    assert ranked[0][:2] == (0, 1) and ranked[-1][:2] == (1, 1)
    grads = np.array([[[1.0, -3.0]], [[-1.0, 1.0]]])  # [example, layer, head]
    assert importance.gradient_importance(grads).tolist() == [[1.0, 2.0]]
    assert np.allclose(importance.gradient_importance(grads, "layer"), [[1 / np.sqrt(5), 2 / np.sqrt(5)]])
    alpha = np.array([[0.9, 0.1], [0.6, 0.3]])
    assert importance.duo_retrieval_heads(alpha).tolist() == [[True, False], [True, False]]
    assert importance.duo_retrieval_heads(alpha, sparsity=0.25).tolist() == [[True, False], [True, True]]
    assert importance.expand_kv(alpha, 2).shape == (2, 4)


# ---- stored probe results -----------------------------------------------------------------------

def test_probe_keys_and_missing_results(store):
    p = stored.params_of("patterns", period=32)
    assert stored.probe_key("rev", "patterns", p) == stored.probe_key("rev", "patterns", {"period": 32})
    assert stored.probe_key("rev", "patterns", p) != stored.probe_key("rev2", "patterns", p)
    assert stored.params_of("needle", {"lengths": [256]}).lengths == (256,)
    with pytest.raises(ValueError):
        stored.params_of("patterns", bogus=1)
    assert "--period 32" in stored.cli_hint("patterns", "smollm2", p)

    class Meta:
        name, revision, n_heads, n_kv_heads = "smollm2", "rev", 4, 2

    class FakeCapture:
        meta, key = Meta(), "k" * 20

    FakeCapture.store = store
    for name in ("induction", "retrieval", "ablation", "grad_gate", "duo_gate", "massive_sink"):
        with pytest.raises(ProbeMissing, match="run this probe first: python -m headscope probe"):
            METRICS[name].compute(FakeCapture())
    # a stored result is read back, with GQA granularity on request
    key = stored.probe_key("rev", "patterns", stored.PatternParams())
    store.put_array(key, "induction", np.array([[0.1, 0.9, 0.2, 0.3]], dtype=np.float32))
    store.put_meta(key, {"kind": "probe", "probe": "patterns", "arrays": ["induction"]})
    assert np.allclose(METRICS["induction"].compute(FakeCapture()), [[0.1, 0.9, 0.2, 0.3]])
    assert np.allclose(METRICS["induction"].compute(FakeCapture(), granularity="kv"), [[0.9, 0.3]])


# ---- DiT sinks (analytics.dit.sink_stats, RefAM) -----------------------------------------------------

def _image_to_text(columns: np.ndarray, n_image: int = 16) -> np.ndarray:
    """a  # [step=1, layer=1, head=1, image, text]: every image query reads the text columns the same."""
    row = np.asarray(columns, dtype=np.float32) / np.sum(columns)
    return np.broadcast_to(row, (1, 1, 1, n_image, len(row))).copy()


def test_dit_sink_is_a_token_read_far_above_the_median_and_flat():
    from analytics.dit import sink_stats

    a = _image_to_text([6, 1, 1, 1, 1])  # token 0 gets 6x every other one, from every image position
    assert sink_stats(a).global_sink.tolist() == [True, False, False, False, False]
    a[..., ::2, 0] = 0  # token 0 read by half of the image only: not flat (CV 1) -> no longer a sink
    assert not sink_stats(a).global_sink.any()


def test_dit_sinks_leave_masked_padding_out_of_the_median():
    """PixArt masks its T5 padding: those columns receive exactly 0.  Counted in the median they made it 0,
    and every word a sink; left out, words read evenly have none and a real sink is still found."""
    from analytics.dit import sink_stats

    words = [1, 1, 1, 1, 1]
    assert not sink_stats(_image_to_text(words + [0] * 20)).global_sink.any()
    found = sink_stats(_image_to_text([6] + words[1:] + [0] * 20)).global_sink
    assert found.tolist() == [True] + [False] * 24
    assert not sink_stats(np.zeros((1, 1, 1, 4, 3), np.float32)).global_sink.any()  # nothing attended: no sink


def test_dit_sinks_judge_a_grouped_padding_run_by_its_average_token():
    """A "split" capture sums a padding run into one column: 20 pads read like the words are 20x a word in
    sum.  Judged per member they are as plain as the words; a pad run that is a real sink still is one."""
    from analytics.dit import sink_stats

    members = [1, 1, 1, 1, 1, 20]
    grouped = _image_to_text([1, 1, 1, 1, 1, 20])
    assert sink_stats(grouped).global_sink.tolist() == [False] * 5 + [True]
    stats = sink_stats(grouped, members=members)
    assert not stats.global_sink.any()
    np.testing.assert_allclose(stats.mean[0, 0, 0], 1 / 25)  # each column's average token
    assert sink_stats(_image_to_text([1, 1, 1, 1, 1, 200]), members=members).global_sink.tolist() == [False] * 5 + [True]
