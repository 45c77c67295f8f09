"""Encoder-decoder models (T5, BART): one capture with one token axis, three groups of layers.

The axis is the encoder's tokens, then the decoder's (its start token, then what it generated), with
spans "encoder" and "decoder", and "prompt" (encoder tokens and the decoder's start token: everything
given) and "response" (the generated tokens) as the explorer expects.  The layers are stored in three
groups, in this order (ModelMeta.groups):

    encoder   [0, E)        encoder self-attention       block [encoder, encoder], bidirectional
    decoder   [E, E + D)    decoder self-attention       block [decoder, decoder], causal
    cross     [E + D, E + 2D)  decoder -> encoder attention  block [decoder, encoder]

Each layer's map is a "full" square over the whole axis with only its block filled (zeros elsewhere),
so the model view and the head view draw any layer as they draw an encoder's.  Interventions address
layers by this global index, and positions on the same axis (capture.engine.session.Session.place:
decoder rows and keys sit after the encoder's).

A capture is made as for decoders (capture.text.adapter): greedy generation with the intervention on
the fast path, then one recorded forward of the encoder over the prompt and the decoder over its start
token and the generated tokens.  Deviation: Whisper-style models (audio encoders) are not served; only
text-to-text models are.
"""
from __future__ import annotations

import time

import torch
from transformers import GenerationConfig, StoppingCriteriaList

from capture.engine import memory
from capture.engine.handle import ModelHandle, attention_layers, prepare
from capture.engine.recorder import Recorder, small_pass
from capture.engine.session import session
from capture.engine.writer import LayerWriter
from capture.text.adapter import TOP_K, StepProgress, TextAdapter, _free_disk, labels, step_logprobs
from core.errors import InputError, ModelUnavailable
from core.progress import Progress
from core.types import Capture, Output, RunSpec

LAYOUT = "full"


def prepare_seq2seq(name: str, model, tokenizer) -> ModelHandle:
    """Index an encoder-decoder's layers in three groups (encoder self, decoder self, cross) and prepare it."""
    encoder, decoder = model.get_encoder(), model.get_decoder()
    enc, dec = attention_layers(encoder), attention_layers(decoder)
    cross = attention_layers(decoder, cross=True)
    if not enc or not dec or len(cross) != len(dec):
        raise ModelUnavailable(f"{name} is an encoder-decoder whose encoder, decoder and cross-attention layers "
                               "HeadScope cannot all find.")
    config = model.config
    heads = {getattr(config, a) for a in ("encoder_attention_heads", "decoder_attention_heads") if hasattr(config, a)}
    if len(heads) > 1:
        raise ModelUnavailable(f"{name} has {' and '.join(map(str, sorted(heads)))} heads in its encoder and decoder; "
                               "HeadScope captures encoder-decoders whose layers all have the same number of heads.")
    for group, layers in (("encoder", enc), ("decoder", dec), ("cross", cross)):
        for attn, _out in layers:
            attn.headscope_group = group
    n_enc, n_dec = len(enc), len(dec)
    groups = {"encoder": (0, n_enc), "decoder": (n_enc, n_enc + n_dec), "cross": (n_enc + n_dec, n_enc + 2 * n_dec)}
    return prepare(name, model, tokenizer, layers=enc + dec + cross, groups=groups)


class BlockRecorder:
    """Hands each layer of an encoder-decoder pass to a "full" Recorder over the whole axis (n tokens:
    `n_encoder` encoder tokens, then the decoder's): the call's rows and keys placed in the layer's
    block, every other row zero."""

    def __init__(self, recorder: Recorder, meta, n_encoder: int, n_tokens: int):
        self.recorder, self.meta = recorder, meta
        self.n_encoder, self.n = n_encoder, n_tokens
        self.started: set[int] = set()

    def take(self, layer: int, first_head: int, first_row: int, n_keys: int, weights: torch.Tensor) -> None:
        """weights  # [heads_in_block, rows, n_keys] for rows first_row.. (axis positions) of one layer's call."""
        group = self.meta.group_of(layer)
        k_first = self.n_encoder if group == "decoder" else 0
        rows = (0, self.n_encoder) if group == "encoder" else (self.n_encoder, self.n)
        if layer not in self.started:  # the rows outside the layer's block: zero
            self.started.add(layer)
            for start, stop in ((0, rows[0]), (rows[1], self.n)):
                if stop > start:
                    self.recorder.take(layer, 0, start, self.n, torch.zeros(
                        self.meta.n_heads, stop - start, self.n, device=weights.device))
        placed = torch.nn.functional.pad(weights, (k_first, self.n - k_first - weights.shape[-1]))  # [heads, rows, n]
        self.recorder.take(layer, first_head, first_row, self.n, placed)

    def finish(self) -> None:
        self.recorder.finish()


class Seq2SeqAdapter(TextAdapter):
    """T5, BART and other text-to-text encoder-decoders from transformers."""

    def encode(self, spec: RunSpec) -> list[int]:
        if spec.chat:
            raise InputError(f"{spec.model} is an encoder-decoder without a chat template; untick 'chat'.")
        return super().encode(spec)

    def _spans(self, n_encoder: int, n_decoder: int) -> dict[str, range]:
        n = n_encoder + n_decoder
        return {"encoder": range(0, n_encoder), "decoder": range(n_encoder, n), "prompt": range(0, n_encoder + 1),
                "response": range(n_encoder + 1, n)}

    def generate(self, spec: RunSpec, prompt_ids: list[int], progress: Progress, share: float
                 ) -> tuple[list[int], list]:
        """Greedy decoding with the spec's intervention active; returns the decoder's ids (its start token
        first) and per-step top-k."""
        model = self.handle.model
        eos = model.generation_config.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        config = GenerationConfig(max_new_tokens=spec.max_new_tokens, do_sample=False, eos_token_id=eos,
                                  pad_token_id=pad, decoder_start_token_id=model.generation_config.decoder_start_token_id,
                                  return_dict_in_generate=True, output_logits=True)
        input_ids = torch.tensor([prompt_ids], device=self.device)
        spans = self._spans(len(prompt_ids), 1 + spec.max_new_tokens)
        with session(spec.intervention, spans=spans) as active:
            with torch.inference_mode():
                result = model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config,
                    stopping_criteria=StoppingCriteriaList([StepProgress(progress, spec.max_new_tokens, share)]),
                )
        self.sink_scores = dict(active.sink_scores)
        decoder_ids = [int(i) for i in result.sequences[0]]
        return decoder_ids, step_logprobs(self.tokenizer, decoder_ids[1:], result.logits)

    def capture(self, spec: RunSpec, key: str, store, progress: Progress) -> Capture:
        meta = self.handle.meta
        model = self.handle.model
        t0 = time.perf_counter()
        prompt_ids = self.encode(spec)
        n_enc = len(prompt_ids)
        estimate = self.check_size(n_enc + 1, spec.max_new_tokens, store.size_limit, layout=LAYOUT,
                                   disk_free=_free_disk(store))
        gen_share = 0.5 if spec.max_new_tokens else 0.0
        self.sink_scores = {}
        with memory.PeakSampler() as peak:
            if spec.max_new_tokens:
                decoder_ids, steps = self.generate(spec, prompt_ids, progress, gen_share)
            else:
                decoder_ids, steps = [int(model.generation_config.decoder_start_token_id)], []
            t_gen = time.perf_counter()
            n = n_enc + len(decoder_ids)
            spans = self._spans(n_enc, len(decoder_ids))
            if len(decoder_ids) == 1:
                del spans["response"]
            small = small_pass(meta.n_layers, meta.n_heads, n)
            with LayerWriter(store, key, meta.n_layers, progress, gen_share, defer=small) as writer:
                recorder = BlockRecorder(Recorder(meta.n_heads, LAYOUT, writer.submit, defer=small), meta, n_enc, n)
                session_spans = {"response": range(n, n), **spans}
                with session(spec.intervention, recorder=recorder, spans=session_spans, sink_scores=self.sink_scores):
                    with torch.inference_mode():
                        enc = torch.tensor([prompt_ids], device=self.device)
                        dec = torch.tensor([decoder_ids], device=self.device)
                        out = model(input_ids=enc, attention_mask=torch.ones_like(enc), decoder_input_ids=dec,
                                    use_cache=False)
                recorder.finish()
        logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        top = torch.topk(logprobs, TOP_K)
        new_ids = decoder_ids[1:]
        output = Output(
            text=self.tokenizer.decode(new_ids, skip_special_tokens=True) if new_ids else "",
            token_ids=prompt_ids + decoder_ids, steps=steps,
            next_top=list(zip(labels(self.tokenizer, top.indices.tolist()), top.values.tolist())),
        )
        t_cap = time.perf_counter()
        return Capture(
            key=key, spec=spec, meta=meta, tokens=labels(self.tokenizer, prompt_ids + decoder_ids), spans=spans,
            output=output, layout=LAYOUT, store=store,
            timings={"generate_s": t_gen - t0, "capture_s": t_cap - t_gen, **peak.report(),
                     "estimate_mb": round(estimate.memory_bytes / 2**20, 1)},
        )
