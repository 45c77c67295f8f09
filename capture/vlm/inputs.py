"""One prompt with one picture, ready for a vision-language model (`VlmInputs`), and the question's
place in it (`question_span`).

Every VLM processor HeadScope uses (capture.vlm.model.VlmProcessor for LLaVA, capture.vlm.chat.ChatProcessor
for the other families) gives a `VlmInputs`: the token ids, the picture inputs its model reads beside
them (pixel_values, and Qwen's image_grid_thw, Idefics3's pixel_attention_mask, LLaVA-OneVision's
image_sizes ...), the per-token inputs (Gemma 3's and PaliGemma's token_type_ids, Qwen's
mm_token_type_ids) with the value a generated token takes (`answered` extends them over the answer for
the recorded pass), the image tokens' positions and places on the picture (capture.vlm.places), the
spans the processor knows ("image", per-view "image:<view>", LLaVA's "image_cls", the whole picture
block with its markers "image_block"), and the picture the boxes are in.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from capture.vlm.places import Places
from core.errors import InputError


@dataclass
class VlmInputs:
    """One prompt with one picture."""

    input_ids: object  # torch.LongTensor [1, T]
    attention_mask: object  # torch.LongTensor [1, T]
    pixel_values: object  # torch.FloatTensor: [1, 3, H, W] (LLaVA), the family's layout otherwise
    image_positions: range  # the image tokens, first to last (Idefics3: its tile markers lie between them)
    tokens: list[str]  # a label per token ("<img:0>" ... for image tokens)
    shown: np.ndarray  # [H, W, 3] uint8: the picture the boxes are in (stored with the capture)
    prompt: str  # the chat-formatted text
    extra: dict = field(default_factory=dict)  # the model's other picture inputs (image_grid_thw, image_sizes ...)
    token_inputs: dict = field(default_factory=dict)  # name -> ([1, T] tensor, the value of a generated token)
    places: Places | None = None  # per image token: box, view, cell
    positions: list[int] = field(default_factory=list)  # the image tokens' positions (in `places` order)
    spans: dict = field(default_factory=dict)  # "image", "image:<view>", "image_cls", "image_block"

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **self.picture_inputs(),
                **{name: tensor for name, (tensor, _fill) in self.token_inputs.items()}}

    def picture_inputs(self) -> dict:
        """The inputs that carry the picture (what a pass continuing from a cached prefix leaves out)."""
        return {"pixel_values": self.pixel_values, **self.extra}

    def answered(self, ids: list[int]) -> dict:
        """The model inputs of a pass over `ids` (these prompt tokens, then an answer): the picture's
        inputs, an all-ones attention mask and each per-token input extended by its generated value."""
        import torch

        input_ids = torch.tensor([ids])
        n = self.input_ids.shape[1]
        tokens = {}
        for name, (tensor, fill) in self.token_inputs.items():
            tokens[name] = torch.cat([tensor, tensor.new_full((1, len(ids) - n), fill)], dim=1)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **self.picture_inputs(), **tokens}


def placed(inputs: dict, model) -> dict:
    """`inputs` on the model's device (capture.engine.device), floating-point ones in its dtype, as
    transformers' BatchFeature.to(device, dtype) does; on a float32 CPU model, as they are."""
    device, dtype = model.device, model.dtype
    if device.type == "cpu" and all(not v.is_floating_point() or v.dtype == dtype for v in inputs.values()):
        return inputs
    return {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}


def question_span(tokenizer, ids: list[int], question: str, after: int) -> range:
    """The token positions of `question` in the prompt `ids`: its first occurrence after token `after`
    (the end of the picture), from the characters each token adds to the decoded text after it."""
    question = question.strip()
    tail = [int(i) for i in ids[after:]]
    ends = [len(tokenizer.decode(tail[: k + 1], skip_special_tokens=False)) for k in range(len(tail))]
    text = tokenizer.decode(tail, skip_special_tokens=False)
    start_char = text.find(question)
    if start_char < 0:
        raise InputError("The question could not be located in the chat-formatted prompt.")
    end_char = start_char + len(question)
    starts = [0] + ends[:-1]
    inside = [k for k, (a, b) in enumerate(zip(starts, ends)) if b > start_char and a < end_char and b > a]
    return range(after + inside[0], after + inside[-1] + 1) if inside else range(after, after)


__all__ = ["VlmInputs", "question_span", "placed"]
