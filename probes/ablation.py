"""Single-head ablation sweep, batched (METHODS.md §10.1; Michel et al. 2019's pruning importance).

Every head is ablated alone (zero, mean or uniform attention) and scored by the drop in the summed
log-prob of the scored tokens; `ablation_sweep` runs B heads per forward, one per batch row, through
the session's per-row head gates or row interventions (capture.engine.session).
"""
from __future__ import annotations

import numpy as np
import torch

from analytics.importance import rank_heads
from capture.engine.handle import ModelHandle, attention_layers
from capture.engine.hooks import hidden_arg, removing, with_hidden
from capture.engine.session import session
from core.errors import InputError, InterventionError
from core.interventions import uniform_ablation
from core.probe_results import AblationParams
from core.progress import Progress, no_progress
from probes.common import haystack_ids, require_causal_lm

ABLATION_MODES = ("zero", "mean", "uniform")
LOGIT_BYTES_BUDGET = 64 * 2**20  # per ablation batch row group: bounds the [rows, scored, vocab] logits


def _out_projections(handle: ModelHandle) -> list[torch.nn.Module]:
    """The output projection (o_proj) of each layer: its input is the concatenated head outputs z."""
    return [out for _, out in attention_layers(handle.model)]


def _ablation_inputs(tok, p: AblationParams) -> tuple[list[int], range]:
    """(token ids, scored positions): the target appended, or the last `score_last` prompt tokens."""
    ids = (tok(p.prompt, add_special_tokens=True)["input_ids"] if p.prompt
           else haystack_ids(tok, p.n_tokens))
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
    require_causal_lm(handle, "ablation")
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
