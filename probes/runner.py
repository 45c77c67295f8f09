"""Multi-pass head measurements that need the model; results go to the cache for `analytics`.

    run_probe("patterns", "smollm2")   repeated random tokens -> prev-token / induction / echo / duplicate
    run_probe("needle", "smollm2")     needle-in-a-haystack sweep -> retrieval + semantic retrieval scores
    run_probe("ablation", "smollm2")   single-head ablation of every head, batched (zero | mean | uniform)
    run_probe("gradient", "smollm2")   Michel et al. |dL/d gate| per head
    run_probe("duo", "smollm2")        mini DuoAttention gate optimisation on synthetic passkeys
    hidden_states(capture)             the residual stream entering every layer of one capture (VAR)

Each result is stored under `core.probe_results.probe_key(model revision, probe, params)`: arrays first,
then a JSON record with `"kind": "probe"` (written last, so a crash never leaves a result that looks
whole).  A second call with the same parameters is served from the cache.  Every probe reports
progress through a `(fraction, message)` callback and holds the model's lock while it runs.
Command line: `python -m headscope probe {patterns,needle,ablation,gradient,duo,hidden} ...`.

Deviations from the papers' defaults are listed in each probe's docstring (short contexts and small
probes so that a CPU finishes in minutes).
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from analytics import heads, retrieval
from analytics.importance import rank_heads
from cache.store import Store
from capture import registry
from capture.engine.handle import ModelHandle, attention_layers
from capture.engine.hooks import hidden_arg, removing, with_hidden
from capture.engine.recorder import Recorder
from capture.engine.session import session
from capture.text.adapter import labels
from core import probe_results as stored
from core.errors import InputError, InterventionError
from core.interventions import uniform_ablation
from core.probe_results import (
    AblationParams,
    DuoParams,
    GradientParams,
    HiddenParams,
    NeedleParams,
    PatternParams,
    ProbeResult,
)
from core.progress import Progress, no_progress
from core.types import Capture, Output, RunSpec
from core.layouts import pack_offset, unpack_tril

ASSETS = Path(__file__).resolve().parent.parent / "assets"
ABLATION_MODES = ("zero", "mean", "uniform")
LOGIT_BYTES_BUDGET = 64 * 2**20  # per ablation batch row group: bounds the [rows, scored, vocab] logits


def _default_store(store: Store | None) -> Store:
    if store is not None:
        return store
    from capture.api import default_store

    return default_store()


def _require_causal_lm(handle: ModelHandle, probe: str) -> None:
    if handle.meta.modality != "text" or not handle.meta.causal:
        raise InputError(f"The {probe} probe needs a causal language model; {handle.meta.name} is not one.")


# ---- running a probe, with the cache in front ---------------------------------------------------

def run_probe(probe: str, model: str = "smollm2", params=None, store: Store | None = None,
              progress: Progress = no_progress, force: bool = False, **options) -> ProbeResult:
    """Compute (or fetch from the cache) one probe result.  `options` are execution settings that do
    not change the result (e.g. `batch_size` of the ablation sweep) and are not part of the key."""
    if probe not in PROBES:
        raise InputError(f"Unknown probe {probe!r}; probes are {', '.join(PROBES)}.")
    try:
        p = stored.params_of(probe, params)
    except (TypeError, ValueError) as exc:
        raise InputError(str(exc)) from exc
    _validate(probe, p)
    store = _default_store(store)
    revision = registry.revision(model)
    key = stored.probe_key(revision, probe, p)
    if not force:
        found = stored.find(store, revision, probe, p)
        if found is not None:
            return found
    with store.lock(key):
        if not force:
            found = stored.find(store, revision, probe, p)
            if found is not None:
                return found
        progress(0.0, f"loading {model}")
        handle = registry.load(model)
        store.evict(key)
        names: list[str] = []

        def put(name: str, array: np.ndarray) -> None:
            store.put_array(key, name, np.ascontiguousarray(array))
            names.append(name)

        if probe == "hidden":
            options["store"] = store
        t0 = time.perf_counter()
        with handle.lock:
            record = PROBES[probe](handle, p, put, progress, **options)
        record.update(kind=stored.KIND, probe=probe, model=model, revision=revision, params=asdict(p),
                      arrays=names, seconds=round(time.perf_counter() - t0, 3))
        store.put_meta(key, record)
        progress(1.0, "done")
    result = stored.find(store, revision, probe, p)
    assert result is not None
    return result


def _validate(probe: str, p) -> None:
    if probe == "patterns":
        if p.period < 2 or p.repeats < 2 or not 0 <= p.low < p.high:
            raise InputError("The pattern probe needs period >= 2, repeats >= 2 and 0 <= low < high.")
    elif probe == "needle":
        if not p.lengths or not p.depths or min(p.lengths) < 64 or p.max_new_tokens < 1:
            raise InputError("The needle probe needs lengths >= 64 tokens, at least one depth and max_new_tokens >= 1.")
        if any(not 0 <= d <= 100 for d in p.depths):
            raise InputError("Needle depths are percentages in [0, 100].")
    elif probe == "ablation":
        if p.mode not in ABLATION_MODES:
            raise InputError(f"Unknown ablation mode {p.mode!r}; use zero, mean or uniform.")
        if p.n_tokens < 4 or p.score_last < 1:
            raise InputError("The ablation probe needs n_tokens >= 4 and score_last >= 1.")
    elif probe == "gradient":
        if p.n_texts < 1 or p.n_tokens < 4:
            raise InputError("The gradient probe needs n_texts >= 1 and n_tokens >= 4.")
    elif probe == "duo":
        if p.steps < 1 or p.context < 64 or p.sink < 1 or p.recent < 1 or p.passkeys < 1 or p.words < 1:
            raise InputError("The duo probe needs steps, sink, recent, passkeys, words >= 1 and context >= 64.")


# ---- model plumbing ------------------------------------------------------------------------------

def _out_projections(handle: ModelHandle) -> list[torch.nn.Module]:
    """The output projection (o_proj) of each layer: its input is the concatenated head outputs z."""
    return [out for _, out in attention_layers(handle.model)]


def _haystack_ids(tokenizer, n: int, start: int = 0) -> list[int]:
    """n token ids of assets/haystack.txt from token `start` on (the text repeats as needed)."""
    ids = _haystack_tokens(tokenizer)
    out = []
    while len(out) < start + n:
        out += ids
    return out[start : start + n]


_HAYSTACK: dict[int, tuple[int, ...]] = {}


def _haystack_tokens(tokenizer) -> list[int]:
    """assets/haystack.txt as token ids (tokenized once per tokenizer)."""
    if id(tokenizer) not in _HAYSTACK:
        text = (ASSETS / "haystack.txt").read_text(encoding="utf-8")
        _HAYSTACK[id(tokenizer)] = tuple(int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(_HAYSTACK[id(tokenizer)])


# ---- patterns: repeated random tokens (RazorAttention, shortened) -------------------------------

def pattern_probe(handle: ModelHandle, p: PatternParams, put, progress: Progress) -> dict:
    """BOS + `period` random ids from [low, high) repeated `repeats` times; one recorded causal pass.

    Deviations from RazorAttention (METHODS.md §1.4): P = 64 and 3 repeats instead of P = 2500 and 4
    (a 193-token probe; scores are per-query means in [0, 1], same ranking); a real causal mask.
    The probe's maps are stored too (`L000`...), with a capture-shaped record, so a page can show them.
    """
    _require_causal_lm(handle, "patterns")
    tok, meta = handle.tokenizer, handle.meta
    vocab = int(getattr(handle.model.config, "vocab_size", 0) or len(tok))
    low, high = min(p.low, vocab - 2), min(p.high, vocab)
    if low >= high:
        low, high = 0, vocab
    rng = np.random.default_rng(p.seed)
    period_ids = [int(i) for i in rng.integers(low, high, size=p.period)]
    bos = tok.bos_token_id
    prefix = [int(bos)] if bos is not None else []
    ids = prefix + period_ids * p.repeats
    offset, n = len(prefix), len(ids)
    scores = {name: np.zeros((meta.n_layers, meta.n_heads), dtype=np.float32) for name in heads.PATTERNS}

    def on_layer(layer: int, packed: np.ndarray, *_overview) -> None:
        put(f"L{layer:03d}", packed)
        layer_scores = heads.pattern_scores(unpack_tril(packed, n)[None], ids, p.period, offset)
        for name in heads.PATTERNS:
            scores[name][layer] = layer_scores[name][0]
        progress(0.05 + 0.9 * (layer + 1) / meta.n_layers, f"probe layer {layer + 1}/{meta.n_layers}")

    recorder = Recorder(meta.n_heads, "tril", on_layer)
    with session(recorder=recorder), torch.inference_mode():
        handle.model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=1)
    for name in heads.PATTERNS:
        put(name, scores[name])
    group = meta.n_heads // meta.n_kv_heads
    razor = heads.razor_heads(heads.group_max(scores["echo"], group), heads.group_max(scores["induction"], group))
    put("razor_kv", razor.astype(np.uint8))
    spans = {"prompt": range(0, n)}
    for r in range(p.repeats):
        spans[f"copy{r + 1}"] = range(offset + r * p.period, offset + (r + 1) * p.period)
    spec = RunSpec(model=meta.name, prompt=f"<pattern probe: {p.period} random ids x {p.repeats}, seed {p.seed}>")
    top = {name: _top_heads(scores[name]) for name in heads.PATTERNS}
    return {
        # a capture-shaped record: Capture.from_record(key, record, store) shows the probe's maps
        "spec": spec.to_json(), "meta": asdict(meta), "tokens": labels(tok, ids),
        "spans": {k: [v.start, v.stop] for k, v in spans.items()},
        "output": Output(token_ids=ids).to_json(), "layout": "tril", "timings": {},
        "token_ids": ids, "offset": offset,
        "summary": {"top": top, "razor_kv_heads": int(razor.sum())},
    }


def pattern_capture(result: ProbeResult) -> Capture:
    """The pattern probe's maps as a Capture (for the page's map view)."""
    return Capture.from_record(result.key, result.record, result.store)


def _top_heads(scores: np.ndarray, k: int = 5) -> list[list]:
    order = np.argsort(-scores, axis=None, kind="stable")[:k]
    H = scores.shape[1]
    return [[int(i // H), int(i % H), round(float(scores.flat[i]), 4)] for i in order]


# ---- the residual stream of a capture (VAR massive activations) ---------------------------------

def hidden_probe(handle: ModelHandle, p: HiddenParams, put, progress: Progress,
                 store: Store | None = None) -> dict:
    """One forward over a capture's tokens; the input of every decoder layer, x^l  # [token, dim] fp16,
    is stored as X000... as soon as that layer starts (never all layers in memory at once)."""
    from capture.api import load_capture

    capture = load_capture(p.capture, store)
    if capture is None:
        raise InputError(f"No capture with key {p.capture} in the cache; `python -m headscope ls` lists them.")
    blocks = handle.decoder_layers()
    if blocks is None:
        raise InputError(f"HeadScope cannot find the decoder layers of {handle.meta.name} to read its residual stream.")
    ids = capture.output.token_ids
    dim = [0]

    def hook(index: int):
        def pre(_module, args, kwargs):
            x = hidden_arg(args, kwargs)[0]  # [token, dim]
            dim[0] = x.shape[-1]
            put(f"X{index:03d}", x.detach().to(torch.float16).numpy())
            progress(0.05 + 0.9 * (index + 1) / len(blocks), f"layer {index + 1}/{len(blocks)}")
        return pre

    with removing([b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]):
        with torch.inference_mode():
            if handle.meta.causal:
                handle.model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=1)
            else:
                handle.model(input_ids=torch.tensor([ids]))
    return {"n_layers": len(blocks), "n_tokens": len(ids), "dim": int(dim[0]), "capture": p.capture,
            "summary": {}}


def hidden_states(capture: Capture, store: Store | None = None, progress: Progress = no_progress,
                  force: bool = False) -> ProbeResult:
    """Store (or fetch) the residual stream of `capture`; analytics.HiddenStates reads it by layer."""
    store = _default_store(store or capture.store)
    return run_probe("hidden", capture.spec.model, HiddenParams(capture=capture.key), store, progress, force)


# ---- needle in a haystack (Wu et al. 2024; CompressKV) -------------------------------------------

def load_needles() -> list[dict]:
    """assets/needles.json: [{needle, question, answer}, ...]."""
    return json.loads((ASSETS / "needles.json").read_text(encoding="utf-8"))["needles"]


QUESTION = "\n\nBased on the content of the book, Question: {question}\nAnswer:"


def needle_prompt(tokenizer, needle: dict, length: int, depth: float, chat: bool) -> tuple[list[int], range]:
    """(prompt ids of about `length` tokens, needle span [s, e)) with the needle at `depth` % of the text.

    Like Wu et al.: the context is cut from the haystack so the whole prompt fits `length`, the needle
    is inserted at a sentence boundary (backing up to the previous period), and the question follows:
    context + "Based on the content of the book, Question: {q}\\nAnswer:" (inside the chat template as
    the user turn when `chat`)."""
    chat = chat and bool(getattr(tokenizer, "chat_template", None))  # no template: the plain prompt

    def wrap(context: str) -> str:
        text = context + QUESTION.format(question=needle["question"])
        if not chat:
            return text
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=not chat)["input_ids"])

    overhead = n_tokens(wrap(""))
    n_needle = n_tokens(" " + needle["needle"])
    n_context = max(16, length - overhead - n_needle)
    context = tokenizer.decode(_haystack_ids(tokenizer, n_context))
    cut = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    at = round(depth / 100.0 * len(cut))
    char = len(context) if at >= len(cut) else cut[at][0]
    period = context.rfind(".", 0, char + 1 if at >= len(cut) else char)
    insert = 0 if period < 0 else period + 1
    text = context[:insert] + " " + needle["needle"] + context[insert:]
    full = wrap(text)
    a = full.find(needle["needle"])
    b = a + len(needle["needle"])
    enc = tokenizer(full, add_special_tokens=not chat, return_offsets_mapping=True)
    inside = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < b and e > a and e > s]
    return [int(i) for i in enc["input_ids"]], range(inside[0], inside[-1] + 1)


def _greedy(handle: ModelHandle, ids: list[int], max_new: int) -> list[int]:
    """Greedy decoding on the fast path, stopped at EOS or at the first token that holds a newline
    (the newline itself is not kept), as Wu et al. do."""
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    tok = handle.tokenizer

    class NewlineStop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.tensor(["\n" in tok.decode([int(input_ids[0, -1])])])

    eos = handle.model.generation_config.eos_token_id
    eos = tok.eos_token_id if eos is None else eos
    eos_set = set(eos) if isinstance(eos, (list, tuple)) else {eos}
    pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(eos_set))
    config = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    input_ids = torch.tensor([ids])
    with session(), torch.inference_mode():
        out = handle.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    generation_config=config, stopping_criteria=StoppingCriteriaList([NewlineStop()]))
    new = []
    for i in out[0, len(ids):].tolist():
        if i in eos_set or "\n" in tok.decode([int(i)]):
            break
        new.append(int(i))
    return new


def decode_step_rows(handle: ModelHandle, ids: list[int], n_prompt: int, n_steps: int,
                     on_layer: Callable[[int, np.ndarray], None]) -> None:
    """The last attention row of every decode step, layer by layer: on_layer(layer, rows  # [head, step, key]).

    One recorded forward over prompt + generated tokens (the Recorder on the final sequence, as
    `capture.api` does): row n_prompt - 1 + t of a causal map is exactly the row the decode step that
    emitted token t computed, so no per-step hooks are needed."""
    n = n_prompt + n_steps - 1  # the last emitted token is never read back
    seq = ids[:n]
    positions = [n_prompt - 1 + t for t in range(n_steps)]

    def take(layer: int, packed: np.ndarray, *_overview) -> None:
        rows = np.zeros((packed.shape[0], n_steps, n), dtype=np.float32)
        for t, p in enumerate(positions):
            rows[:, t, : p + 1] = packed[:, pack_offset(p) : pack_offset(p) + p + 1]
        on_layer(layer, rows)

    recorder = Recorder(handle.meta.n_heads, "tril", take)
    with session(recorder=recorder), torch.inference_mode():
        handle.model(input_ids=torch.tensor([seq]), use_cache=False, logits_to_keep=1)


def needle_probe(handle: ModelHandle, p: NeedleParams, put, progress: Progress) -> dict:
    """Needle-in-a-haystack sweep: every (length, depth) cell once, needles cycled over the cells.

    Deviations from Wu et al. (METHODS.md §1.1): prompt lengths 256-1,024 tokens by default (the paper
    sweeps 20 lengths to 50k; ~5k is "enough" for the strongest heads), 5 depths instead of 10, one
    needle per cell instead of every needle in every cell, at most 24 new tokens instead of 50, our own
    needles and haystack (assets/), the chat template on by default (an instruct model), ROUGE-1
    without stemming.  Each test: greedy generation on the fast path, then one recorded pass for the
    decode rows (`decode_step_rows`)."""
    _require_causal_lm(handle, "needle")
    meta, tok = handle.meta, handle.tokenizer
    needles = load_needles()
    chosen = list(p.needles) or list(range(len(needles)))
    if any(not 0 <= i < len(needles) for i in chosen):
        raise InputError(f"Needle indices run from 0 to {len(needles) - 1} (assets/needles.json).")
    limit = int(getattr(handle.model.config, "max_position_embeddings", 0) or 2048)
    if max(p.lengths) + p.max_new_tokens > limit:
        raise InputError(f"{meta.name} takes at most {limit} tokens; use shorter needle lengths.")
    cells = [(length, depth) for length in p.lengths for depth in p.depths]
    total_work = sum(length for length, _ in cells)
    done_work = 0
    L, H = meta.n_layers, meta.n_heads
    per_retrieval = np.zeros((len(cells), L, H), dtype=np.float32)
    per_semantic = np.zeros((len(cells), L, H), dtype=np.float32)
    tests = []
    for index, (length, depth) in enumerate(cells):
        which = chosen[index % len(chosen)]
        needle = needles[which]
        progress(0.02 + 0.96 * done_work / total_work, f"test {index + 1}/{len(cells)}: {length} tokens, depth {depth:g}%")
        ids, span = needle_prompt(tok, needle, length, depth, p.chat)
        new = _greedy(handle, ids, p.max_new_tokens)
        answer = tok.decode(new, skip_special_tokens=True)
        recall = retrieval.rouge1_recall(needle["answer"], answer)
        argmax = np.zeros((L, H, len(new)), dtype=np.int32)
        mass = np.zeros((L, H, len(new)), dtype=np.float32)
        if new:
            def on_layer(layer: int, rows: np.ndarray) -> None:
                argmax[layer], mass[layer] = retrieval.step_reductions(rows, span)

            decode_step_rows(handle, ids + new, len(ids), len(new), on_layer)
            per_retrieval[index] = retrieval.copy_score(argmax, new, ids, span)
            per_semantic[index] = retrieval.semantic_score(mass, new, ids, span)
        put(f"argmax_{index:03d}", argmax)  # the copy trace: top-1 key of every head at every step
        tests.append({
            "length": length, "depth": float(depth), "needle": which, "n_prompt": len(ids),
            "span": [span.start, span.stop], "question": needle["question"], "expected": needle["answer"],
            "answer": answer, "recall": recall, "counted": recall > retrieval.ROUGE_THRESHOLD,
            "emitted": new, "emitted_tokens": labels(tok, new),
            "needle_tokens": labels(tok, ids[span.start : span.stop]),
        })
        done_work += length
    counted = [t["counted"] for t in tests]
    scores = retrieval.mean_over_counted(per_retrieval, counted)
    semantic = retrieval.mean_over_counted(per_semantic, counted)
    put("retrieval", scores)
    put("semantic_retrieval", semantic)
    put("per_test_retrieval", per_retrieval)
    put("per_test_semantic", per_semantic)
    return {"tests": tests, "summary": {
        "n_tests": len(tests), "n_counted": int(sum(counted)),
        "retrieval_heads": [list(h) for h in retrieval.retrieval_heads(scores)],
        "top_retrieval": _top_heads(scores), "top_semantic": _top_heads(semantic),
    }}


# ---- single-head ablation sweep, batched -----------------------------------------------------------

def _ablation_inputs(tok, p: AblationParams) -> tuple[list[int], range]:
    """(token ids, scored positions): the target appended, or the last `score_last` prompt tokens."""
    ids = (tok(p.prompt, add_special_tokens=True)["input_ids"] if p.prompt
           else _haystack_ids(tok, p.n_tokens))
    ids = [int(i) for i in ids]
    if p.target:
        target = [int(i) for i in tok(p.target, add_special_tokens=False)["input_ids"]]
        if not target:
            raise InputError("The ablation target tokenizes to nothing; give a non-empty target.")
        return ids + target, range(len(ids), len(ids) + len(target))
    if len(ids) <= p.score_last:
        raise InputError(f"The ablation prompt has {len(ids)} tokens; it needs more than score_last = {p.score_last}.")
    return ids, range(len(ids) - p.score_last, len(ids))


def _scored_logprob(model: torch.nn.Module, input_ids: torch.Tensor, scored: range) -> torch.Tensor:
    """sum over scored positions q of log p(ids[q] | ids[<q]), per batch row  # [batch].

    `scored` must end at the last position.  The logits of only the scored positions are formed,
    one batch row at a time, so memory stays small even for large ablation batches."""
    n = input_ids.shape[1]
    if scored.stop != n:
        raise ValueError("scored positions must end at the last token")
    targets = input_ids[0, scored.start : scored.stop]  # [scored]
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = model.config
    plain_head = not (getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None))
    if base is not None and head is not None and plain_head:
        hidden = base(input_ids=input_ids, use_cache=False).last_hidden_state  # [batch, n, dim] (expanded by hooks)
        h = hidden[:, scored.start - 1 : scored.stop - 1]  # positions that predict the scored tokens
        out = []
        for b in range(h.shape[0]):
            logp = torch.log_softmax(head(h[b]).float(), dim=-1)  # [scored, vocab]
            out.append(logp.gather(1, targets[:, None]).sum())
        return torch.stack(out)
    logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=len(scored) + 1).logits[:, : len(scored)]
    return torch.log_softmax(logits.float(), dim=-1).gather(2, targets[None, :, None].expand(logits.shape[0], -1, 1)).sum(dim=(1, 2))


def _mean_head_outputs(handle: ModelHandle, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """One clean pass: the mean over positions of every head's output z (the o_proj input), per layer
    # [head * head_dim]; what mean ablation puts in place of an ablated head."""
    means: list[torch.Tensor | None] = [None] * handle.meta.n_layers

    def hook(layer: int):
        def pre(_module, args):
            means[layer] = args[0][0].float().mean(dim=0)  # [head * head_dim]
        return pre

    outs = _out_projections(handle)
    with removing([o.register_forward_pre_hook(hook(i)) for i, o in enumerate(outs)]), torch.inference_mode():
        handle.model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    return means  # type: ignore[return-value]


def ablation_sweep(handle: ModelHandle, ids: list[int], scored: range, mode: str = "zero",
                   heads_list: list[tuple[int, int]] | None = None, batch_size: int | None = None,
                   progress: Progress = no_progress) -> tuple[float, np.ndarray]:
    """(clean log-prob, ablated log-prob  # [layer, head]) of the scored tokens, one head ablated at a time.

    Batched: each forward carries B copies of the prompt and row b ablates a different head:
    - zero:    `session(head_gates=...)`, gate 0 on that head in that row (z <- 0);
    - mean:    an o_proj pre-hook of this module, z <- its clean mean over the prompt's positions;
    - uniform: `session(row_interventions=...)`, a uniform-attention edit (mix towards
               uniform, u = 1) on that head in that row (Wu et al.'s masking: the head outputs the mean
               of the visible values).
    Heads go in layer order and the rows share the clean prefix: the batch runs at width 1 up to the
    first layer it ablates and is widened to B there (a pre-hook on that decoder layer, which also
    opens the session), so a full sweep costs about half of L*H single passes."""
    meta = handle.meta
    if mode not in ABLATION_MODES:
        raise InterventionError(f"Unknown ablation mode {mode!r}; use zero, mean or uniform.")
    if heads_list is None:
        heads_list = [(l, h) for l in range(meta.n_layers) for h in range(meta.n_heads)]
    heads_list = sorted(heads_list)
    input_ids = torch.tensor([ids])
    vocab = int(getattr(handle.model.config, "vocab_size", 50000))
    if batch_size is None:
        batch_size = max(1, min(3 * meta.n_heads, LOGIT_BYTES_BUDGET * 8 // max(1, len(scored) * vocab * 4)))
    blocks = handle.decoder_layers()
    outs = _out_projections(handle)
    with torch.inference_mode():
        clean = float(_scored_logprob(handle.model, input_ids, scored)[0])
    means = _mean_head_outputs(handle, input_ids) if mode == "mean" else None
    ablated = np.full((meta.n_layers, meta.n_heads), np.nan, dtype=np.float64)
    for start in range(0, len(heads_list), batch_size):
        batch = heads_list[start : start + batch_size]
        B = len(batch)
        gates: dict[int, torch.Tensor] = {}
        for b, (l, h) in enumerate(batch):
            gates.setdefault(l, torch.ones(B, meta.n_heads))[b, h] = 0.0
        if mode == "zero":
            make_session = lambda: session(head_gates=gates)  # noqa: E731
        elif mode == "uniform":
            rows = [uniform_ablation([head]) for head in batch]
            make_session = lambda: session(row_interventions=rows)  # noqa: E731
        else:
            make_session = session
        hooks = []
        if mode == "mean":
            for l, g in gates.items():
                def mean_in(_module, args, g=g, mean=means[l]):
                    z = args[0]
                    Bz, n_q, width = z.shape
                    z = z.view(Bz, n_q, meta.n_heads, -1)
                    m = mean.view(meta.n_heads, -1).to(z.dtype)
                    gz = g.to(z.dtype)[:, None, :, None]
                    return ((z * gz + (1 - gz) * m).reshape(Bz, n_q, width),) + tuple(args[1:])
                hooks.append(outs[l].register_forward_pre_hook(mean_in))
        opened: list = []
        if blocks is not None:
            def widen(_module, args, kwargs, B=B):
                opened.append(make_session())
                opened[-1].__enter__()  # the session starts where the rows start to differ
                x = hidden_arg(args, kwargs)
                return with_hidden(args, kwargs, x.expand(B, *x.shape[1:]).contiguous())
            hooks.append(blocks[batch[0][0]].register_forward_pre_hook(widen, with_kwargs=True))
            batch_ids = input_ids
        else:
            opened.append(make_session())
            opened[-1].__enter__()
            batch_ids = input_ids.expand(B, -1)
        try:
            with removing(hooks), torch.inference_mode():
                values = _scored_logprob(handle.model, batch_ids, scored)
        finally:
            for cm in reversed(opened):
                cm.__exit__(None, None, None)
        for b, (l, h) in enumerate(batch):
            ablated[l, h] = float(values[b])
        progress(0.05 + 0.93 * (start + B) / len(heads_list), f"ablated {start + B}/{len(heads_list)} heads")
    return clean, ablated


def ablation_probe(handle: ModelHandle, p: AblationParams, put, progress: Progress,
                   batch_size: int | None = None) -> dict:
    """Every head ablated alone (mode zero | mean | uniform, METHODS.md §10.1); score = drop in the summed
    log-prob of the scored tokens.  Mean ablation replaces the head output by its mean over this
    prompt's positions (one prompt, not a dataset: a deviation from dataset-mean ablation)."""
    _require_causal_lm(handle, "ablation")
    ids, scored = _ablation_inputs(handle.tokenizer, p)
    meta = handle.meta
    if any(not 0 <= l < meta.n_layers for l in p.layers):
        raise InputError(f"Ablation layers must lie in 0..{meta.n_layers - 1}.")
    heads_list = [(l, h) for l in (sorted(set(p.layers)) or range(meta.n_layers)) for h in range(meta.n_heads)]
    clean, ablated = ablation_sweep(handle, ids, scored, p.mode, heads_list=heads_list, batch_size=batch_size,
                                    progress=progress)
    put("ablated_logprob", ablated.astype(np.float32))
    ranked = [[l, h, round(v, 4)] for l, h, v in rank_heads(clean - ablated) if np.isfinite(v)]
    return {"n_tokens": len(ids), "scored": [scored.start, scored.stop],
            "summary": {"clean_logprob": clean, "mode": p.mode, "top": ranked[:5], "bottom": ranked[::-1][:5]}}


# ---- gradient importance (Michel et al. 2019) ------------------------------------------------------

@contextlib.contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """No parameter gradients for the duration (only the gates are trained / differentiated)."""
    flags = [(q, q.requires_grad) for q in model.parameters()]
    for q, _ in flags:
        q.requires_grad_(False)
    try:
        yield
    finally:
        for q, flag in flags:
            q.requires_grad_(flag)


def gradient_probe(handle: ModelHandle, p: GradientParams, put, progress: Progress) -> dict:
    """|dL/d xi_h| with xi a gate (= 1) on every head's output, L the mean next-token loss of a text
    (Michel et al. 2019, eq. 2), over `n_texts` consecutive `n_tokens`-token chunks of assets/haystack.txt.
    Stored signed per text: grads  # [text, layer, head]; analytics takes the mean absolute value.
    Deviation: a few hundred tokens of our own text instead of a task's validation set."""
    _require_causal_lm(handle, "gradient")
    meta = handle.meta
    grads = np.zeros((p.n_texts, meta.n_layers, meta.n_heads), dtype=np.float32)
    losses = []
    with _frozen(handle.model), torch.enable_grad():
        for t in range(p.n_texts):
            ids = torch.tensor([_haystack_ids(handle.tokenizer, p.n_tokens, start=t * p.n_tokens)])
            gates = {l: torch.ones(1, meta.n_heads, requires_grad=True) for l in range(meta.n_layers)}
            with session(head_gates=gates):
                logits = handle.model(input_ids=ids, use_cache=False).logits[0, :-1]
                loss = torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:])
            loss.backward()
            for l, g in gates.items():
                grads[t, l] = g.grad[0].numpy()
            losses.append(float(loss.detach()))
            progress(0.05 + 0.9 * (t + 1) / p.n_texts, f"text {t + 1}/{p.n_texts}")
    put("grads", grads)
    importance = np.abs(grads).mean(axis=0)
    return {"summary": {"mean_loss": float(np.mean(losses)), "top": _top_heads(importance)}}


# ---- DuoAttention, mini (Xiao et al. 2024) ----------------------------------------------------------

DUO_IMPLEMENTATION = "headscope_duo"
NATO = ("alfa bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike november oscar papa "
        "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()
ORDINALS = ("first second third fourth fifth sixth seventh eighth ninth tenth").split()


class _DuoState:
    def __init__(self, alpha: torch.Tensor, group: int, sink: int, recent: int):
        self.alpha, self.group, self.sink, self.recent = alpha, group, sink, recent
        self.full_only = False
        self._masks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def masks(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(causal, streaming) bool masks  # [query, key]; streaming = causal and (j < sink or i - j < recent)."""
        if n not in self._masks:
            i = torch.arange(n)[:, None]
            j = torch.arange(n)[None, :]
            causal = j <= i
            self._masks[n] = (causal, causal & ((j < self.sink) | (i - j < self.recent)))
        return self._masks[n]


_DUO: contextvars.ContextVar[_DuoState | None] = contextvars.ContextVar("headscope_duo", default=None)


def _duo_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """o = alpha * FullAttn + (1 - alpha) * StreamAttn per head, alpha shared by a GQA group
    (duo_attn/patch/llama.py, llama_duo_attention_forward_two_way).  Returns [batch, query, head, dim]."""
    state = _DUO.get()
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = getattr(module, "headscope_layer", None)
    if state is None or layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    n = query.shape[2]
    causal, streaming = state.masks(n)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    full = sdpa(query, key, value, attn_mask=causal, scale=scaling, enable_gqa=True)  # [batch, head, query, dim]
    if state.full_only:
        return full.transpose(1, 2).contiguous(), None
    stream = sdpa(query, key, value, attn_mask=streaming, scale=scaling, enable_gqa=True)
    a = state.alpha[layer].clamp(0, 1).repeat_interleave(state.group)[None, :, None, None].to(full.dtype)
    out = a * full + (1 - a) * stream
    return out.transpose(1, 2).contiguous(), None


def _register_duo() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(DUO_IMPLEMENTATION, _duo_attention)
    AttentionMaskInterface.register(DUO_IMPLEMENTATION, sdpa_mask)


def passkey_sample(tokenizer, context: int, passkeys: int, words: int, rng: np.random.Generator
                   ) -> tuple[list[int], list[int]]:
    """(ids, labelled positions): a haystack of about `context` tokens with `passkeys` passkeys of `words`
    NATO words at depths 5-95 %, then one question + answer per passkey; labels are the positions
    that predict the answer words (MultiplePasskeyRetrievalDataset, shortened)."""
    keys = [" ".join(rng.choice(NATO, size=words)) for _ in range(passkeys)]
    intros = [f" Remember this sequence of words, it's the {ORDINALS[k % 10]} passkey to the vault: {keys[k]}."
              for k in range(passkeys)]
    qa = [(f"\nWhat is the {ORDINALS[k % 10]} passkey to the vault? The {ORDINALS[k % 10]} passkey to the vault is:",
           " " + keys[k] + ".") for k in range(passkeys)]
    fixed = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in intros)
    fixed += sum(len(tokenizer(q + a, add_special_tokens=False)["input_ids"]) for q, a in qa)
    n_hay = max(32, context - fixed)
    start = int(rng.integers(0, 2000))
    hay = tokenizer.decode(_haystack_ids(tokenizer, n_hay, start=start))
    depths = sorted(rng.uniform(0.05, 0.95, size=passkeys))
    text, last = "", 0
    for depth, intro in zip(depths, intros):
        cut = max(last, hay.rfind(".", 0, int(depth * len(hay))) + 1)
        text += hay[last:cut] + intro
        last = cut
    text += hay[last:]
    answers = []
    for q, a in qa:
        text += q
        answers.append((len(text), len(text) + len(a)))
        text += a
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [i for i, (s, e) in enumerate(enc["offset_mapping"])
              if e > s and any(s < b and e > a for a, b in answers) and i > 0]
    return [int(i) for i in enc["input_ids"]], [i - 1 for i in labels]


def duo_probe(handle: ModelHandle, p: DuoParams, put, progress: Progress) -> dict:
    """Mini DuoAttention: train one gate alpha per (layer, KV head) so that mixing full and streaming
    attention (o = alpha*Full + (1 - alpha)*Stream) keeps the final hidden states at the passkey answer
    positions (MSE against the full-attention model) while an L1 term (reg = 0.05) pushes alpha to 0.
    alpha starts at 1 and is clamped to [0, 1] before each step; model weights are frozen (METHODS.md §1.3).

    Deviations from the official recipe, to run in minutes on a CPU (each step is a teacher forward,
    a student forward and a backward through the frozen model: ~0.2 TFLOP at 256 tokens): 256-token
    contexts instead of 1k-32k; sink 16 / recent 64 instead of 128 / 256 (scaled with the context);
    24 steps instead of 2,000, so lr 0.05 instead of 0.02 (Adam moves alpha by about lr per step: the
    gates can still reach 0); 2 passkeys of 8 NATO words instead of 10 of 32; our haystack instead of
    BookSum; Adam on alpha; the teacher (full attention) runs as a separate no-grad pass instead of a
    duplicated batch; the loss is read at the positions that predict the answer tokens."""
    _require_causal_lm(handle, "duo")
    meta, model = handle.meta, handle.model
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if base is None:
        raise InputError(f"HeadScope cannot find the base model of {meta.name} for the duo probe.")
    _register_duo()
    rng = np.random.default_rng(p.seed)
    torch.manual_seed(p.seed)
    alpha = torch.ones(meta.n_layers, meta.n_kv_heads, requires_grad=True)
    state = _DuoState(alpha, meta.n_heads // meta.n_kv_heads, p.sink, p.recent)
    optimiser = torch.optim.Adam([alpha], lr=p.lr)
    losses, distill = [], []
    previous = model.config._attn_implementation
    token = _DUO.set(state)
    try:
        model.set_attn_implementation(DUO_IMPLEMENTATION)
        with _frozen(model):
            for step in range(p.steps):
                with torch.no_grad():
                    alpha.clamp_(0.0, 1.0)
                ids, positions = passkey_sample(handle.tokenizer, p.context, p.passkeys, p.words, rng)
                input_ids = torch.tensor([ids])
                state.full_only = True
                with torch.no_grad():
                    teacher = base(input_ids=input_ids, use_cache=False).last_hidden_state[0, positions]
                state.full_only = False
                with torch.enable_grad():
                    student = base(input_ids=input_ids, use_cache=False).last_hidden_state[0, positions]
                    mse = ((student - teacher) ** 2).mean()
                    loss = mse + p.reg * alpha.abs().mean()
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                losses.append(float(loss.detach()))
                distill.append(float(mse.detach()))
                progress(0.02 + 0.96 * (step + 1) / p.steps, f"step {step + 1}/{p.steps}: loss {losses[-1]:.4f}")
    finally:
        model.set_attn_implementation(previous)
        _DUO.reset(token)
    with torch.no_grad():
        final = alpha.clamp(0.0, 1.0).numpy().astype(np.float32)
    put("alpha", final)
    put("loss", np.asarray(losses, dtype=np.float32))
    put("distill", np.asarray(distill, dtype=np.float32))
    return {"summary": {"final_loss": losses[-1], "final_distill": distill[-1],
                        "full_heads": int((final >= 0.5).sum()), "kv_heads": int(final.size),
                        "top": _top_heads(final)}}


PROBES: dict[str, Callable] = {
    "patterns": pattern_probe,
    "needle": needle_probe,
    "ablation": ablation_probe,
    "gradient": gradient_probe,
    "duo": duo_probe,
    "hidden": hidden_probe,
}

__all__ = ["PROBES", "ablation_sweep", "decode_step_rows", "hidden_states", "load_needles", "needle_prompt",
           "passkey_sample", "pattern_capture", "run_probe"]
