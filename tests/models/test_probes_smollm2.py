"""Head analytics and probes on the real SmolLM2 (small inputs: each test takes seconds)."""
from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch

import analytics
from analytics import METRICS, HiddenStates, retrieval, sinks
from analytics.summary import forget, head_summary
from cache.store import Store
from capture.api import run
from capture.engine import attention
from capture.engine.session import session
from core import probe_results as stored
from core.interventions import ablate_heads
from core.types import Capture, ModelMeta, Output, RunSpec
import probes
from probes import ablation, duo, needle
from probes.common import haystack_ids

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pstore(tmp_path_factory):
    s = Store(tmp_path_factory.mktemp("probes") / "cache", size_limit=4 * 2**30)
    yield s
    s.close()


@pytest.fixture(scope="module")
def short_capture(smollm2, pstore):
    return run(RunSpec(model="smollm2", prompt="The quick brown fox jumps over the lazy dog. The quick brown fox"),
               store=pstore)


def test_first_token_is_a_sink_in_most_middle_layer_heads(short_capture):
    alpha = METRICS["sink_alpha"].compute(short_capture)  # [layer, head]
    assert alpha.shape == (30, 9)
    middle = alpha[10:21]
    assert (middle > sinks.GU_EPSILON).mean() > 0.5
    s = METRICS["act_sink"].compute(short_capture)  # [layer, head, token]
    sets = sinks.act_sink_sets(s)
    assert (sets.first[10:21] == 0).mean() > 0.5  # ACT's first detected sink is the first token
    lookback, entropy = METRICS["lookback"].compute(short_capture), METRICS["entropy"].compute(short_capture)
    assert lookback.shape == entropy.shape == (30, 9)
    assert (lookback >= 0).all() and (lookback <= short_capture.n_tokens).all()
    assert (entropy >= 0).all() and (entropy <= np.log(short_capture.n_tokens)).all()
    waad, fai = METRICS["waad"].compute(short_capture), METRICS["fai"].compute(short_capture)
    assert waad.shape == fai.shape == (short_capture.n_tokens,)
    assert np.nanmax(waad) <= 10 and np.nanmin(fai) >= 0


def test_massive_activations_from_the_stored_residual_stream(short_capture, pstore):
    with pytest.raises(analytics.ProbeMissing, match="python -m headscope probe hidden"):
        METRICS["massive_sink"].compute(short_capture)
    result = probes.hidden_states(short_capture, pstore)
    hidden = HiddenStates(result)
    assert len(hidden) == 30 and hidden[0].shape == (short_capture.n_tokens, 576)
    dims = sinks.massive_dims(hidden)
    assert dims, "SmolLM2 has massive dimensions (phi > 20) on its first token"
    phi = METRICS["massive_sink"].compute(short_capture)
    assert phi.shape == (short_capture.n_tokens,) and phi[0] > sinks.VAR_TAU


def test_pattern_probe_finds_an_induction_head(smollm2, pstore):
    result = probes.run_probe("patterns", "smollm2", {"period": 32, "repeats": 3}, store=pstore)
    induction = np.asarray(result.array("induction"))
    assert induction.shape == (30, 9)
    assert induction.max() > 0.5  # at least one clearly induction-like head
    prev = np.asarray(result.array("prev_token"))
    assert prev.max() > 0.5
    layer, head = np.unravel_index(induction.argmax(), induction.shape)
    assert prev[layer, head] < induction[layer, head]
    # the registry reads the stored result (non-default params are passed through)
    capture_like = type("C", (), {"store": pstore, "meta": smollm2.meta, "key": ""})()
    via_registry = METRICS["induction"].compute(capture_like, period=32, repeats=3)
    assert np.allclose(via_registry, induction)
    assert METRICS["echo"].compute(capture_like, period=32, repeats=3, granularity="kv").shape == (30, 3)
    # the probe's maps are viewable as a capture
    probe_capture = probes.pattern_capture(result)
    assert probe_capture.n_tokens == 1 + 32 * 3 and probe_capture.head(0, 0).shape == (97, 97)
    again = probes.run_probe("patterns", "smollm2", {"period": 32, "repeats": 3}, store=pstore)
    assert again.key == result.key  # served from the cache


def _single_ablation(handle, ids, scored, head) -> float:
    with session(ablate_heads([head])), torch.inference_mode():
        return float(ablation._scored_logprob(handle.model, torch.tensor([ids]), scored)[0])


def test_ablation_sweep_ranks_heads_that_matter(smollm2, pstore):
    params = stored.AblationParams(n_tokens=24, score_last=8, layers=(0, 17, 18))
    result = probes.run_probe("ablation", "smollm2", params, store=pstore)
    capture_like = type("C", (), {"store": pstore, "meta": smollm2.meta, "key": ""})()
    drop = METRICS["ablation"].compute(capture_like, n_tokens=24, score_last=8, layers=(0, 17, 18))  # [layer, head]
    assert drop.shape == (30, 9) and np.isfinite(drop[[0, 17, 18]]).all() and np.isnan(drop[1]).all()
    ranked = [r for r in analytics.importance.rank_heads(np.abs(drop)) if np.isfinite(r[2])]
    top, bottom = ranked[0][:2], ranked[-1][:2]
    ids, scored = ablation._ablation_inputs(smollm2.tokenizer, params)
    clean = result.summary["clean_logprob"]
    # independent single-head runs through the intervention path agree with the batched sweep
    moved_top = abs(_single_ablation(smollm2, ids, scored, top) - clean)
    moved_bottom = abs(_single_ablation(smollm2, ids, scored, bottom) - clean)
    assert moved_top > moved_bottom
    assert moved_top == pytest.approx(abs(drop[top]), rel=1e-3, abs=1e-3)


def test_uniform_and_mean_ablation_batched_match_single_runs(smollm2):
    from core.interventions import uniform_ablation

    ids, scored = ablation._ablation_inputs(smollm2.tokenizer, stored.AblationParams(n_tokens=20, score_last=6))
    heads = [(2, 1), (2, 7), (18, 6)]
    clean, ablated = probes.ablation_sweep(smollm2, ids, scored, "uniform", heads_list=heads, batch_size=3)
    for head in heads:
        with session(uniform_ablation([head])), torch.inference_mode():
            single = float(ablation._scored_logprob(smollm2.model, torch.tensor([ids]), scored)[0])
        assert ablated[head] == pytest.approx(single, abs=1e-3)
    _, mean_ablated = probes.ablation_sweep(smollm2, ids, scored, "mean", heads_list=heads, batch_size=2)
    assert np.isfinite(mean_ablated[2, 1]) and mean_ablated[2, 1] != pytest.approx(clean, abs=1e-6)


def test_gradient_importance_agrees_with_ablation_at_the_extremes(smollm2, pstore):
    result = probes.run_probe("gradient", "smollm2", {"n_texts": 1, "n_tokens": 48}, store=pstore)
    grads = np.asarray(result.array("grads"))
    assert grads.shape == (1, 30, 9) and np.isfinite(grads).all()
    imp = analytics.importance.gradient_importance(grads)
    ranked = analytics.importance.rank_heads(imp)
    ids = haystack_ids(smollm2.tokenizer, 48)
    scored = range(1, 48)
    _, ablated = probes.ablation_sweep(smollm2, ids, scored, "zero", heads_list=[ranked[0][:2], ranked[-1][:2]])
    with torch.inference_mode():
        clean = float(ablation._scored_logprob(smollm2.model, torch.tensor([ids]), scored)[0])
    assert abs(ablated[ranked[0][:2]] - clean) > abs(ablated[ranked[-1][:2]] - clean)


def test_needle_probe_scores_and_answers(smollm2, pstore):
    params = {"lengths": [160], "depths": [50.0], "needles": [0], "max_new_tokens": 18}
    result = probes.run_probe("needle", "smollm2", params, store=pstore)
    (test,) = result.record["tests"]
    assert test["recall"] == pytest.approx(retrieval.rouge1_recall(test["expected"], test["answer"]))
    assert test["recall"] > retrieval.ROUGE_THRESHOLD, test["answer"]  # SmolLM2 finds a needle at 160 tokens
    capture_like = type("C", (), {"store": pstore, "meta": smollm2.meta, "key": ""})()
    for name in ("retrieval", "semantic_retrieval"):
        scores = METRICS[name].compute(capture_like, **params)
        assert scores.shape == (30, 9)
        assert ((scores >= 0) & (scores <= 1)).all()
    assert METRICS["retrieval"].compute(capture_like, **params).max() > 0  # some head copies the needle
    trace = np.asarray(result.array("argmax_000"))  # [layer, head, step]
    assert trace.shape[:2] == (30, 9) and trace.shape[2] == len(test["emitted"])


def test_decode_rows_equal_eager_generation_rows(smollm2):
    """The recorded pass's rows are the rows each decode step computed (eager, output_attentions)."""
    ids = smollm2.tokenizer("The lighthouse keeper lit the lamp and")["input_ids"]
    new = needle._greedy(smollm2, ids, 3)
    got = {}
    needle.decode_step_rows(smollm2, ids + new, len(ids), len(new), lambda l, rows: got.__setitem__(l, rows))
    model = smollm2.model
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([ids + new[:-1]]), output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(attention.IMPLEMENTATION)
    for layer in (0, 15, 29):
        eager = out.attentions[layer][0, :, len(ids) - 1 :].numpy()  # [head, step, key]
        assert np.allclose(got[layer], eager, atol=2e-3)


def test_duo_probe_mini(smollm2, pstore):
    ids, positions = duo.passkey_sample(smollm2.tokenizer, 128, 1, 4, np.random.default_rng(0))
    assert len(positions) >= 4 and max(positions) < len(ids)
    small = {"steps": 1, "context": 96, "sink": 4, "recent": 16, "passkeys": 1, "words": 4}
    result = probes.run_probe("duo", "smollm2", small, store=pstore)
    alpha = np.asarray(result.array("alpha"))
    assert alpha.shape == (30, 3) and ((alpha >= 0) & (alpha <= 1)).all()
    assert alpha.min() < 1.0  # the gates moved
    assert np.isfinite(np.asarray(result.array("loss"))).all()
    assert smollm2.model.config._attn_implementation == attention.IMPLEMENTATION  # restored
    capture_like = type("C", (), {"store": pstore, "meta": smollm2.meta, "key": ""})()
    gate = METRICS["duo_gate"].compute(capture_like, **small)
    assert gate.shape == (30, 9)


def test_metrics_stream_a_long_capture_in_about_one_layer_of_memory(tmp_path):
    """Peak traced memory of all one-pass metrics stays below one layer's float32 maps."""
    n, n_layers, n_heads = 1536, 6, 4
    store = Store(tmp_path / "cache", size_limit=2**30)
    meta = ModelMeta(name="synthetic", family="llama", modality="text", n_layers=n_layers, n_heads=n_heads,
                     n_kv_heads=n_heads, head_dim=8, causal=True)
    rng = np.random.default_rng(0)
    key = "f" * 20
    for layer in range(n_layers):
        packed = np.empty((n_heads, n * (n + 1) // 2), dtype=np.float16)
        for r in range(n):  # each row a random distribution over its visible keys
            w = rng.random((n_heads, r + 1)).astype(np.float32)
            packed[:, r * (r + 1) // 2 : (r + 1) * (r + 2) // 2] = w / w.sum(axis=1, keepdims=True)
        store.put_array(key, f"L{layer:03d}", packed)
    capture = Capture(key=key, spec=RunSpec(model="synthetic", prompt="x"), meta=meta, tokens=["t"] * n,
                      spans={"prompt": range(0, n)}, output=Output(), layout="tril", store=store)
    layer_bytes = n_heads * n * n * 4  # one layer's square maps as float32
    forget()
    tracemalloc.start()
    try:
        summary = head_summary(capture)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary.lookback.shape == (n_layers, n_heads)
    assert peak < layer_bytes, f"peak {peak / 2**20:.1f} MiB vs one layer {layer_bytes / 2**20:.1f} MiB"
    assert peak < n_layers * layer_bytes / 4
    store.close()


def test_cli_probe_commands(tmp_path, capsys):
    env = dict(os.environ, HEADSCOPE_CACHE_DIR=str(tmp_path), HF_HUB_OFFLINE="1")
    models = ROOT / "cache_data" / "models"
    if models.exists():
        (tmp_path / "models").symlink_to(models)  # reuse the converted SmolLM2
    done = subprocess.run([sys.executable, "-m", "headscope", "probe", "patterns", "--model", "smollm2", "--period", "16",
                           "--repeats", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "probe patterns on smollm2: key" in done.stdout and "induction" in done.stdout
    from headscope.cli import main  # bad input fails before any model or cache is touched

    assert main(["probe", "ablation", "--mode", "sideways"]) == 2
    assert "zero, mean or uniform" in capsys.readouterr().err
    assert main(["probe", "hidden", "nope"]) == 2
    assert "capture key" in capsys.readouterr().err
    assert main(["probe", "needle", "--depths", "150"]) == 2
    assert "percentages" in capsys.readouterr().err


def test_atlas_page_renders_metrics(short_capture):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "pages" / "atlas.py"), default_timeout=120)
    at.session_state["capture"] = short_capture
    at.run()
    assert not at.exception and at.title[0].value == "Head atlas"
    assert len(at.get("plotly_chart")) == 1  # the layer x head map of the default metric
    for name in ("act_sink", "waad", "fai", "entropy"):
        at.selectbox[0].set_value(name).run()
        assert not at.exception, name
        assert len(at.get("plotly_chart")) == 1, name
