"""FLUX.2 [klein]: HeadScope's processor for its single-stream blocks, and the family.

`Flux2Transformer2DModel` (Black Forest Labs 2025) keeps FLUX.1's layout: double-stream blocks (joint
attention over [text tokens, image tokens], separate projections per stream), then single-stream blocks
over the same sequence, rotary position embeddings on four axes applied to q and k before attention.  A
double-stream block's attention is FLUX.1's step for step, so capture.dit.families.flux.FluxProcessor
drives it.  A single-stream block (`Flux2ParallelSelfAttention`) projects q, k, v and the MLP's input in
one matrix and sends the head outputs and the MLP's through one output projection: `Flux2SingleProcessor`
is `Flux2ParallelSelfAttnProcessor` step for step, and a `scale` edit acts on the head outputs before
that projection.  All are "joint" layers, double-stream first.

Text: the pipeline renders the prompt in Qwen3's chat template (thinking off) and pads it to
`max_sequence_length` (512); the transformer reads all of it, its padding unmasked (the labels are the very
tokens; the padding run is a span, as T5's is for FLUX.1).  Its states are three of Qwen3's hidden
layers side by side.

Sampling: the [klein] base models use classifier-free guidance as a second transformer call per step
for the empty negative prompt, the conditional call first (recorded); the step-distilled ones
(`is_distilled` in the pipeline's config) make one call.

FLUX.2 [dev] (`Flux2Pipeline`, the family `DEV`): the same transformer with a guidance embedding (guidance
distilled: one call a step, `guidance_scale` 4 the embedded scale), its text from Mistral Small 3.1
(`Mistral3ForConditionalGeneration`, hidden layers 10, 20 and 30 side by side): the pipeline renders the prompt
with its system message in the processor's chat template (`[SYSTEM_PROMPT] … [/SYSTEM_PROMPT][INST] prompt
[/INST]`) and pads it to 512, unmasked.  The system message is a "system" span (`preamble`: the ids the prompt's
rendering shares with an empty prompt's).  The folder's processor is transformers' `PixtralProcessor`, which
needs torchvision (HeadScope never installs it) though the pipeline only renders text with it: `MistralText` is
a processor of the tokenizer alone, through the very `ProcessorMixin` code (chat template, special tokens,
padding) that PixtralProcessor runs on text, built from the folder's tokenizer and chat template.  The
pipeline's reference images (`image=`) and prompt upsampling are not used.

Both families count a prompt for the estimate as their pipelines render it, chat template and system message
included (`encode`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from capture.dit.attend import Attend
from capture.dit.families import Family
from capture.dit.families.flux import rotated_attention


class Flux2SingleProcessor:
    """Flux2ParallelSelfAttnProcessor with HeadScope's recording and edits (module docstring)."""

    def __init__(self, layer: int, n_heads: int):
        self.attend = Attend(layer, "joint", n_heads)

    def __call__(self, attn, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = attn.to_qkv_mlp_proj(hidden_states)  # [batch, tokens, 3 * inner + MLP input]
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp_hidden = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)
        query, key, value = qkv.chunk(3, dim=-1)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))  # [batch, tokens, head, head_dim]
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        hidden = rotated_attention(self, attn, query, key, value, attention_mask, image_rotary_emb)
        return attn.to_out(torch.cat([hidden, attn.mlp_act_fn(mlp_hidden)], dim=-1))

    # diffusers' dispatcher reads these from the processor (None: the default attention backend)
    _attention_backend = None
    _parallel_config = None


def mistral_text(folder: Path):
    """FLUX.2 [dev]'s text processor (module docstring) from the pipeline folder's `tokenizer` folder: its
    tokenizer, and the processor's chat template (chat_template.jinja or .json) before the tokenizer's own."""
    import json

    from transformers import AutoTokenizer, ProcessorMixin

    class MistralText(ProcessorMixin):
        """PixtralProcessor's text path: ProcessorMixin's `apply_chat_template` and `__call__` over the tokenizer."""

        text_kwargs = {"return_tensors": "pt"}  # PixtralProcessor's defaults

        def __init__(self, tokenizer, chat_template=None):
            super().__init__(tokenizer, chat_template=chat_template)

        def apply_chat_template(self, conversation, *args, processor_kwargs=None, **kwargs):
            """ProcessorMixin's, with the tokenizer arguments the pipeline passes loose (padding, truncation,
            max_length) handed over in `processor_kwargs`, where ProcessorMixin moves them itself, warning on
            every run that they belong there."""
            loose = {k: kwargs.pop(k) for k in ("padding", "truncation", "max_length") if k in kwargs}
            return super().apply_chat_template(conversation, *args, processor_kwargs={**(processor_kwargs or {}),
                                                                                      **loose}, **kwargs)

    source = Path(folder) / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    template = source / "chat_template.jinja"
    listed = source / "chat_template.json"
    chat = template.read_text() if template.is_file() else \
        json.loads(listed.read_text())["chat_template"] if listed.is_file() else tokenizer.chat_template
    if not chat:  # load_pipeline makes it the sentence: "... could not be loaded (its tokenizer has no ...)"
        raise ValueError("its tokenizer has no chat template, with which FLUX.2 [dev]'s pipeline writes the prompt")
    return {"tokenizer": MistralText(tokenizer, chat_template=chat)}


def _klein_encode(pipe, prompt: str, length: int) -> list[int]:
    """[klein]'s prompt ids as its pipeline renders them (Qwen3's chat template, thinking off), unpadded."""
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=False)
    return list(pipe.tokenizer(text, truncation=True, max_length=length)["input_ids"])


def _messages(pipe, prompt: str) -> list:
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    return format_input(prompts=[prompt], system_message=pipe.system_message)


def _encode(pipe, prompt: str, length: int) -> list[int]:
    """The prompt's ids as the pipeline renders them (its system message, the chat template), unpadded."""
    rendered = pipe.tokenizer.apply_chat_template(_messages(pipe, prompt), add_generation_prompt=False, tokenize=True,
                                                  return_dict=True, return_tensors="np",
                                                  processor_kwargs={"truncation": True, "max_length": length})
    return [int(i) for i in rendered["input_ids"][0]]


def _preamble(pipe, ids: list[int]) -> int:
    """How many of `ids` come before the prompt: those its rendering shares with an empty prompt's (the system
    message and the markers around it)."""
    empty = _encode(pipe, "", len(ids))
    same = 0
    while same < min(len(ids), len(empty)) and ids[same] == empty[same]:
        same += 1
    return same


FAMILY = Family(name="flux2", transformer="Flux2Transformer2DModel",
                pipelines=("Flux2KleinPipeline",),
                text_first=True, cfg=False, separate_cfg=True,
                guides=lambda pipe: not getattr(pipe.config, "is_distilled", False),
                encoders=(("qwen3", "text_encoder", "tokenizer"),),
                unit_of=lambda pipe: pipe.vae_scale_factor * 2,  # the 2 x 2 packing of latents, as FLUX.1
                max_side=lambda pipe, default: 2 * default, encode=_klein_encode)
DEV = Family(name="flux2dev", transformer="Flux2Transformer2DModel",
             pipelines=("Flux2Pipeline",),
             text_first=True, cfg=False,
             encoders=(("mistral", "text_encoder", "tokenizer"),),
             unit_of=lambda pipe: pipe.vae_scale_factor * 2,
             max_side=lambda pipe, default: 2 * default,
             encode=_encode, preamble=_preamble, components=mistral_text)
VARIANTS = (FAMILY, DEV)  # the pipelines around Flux2Transformer2DModel (capture.dit.load)

__all__ = ["DEV", "FAMILY", "VARIANTS", "Flux2SingleProcessor", "mistral_text"]
