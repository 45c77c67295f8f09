"""Tiny random-weight diffusers pipelines of the thirteen families HeadScope loads, built here (no hub).

Each `save_<family>(folder)` builds a pipeline from configs - transformer, VAE, text encoders, scheduler -
with tokenizers made locally with the `tokenizers` library from a 30-word vocabulary (CLIP's BPE, T5's
Unigram, Gemma's, Qwen2's and GLM's BPE), and saves it with `save_pretrained`: SD3 with SD3.5's dual attention in
its first block, Flux (one double- and one single-stream block), Chroma (Flux's blocks, T5 only, guidance
as a second call per step), PixArt-Σ, Sana (linear self-attention), Qwen-Image (two double-stream
blocks, a one-layer Qwen2.5-VL text encoder, guidance as a second call per step), FLUX.2 [klein] (one
double- and one single-stream block, Qwen3), FLUX.2 [dev] (the same blocks, a guidance embedding, Mistral 3 with
its processor's chat template), CogView 4 (GLM, its text padded on the left), AuraFlow (one
MM-DiT and one single block, 8 register tokens), HunyuanDiT (BERT and T5, cross-attention), Lumina 2 (a refiner
of each kind, two joint layers with grouped keys, Gemma 2, its system prompt) and Z-Image (a refiner of each
kind, two joint layers, Qwen3, guidance rows with the conditional first).  At 32 x 32 px their transformers see
64 (SD3, PixArt, Flux, Chroma, Qwen-Image, FLUX.2 [klein] and [dev], CogView 4, AuraFlow, Z-Image) or 256 (Sana)
image tokens; HunyuanDiT's and Lumina 2's pipelines assume 8 px a latent, so they are sampled at 128 x 128 px
(`size`) for their 64.
"""
from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("a an the red orange yellow green blue purple circle square triangle at top bottom left right center "
         "and of in on with cat dog photo painting").split()
SIZE = 32  # pixels per side the tests sample at


def clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    merges = []
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    for word in WORDS:  # merges that rebuild each word from its letters, left to right
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        current = parts[0]
        for part in parts[1:]:
            if (current, part) not in merges:
                merges.append((current, part))
            current += part
            vocab.setdefault(current, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=12)


def t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in WORDS]
    pieces += [(ch, -5.0) for ch in "abcdefghijklmnopqrstuvwxyz"] + [("▁", -3.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def gemma_tokenizer(words: tuple[str, ...] = ()):
    """Gemma's BPE over WORDS and `words` (Lumina 2's system prompt), letters and byte fallback for the rest."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    merges = []
    for ch in "abcdefghijklmnopqrstuvwxyz▁":
        vocab.setdefault(ch, len(vocab))
    for word in (*WORDS, *words):
        parts = ["▁"] + list(word)
        current = parts[0]
        for part in parts[1:]:
            if (current, part) not in merges:
                merges.append((current, part))
            current += part
            vocab.setdefault(current, len(vocab))
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=merges)


QWEN_SYSTEM = ("system Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
               "relationships of the objects and background: user assistant")
QWEN3_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
                  "not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")  # Qwen3's, for one user turn


def byte_bpe(text: str, vocab_size: int, special: tuple[str, ...] = (), extra: tuple[str, ...] = ()):
    """A byte-level BPE (`tokenizers`, as Qwen's, GLM's and the VLMs' of tiny_vlms are) trained on `text`, the same
    with its words spaced out, and `extra` lines; `special` tokens first in its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([text, " " + text.replace(" ", "  "), *extra] * 20, trainer)
    return bpe


def qwen_tokenizer():
    """Qwen2's byte-level BPE over WORDS and the words of Qwen-Image's prompt template, each one token as in
    Qwen's own vocabulary, so that the template's system prompt is the 34 tokens the pipeline drops; chat
    markers and Qwen3's thinking tags are special tokens, and Qwen3's chat template renders a prompt as
    FLUX.2 [klein]'s pipeline asks (thinking off)."""
    import json

    from transformers import Qwen2Tokenizer

    bpe = byte_bpe(" ".join(WORDS) + " " + QWEN_SYSTEM, 600, extra=("system\nDescribe user\nassistant\n\n\n",))
    model = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]],
                               eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None)
    tokenizer.add_tokens(["<|im_start|>", "<think>", "</think>"], special_tokens=True)
    tokenizer.chat_template = QWEN3_TEMPLATE
    return tokenizer


def glm_tokenizer():
    """GLM-4's shape: a byte-level BPE over WORDS that opens every text with "[gMASK]<sop>" (so the empty negative
    prompt is two tokens, as GLM's is), "<|endoftext|>" its padding, padded on the left."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    bpe = byte_bpe(" ".join(WORDS), 420, special=("<|endoftext|>", "[gMASK]", "<sop>"))
    bpe.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A", special_tokens=[(t, bpe.token_to_id(t)) for t in ("[gMASK]", "<sop>")])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   padding_side="left")


def bert_tokenizer():
    """HunyuanDiT's bilingual CLIP text encoder is a BERT: a WordPiece vocabulary over WORDS and letters."""
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz"]
    vocab += ["##" + ch for ch in "abcdefghijklmnopqrstuvwxyz"]
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=77)


def t5_encoder(vocab: int, width: int = 32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(T5Config(vocab_size=vocab, d_model=width, d_kv=8, d_ff=37, num_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0))


def gemma2_encoder(vocab: int, layers: int):
    """A Gemma 2 text encoder of width 8 (Sana's; Lumina 2's, which reads its second-to-last states: two layers)."""
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    return Gemma2Model(Gemma2Config(head_dim=16, hidden_size=8, intermediate_size=64, max_position_embeddings=8192,
                                    num_attention_heads=2, num_hidden_layers=layers, num_key_value_heads=2,
                                    vocab_size=vocab))


def clip_encoder(vocab: int, projection: bool = True):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2, hidden_size=16, intermediate_size=37,
                            num_attention_heads=2, num_hidden_layers=1, vocab_size=vocab, projection_dim=16,
                            max_position_embeddings=12)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def kl_vae(levels: int = 2):
    """A KL autoencoder of 2 ** (levels - 1) px a latent (2; 8 for the pipelines that assume it)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(4,) * levels,
                         down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels,
                         layers_per_block=1, latent_channels=4, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def sd3(wide: bool = False):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    clip, t5 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(0)
    heads, head_dim = (24, 64) if wide else (2, 8)  # wide: SD3-medium's layers (bench/dit.py --wide)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2,
                                        attention_head_dim=head_dim, num_attention_heads=heads,
                                        caption_projection_dim=heads * head_dim, joint_attention_dim=32,
                                        pooled_projection_dim=32, out_channels=4, qk_norm="rms_norm",
                                        dual_attention_layers=() if wide else (0,), pos_embed_max_size=16)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=kl_vae(),
                                    text_encoder=clip_encoder(len(clip)), tokenizer=clip,
                                    text_encoder_2=clip_encoder(len(clip)), tokenizer_2=clip_tokenizer(),
                                    text_encoder_3=t5_encoder(len(t5)), tokenizer_3=t5)


def flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip, t5 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    return FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=kl_vae(),
                        text_encoder=clip_encoder(len(clip), projection=False), tokenizer=clip,
                        text_encoder_2=t5_encoder(len(t5)), tokenizer_2=t5)


def chroma():
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    t5 = t5_tokenizer()
    torch.manual_seed(0)
    transformer = ChromaTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                           axes_dims_rope=(4, 4, 8), approximator_num_channels=16,
                                           approximator_hidden_dim=32, approximator_layers=1)
    return ChromaPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=kl_vae(),
                          text_encoder=t5_encoder(len(t5)), tokenizer=t5)


def pixart(wide: bool = False):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    t5 = t5_tokenizer()
    torch.manual_seed(0)
    heads, head_dim = (16, 72) if wide else (2, 8)  # wide: PixArt-Σ's layers (bench/dit.py --wide)
    transformer = PixArtTransformer2DModel(sample_size=16, num_layers=2, patch_size=2, attention_head_dim=head_dim,
                                           num_attention_heads=heads, caption_channels=32, in_channels=4,
                                           cross_attention_dim=heads * head_dim, out_channels=8, attention_bias=True,
                                           activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                           norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    return PixArtSigmaPipeline(transformer=transformer, scheduler=DPMSolverMultistepScheduler(), vae=kl_vae(),
                               text_encoder=t5_encoder(len(t5)), tokenizer=t5)


def sana():
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    gemma = gemma_tokenizer()
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                                         num_attention_heads=2, attention_head_dim=4, num_cross_attention_heads=2,
                                         cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
                                         sample_size=16)
    torch.manual_seed(0)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                        decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=[1, 1], downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407)
    encoder = gemma2_encoder(len(gemma), layers=1)
    return SanaPipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                        text_encoder=encoder, tokenizer=gemma)


def qwenimage():
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = qwen_tokenizer()
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              axes_dims_rope=(8, 4, 4))
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.0] * 4, latents_std=[1.0] * 4)  # 2 px a latent: 8 x 8 tokens at 32 px
    torch.manual_seed(0)
    text = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0})
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16)
    encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))
    return QwenImagePipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                             text_encoder=encoder, tokenizer=tokenizer)


def _flux2_parts(guidance_embeds: bool):
    """FLUX.2's transformer (one double- and one single-stream block) and VAE."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                          timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4),
                                          guidance_embeds=guidance_embeds)
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(4, 4),
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             layers_per_block=1, latent_channels=4, norm_num_groups=1, use_quant_conv=False,
                             use_post_quant_conv=False)
    return transformer, vae


def flux2():
    """FLUX.2 [klein]: one double- and one single-stream block; Qwen3 with the 27 layers whose hidden states
    9, 18 and 27 the pipeline reads (width 8); guidance as a second call per step (not distilled)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = qwen_tokenizer()
    transformer, vae = _flux2_parts(guidance_embeds=False)
    torch.manual_seed(0)
    encoder = Qwen3ForCausalLM(Qwen3Config(hidden_size=8, intermediate_size=16, num_hidden_layers=27, head_dim=4,
                                           num_attention_heads=2, num_key_value_heads=2, vocab_size=len(tokenizer),
                                           max_position_embeddings=1024, bos_token_id=None,
                                           eos_token_id=tokenizer.eos_token_id))
    return Flux2KleinPipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                              text_encoder=encoder, tokenizer=tokenizer)


MISTRAL_MARKERS = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]",
                   "[IMG_BREAK]", "[IMG_END]")
# Mistral Small 3.1's processor template for a system and a user turn of text blocks (an image block is [IMG])
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]"
                    "{% else %}[INST]{% endif %}{% for block in m['content'] %}{% if block['type'] == 'text' %}"
                    "{{ block['text'] }}{% else %}[IMG]{% endif %}{% endfor %}{% if m['role'] == 'system' %}"
                    "[/SYSTEM_PROMPT]{% else %}[/INST]{% endif %}{% endfor %}")


def mistral_tokenizer():
    """A byte-level BPE over WORDS and FLUX.2 [dev]'s system message, Mistral's markers special, with the chat
    template of Mistral Small 3.1's processor (one bos token first, so the processor adds none)."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import PreTrainedTokenizerFast

    bpe = byte_bpe(" ".join(WORDS) + " " + SYSTEM_MESSAGE, 600, special=MISTRAL_MARKERS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>")
    tokenizer.chat_template = MISTRAL_TEMPLATE
    return tokenizer


def flux2dev():
    """FLUX.2 [dev]: FLUX.2's blocks with a guidance embedding; Mistral 3 (a Pixtral vision tower of one layer,
    a Mistral of the 30 layers whose hidden states 10, 20 and 30 the pipeline reads, width 8).  Its processor is
    saved as a tokenizer and its chat template (`save` names it PixtralProcessor in model_index.json, as the real
    folder does)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    tokenizer = mistral_tokenizer()
    transformer, vae = _flux2_parts(guidance_embeds=True)
    text = MistralConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=30, head_dim=4, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024)
    vision = PixtralVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 head_dim=4, patch_size=4, image_size=32)
    torch.manual_seed(0)
    encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        vision_config=vision, text_config=text, spatial_merge_size=1,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]")))
    return Flux2Pipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                         text_encoder=encoder, tokenizer=tokenizer)


def as_released(folder: Path) -> None:
    """A saved tiny FLUX.2 [dev] folder as the released one reads: model_index.json names transformers'
    PixtralProcessor for its tokenizer (which diffusers cannot load without torchvision) and the tokenizer
    folder holds the processor's processor_config.json."""
    import json

    index = json.loads((folder / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "PixtralProcessor"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    (folder / "tokenizer" / "processor_config.json").write_text(json.dumps(
        {"image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]", "image_token": "[IMG]", "patch_size": 4,
         "processor_class": "PixtralProcessor", "spatial_merge_size": 1}))


def cogview4():
    """CogView 4: two joint blocks, a two-layer GLM text encoder; guidance as a second call per step."""
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmModel

    tokenizer = glm_tokenizer()
    torch.manual_seed(0)
    transformer = CogView4Transformer2DModel(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                             num_attention_heads=2, out_channels=4, text_embed_dim=16,
                                             time_embed_dim=8, condition_dim=4)
    torch.manual_seed(0)
    encoder = GlmModel(GlmConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=2, head_dim=8, vocab_size=len(tokenizer),
                                 max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id))
    scheduler = FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                                use_dynamic_shifting=True, time_shift_type="linear")  # CogView4's
    return CogView4Pipeline(tokenizer=tokenizer, text_encoder=encoder, vae=kl_vae(), transformer=transformer,
                            scheduler=scheduler)


def auraflow():
    """AuraFlow: one MM-DiT and one single block, its 8 register tokens, a one-layer UMT5; guidance as batch rows."""
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    t5 = t5_tokenizer()
    torch.manual_seed(0)
    transformer = AuraFlowTransformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                             num_single_dit_layers=1, attention_head_dim=8, num_attention_heads=2,
                                             caption_projection_dim=16, joint_attention_dim=32, out_channels=4,
                                             pos_embed_max_size=256)
    torch.manual_seed(0)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(t5), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=2,
                                          relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0))
    return AuraFlowPipeline(tokenizer=t5, text_encoder=encoder, vae=kl_vae(), transformer=transformer,
                            scheduler=FlowMatchEulerDiscreteScheduler())


def hunyuandit():
    """HunyuanDiT: two blocks (self- and cross-attention), a one-layer BERT and T5; a VAE of 8 px a latent, which
    the pipeline assumes (so 128 px for 8 x 8 patches)."""
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline
    from transformers import BertConfig, BertModel

    bert, t5 = bert_tokenizer(), t5_tokenizer()
    torch.manual_seed(0)
    transformer = HunyuanDiT2DModel(sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8,
                                    num_attention_heads=2, in_channels=4, cross_attention_dim=32,
                                    cross_attention_dim_t5=32, pooled_projection_dim=16, hidden_size=16, text_len=77,
                                    text_len_t5=256, activation_fn="gelu-approximate")
    vae = kl_vae(levels=4)
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=len(bert), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=37, max_position_embeddings=128))
    return HunyuanDiTPipeline(vae=vae, text_encoder=encoder, tokenizer=bert, transformer=transformer,
                              scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
                              requires_safety_checker=False, text_encoder_2=t5_encoder(len(t5)), tokenizer_2=t5)


def lumina2():
    """Lumina 2: one caption and one image refiner layer, two joint layers with 4 query and 2 key / value heads, a
    two-layer Gemma 2; guidance as a second call per step; its pipeline assumes 8 px a latent (128 px)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    gemma = gemma_tokenizer(words=tuple(LUMINA_SYSTEM.lower().replace(".", " ").replace("-", " ").split()))
    torch.manual_seed(0)
    transformer = Lumina2Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=2,
                                            num_refiner_layers=1, num_attention_heads=4, num_kv_heads=2,
                                            multiple_of=16, axes_dim_rope=(4, 2, 2), axes_lens=(300, 64, 64),
                                            cap_feat_dim=8)
    encoder = gemma2_encoder(len(gemma), layers=2)
    return Lumina2Pipeline(transformer=transformer, vae=kl_vae(levels=4), scheduler=FlowMatchEulerDiscreteScheduler(),
                           text_encoder=encoder, tokenizer=gemma)


def zimage():
    """Z-Image: one image and one caption refiner layer, two joint layers, a two-layer Qwen3 (its second-to-last
    states); guidance as batch rows, the conditional first."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = qwen_tokenizer()
    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=8,
                                           axes_dims=[8, 4, 4], axes_lens=[1024, 64, 64])
    torch.manual_seed(0)
    encoder = Qwen3Model(Qwen3Config(hidden_size=8, intermediate_size=16, num_hidden_layers=2, head_dim=4,
                                     num_attention_heads=2, num_key_value_heads=2, vocab_size=len(tokenizer),
                                     max_position_embeddings=1024, bos_token_id=None,
                                     eos_token_id=tokenizer.eos_token_id))
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=kl_vae(), text_encoder=encoder,
                          tokenizer=tokenizer, transformer=transformer)


LUMINA_SYSTEM = ("You are an assistant designed to generate superior images with the superior degree of image-text "
                 "alignment based on textual prompts or user prompts.")  # Lumina2Pipeline's
FAMILIES = ("sd3", "flux", "chroma", "pixart", "sana", "qwenimage", "flux2", "flux2dev", "cogview4", "auraflow",
            "hunyuandit", "lumina2", "zimage")
SIZES = {"hunyuandit": 128, "lumina2": 128}  # pixels a side where a family's tests need more than SIZE (8 x 8 patches)


def size(family: str) -> int:
    return SIZES.get(family, SIZE)


WIDE = ("sd3", "pixart")  # families with a `wide` variant: two layers of the real model's width


def save(family: str, folder: Path, wide: bool = False) -> Path:
    """The tiny `family` pipeline saved in `folder` (save_pretrained); `wide`: its transformer's two layers at
    the real model's width (tiny text encoders and VAE all the same)."""
    (globals()[family](wide=True) if wide else globals()[family]()).save_pretrained(folder)
    if family == "flux2dev":
        as_released(Path(folder))
    return folder
