"""A VLM's greedy answers to many questions, each with its own intervention, a batch at a time.

`answer_ids` answers the questions of one prompt shape (same length, same image and question spans)
in one `generate` with one intervention per batch row (capture.engine.session's `row_interventions`):
with no padding every row's positions, spans and position sets are those of its own run, so each
answer is the one its own capture's generation step writes (VlmAdapter.generate).  When no row's
intervention touches the prompt before its last token (`prefix_shared`: no edit, GIFT, VAR), the
system prompt and picture are computed once per picture (VlmAdapter.record_prefix) and every row
continues from that key/value cache (families with causal masks and 1-D positions: LLaVA).  probes.vlm_accuracy answers held-out scenes' questions with it,
before and after an intervention.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from capture.engine.session import session
from capture.vlm.adapter import VlmAdapter, generation_spans
from capture.vlm.inputs import placed
from capture.vlm.model import greedy_settings
from core.errors import InterventionError
from core.interventions import parse_positions, sink_set
from core.progress import Progress, no_progress
from core.types import RunSpec

ANSWER_BATCH = 16  # questions answered together with their own interventions (row_interventions)


def answers_with(handle, specs: list[RunSpec], batch: int = ANSWER_BATCH,
                 progress: Progress = no_progress, prefixes: dict | None = None, encoded: list | None = None) -> list[str]:
    """The greedy answers to `specs`, each with its own intervention active, as the capture's generation
    step writes them (capture.vlm.adapter.VlmAdapter.generate), `batch` at a time (`answer_ids`)."""
    tok = VlmAdapter(handle).tokenizer
    return [tok.decode(ids, skip_special_tokens=True).strip()
            for ids in answer_ids(handle, specs, batch, progress, prefixes, encoded)]


def prefix_shared(intervention, prefix: int, n: int, spans: dict[str, range]) -> bool:
    """Whether `intervention` on an `n`-token prompt with `spans` leaves its first `prefix` rows as they
    are: every edit acts on the "last" rows (GIFT) or on rows from `prefix` on (VAR: the rows after the
    picture), with no sink set to detect at prefill.  Then the system prompt and picture can be
    computed once per scene and shared (`answer_ids`)."""

    def late(queries: str) -> bool:
        if queries == "last":
            return True
        try:
            rows = parse_positions(queries, n, spans)
        except InterventionError:
            return False
        return rows is not None and (len(rows) == 0 or rows.start >= prefix)

    return all(late(e.queries) and sink_set(e.keys) is None and "sink" not in e.mode for e in intervention.edits)


def _stacked(caches: list):
    """One batched DynamicCache from per-row caches of equal length (copied: generate extends it)."""
    return DynamicCache([(torch.cat([c.layers[i].keys for c in caches]), torch.cat([c.layers[i].values for c in caches]))
                         for i in range(len(caches[0].layers))])


def _batched(inputs: list) -> dict:
    """The picture and per-token inputs of same-shaped prompts, one batch row each (concatenated on dim 0:
    pixel_values [batch, ...], Qwen's packed patches and image_grid_thw, token_type_ids [batch, n] ...)."""
    first = inputs[0].model_inputs()
    return {name: torch.cat([x.model_inputs()[name] for x in inputs]) for name in first
            if name not in ("input_ids", "attention_mask")}


def answer_ids(handle, specs: list[RunSpec], batch: int = ANSWER_BATCH,
               progress: Progress = no_progress, prefixes: dict | None = None,
               encoded: list | None = None) -> list[list[int]]:
    """The greedy answers' new token ids (up to and with the end-of-sequence token), `batch` at a time.

    Questions whose prompts have the same length and the same image and question spans go through one
    `generate` with one intervention per batch row (capture.engine.session.session(row_interventions=...)):
    with no padding every row's positions, spans and position sets are those of its own run.  When no
    row's intervention touches the prompt before its last token (`prefix_shared`: none, GIFT, VAR), the
    system prompt and picture (~88 of ~105 tokens) are computed once per picture and each row starts
    from that cache, so only the question's tokens are run again; `prefixes` ((picture, length) ->
    DynamicCache, filled here where missing) lets several calls share those caches, as `encoded`
    (VlmAdapter.encode of each spec) their inputs.  A row stops at its end-of-sequence token; what
    follows it is cut.  `progress(fraction, message)` after each batch."""
    adapter = VlmAdapter(handle)
    tok = adapter.tokenizer
    eos = tok.eos_token_id
    encoded = encoded or [adapter.encode(spec) for spec in specs]
    groups: dict[tuple, list[int]] = {}
    for i, (inputs, spans) in enumerate(encoded):
        n = inputs.input_ids.shape[1]
        shape = (n, specs[i].max_new_tokens, *sorted((k, v.start, v.stop) for k, v in spans.items()))
        groups.setdefault(shape, []).append(i)
    prefixes = {} if prefixes is None else prefixes  # (picture, length) -> its cache
    out: list[list[int]] = [[] for _ in specs]
    done = 0
    for members in groups.values():
        for start in range(0, len(members), batch):
            rows = members[start : start + batch]
            progress(done / len(specs), f"answered {done}/{len(specs)} questions")
            done += len(rows)
            inputs, spans = encoded[rows[0]]
            n, max_new = inputs.input_ids.shape[1], specs[rows[0]].max_new_tokens
            input_ids = torch.cat([encoded[i][0].input_ids for i in rows])  # [batch, n]
            model_inputs = placed(_batched([encoded[i][0] for i in rows]), handle.model)
            shared = spans["image"].stop  # the prefix: everything up to the last image token
            with handle.lock:
                if adapter.family.shares_prefix and shared < n and \
                        all(prefix_shared(specs[i].intervention, shared, n, spans) for i in rows):
                    for i in rows:
                        if (specs[i].image, shared) not in prefixes:
                            prefixes[(specs[i].image, shared)] = adapter.record_prefix(encoded[i][0], shared,
                                                                                       record=False).cache
                    model_inputs = {"cache": _stacked([prefixes[(specs[i].image, shared)] for i in rows])}
                with session(row_interventions=[specs[i].intervention for i in rows],
                             spans=generation_spans(spans, n, max_new)), torch.inference_mode():
                    prompts = placed({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, handle.model)
                    result = handle.model.generate(**prompts, **model_inputs, **greedy_settings(tok, max_new))
            for i, row in zip(rows, result[:, n:].tolist()):
                out[i] = row[: row.index(eos) + 1] if eos in row else row
    return out
