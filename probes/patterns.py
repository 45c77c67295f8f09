"""The pattern probe: repeated random tokens (RazorAttention, shortened; METHODS.md §1.4).

One recorded causal pass over BOS + a block of random token ids repeated a few times scores every head
as previous-token, induction, echo and duplicate head (analytics.heads), and marks RazorAttention's
retrieval KV heads.  The probe's maps are stored like a capture's, so a page can show them
(`pattern_capture`).
"""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from analytics import heads
from capture.engine.handle import ModelHandle
from capture.engine.recorder import Recorder
from capture.engine.session import session
from capture.text.adapter import labels
from core.layouts import unpack_tril
from core.probe_results import PatternParams, ProbeResult
from core.progress import Progress
from core.types import Capture, Output, RunSpec
from probes.common import require_causal_lm, top_heads


def pattern_probe(handle: ModelHandle, p: PatternParams, put, progress: Progress) -> dict:
    """BOS + `period` random ids from [low, high) repeated `repeats` times; one recorded causal pass.

    Deviations from RazorAttention (METHODS.md §1.4): P = 64 and 3 repeats instead of P = 2500 and 4
    (a 193-token probe; scores are per-query means in [0, 1], same ranking); a real causal mask.
    The probe's maps are stored too (`L000`...), with a capture-shaped record, so a page can show them.
    """
    require_causal_lm(handle, "patterns")
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
    top = {name: top_heads(scores[name]) for name in heads.PATTERNS}
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
