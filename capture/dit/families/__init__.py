"""The diffusion-transformer families HeadScope loads from a diffusers pipeline folder.

One `Family` per transformer class (capture.dit.families.sd3, .flux, .flux2, .chroma, .pixart, .sana,
.qwenimage, .cogview4, .auraflow, .hunyuandit, .lumina2, .zimage), or per pipeline where two pipelines drive one
transformer differently (.flux2's `VARIANTS`: FLUX.2 [klein] and [dev]): what differs between them for HeadScope is the
pipeline classes it was checked in, the order of the joint sequence (Flux, FLUX.2, Chroma, Qwen-Image, CogView 4,
AuraFlow, Lumina 2: text first), whether the pipeline batches an unconditional branch with the conditional one
(before it; after it: Z-Image) or calls the transformer for it separately (classifier-free guidance, which
pipeline argument scales it, from which scale and in which form), which text
encoders' states the transformer reads (their token ids are caught on the way in, so the labels are those of
the very tokens the model saw), the pixel unit of a picture side (VAE factor x patch) and the largest side it
is sampled at, and the pipeline arguments HeadScope fixes (PixArt and Sana: no caption cleaning, which needs
extra packages, and no aspect-ratio binning, so a picture is sampled at the size asked for; Qwen-Image: the
negative prompt), where the text's padding run is (last, or first: CogView 4), which tokens the transformer
adds before the text (AuraFlow's registers), which the pipeline adds before the prompt (Lumina 2's system
prompt) and how many text positions the joint attention reads (Lumina 2: the unpadded ones; Z-Image: padded by
the transformer itself to a multiple of 32).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from capture.dit.tokens import TokenLayout, leading_padding, padding_start


def text_tokenizer(pipe, attr: str):
    """The tokenizer held in pipeline attribute `attr`: the tokenizer itself, or a processor's (FLUX.2 [dev]'s text
    processor); None where the pipeline has none."""
    held = getattr(pipe, attr, None)
    return getattr(held, "tokenizer", held)


def unpadded(ids: list[int], pipe, _call=None) -> list[int]:
    """`select` of a pipeline whose transformer reads its text without the padding run the tokenizer put after it
    (Lumina 2, Z-Image)."""
    return ids[:padding_start(ids, pipe.tokenizer.pad_token_id, None)]


def refined(title: str, refiners: int, joint: int) -> str:
    """The note of a family whose transformer refines the image and the caption apart before its joint layers
    (Lumina 2, Z-Image; capture.dit.attention `refiner_part`): which HeadScope layers are which."""
    def layers(first: int, count: int) -> str:
        return f"layer {first}" if count == 1 else f"layers {first} to {first + count - 1}"

    return (f"{title} refines the picture and the caption apart first: its image-only refiners are "
            f"{layers(0, refiners)}, its caption-only refiners {layers(refiners, refiners)} (their picture reads no "
            f"words), and the joint ones {layers(2 * refiners, joint)}.")


@dataclass(frozen=True)
class Family:
    """What HeadScope needs to know about one pipeline family (module docstring)."""

    name: str
    transformer: str  # diffusers class name of the pipeline's transformer
    # the pipeline classes HeadScope was checked on (tests/models/test_dit_pipelines.py); another one around the
    # same transformer (an image-to-image, inpainting or few-step variant) is refused, its call may differ
    pipelines: tuple[str, ...]
    text_first: bool  # Flux, FLUX.2, Chroma, Qwen-Image, CogView 4, AuraFlow, Lumina 2: [text, image]; others not
    cfg: bool  # the pipeline batches [unconditional, conditional] rows (`cond_first`: the other way) when it guides
    encoders: tuple[tuple[str, str, str], ...]  # (segment name, text encoder attribute, tokenizer attribute)
    unit_of: Callable  # pipe -> pixels per patch side (VAE scale factor x patch size)
    max_side: Callable  # (pipe, default side) -> the largest picture side HeadScope samples
    call_kwargs: dict = field(default_factory=dict)  # fixed arguments of the pipeline call
    select: Callable | None = None  # (ids, pipe, call kwargs) -> the ids the transformer reads (Sana, Qwen-Image)
    # (pipe, prompt) -> the ids the transformer will read, for a family whose text is not padded to a fixed
    # length (Qwen-Image); None: each encoder's fixed length
    read_ids: Callable | None = None
    # (pipe, prompt, length) -> the prompt's ids as the pipeline renders them for its padded encoder, unpadded (FLUX.2
    # [dev]: its chat template and system message); None: the tokenizer's ids of the prompt alone
    encode: Callable | None = None
    # folder -> {pipeline attribute: component} that HeadScope builds instead of diffusers (FLUX.2 [dev]'s text
    # processor: transformers' PixtralProcessor needs torchvision)
    components: Callable | None = None
    missing: Callable | None = None  # (pipe, segment) -> how many zero tokens stand in for an absent encoder
    # classifier-free guidance as a second transformer call per step (the conditional call first: Chroma,
    # Qwen-Image, FLUX.2 [klein], CogView 4) when the guidance scale is above 1, instead of a batch row
    separate_cfg: bool = False
    guidance_arg: str = "guidance_scale"  # the pipeline argument of the classifier-free guidance scale
    guides: Callable | None = None  # pipe -> False where the pipeline skips guidance at any scale (distilled)
    pads_left: bool = False  # the text's padding run comes first (CogView 4; any tokenizer that pads "left"), not last
    masks_padding: bool = False  # the attention masks the text's padding out (PixArt, Sana): no weight on it
    # the joint attention takes an n x n mask (Chroma's padding): a "split" capture keeps it with each kept step's
    # queries and keys (capture.dit.record), and its estimate counts it
    joint_mask: bool = False
    # pipe -> labels of the tokens the transformer itself puts before the text it is given (AuraFlow's registers)
    extra_text: Callable | None = None
    # the transformer's arguments whose states it joins into one text axis, in order (HunyuanDiT: BERT's, mT5's)
    text_inputs: tuple[str, ...] = ("encoder_hidden_states",)
    lengths: dict = field(default_factory=dict)  # segment -> the length the pipeline pads it to, where it fixes it
    # (pipe, ids) -> how many of the text's first ids are the pipeline's own instruction (Lumina 2's system prompt):
    # a "system" segment the model reads and the word maps leave out
    preamble: Callable | None = None
    note: Callable | None = None  # pipe -> a sentence every capture of the family carries (what it leaves out)
    cond_first: bool = False  # the conditional row is the first of the guidance batch (Z-Image), not the last
    cfg_from: float = 1.0  # the pipeline guides when its guidance scale is above this (Z-Image: 0)
    # the guidance scale -> the weight of the conditional prediction in the pipeline's guided one: g in u + g (c - u),
    # 1 + g in Z-Image's c + g (c - u) (SoftPAG folds its term by it: capture.dit.pipeline)
    cond_weight: Callable = lambda g: g
    pad_to: int = 0  # the transformer pads the text to a multiple of this with a learned state (Z-Image: 32)
    image_multiple: int = 1  # the patch count must be a multiple of this (Z-Image: else it pads the image inside)
    default_side: int = 0  # the pipeline's default picture side in pixels where neither it nor its transformer says
    # (the transformer's arguments, its keyword arguments) -> the text positions its joint attention reads, where it
    # cuts or pads the text it is given (Lumina 2: the count of its mask; Z-Image: padded to `pad_to`); None: every
    # position of `text_inputs`
    read_text: Callable | None = None

    def n_extra(self, pipe) -> int:
        """How many tokens the transformer puts before the text the pipeline gives it."""
        return len(self.extra_text(pipe)) if self.extra_text is not None else 0

    def n_read(self, pipe, args: tuple, kwargs: dict) -> int:
        """How many text positions one transformer call's joint attention reads (its arguments)."""
        given = self.read_text(args, kwargs) if self.read_text is not None else \
            sum(kwargs[name].shape[1] for name in self.text_inputs)
        return int(given) + self.n_extra(pipe)

    def layout(self, pipe, caught: dict[str, list[int]], grid: tuple[int, int], n_text: int,
               call: dict) -> tuple[TokenLayout, list[str]]:
        """The run's token axis from the token ids caught at each text encoder (`caught`: encoder
        attribute -> the prompt's ids), and notes; falls back to "<text i>" labels when the ids do not
        add up to the `n_text` tokens the transformer's attention reads."""
        text, segments, padding = [], [], []
        notes = [self.note(pipe)] if self.note is not None else []
        if self.extra_text is not None:
            text = list(self.extra_text(pipe))
            segments.append(("registers", range(0, len(text))))
        for name, encoder, tokenizer_attr in self.encoders:
            tokenizer = text_tokenizer(pipe, tokenizer_attr)
            ids = caught.get(encoder)
            start = len(text)
            if ids is None or tokenizer is None:
                count = self.missing(pipe, name) if self.missing else 0
                text += ["<none>"] * count
                if count:
                    notes.append(f"{self.name}: no {name} encoder in this pipeline; its {count} positions are zeros.")
            else:
                ids = self.select(ids, pipe, call) if self.select else ids
                text += tokenizer.convert_ids_to_tokens(ids)
                lead = 0  # the padding run before the text, where the tokenizer pads on the left
                if self.pad_to:  # the transformer's own padding states after the text: labelled as padding
                    text += ["<pad>"] * ((-len(ids)) % self.pad_to)
                    padding.append(range(start + len(ids), len(text)))
                elif self.pads_left or getattr(tokenizer, "padding_side", "right") == "left":
                    lead = leading_padding(ids, tokenizer.pad_token_id)
                    padding.append(range(start, start + lead))
                else:
                    pad = padding_start(ids, tokenizer.pad_token_id, tokenizer.eos_token_id)
                    padding.append(range(start + pad, start + len(ids)))
                told = self.preamble(pipe, ids[lead:]) if self.preamble is not None else 0
                if told:  # the segment starts after it (and after a leading padding run)
                    segments.append(("system", range(start + lead, start + lead + told)))
                    start += lead + told
            segments.append((name, range(start, len(text))))
        if len(text) != n_text:
            notes.append(f"The transformer read {n_text} text positions; HeadScope labels them by position.")
            text, segments, padding = [f"<text {i}>" for i in range(n_text)], [], []
        return TokenLayout(grid=grid, text=text, text_first=self.text_first, segments=segments,
                           padding=padding), notes


__all__ = ["Family", "refined", "text_tokenizer", "unpadded"]
