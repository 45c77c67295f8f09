"""DuoAttention, mini (Xiao et al. 2024; METHODS.md §1.3): which KV heads need full attention.

One gate alpha per (layer, KV head) mixes full and streaming (sink + recent window) attention; the
gates are trained on synthetic passkey contexts so that the final hidden states at the answer
positions stay those of full attention, while an L1 term pushes them to 0.  The mixing runs as its
own transformers attention function ("headscope_duo"), set for the duration of the probe.
"""
from __future__ import annotations

import contextvars

import numpy as np
import torch

from capture.engine.handle import ModelHandle
from core.errors import InputError
from core.probe_results import DuoParams
from core.progress import Progress
from probes.common import frozen, haystack_ids, require_causal_lm, top_heads

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
    hay = tokenizer.decode(haystack_ids(tokenizer, n_hay, start=start))
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
    require_causal_lm(handle, "duo")
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
        with frozen(model):
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
                        "top": top_heads(final)}}
