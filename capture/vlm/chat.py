"""A family's own transformers processor, built from a model folder's parts, as a VLM handle's processor.

`ChatProcessor.from_pretrained` builds the family's processor class (capture.vlm.families) from the
folder's image processor (its PIL backend: the "fast" ones need torchvision, which HeadScope never
installs), its tokenizer and its chat template, and the settings of its processor_config.json; the
video processor that Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision processors also hold (and whose module
imports torchvision) is left out: `image_only` makes a subclass whose constructor takes the image
processor and tokenizer only.  `encode(picture, question)` asks the question as the model card does,
`apply_chat_template` with the picture and the question in one user turn and add_generation_prompt, and
returns capture.vlm.inputs.VlmInputs with each image token's place on the picture (the family's
`places`).  The stored picture is the original (RGB), and the boxes are in its pixels.

A folder HeadScope cannot treat as what it is is refused with one sentence: no chat template (PaliGemma
apart, whose processor writes its prompt), Gemma 3's pan-and-scan crops, a processor that counts other
image tokens than the family's places.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np

import capture.images as images
from capture.vlm.families.family import Family
from capture.vlm.inputs import VlmInputs
from core.errors import InputError, ModelUnavailable

SKIPPED = ("input_ids", "attention_mask", "labels")  # processor outputs that are not picture inputs


def image_only(cls):
    """`cls` (a transformers processor class) taking an image processor and a tokenizer only: its
    attributes are read from the constructor's signature, so the video processor is not one."""

    def __init__(self, image_processor, tokenizer, chat_template=None, **kwargs):
        cls.__init__(self, image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": __name__})


def _file(source: str, name: str, kwargs: dict) -> str | None:
    from transformers.utils import cached_file

    try:
        return cached_file(source, name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, **kwargs)
    except Exception:  # noqa: BLE001 - no such file
        return None


def chat_template(source: str, tokenizer, kwargs: dict) -> str | None:
    """The model's chat template: the processor's (chat_template.jinja / .json), else the tokenizer's."""
    for name in ("chat_template.jinja", "chat_template.json"):
        path = _file(source, name, kwargs)
        if path:
            text = Path(path).read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return getattr(tokenizer, "chat_template", None) or None


class ChatProcessor:
    """A family's processor (tokenizer, image processor, chat template) for capture.vlm.adapter."""

    def __init__(self, processor, family: Family, config, template: str | None, name: str):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.family = family
        self.config = config
        self.template = template
        self.image_token_id = int(getattr(config, "image_token_id", None) or config.image_token_index)
        markers = [self.tokenizer.convert_tokens_to_ids(m) for m in family.markers]
        self.marker_ids = {int(i) for i in markers if i is not None and i != self.tokenizer.unk_token_id}
        self.grid = None  # no fixed patch grid: every capture stores its tokens' boxes
        if family.needs_template and not template:
            raise ModelUnavailable(f"{name} has no chat template, so HeadScope cannot tell how the model expects a "
                                   "question about a picture; add the chat template its model card uses.")
        if getattr(processor.image_processor, "do_pan_and_scan", False):
            raise ModelUnavailable(f"{name} crops pictures by pan-and-scan, whose crops HeadScope does not place on "
                                   "the picture; turn do_pan_and_scan off in its preprocessor_config.json.")

    @classmethod
    def from_pretrained(cls, source: str, config, family: Family, name: str, kwargs: dict) -> "ChatProcessor":
        import transformers
        from transformers import AutoImageProcessor, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **kwargs)
        image_processor = AutoImageProcessor.from_pretrained(source, backend="pil", trust_remote_code=False, **kwargs)
        template = chat_template(source, tokenizer, kwargs)
        base = getattr(transformers, family.processor)
        path = _file(source, "processor_config.json", kwargs)
        settings = json.loads(Path(path).read_text()) if path else {}
        accepted = set(inspect.signature(base.__init__).parameters) - {"self", "image_processor", "tokenizer",
                                                                        "video_processor", "chat_template"}
        processor = image_only(base)(image_processor, tokenizer, chat_template=template,
                                     **{k: v for k, v in settings.items() if k in accepted})
        return cls(processor, family, config, template, name)

    def encode(self, image, question: str) -> VlmInputs:
        """The chat-formatted prompt with one picture and `question`, ready for the model."""
        picture = images.as_picture(image)
        question = question.strip()
        messages = [{"role": "user", "content": [{"type": "image", "image": picture},
                                                 {"type": "text", "text": question}]}]
        try:
            if self.template:
                text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                out = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                         return_dict=True, return_tensors="pt")
            else:  # PaliGemma: the processor writes "<image>" x n, <bos>, the question and a newline
                text = question
                out = self.processor(images=[picture], text=question, return_tensors="pt")
        except (ValueError, TypeError, IndexError) as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise InputError(f"The {self.family.label} processor cannot read this picture ({first}).") from exc
        ids = [int(i) for i in out["input_ids"][0]]
        positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        places = self.family.places(self, out, picture.size)
        if not positions or len(places) != len(positions):
            raise ModelUnavailable(f"The {self.family.label} processor wrote {len(positions)} image tokens where "
                                   f"HeadScope places {len(places)}; this processor's settings are not ones it knows.")
        n = len(ids)
        token_inputs = {k: (v, self.family.fills.get(k, 0)) for k, v in out.items()
                        if k not in SKIPPED and getattr(v, "shape", None) is not None and tuple(v.shape) == (1, n)}
        extra = {k: v for k, v in out.items() if k not in SKIPPED and k != "pixel_values" and k not in token_inputs}
        image = range(positions[0], positions[-1] + 1)
        block = [i for i, t in enumerate(ids) if t in self.marker_ids] + positions
        spans = {"image": image, **places.spans(positions)}
        if min(block) < image.start or max(block) >= image.stop:
            spans["image_block"] = range(min(block), max(block) + 1)
        tokens = self.tokenizer.convert_ids_to_tokens(ids)
        for k, i in enumerate(positions):
            tokens[i] = f"<img:{k}>"
        return VlmInputs(out["input_ids"], out["attention_mask"], out["pixel_values"], image, tokens,
                         np.asarray(picture), text, extra=extra, token_inputs=token_inputs, places=places,
                         positions=positions, spans=spans)


__all__ = ["ChatProcessor", "image_only", "chat_template"]
