"""Capture with the embedded SmolLM2-135M (30 layers x 9 query heads, 3 KV heads): maps equal to
transformers' eager attentions, generation equal to plain generate, scale edits, the cache in front."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cache.store import Store
from capture import registry
from capture.api import cached, run
from capture.engine import attention
from capture.engine.recorder import Recorder
from capture.engine.session import session
from conftest import cache_with_models
from core.interventions import HeadEdit, Intervention
from core.types import RunSpec
from core.layouts import max_pool

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "The quick brown fox jumps over the lazy dog. The capital of France is"
N_NEW = 5
ATOL = 2e-3  # maps are stored as float16


@pytest.fixture(scope="module")
def module_store(tmp_path_factory):
    s = Store(tmp_path_factory.mktemp("cache"), size_limit=4 * 2**30)
    yield s
    s.close()


@pytest.fixture(scope="module")
def generated(smollm2, module_store):
    """Prompt + N_NEW greedy tokens, captured once for the tests of this module that only read it."""
    return run(RunSpec(model="smollm2", prompt=PROMPT, max_new_tokens=N_NEW), store=module_store)


def all_maps(capture) -> list[np.ndarray]:
    return [np.array(capture.attention(layer)) for layer in range(capture.meta.n_layers)]


class attn_implementation:
    """Switch a loaded model to another attention implementation for a block, then back to HeadScope."""

    def __init__(self, handle, name: str):
        self.model, self.name = handle.model, name

    def __enter__(self):
        self.model.set_attn_implementation(self.name)

    def __exit__(self, *exc):
        self.model.set_attn_implementation(attention.IMPLEMENTATION)
        assert self.model.config._attn_implementation == attention.IMPLEMENTATION


# ---- (a) maps equal eager output_attentions ----------------------------------------------------

def test_prefill_and_generated_rows_equal_eager_generate(smollm2, generated):
    cap = generated
    n_prompt = len(cap.spans["prompt"])
    prompt_ids = torch.tensor([cap.output.token_ids[:n_prompt]])
    with attn_implementation(smollm2, "eager"), torch.inference_mode():
        out = smollm2.model.generate(
            input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=N_NEW,
            do_sample=False, output_attentions=True, return_dict_in_generate=True, pad_token_id=2)
        full = smollm2.model(input_ids=torch.tensor([cap.output.token_ids]), output_attentions=True)
    assert out.sequences[0].tolist() == cap.output.token_ids  # same continuation, so the rows are comparable
    assert len(out.attentions) == N_NEW  # step 0 = prefill, steps 1.. = one new token each

    maps = all_maps(cap)
    n = cap.n_tokens
    assert n == n_prompt + N_NEW
    for layer, attn in enumerate(maps):
        attn = attn.astype(np.float32)  # [head, query, key]
        assert attn.shape == (9, n, n)
        # prefill: the prompt's square
        eager_prefill = out.attentions[0][layer][0].numpy()  # [head, prompt, prompt]
        np.testing.assert_allclose(attn[:, :n_prompt, :n_prompt], eager_prefill, atol=ATOL, rtol=0,
                                   err_msg=f"prefill, layer {layer}")
        # each decode step t processes token n_prompt+t-1: one row over keys 0..n_prompt+t-1
        for step in range(1, N_NEW):
            row = n_prompt + step - 1
            eager_row = out.attentions[step][layer][0, :, 0].numpy()  # [head, key]
            assert eager_row.shape == (9, row + 1)
            np.testing.assert_allclose(attn[:, row, : row + 1], eager_row, atol=ATOL, rtol=0,
                                       err_msg=f"decode step {step}, layer {layer}")
        # the last generated token is never fed back during generate: its row is the recorded pass's,
        # held against an eager forward over the whole sequence (which also covers every other row)
        np.testing.assert_allclose(attn, full.attentions[layer][0].numpy(), atol=ATOL, rtol=0,
                                   err_msg=f"full sequence, layer {layer}")
        # causal: rows sum to 1, nothing above the diagonal
        np.testing.assert_allclose(attn.sum(-1), 1.0, atol=2e-3)
        assert not np.triu(attn, 1).any()
        assert (attn >= 0).all()


def test_maps_are_not_trivial(generated):
    """Guards the comparison above: real maps are far from uniform and differ between heads."""
    attn = generated.attention(10).astype(np.float32)
    n = generated.n_tokens
    uniform = np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]
    assert np.abs(attn - uniform).max() > 0.2
    assert np.abs(attn[0] - attn[1]).max() > 0.05


def test_row_and_head_agree_with_attention(generated):
    attn = generated.attention(3)
    for h in (0, 8):
        np.testing.assert_array_equal(generated.head(3, h), attn[h])
    for q in (0, generated.n_tokens - 1):
        np.testing.assert_array_equal(generated.row(3, q), attn[:, q])
    with pytest.raises(IndexError):
        generated.attention(30)
    with pytest.raises(IndexError):
        generated.head(0, 9)


def test_thumbnails_are_the_block_max_of_the_stored_maps(generated):
    """The model view's thumbnails, pooled during the forward, equal max_pool of the stored maps."""
    thumbs = np.asarray(generated.overview(), dtype=np.float32)  # [layer, head, bins, bins]
    for layer in (0, 17):
        expected = max_pool(generated.attention(layer).astype(np.float32), thumbs.shape[-1])
        np.testing.assert_allclose(thumbs[layer], expected, rtol=1e-3, atol=0)


@pytest.mark.parametrize("n, block, defer", [(100, 256, False), (300, 256, False), (300, 7, False), (65, 16, False),
                                             (300, 7, True)])
def test_recorder_thumbnails_with_blocks_that_cut_across_bins(n, block, defer):
    """Row blocks that start inside a thumbnail bin (and a ragged last bin) pool like max_pool; a
    deferred recorder hands the layer on only in `finish`."""
    rng = np.random.default_rng(n + block)
    heads = 3
    full = np.tril(rng.random((heads, n, n), dtype=np.float32))
    done = {}
    recorder = Recorder(heads, "tril", lambda layer, maps, overview: done.update(overview=overview, maps=maps),
                        defer=defer)
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        recorder.take(0, 0, r0, n, torch.from_numpy(full[:, r0:r1, :r1].copy()))
    assert bool(done) != defer
    recorder.finish()
    np.testing.assert_array_equal(done["overview"], max_pool(full, min(32, n)).astype(np.float16))
    rows, cols = np.tril_indices(n)
    np.testing.assert_array_equal(done["maps"], full[:, rows, cols].astype(np.float16))  # the packed lower triangle


# ---- (b) empty intervention = plain generate -----------------------------------------------------

def test_empty_intervention_generates_exactly_plain_sdpa_tokens(smollm2, store):
    spec = RunSpec(model="smollm2", prompt="Name three colours.", chat=True, max_new_tokens=8)
    cap = run(spec, store=store)
    template = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": spec.prompt}],
                                                     add_generation_prompt=True, tokenize=True)
    prompt = list(template["input_ids"] if hasattr(template, "keys") else template)
    n_prompt = len(cap.spans["prompt"])
    assert cap.output.token_ids[:n_prompt] == prompt
    ids = torch.tensor([prompt])
    with attn_implementation(smollm2, "sdpa"), torch.inference_mode():
        plain = smollm2.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                       do_sample=False)
    assert cap.output.token_ids == plain[0].tolist()
    assert len(cap.output.steps) == len(plain[0]) - n_prompt > 0
    assert cap.output.text == smollm2.tokenizer.decode(plain[0, n_prompt:], skip_special_tokens=True)


# ---- (c) scale 0 = zeroing the head's slice of the o_proj input ---------------------------------

LAYER, HEAD = 5, 4


def _logits(handle, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return handle.model(input_ids=ids).logits[0].float()  # [query, vocab]


def test_scale_zero_equals_zeroing_the_o_proj_slice(smollm2, store):
    iv = Intervention(edits=(HeadEdit(layer=LAYER, head=HEAD, op="scale", value=0),))
    prompt_ids = smollm2.tokenizer(PROMPT)["input_ids"]
    ids = torch.tensor([prompt_ids])
    d = smollm2.meta.head_dim

    base = _logits(smollm2, ids)
    with session(iv):
        edited = _logits(smollm2, ids)

    def zero_head(_module, args):
        z = args[0].clone()  # [batch, query, head * head_dim]
        z[..., HEAD * d : (HEAD + 1) * d] = 0
        return (z, *args[1:])

    o_proj = smollm2.model.model.layers[LAYER].self_attn.o_proj
    hook = o_proj.register_forward_pre_hook(zero_head)
    try:
        by_hand = _logits(smollm2, ids)
    finally:
        hook.remove()

    assert (edited - base).abs().max() > 1e-3  # the edit changes the logits
    torch.testing.assert_close(edited, by_hand, atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(smollm2, ids), base, atol=0, rtol=0)  # hooks and sessions left nothing behind

    # the same edit through capture.api: maps up to and including LAYER unchanged, later ones changed,
    # and the recorded pass's next-token distribution is the hand-ablated model's
    plain = run(RunSpec(model="smollm2", prompt=PROMPT), store=store)
    ablated = run(RunSpec(model="smollm2", prompt=PROMPT, intervention=iv), store=store)
    assert ablated.key != plain.key
    for layer in range(LAYER + 1):
        np.testing.assert_array_equal(ablated.attention(layer), plain.attention(layer), err_msg=f"layer {layer}")
    assert np.abs(ablated.attention(LAYER + 1).astype(np.float32) - plain.attention(LAYER + 1)).max() > 1e-4
    logprobs = torch.log_softmax(by_hand[-1], dim=-1)
    top = torch.topk(logprobs, len(ablated.output.next_top))
    np.testing.assert_allclose([v for _, v in ablated.output.next_top], top.values.numpy(), atol=1e-4)
    assert [v for _, v in ablated.output.next_top] != [v for _, v in plain.output.next_top]


def test_scale_one_changes_nothing(smollm2):
    ids = torch.tensor([smollm2.tokenizer(PROMPT)["input_ids"]])
    base = _logits(smollm2, ids)
    with session(Intervention(edits=(HeadEdit(layer=LAYER, head=HEAD, op="scale", value=1.0),))):
        same = _logits(smollm2, ids)
    torch.testing.assert_close(same, base, atol=0, rtol=0)


# ---- (d) the cache in front ----------------------------------------------------------------------

def _no_model(name):
    raise AssertionError(f"the model {name} was loaded for a cached capture")


def test_second_run_is_served_from_the_cache_without_the_model(smollm2, store, monkeypatch):
    spec = RunSpec(model="smollm2", prompt="One, two, three,", max_new_tokens=3)
    first = run(spec, store=store)
    assert not first.from_cache
    maps = all_maps(first)

    monkeypatch.setattr(registry, "load", _no_model)
    again = Store(store.directory, size_limit=store.size_limit)  # a fresh handle on the same directory
    try:
        second = run(spec, store=again)
        assert second.from_cache and second.key == first.key
        assert second.spec == spec and second.meta == first.meta
        assert second.tokens == first.tokens and second.spans == first.spans
        assert second.output == first.output  # text, token ids, per-step top-k, all through JSON
        for layer, expected in enumerate(maps):
            got = second.attention(layer)
            assert got.dtype == np.float16
            np.testing.assert_array_equal(got.view(np.uint16), expected.view(np.uint16))
        assert cached(spec, store=again).from_cache
        assert cached(RunSpec(model="smollm2", prompt="One, two, three,", max_new_tokens=4), store=again) is None
    finally:
        again.close()


# ---- (e) corruption is recomputed transparently -----------------------------------------------

def test_truncated_layer_file_is_recomputed(smollm2, store):
    spec = RunSpec(model="smollm2", prompt="Corrupt me, then heal.", max_new_tokens=2)
    first = run(spec, store=store)
    maps = all_maps(first)
    path = Path(store.get_array(first.key, "L007").filename)
    assert path.is_relative_to(store.directory) and path.suffix == ".npy"
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)

    assert cached(spec, store=store) is None  # detected on read (and evicted)
    second = run(spec, store=store)  # recomputed, no exception
    assert not second.from_cache and second.key == first.key
    third = run(spec, store=store)
    assert third.from_cache
    for layer, expected in enumerate(maps):
        np.testing.assert_allclose(third.attention(layer).astype(np.float32), expected.astype(np.float32),
                                   atol=1e-3, rtol=0)
    assert store.keys() == [first.key]
    assert not path.exists()  # the damaged file went with the eviction


def test_capture_without_metadata_is_recomputed(smollm2, store):
    """An interrupted run leaves arrays but no metadata: invisible, then overwritten cleanly."""
    spec = RunSpec(model="smollm2", prompt="Half written.")
    key = spec.key(registry.revision("smollm2"))
    store.put_array(key, "L000", np.zeros((9, 3), np.float16))  # a leftover of an interrupted run
    assert store.keys() == [] and cached(spec, store=store) is None
    cap = run(spec, store=store)
    assert not cap.from_cache
    assert store.keys() == [key]
    assert cap.attention(0).shape == (9, cap.n_tokens, cap.n_tokens) and cap.attention(0).any()


# ---- (f) GQA and (g) spans, tokens, top-k ----------------------------------------------------

def test_gqa_meta(generated, module_store):
    for meta in (generated.meta, cached(generated.spec, store=module_store).meta):
        assert (meta.n_layers, meta.n_heads, meta.n_kv_heads, meta.head_dim) == (30, 9, 3, 64)
        assert meta.family == "llama" and meta.causal and meta.modality == "text"
        assert meta.group_size == 3 and [meta.kv_head(h) for h in (0, 2, 3, 8)] == [0, 0, 1, 2]


def test_spans_tokens_and_steps(smollm2, generated):
    cap = generated
    tok = smollm2.tokenizer
    prompt_ids = tok(PROMPT)["input_ids"]
    n_prompt = len(prompt_ids)
    assert cap.spans == {"prompt": range(0, n_prompt), "response": range(n_prompt, n_prompt + N_NEW)}
    assert cap.output.token_ids[:n_prompt] == prompt_ids
    assert len(cap.tokens) == len(cap.output.token_ids) == cap.n_tokens == n_prompt + N_NEW
    assert cap.tokens[1] == tok.decode([prompt_ids[1]])  # " quick": ordinary tokens keep their text
    assert all(t for t in cap.tokens)
    new_ids = cap.output.token_ids[n_prompt:]
    assert cap.output.text == tok.decode(new_ids, skip_special_tokens=True)

    assert len(cap.output.steps) == N_NEW
    for step, token_id in zip(cap.output.steps, new_ids):
        values = [v for _, v in step.top]
        assert len(step.top) == 5
        assert values == sorted(values, reverse=True)
        assert all(v <= 0 for v in values) and sum(np.exp(values)) <= 1 + 1e-6
        assert step.token_id == token_id
        assert step.logprob == pytest.approx(values[0], abs=1e-6)  # greedy: the chosen token is the top-1
        assert step.token == step.top[0][0] == cap.tokens[cap.output.token_ids.index(token_id, n_prompt)]


def test_step_logprobs_match_the_model(smollm2, generated):
    """Each step's top-k are the log-softmax of the logits at that position of a plain forward."""
    cap = generated
    n_prompt = len(cap.spans["prompt"])
    logits = _logits(smollm2, torch.tensor([cap.output.token_ids]))
    for t, step in enumerate(cap.output.steps):
        logprobs = torch.log_softmax(logits[n_prompt - 1 + t], dim=-1)
        top = torch.topk(logprobs, 5)
        assert top.indices[0].item() == step.token_id
        np.testing.assert_allclose([v for _, v in step.top], top.values.numpy(), atol=1e-3)
    final = torch.topk(torch.log_softmax(logits[-1], dim=-1), 5)
    np.testing.assert_allclose([v for _, v in cap.output.next_top], final.values.numpy(), atol=1e-3)


# ---- (h) two processes, one entry ----------------------------------------------------------------

WORKER = r"""
import json, os, sys, time
from pathlib import Path
from capture import registry
from capture.api import run
from core.types import RunSpec
registry.load("smollm2")
d = Path(os.environ["HEADSCOPE_CACHE_DIR"])
(d / f"ready{sys.argv[1]}").touch()
deadline = time.time() + 120
while not (d / "go").exists() and time.time() < deadline:
    time.sleep(0.005)
c = run(RunSpec(model="smollm2", prompt="Two at once: one two three", max_new_tokens=2))
c.attention(29)
print(json.dumps({"key": c.key, "from_cache": c.from_cache, "n": c.n_tokens}))
"""


def test_two_processes_capture_one_entry(smollm2, tmp_path):
    root = cache_with_models(tmp_path / "shared")
    env = dict(os.environ, HEADSCOPE_CACHE_DIR=str(root), HF_HUB_OFFLINE="1", TQDM_DISABLE="1",
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        import time

        deadline = time.time() + 180
        while not all((root / f"ready{i}").exists() for i in range(2)):
            assert time.time() < deadline, "workers did not start"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.02)
        (root / "go").touch()  # both models loaded: release them together
        results = []
        for p in procs:
            out, err = p.communicate(timeout=180)
            assert p.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()

    assert results[0]["key"] == results[1]["key"]
    assert sorted(r["from_cache"] for r in results) == [False, True]  # computed once, the other waited
    key = results[0]["key"]
    store = Store(root)
    try:
        assert store.keys() == [key]
        cap = cached(RunSpec(model="smollm2", prompt="Two at once: one two three", max_new_tokens=2), store=store)
        assert cap is not None and cap.key == key and cap.n_tokens == results[0]["n"]
        for layer in range(cap.meta.n_layers):
            np.testing.assert_allclose(cap.attention(layer).astype(np.float32).sum(-1), 1.0, atol=2e-3)
        import sqlite3

        with sqlite3.connect(root / "index" / "cache.db") as db:
            rows = [k for (k,) in db.execute("SELECT key FROM Cache")]
        names = [r.split("/", 1)[1] for r in rows]
        assert all(r.startswith(key + "/") for r in rows)
        assert len(names) == len(set(names))
        assert {f"L{layer:03d}" for layer in range(30)} | {"meta"} <= set(names)
        assert len(list((root / "index").rglob("*.npy"))) == len(names) - 1  # no orphan files
    finally:
        store.close()


@pytest.mark.parametrize("model", ["smollm2", "minilm"])
def test_fused_recorder_equals_the_torch_path(model, request, monkeypatch):
    """capture/engine/fused.cpp's record_layer (two bands of rows at 40 tokens, row tiles at 400) gives the
    maps, thumbnails and outputs of the block-by-block torch path, causal (packed triangle) and
    bidirectional (full maps)."""
    from capture.engine import fused

    kernel = fused.load()
    assert kernel is not None, f"the fused kernel did not build: {fused.problem()}"
    calls = []

    class Counting:
        def record_layer(self, *args):
            calls.append(args[-5].shape)
            return kernel.record_layer(*args)

    monkeypatch.setattr(fused, "load", lambda: Counting())
    handle = request.getfixturevalue(model)
    meta = handle.meta
    for n in (40, 400):
        ids = torch.randint(200, 2000, (1, n), generator=torch.Generator().manual_seed(n))
        results = []
        for use_kernel in (True, False):
            layers: dict = {}
            recorder = Recorder(meta.n_heads, "tril" if meta.causal else "full",
                                lambda layer, maps, overview: layers.__setitem__(layer, (maps, overview)),
                                use_kernel=use_kernel)
            with session(recorder=recorder), torch.inference_mode():
                out = handle.model(input_ids=ids, **({"use_cache": False} if meta.causal else {}))
            recorder.finish()
            results.append((out.logits if meta.causal else out.last_hidden_state, layers))
        assert len(calls) == meta.n_layers  # every layer of the first pass went through the kernel
        calls.clear()
        (out_k, maps_k), (out_t, maps_t) = results
        assert torch.allclose(out_k, out_t, atol=1e-4, rtol=1e-4)
        assert sorted(maps_k) == list(range(meta.n_layers))
        for layer in (0, meta.n_layers // 2, meta.n_layers - 1):
            np.testing.assert_allclose(maps_k[layer][0].astype(np.float32), maps_t[layer][0].astype(np.float32), atol=2e-3)
            np.testing.assert_allclose(maps_k[layer][1].astype(np.float32), maps_t[layer][1].astype(np.float32), atol=2e-3)


def test_a_build_lock_left_by_a_killed_build_does_not_hang_the_next_one(tmp_path):
    """torch's cpp_extension lock is a plain file a process killed mid-build leaves behind; every later load
    would wait for it for ever.  fused.load removes it under its own flock: a fresh process with a stale lock
    in its build folder loads the module within the time limit."""
    from torch.utils.cpp_extension import _get_build_directory

    from capture.engine import fused

    folder = Path(_get_build_directory(fused.NAME, verbose=False))
    (folder / "lock").touch()  # as a build killed mid-way leaves it
    code = "from capture.engine import fused; m = fused.load(); print('ok' if m is not None else fused.problem())"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
    assert not (folder / "lock").exists()
