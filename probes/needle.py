"""Needle in a haystack (Wu et al. 2024; CompressKV): which heads copy the needle into the answer.

Each test hides a needle sentence at a depth of a haystack prompt, asks for it, decodes greedily on
the fast path, and records the last attention row of every decode step (`decode_step_rows`) for
analytics.retrieval: the retrieval score (the head's top key is the needle token being copied) and the
semantic retrieval score (the head's mass on the needle when the emitted token is in it).
"""
from __future__ import annotations

import json
from typing import Callable

import numpy as np
import torch

from analytics import retrieval
from capture.engine.handle import ModelHandle
from capture.engine.recorder import Recorder
from capture.engine.session import session
from capture.text.adapter import labels
from core.errors import InputError
from core.layouts import pack_offset
from core.probe_results import NeedleParams
from core.progress import Progress
from probes.common import ASSETS, haystack_ids, require_causal_lm, top_heads


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
    context = tokenizer.decode(haystack_ids(tokenizer, n_context))
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
    require_causal_lm(handle, "needle")
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
        "top_retrieval": top_heads(scores), "top_semantic": top_heads(semantic),
    }}
