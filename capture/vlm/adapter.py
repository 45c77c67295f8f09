"""Vision-language models: a picture and a question, a greedy answer, and the language model's attention
over text and image tokens, for every family capture.vlm.families knows.

A capture is made in two steps, as for text (capture/text/adapter.py):
1. the answer: greedy generation on the fast path (SDPA, KV cache, the spec's intervention active),
   exactly what `capture.vlm.model.answer` writes, with the top-k log-probabilities of every step;
2. one recorded forward of the whole model over prompt + answer (the picture goes through the vision
   tower and the projector again; only the language model's attention layers are HeadScope's layers,
   `registry.prepare(..., layers_of=language_model)`, so layer l of the capture is LM layer l and the
   vision tower runs plain SDPA).  Row i of a causal map depends only on tokens 0..i, so these rows
   are the rows each generation step computed.  The per-token inputs (token_type_ids ...) go on over
   the answer with the value a generated token has (VlmInputs.answered), so the pass builds the mask
   the model built while answering.  Families whose mask lets a token see later ones (Gemma 3's
   bidirectional image block, PaliGemma's prefix-LM: `Family.layout` "full") store whole square maps
   (layout "full"), the rest the lower triangle ("tril").

Inputs: `RunSpec.image` names the picture (a sample photo, "sha256:<hex>" of an upload, or a
procedural scene "scene-<seed>": capture.images), `RunSpec.prompt` is the question, asked through the
model's chat template (the handle's processor: capture.vlm.model.VlmProcessor for LLaVA,
capture.vlm.chat.ChatProcessor for the others); `max_new_tokens` 0 runs the prompt only.

Tokens: the text tokens as readable labels, "patch(r,c)" for the image tokens of a one-view picture,
"<view>(r,c)" with several views ("tile3(0,1)", "global(2,2)", "base(..)", "tiles(..)"), "img:newline"
for LLaVA-NeXT's row ends; a LLaVA checkpoint with "full" feature selection keeps the vision CLS token
first: "img:CLS", span "image_cls".  Spans: "image" (first to last image token), "image:<view>" per view,
"image_block" (the picture with its marker tokens, where they lie outside "image"), "question" (the
question's own tokens inside the chat template), "prompt" (every input token), "answer" and "response"
(the generated tokens, both names: the text pages read "response").  Stored with the capture: the
picture the boxes are in ("image", read back by `Capture.image()`: LLaVA's as the model saw it, the
others' original), each image token's position and box in its pixels ("image_positions"  # [token]
int32, "image_boxes"  # [token, 4] float32, x0 y0 x1 y1, NaN for no place; analytics.vlm_picture), the
residual stream entering each LM layer ("hidden"  # [layer, token, dim] float16, for VAR's massive
activations, analytics.vlm), and the vision tower's own maps where it is a ViT over one view
("vision_attention", [layer, head, token, token] float16, with its patch grid "vision_grid": `Family.tower`),
taken from the tower's run inside the recorded pass (capture.vlm.tower: one view's eager weights beside
its SDPA output), not from a second tower pass.  A small pass writes all of them, its layers and
thumbnails included, in one index transaction, and those under 32 KB in their index rows rather than in
a file each (cache.store.Store.put_array(..., inline=True): a file costs more to create than they do to
write); old captures, all files, read as before.
"""
from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

import capture.images as images
from capture.engine.device import to_host
from capture.engine.handle import ModelHandle
from capture.engine.recorder import BranchRecorder, Recorder, small_pass
from capture.engine.session import session
from capture.engine.writer import LayerWriter
from capture.text.adapter import TOP_K, StepProgress, labels, stored_bytes
from capture.vlm.inputs import VlmInputs, placed, question_span
from capture.vlm.model import greedy_settings
from core.errors import InputError
from core.progress import Progress, no_progress
from core.types import Capture, Output, RunSpec, StepLogprobs

HIDDEN = "hidden"  # cache entry: the residual stream of the recorded pass, [layer, token, dim] float16
VISION = "vision_attention"  # cache entry: the vision tower's maps, [layer, head, token, token] float16
VISION_GRID = "vision_grid"  # cache entry: [2] int32, the tower's patch grid (rows, cols)
POSITIONS = "image_positions"  # cache entry: [image token] int32, their positions in the sequence
BOXES = "image_boxes"  # cache entry: [image token, 4] float32, (x0, y0, x1, y1) in the stored picture's pixels


_LABELS: "weakref.WeakKeyDictionary[object, dict[int, str]]" = weakref.WeakKeyDictionary()


def token_labels(tokenizer, token_ids) -> list[str]:
    """capture.text.adapter.labels (each token decoded alone, so a token's label never depends on its
    neighbours), remembered per tokenizer: the tokens a model's captures share (its chat template's,
    the picture's, the answers') are decoded once, the rest in one tokenizer call."""
    known = _LABELS.setdefault(tokenizer, {})
    ids = [int(i) for i in token_ids]
    missing = list(dict.fromkeys(i for i in ids if i not in known))
    if missing:
        known.update(zip(missing, labels(tokenizer, missing)))
    return [known[i] for i in ids]


def generation_spans(spans: dict[str, range], n: int, max_new_tokens: int) -> dict[str, range]:
    """The prompt's spans plus "response" and "answer": the positions an n-token prompt's answer will take."""
    return {**spans, "response": range(n, n + max_new_tokens), "answer": range(n, n + max_new_tokens)}


@dataclass
class RecordedPrefix:
    """The first `length` prompt tokens (system prompt and picture) run once with nothing edited, and
    (unless asked not to) recorded: what every question about the same picture continues from
    (`VlmAdapter.record_from`, capture.vlm.answers.answer_ids)."""
    length: int
    ids: list[int]  # its token ids
    cache: object  # transformers DynamicCache: [1, kv_head, length, head_dim] per layer
    maps: dict[int, np.ndarray]  # layer -> [head, length (length + 1) / 2] float16 (tril); {} unrecorded
    residual: torch.Tensor | None  # [layer, length, dim] float16: x^l entering each LM layer; None unrecorded


class VlmAdapter:
    """Image-text-to-text models with their processor (capture.vlm.model.VlmProcessor for LLaVA,
    capture.vlm.chat.ChatProcessor for the other families)."""

    def __init__(self, handle: ModelHandle):
        self.handle = handle
        self.processor = handle.tokenizer
        self.tokenizer = self.processor.tokenizer
        self.family = self.processor.family  # capture.vlm.families.Family
        self.layout = self.family.layout  # "tril" | "full"
        self.sink_scores: dict = {}

    # ---- inputs -------------------------------------------------------------------------------
    def encode(self, spec: RunSpec):
        """(VlmInputs, spans of the prompt) for the spec's picture and question."""
        if not spec.prompt.strip():
            raise InputError("The question is empty; type a question about the picture.")
        picture = images.load_image(spec.image)
        inputs = self.processor.encode(picture, spec.prompt)
        ids = [int(i) for i in inputs.input_ids[0]]
        after = inputs.spans.get("image_block", inputs.image_positions).stop
        spans = {"prompt": range(len(ids)), **inputs.spans,
                 "question": question_span(self.tokenizer, ids, spec.prompt, after)}
        return inputs, spans

    def labels(self, ids: list[int], inputs: VlmInputs, texts: list[str] | None = None) -> list[str]:
        """Readable token labels; each image token's view and cell ("patch(r,c)", "tile0(r,c)" ...,
        "img:CLS" for a kept CLS token).  `texts`: capture.text.adapter.labels of `ids`, where already made."""
        out = token_labels(self.tokenizer, ids) if texts is None else list(texts)
        for position, label in zip(inputs.positions, inputs.places.labels()):
            out[position] = label
        for position in inputs.spans.get("image_cls", ()):
            out[position] = "img:CLS"
        return out

    # ---- generation (fast path) ---------------------------------------------------------------
    def generate(self, spec: RunSpec, inputs, spans: dict[str, range], progress: Progress, share: float):
        """Greedy answer with the spec's intervention active: (new ids, per-step top-k), with the
        settings of capture.vlm.model.answers (so the text is the same)."""
        tok = self.tokenizer
        n = inputs.input_ids.shape[1]
        with session(spec.intervention, spans=generation_spans(spans, n, spec.max_new_tokens)) as active:
            with torch.inference_mode():
                result = self.handle.model.generate(
                    **placed(inputs.model_inputs(), self.handle.model), **greedy_settings(tok, spec.max_new_tokens),
                    return_dict_in_generate=True, output_logits=True,
                    stopping_criteria=[StepProgress(progress, spec.max_new_tokens, share)])
        self.sink_scores = dict(active.sink_scores)  # the recorded pass edits the very same sinks
        new_ids = [int(i) for i in result.sequences[0, n:]]
        return new_ids, self._steps(new_ids, result.logits)

    def _steps(self, new_ids: list[int], logits) -> list[StepLogprobs]:
        """capture.text.adapter.step_logprobs over all steps at once (one softmax, one top-k, one tokenizer
        call for every label): per generated token the chosen token and the top-k log-probabilities, from
        generate's `output_logits` (a tuple of [batch, vocab] per step; batch row 0)."""
        n = min(len(new_ids), len(logits))
        if not n:
            return []
        logprobs = torch.log_softmax(torch.stack([step[0] for step in logits[:n]]).float(), dim=-1)  # [step, vocab]
        top = torch.topk(logprobs, TOP_K)
        chosen = logprobs[torch.arange(n), torch.tensor(new_ids[:n])].tolist()
        names = token_labels(self.tokenizer, new_ids[:n] + top.indices.reshape(-1).tolist())
        values = top.values.tolist()
        return [StepLogprobs(token=names[s], token_id=new_ids[s], logprob=chosen[s],
                             top=list(zip(names[n + s * TOP_K:n + (s + 1) * TOP_K], values[s])))
                for s in range(n)]

    # ---- the recorded pass --------------------------------------------------------------------
    @contextlib.contextmanager
    def _residual(self, into: dict[int, torch.Tensor]) -> Iterator[None]:
        """Keep the residual stream entering each LM decoder layer, x^l  # [token, dim] float16, for
        VAR's massive activations (METHODS §2.2): ~4 MB for shapes-vlm, so it rides with the capture."""
        from capture.engine.hooks import hidden_arg, removing

        blocks = self.handle.decoder_layers() or []

        def hook(index: int):
            def pre(_module, args, kwargs):
                into[index] = hidden_arg(args, kwargs)[0].detach().to(torch.float16)
            return pre

        with removing([b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]):
            yield

    def capture(self, spec: RunSpec, key: str, store, progress: Progress) -> Capture:
        meta = self.handle.meta
        t0 = time.perf_counter()
        inputs, spans = self.encode(spec)
        need = stored_bytes(meta.n_layers, meta.n_heads, inputs.input_ids.shape[1] + spec.max_new_tokens,
                            causal=self.layout == "tril")
        if need > store.size_limit:
            raise InputError(f"Capturing this run needs {need / 2**30:.1f} GB of cache but the cache holds "
                             f"{store.size_limit / 2**30:.1f} GB; raise HEADSCOPE_CACHE_GB or shorten the question.")
        gen_share = 0.5 if spec.max_new_tokens else 0.0
        self.sink_scores = {}
        new_ids, steps = [], []
        if spec.max_new_tokens:
            new_ids, steps = self.generate(spec, inputs, spans, progress, gen_share)
        t_gen = time.perf_counter()
        capture = self.record(spec, key, store, inputs, spans, new_ids, steps, progress, gen_share)
        capture.timings["generate_s"] = t_gen - t0
        return capture

    def record_prefix(self, inputs, length: int, record: bool = True) -> RecordedPrefix:
        """Run the first `length` tokens of `inputs` (picture included) once, unedited; with `record`,
        record their maps and residual stream too (the answers alone need only the cache).  Families with
        `shares_prefix` only (causal, 1-D positions: LLaVA)."""
        if not self.family.shares_prefix:
            raise ValueError(f"{self.family.label} answers do not continue from a cached prefix.")
        meta = self.handle.meta
        maps: dict[int, np.ndarray] = {}
        residual: dict[int, torch.Tensor] = {}
        small = small_pass(meta.n_layers, meta.n_heads, length)
        recorder = Recorder(meta.n_heads, "tril", lambda layer, m, _overview: maps.__setitem__(layer, m),
                            defer=small) if record else None
        input_ids = inputs.input_ids[:, :length]
        with self._residual(residual) if record else contextlib.nullcontext(), \
                session(recorder=recorder, spans={"prompt": range(length)}), torch.inference_mode():
            out = self.handle.model(**placed({"input_ids": input_ids, "pixel_values": inputs.pixel_values,
                                              "attention_mask": torch.ones_like(input_ids)}, self.handle.model),
                                    use_cache=True, logits_to_keep=1)
        if recorder is not None:
            recorder.finish()
        stacked = torch.stack([residual[l] for l in range(meta.n_layers)]) if len(residual) == meta.n_layers else None
        return RecordedPrefix(length, [int(i) for i in input_ids[0]], out.cache, maps, stacked)

    def record(self, spec: RunSpec, key: str, store, inputs, spans: dict[str, range], new_ids: list[int],
               steps=(), progress: Progress = no_progress, share: float = 0.0, vision: bool = True) -> Capture:
        """The recorded pass over prompt + `new_ids` (the answer `generate` wrote, with the same
        intervention), stored under `key`: the LM's maps, its residual stream and (`vision`) the vision
        tower's maps."""
        meta = self.handle.meta
        t_gen = time.perf_counter()
        ids, spans = self._answered(inputs, spans, new_ids)
        session_spans = {"response": range(len(ids), len(ids)), "answer": range(len(ids), len(ids)), **spans}
        residual: dict[int, torch.Tensor] = {}
        small = small_pass(meta.n_layers, meta.n_heads, len(ids))
        view = self.family.tower(self.handle.model, inputs) if vision and self.family.tower else None
        with contextlib.ExitStack() as writes:  # a small pass: every array in one index transaction
            with LayerWriter(store, key, meta.n_layers, progress, share, defer=small, inline=True) as writer:
                with self._residual(residual), \
                        view.recording() if view is not None else contextlib.nullcontext([]) as tower:
                    recorder = Recorder(meta.n_heads, self.layout, writer.submit, defer=small)
                    with session(spec.intervention, recorder=recorder, spans=session_spans,
                                 sink_scores=self.sink_scores):
                        with torch.inference_mode():
                            out = self.handle.model(**placed(inputs.answered(ids), self.handle.model),
                                                    use_cache=False, logits_to_keep=1)
                    recorder.finish()
                arrays = self._picture_arrays(inputs)
                if len(residual) == meta.n_layers:  # x^l entering each LM layer  # [layer, token, dim] float16
                    arrays[HIDDEN] = to_host(torch.stack([residual[l] for l in range(meta.n_layers)]))
                if view is not None:  # [layer, head, token, token] float16: recorded in the pass, else run again
                    arrays.update({VISION: tower[0] if tower else view.maps(),
                                   VISION_GRID: np.asarray(view.grid(), np.int32)})
                # the writer's deferred layers and thumbnails go in as it closes, in the same transaction (a
                # large pass streams its layers from the writer's thread, which must not wait on this one)
                writes.enter_context(store.transaction() if small else contextlib.nullcontext())
            with store.transaction():  # nested in the one above for a small pass
                for name, array in arrays.items():
                    store.put_array(key, name, array, inline=True)  # the small ones in the index, no file each
        return self._capture(spec, key, store, ids, spans, inputs, new_ids, steps, out.logits[0, -1], t_gen)

    def record_from(self, prefix: RecordedPrefix, store, items: list[tuple]) -> list[Capture]:
        """The recorded passes of several answered questions about one picture, with no intervention,
        continued from the picture's `prefix` (`record_prefix`) in one forward: items are (spec, key,
        inputs, spans, new_ids) as for `record(..., vision=False)`, and each capture equals that pass's.

        Each question's tokens after the prefix and its answer are one branch of the sequence: a 4-D
        mask lets a branch see the prefix and itself only, its positions continue from the prefix, and
        BranchRecorder hands its rows, with its keys only, to its own Recorder seeded with
        the prefix's maps.  One pass for all of a picture's questions reads the weights once
        (probes.vlm_accuracy's recorded passes: weight reads, not arithmetic, bound them on a CPU)."""
        meta = self.handle.meta
        t_gen = time.perf_counter()
        p = prefix.length
        answered = [self._answered(inputs, spans, new_ids) for _spec, _key, inputs, spans, new_ids in items]
        for (spec, *_rest), (ids, _spans) in zip(items, answered):
            if not spec.intervention.empty or ids[:p] != prefix.ids:
                raise ValueError("record_from continues plain passes whose prompt starts with the recorded prefix.")
        tails = [ids[p:] for ids, _ in answered]  # each branch: the question's tokens after the prefix + answer
        lengths = [len(t) for t in tails]
        total = sum(lengths)
        mask = torch.zeros(1, 1, total, p + total, dtype=torch.bool)  # [1, 1, query, key]: True may attend
        mask[..., :p] = True
        positions, ends, row = [], [], 0
        for m in lengths:
            mask[0, 0, row:row + m, p + row:p + row + m] = torch.ones(m, m, dtype=torch.bool).tril()
            positions += range(p, p + m)
            row += m
            ends.append(row - 1)
        residual: dict[int, torch.Tensor] = {}
        small = small_pass(meta.n_layers, meta.n_heads, p + max(lengths))
        with contextlib.ExitStack() as stack:
            writers = [stack.enter_context(LayerWriter(store, key, meta.n_layers, no_progress, 0.0, defer=small))
                       for _spec, key, *_rest in items]
            stack.enter_context(self._residual(residual))
            recorder = BranchRecorder(
                [Recorder(meta.n_heads, "tril", w.submit, defer=small, prefix=prefix.maps) for w in writers],
                p, lengths)
            try:
                with session(recorder=recorder, spans={"prompt": range(p)}), torch.inference_mode():
                    packed = {"input_ids": torch.tensor([[t for tail in tails for t in tail]]), "attention_mask": mask,
                              "position_ids": torch.tensor([positions])}
                    out = self.handle.model(**placed(packed, self.handle.model),
                                            cache=prefix.cache, use_cache=True, logits_to_keep=torch.tensor(ends))
            finally:
                if prefix.cache.get_seq_length() > p:  # back to the prefix alone (a negative count: tokens to drop)
                    prefix.cache.crop(p - prefix.cache.get_seq_length())
            recorder.finish()
        captures, row = [], 0
        for b, ((spec, key, inputs, _spans, new_ids), (ids, spans)) in enumerate(zip(items, answered)):
            arrays = self._picture_arrays(inputs)
            if len(residual) == meta.n_layers and prefix.residual is not None:
                arrays[HIDDEN] = to_host(torch.stack([torch.cat([prefix.residual[l], residual[l][row:row + lengths[b]]])
                                                      for l in range(meta.n_layers)]))
            with store.transaction():
                for name, array in arrays.items():
                    store.put_array(key, name, array, inline=True)  # the small ones in the index, no file each
            captures.append(self._capture(spec, key, store, ids, spans, inputs, new_ids, (), out.logits[0, b], t_gen))
            row += lengths[b]
        return captures

    @staticmethod
    def _picture_arrays(inputs: VlmInputs) -> dict[str, np.ndarray]:
        """What a capture stores about its picture: the picture, each image token's position and box on it."""
        return {"image": inputs.shown, POSITIONS: np.asarray(inputs.positions, np.int32), BOXES: inputs.places.boxes}

    @staticmethod
    def _answered(inputs, spans: dict[str, range], new_ids: list[int]):
        """(prompt + answer ids, spans with "answer"/"response")."""
        prompt_ids = [int(i) for i in inputs.input_ids[0]]
        ids = prompt_ids + list(new_ids)
        spans = dict(spans)
        if new_ids:
            spans["answer"] = spans["response"] = range(len(prompt_ids), len(ids))
        return ids, spans

    def _capture(self, spec: RunSpec, key: str, store, ids: list[int], spans: dict[str, range], inputs: VlmInputs,
                 new_ids: list[int], steps, last_logits: torch.Tensor, t_gen: float) -> Capture:
        """The Capture of a recorded pass; last_logits  # [vocab] at its last row give the next-token top-k."""
        top = torch.topk(torch.log_softmax(last_logits.float(), dim=-1), TOP_K)
        texts = token_labels(self.tokenizer, ids + top.indices.tolist())
        output = Output(
            text=self.tokenizer.decode(new_ids, skip_special_tokens=True).strip() if new_ids else "",
            token_ids=ids, steps=list(steps),
            next_top=list(zip(texts[len(ids):], top.values.tolist())),
        )
        return Capture(
            key=key, spec=spec, meta=self.handle.meta, tokens=self.labels(ids, inputs, texts[:len(ids)]), spans=spans, output=output,
            layout=self.layout, store=store,
            timings={"capture_s": time.perf_counter() - t_gen},
        )
