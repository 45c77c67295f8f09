"""Text models: causal LMs (prefill + greedy generation) and bidirectional encoders (prefill only).

A capture is made in two steps:
1. generation with the active intervention on the fast path (SDPA, KV cache), recording the chosen
   token and the top-k log-probabilities of every step;
2. one recorded forward over prompt + generated tokens.  Row i of a causal map depends only on tokens
   0..i, so the rows of this pass are the rows each generation step computed (tests hold this
   against transformers' eager `output_attentions` during `generate`), and they form one square map.

Inputs longer than `capture.engine.longctx.qk_threshold()` tokens are recorded in the "qk" layout (queries,
keys and one-pass reductions instead of maps; core.qk).  Before anything runs, `check_size`
estimates the peak memory (of the GPU when the model is on one) and disk of the capture
(capture.engine.memory) and refuses one that would not fit, saying how long an input would; the
measured peak is reported in `Capture.timings`.  The model runs where capture.engine.device put it;
inputs go to the device of its first layer.  Encoder-decoders have their own adapter
(capture.text.seq2seq).
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from capture.engine import linears, longctx, memory
from capture.engine.handle import ModelHandle
from capture.engine.recorder import Recorder, small_pass
from capture.engine.session import session
from capture.engine.writer import LayerWriter
from core.errors import InputError
from core.progress import Progress
from core.types import SINK_SHARE, Capture, Output, RunSpec, StepLogprobs
from core.layouts import overview_name

TOP_K = 5
BYTES_PER_WEIGHT = 2  # fp16 on disk


def labels(tokenizer, token_ids) -> list[str]:
    """Tokens as short visible labels (one tokenizer call): newlines as ↵, tabs as ⇥, a bare space as ␣."""
    texts = tokenizer.batch_decode([[int(i)] for i in token_ids], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    out = []
    for text in texts:
        text = text.replace("\n", "↵").replace("\t", "⇥").replace("\r", "")
        out.append("␣" * max(1, len(text)) if text.strip() == "" else text)
    return out


def readable(tokenizer, token_id: int) -> str:
    """One token as a short visible label (`labels`)."""
    return labels(tokenizer, [token_id])[0]


def stored_bytes(n_layers: int, n_heads: int, n_tokens: int, causal: bool) -> int:
    """Bytes a capture of every map takes on disk (lower triangle only for causal models)."""
    per_head = n_tokens * (n_tokens + 1) // 2 if causal else n_tokens * n_tokens
    return n_layers * n_heads * per_head * BYTES_PER_WEIGHT


def step_logprobs(tokenizer, new_ids: list[int], logits) -> list[StepLogprobs]:
    """Per generated token: the chosen token and the top-k log-probabilities, from generate's
    `output_logits` (a tuple of [batch, vocab] per step; batch row 0)."""
    steps = []
    for token_id, step in zip(new_ids, logits):
        logprobs = torch.log_softmax(step[0].float(), dim=-1)  # [vocab]
        top = torch.topk(logprobs, TOP_K)
        steps.append(StepLogprobs(
            token=readable(tokenizer, token_id), token_id=token_id, logprob=float(logprobs[token_id]),
            top=list(zip(labels(tokenizer, top.indices.tolist()), top.values.tolist())),
        ))
    return steps


class StepProgress(StoppingCriteria):
    """Reports each generation step to a progress callback; never stops generation itself."""

    def __init__(self, progress: Progress, total: int, share: float):
        self.progress, self.total, self.share, self.done = progress, total, share, 0

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        self.done += 1
        self.progress(self.share * self.done / self.total, f"generating token {self.done}/{self.total}")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


class TextAdapter:
    """Causal LMs and encoders from transformers."""

    def __init__(self, handle: ModelHandle):
        self.handle = handle
        self.sink_scores: dict = {}  # layer -> ACT sink scores of the last generation (Session.sink_scores)
        self.tokenizer = handle.tokenizer
        config = handle.model.config
        self.max_tokens = int(getattr(config, "max_position_embeddings", 0) or 2048)
        self.device = handle.model.device  # where inputs go (the first layer's device when spread over GPUs)
        self.where = "cpu" if self.device.type == "cpu" else str(self.device)  # what capture.engine.memory measures
        self.dtype_bytes = handle.model.dtype.itemsize

    # ---- inputs -------------------------------------------------------------------------------
    def encode(self, spec: RunSpec) -> list[int]:
        if not spec.prompt.strip():
            raise InputError("The prompt is empty; type some text to run.")
        if spec.chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise InputError(f"{spec.model} has no chat template; untick 'chat'.")
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": spec.prompt}], add_generation_prompt=True, tokenize=True
            )
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            ids = self.tokenizer(spec.prompt)["input_ids"]
        return [int(i) for i in ids]

    def check_size(self, n_prompt: int, max_new_tokens: int, limit_bytes: int, layout: str | None = None,
                   memory_bytes: int | None = None, disk_free: int | None = None) -> memory.Estimate:
        """Refuse an input that is too long for the model, or whose capture in `layout` (default: the
        stored maps) would not fit in memory (`memory_bytes`, default capture.engine.memory.available_bytes())
        or in the cache (`limit_bytes`, and `disk_free` when given).  Returns the estimate."""
        meta = self.handle.meta
        total = n_prompt + max_new_tokens
        if total > self.max_tokens:
            raise InputError(
                f"The input is {n_prompt} tokens (+{max_new_tokens} to generate); {meta.name} takes at most "
                f"{self.max_tokens}. Shorten the prompt or generate fewer tokens."
            )
        layout = layout or ("tril" if meta.causal else "full")
        need = memory.estimate(meta, total, layout, device=self.where, dtype_bytes=self.dtype_bytes)
        # the recorded pass's first run on this model also makes its packed linear weights
        budget = memory.available_bytes(self.where) - linears.bytes_to_pack(self.handle.model) \
            if memory_bytes is None else int(memory_bytes)
        disk_budget = limit_bytes if disk_free is None else min(limit_bytes, disk_free)
        if need.memory_bytes <= budget and need.disk_bytes <= disk_budget:
            return need
        fit = memory.max_tokens(meta, layout, budget, disk_budget, total, device=self.where,
                                dtype_bytes=self.dtype_bytes)
        gpu = "" if self.where == "cpu" else f"GPU memory ({self.where}) "
        if need.memory_bytes > budget:
            problem = (f"needs about {need.memory_gb:.1f} GB of {gpu or 'memory '}for the recorded pass, but "
                       f"{budget / 2**30:.1f} GB is available to it")
            limits = f"free {gpu or 'memory '}or set HEADSCOPE_CAPTURE_GB"
        else:
            problem = (f"needs {need.disk_gb:.1f} GB of cache, but the cache can take "
                       f"{disk_budget / 2**30:.1f} GB")
            limits = "free disk space or raise HEADSCOPE_CACHE_GB"
        ways = [f"shorten the input to at most {max(fit - max_new_tokens, 0):,} prompt tokens"
                + (f" ({max_new_tokens} generated tokens included in the {fit:,})" if max_new_tokens else "")
                if fit > max_new_tokens else "shorten the input"]
        if layout != longctx.LAYOUT and meta.causal and total > longctx.qk_threshold():
            ways.append("drop the attention-level edits (they need stored maps; without them inputs over "
                        f"{longctx.qk_threshold():,} tokens keep only queries and keys)")
        ways.append(limits)
        raise InputError(f"Capturing {total:,} tokens of {meta.name} ({meta.n_layers} layers x {meta.n_heads} heads, "
                         f"{layout} layout) {problem}. To make it fit, " + "; or ".join(ways) + ".")

    # ---- generation (fast path) ---------------------------------------------------------------
    def generate(self, spec: RunSpec, prompt_ids: list[int], progress: Progress, share: float
                 ) -> tuple[list[int], list[StepLogprobs]]:
        """Greedy generation with the spec's intervention active; returns new ids and per-step top-k."""
        tok = self.tokenizer
        eos = self.handle.model.generation_config.eos_token_id
        if eos is None:
            eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if isinstance(eos, int) else eos[0])
        config = GenerationConfig(max_new_tokens=spec.max_new_tokens, do_sample=False, eos_token_id=eos,
                                  pad_token_id=pad, return_dict_in_generate=True, output_logits=True)
        input_ids = torch.tensor([prompt_ids], device=self.device)
        n = len(prompt_ids)
        spans = {"prompt": range(n), "response": range(n, n + spec.max_new_tokens)}
        with session(spec.intervention, spans=spans) as active:
            with torch.inference_mode():
                result = self.handle.model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config,
                    stopping_criteria=StoppingCriteriaList([StepProgress(progress, spec.max_new_tokens, share)]),
                )
        # the recorded pass reuses generation's sink sets (detected once on the prompt's prefill rows)
        self.sink_scores = dict(active.sink_scores)
        new_ids = [int(i) for i in result.sequences[0, len(prompt_ids):]]
        return new_ids, step_logprobs(tok, new_ids, result.logits)

    # ---- the recorded pass --------------------------------------------------------------------
    def capture(self, spec: RunSpec, key: str, store, progress: Progress) -> Capture:
        meta = self.handle.meta
        t0 = time.perf_counter()
        prompt_ids = self.encode(spec)
        notes = []
        max_new = spec.max_new_tokens
        if max_new and not meta.causal:
            notes.append(f"{meta.name} is a bidirectional encoder: it does not generate, so only the prompt was run.")
            max_new = 0
        config = self.handle.model.config
        planned = longctx.choose_layout(meta, len(prompt_ids) + max_new, spec.intervention, config)
        estimate = self.check_size(len(prompt_ids), max_new, store.size_limit, layout=planned,
                                   disk_free=_free_disk(store))
        gen_share = 0.5 if max_new else 0.0
        new_ids, steps = [], []
        self.sink_scores = {}
        with memory.PeakSampler(device=self.where) as peak:
            if max_new:
                new_ids, steps = self.generate(spec, prompt_ids, progress, gen_share)
            t_gen = time.perf_counter()
            ids = prompt_ids + new_ids
            spans = {"prompt": range(0, len(prompt_ids))}
            if new_ids:
                spans["response"] = range(len(prompt_ids), len(ids))
            layout = longctx.choose_layout(meta, len(ids), spec.intervention, config)  # generation may stop early
            layout_info = {}

            input_ids = torch.tensor([ids], device=self.device)
            small = layout != longctx.LAYOUT and small_pass(meta.n_layers, meta.n_heads, len(ids))
            with LayerWriter(store, key, meta.n_layers, progress, gen_share, defer=small) as writer:
                if layout == longctx.LAYOUT:
                    recorder = longctx.QKRecorder(meta, len(ids), writer.submit,
                                                  split=len(prompt_ids) if new_ids else None)
                else:
                    recorder = Recorder(meta.n_heads, layout, writer.submit, defer=small)
                # an empty "response" span in a prefill-only run, so edits on it resolve (to nothing)
                session_spans = {"response": range(len(ids), len(ids)), **spans}
                try:
                    with session(spec.intervention, recorder=recorder, spans=session_spans,
                                 sink_scores=self.sink_scores):
                        with torch.inference_mode(), linears.packed(self.handle.model):
                            if meta.causal:
                                with last_layer_mlp_on_last_row(self.handle):
                                    out = self.handle.model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
                            else:
                                self.handle.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
                    recorder.finish()
                    shares = None if layout == longctx.LAYOUT else recorder.sink_shares()
                    if shares is not None:  # GPT-OSS: the sink logit's share of each row (Capture.sink_share)
                        store.put_array(key, SINK_SHARE, shares)
                finally:
                    if layout == longctx.LAYOUT:
                        recorder.close()
            if layout == longctx.LAYOUT:  # reductions and head overviews, before the metadata record
                from core.qk import HEAD_OVERVIEW_BINS, reduction_name

                for name, array in recorder.arrays.items():
                    store.put_array(key, reduction_name(name), array)
                store.put_array(key, overview_name(min(HEAD_OVERVIEW_BINS, len(ids))), recorder.head_overview)
                layout_info = recorder.params().to_json()
        next_top = []
        if meta.causal:
            logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            top = torch.topk(logprobs, TOP_K)
            next_top = list(zip(labels(self.tokenizer, top.indices.tolist()), top.values.tolist()))
        t_cap = time.perf_counter()
        output = Output(
            text=self.tokenizer.decode(new_ids, skip_special_tokens=True) if new_ids else "",
            token_ids=ids, steps=steps, next_top=next_top, notes=notes,
        )
        return Capture(
            key=key, spec=spec, meta=meta, tokens=labels(self.tokenizer, ids), spans=spans,
            output=output, layout=layout, store=store, layout_info=layout_info,
            timings={"generate_s": t_gen - t0, "capture_s": t_cap - t_gen,
                     **peak.report(), "estimate_mb": round(estimate.memory_bytes / 2**20, 1)},
        )


LAST_ROW_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # decoder layers: attention, then a per-row MLP block


@contextlib.contextmanager
def last_layer_mlp_on_last_row(handle: ModelHandle) -> Iterator[None]:
    """In a pass that keeps only the last row's logits (logits_to_keep=1), the last decoder layer's MLP
    runs on the last row alone: its earlier rows feed nothing after it, and their maps are recorded
    by the layer's attention, which runs first.  The post-attention norm hands the MLP the last row;
    the residual add broadcasts it (the earlier rows of the layer's output are then not the model's,
    and nothing reads them).  Llama-style layers only (LAST_ROW_TYPES); SmolLM2 at 128 tokens: the
    MLP of one layer of 30, ~2% of a capture."""
    blocks = handle.decoder_layers() if handle.model.config.model_type in LAST_ROW_TYPES else None
    norm = getattr(blocks[-1], "post_attention_layernorm", None) if blocks else None
    if norm is None or not hasattr(blocks[-1], "mlp"):
        yield
        return
    hook = norm.register_forward_hook(lambda _module, _args, out: out[:, -1:])
    try:
        yield
    finally:
        hook.remove()


def _free_disk(store) -> int | None:
    """Free bytes on the cache's disk (None if it cannot be told)."""
    import shutil

    try:
        return shutil.disk_usage(store.directory).free
    except (OSError, AttributeError):
        return None
