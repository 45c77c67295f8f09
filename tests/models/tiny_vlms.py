"""Tiny random-weight vision-language models of the families HeadScope places on the picture, built here
from configs (no hub), each saved with a working processor made offline: the family's own image
processor (its PIL backend: torchvision is never installed), a byte-level BPE tokenizer built with the
`tokenizers` library from a few question words plus the family's image special tokens, and a chat
template that renders the picture as the family's real template does.

`save(family, folder)` writes the folder as `save_pretrained` does on the hub (config + safetensors,
preprocessor_config.json, tokenizer files, chat_template.jinja; Qwen and LLaVA-OneVision also a
video_preprocessor_config.json, which HeadScope must ignore); `reference(family, folder)` is the
family's transformers processor built from those same parts in memory (the test's reference, never
HeadScope's), and `eager(folder)` the model with eager attention.  Language models: 2 layers, 4 heads over
2 KV heads, hidden size 32; vision towers: 2 layers, hidden size 32.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ("what colour is the circle square triangle how many shapes are there in picture where red green blue "
         "yellow a an of on left right top bottom yes no user assistant system model you helpful animal this")
FAMILIES = ("llava_onevision", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "gemma3", "paligemma")
QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
                 "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|>"
                 "<|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ONEVISION_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}{% for c in m['content'] %}"
                      "{% if c['type'] == 'image' %} <image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                      "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
IDEFICS3_TEMPLATE = ("<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}:{% for c in m['content'] %}"
                     "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                     "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
GEMMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
                   "m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>{% else %}"
                   "{{ c['text'] | trim }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
                   "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=4096)


def tokenizer(special: list[str], chat_template: str | None, **tokens):
    """A byte-level BPE tokenizer (`tokenizers`) over WORDS with `special` tokens first; `tokens` name the
    roles (bos_token, eos_token, pad_token, image_token, ...), as the family's tokenizer_config.json does."""
    from transformers import PreTrainedTokenizerFast

    from tiny_pipelines import byte_bpe

    bpe = byte_bpe(WORDS, 420, special=tuple(special))
    roles = {k: v for k, v in tokens.items() if k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    extra = {k: v for k, v in tokens.items() if k not in roles}
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, extra_special_tokens=extra or None, **roles)
    tok.chat_template = chat_template
    return tok


def _save(folder: Path, model, image_processor, tok, video: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    tok.save_pretrained(folder)
    if tok.chat_template:
        (folder / "chat_template.jinja").write_text(tok.chat_template)
    if video:  # as the hub's folders have it; building its processor needs torchvision
        (folder / "video_preprocessor_config.json").write_text(
            json.dumps({"video_processor_type": "Qwen2VLVideoProcessor"}))
    return folder


def _ids(tok, *names: str) -> list[int]:
    return [tok.convert_tokens_to_ids(n) for n in names]


def qwen(folder: Path, version: str = "qwen2_vl") -> Path:
    """Qwen2-VL / Qwen2.5-VL: 14 px patches merged 2 x 2, at most 64 merged tokens (dynamic resolution)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, \
        Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
               "<|video_pad|>"]
    tok = tokenizer(special, QWEN_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 64, patch_size=14,
                                               merge_size=2, temporal_patch_size=2)
    start, end, image, video = _ids(tok, "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
    text = dict(TEXT, vocab_size=len(tok), rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2],
                                                            "rope_theta": 10000.0})
    vision = dict(depth=2, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  in_chans=3)
    if version == "qwen2_vl":
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        vision.update(embed_dim=32, mlp_ratio=2)
    else:
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision.update(intermediate_size=64, out_hidden_size=32, window_size=56, fullatt_block_indexes=[1])
    config = config_class(text_config=text, vision_config=vision, image_token_id=image, video_token_id=video,
                          vision_start_token_id=start, vision_end_token_id=end, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return _save(folder, model_class(config), image_processor, tok, video=True)


def llava_anyres(folder: Path, version: str = "llava_onevision") -> Path:
    """LLaVA-OneVision / LLaVA-NeXT: 28 px tiles of 2 x 2 patches (SigLIP / CLIP), any-resolution grids up to
    2 x 2 tiles, plus the whole picture as the base view."""
    from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig)

    tok = tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"], ONEVISION_TEMPLATE,
                    eos_token="<|im_end|>", pad_token="<|endoftext|>", image_token="<image>", video_token="<video>")
    pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]
    text = dict(TEXT, vocab_size=len(tok))
    image, video = _ids(tok, "<image>", "<video>")
    if version == "llava_onevision":
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import \
            LlavaOnevisionImageProcessorPil as Processor

        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=28, patch_size=14)
        config = LlavaOnevisionConfig(vision_config=vision, text_config=dict(text, model_type="qwen2"),
                                      image_token_id=image, video_token_id=video, image_grid_pinpoints=pinpoints,
                                      vision_feature_select_strategy="full", vision_feature_layer=-1)
        model_class = LlavaOnevisionForConditionalGeneration
        image_processor = Processor(size={"height": 28, "width": 28}, image_grid_pinpoints=pinpoints, do_pad=True)
    else:
        from transformers.models.llava_next.image_processing_pil_llava_next import \
            LlavaNextImageProcessorPil as Processor

        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=28, patch_size=14, projection_dim=32)
        config = LlavaNextConfig(vision_config=vision, text_config=dict(text, model_type="llama"), image_token_id=image,
                                 image_grid_pinpoints=pinpoints, vision_feature_select_strategy="default",
                                 vision_feature_layer=-1)
        model_class = LlavaNextForConditionalGeneration
        image_processor = Processor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                    image_grid_pinpoints=pinpoints, do_pad=True)
    torch.manual_seed(0)
    folder = _save(folder, model_class(config), image_processor, tok, video=version == "llava_onevision")
    settings = {"vision_feature_select_strategy": config.vision_feature_select_strategy, "num_image_tokens": 4,
                "patch_size": 14}
    if version == "llava_next":  # CLIP's CLS token, dropped by the "default" feature selection
        settings = {"vision_feature_select_strategy": "default", "patch_size": 14, "num_additional_image_tokens": 1}
    (folder / "processor_config.json").write_text(json.dumps(settings))
    return folder


def idefics3(folder: Path) -> Path:
    """Idefics3 (SmolVLM): 56 px tiles of 4 x 4 patches, pixel shuffle 2 -> 4 tokens a tile, pictures split
    into up to 2 x 2 tiles plus a global view."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    rows_cols = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tok = tokenizer(["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                     "<global-img>"] + rows_cols, IDEFICS3_TEMPLATE, eos_token="<end_of_utterance>",
                    pad_token="<|endoftext|>", bos_token="<|im_start|>")
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 112}, max_image_size={"longest_edge": 56},
                                                do_image_splitting=True)
    config = Idefics3Config(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=56, patch_size=14),
                            text_config=dict(TEXT, vocab_size=len(tok), model_type="llama"), scale_factor=2,
                            image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    folder = _save(folder, Idefics3ForConditionalGeneration(config), image_processor, tok)
    (folder / "processor_config.json").write_text(json.dumps({"image_seq_len": 4}))
    return folder


def gemma3(folder: Path) -> Path:
    """Gemma 3: SigLIP over 56 px (4 x 4 patches) average-pooled to 2 x 2 = 4 soft tokens, bidirectional
    attention among them."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = tokenizer(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                     "<end_of_image>", "<image_soft_token>"], GEMMA3_TEMPLATE, bos_token="<bos>", eos_token="<eos>",
                    pad_token="<pad>", boi_token="<start_of_image>", eoi_token="<end_of_image>",
                    image_token="<image_soft_token>")
    image_processor = Gemma3ImageProcessorPil(size={"height": 56, "width": 56}, do_pan_and_scan=False)
    boi, eoi, image = _ids(tok, "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    text = dict(TEXT, vocab_size=len(tok), head_dim=8, sliding_window=64, query_pre_attn_scalar=8,
                layer_types=["sliding_attention", "full_attention"])
    config = Gemma3Config(text_config=text, vision_config=dict(hidden_size=32, intermediate_size=64,
                                                               num_hidden_layers=2, num_attention_heads=2,
                                                               image_size=56, patch_size=14),
                          mm_tokens_per_image=4, boi_token_index=boi, eoi_token_index=eoi, image_token_index=image)
    torch.manual_seed(0)
    folder = _save(folder, Gemma3ForConditionalGeneration(config), image_processor, tok)
    (folder / "processor_config.json").write_text(json.dumps({"image_seq_length": 4}))
    return folder


def paligemma(folder: Path) -> Path:
    """PaliGemma: SigLIP over 56 px, 4 x 4 = 16 image tokens, a prefix-LM mask (picture and prompt attend
    bidirectionally); no chat template, as on the hub: its processor writes the prompt."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration
    from transformers.models.paligemma.processing_paligemma import EXTRA_TOKENS
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = tokenizer(["<pad>", "<eos>", "<bos>", "<image>"], None, bos_token="<bos>", eos_token="<eos>",
                    pad_token="<pad>", image_token="<image>")
    tok.add_tokens(EXTRA_TOKENS)  # PaliGemma's location and segmentation tokens, as its tokenizer has them
    image_processor = SiglipImageProcessorPil(size={"height": 56, "width": 56})
    image_processor.image_seq_length = 16
    config = PaliGemmaConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=2, image_size=56, patch_size=14,
                                                projection_dim=32),
                             text_config=dict(TEXT, vocab_size=len(tok), head_dim=8, model_type="gemma"),
                             image_token_id=tok.convert_tokens_to_ids("<image>"), projection_dim=32)
    torch.manual_seed(0)
    folder = _save(folder, PaliGemmaForConditionalGeneration(config), image_processor, tok)
    data = json.loads((folder / "preprocessor_config.json").read_text())
    data.update(image_seq_length=16, processor_class="PaliGemmaProcessor")
    (folder / "preprocessor_config.json").write_text(json.dumps(data))
    return folder


def save(family: str, folder: Path) -> Path:
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return qwen(folder, family)
    if family in ("llava_onevision", "llava_next"):
        return llava_anyres(folder, family)
    return {"idefics3": idefics3, "gemma3": gemma3, "paligemma": paligemma}[family](folder)


def reference(family: str, folder: Path):
    """The family's transformers processor from the folder's parts, built here without its video processor
    (a subclass whose constructor takes the image processor and tokenizer only)."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    names = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "idefics3": "Idefics3Processor",
             "llava_onevision": "LlavaOnevisionProcessor", "llava_next": "LlavaNextProcessor",
             "gemma3": "Gemma3Processor", "paligemma": "PaliGemmaProcessor"}
    base = getattr(transformers, names[family])

    def __init__(self, image_processor, tokenizer, chat_template=None, **kwargs):
        base.__init__(self, image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)

    cls = type(base.__name__, (base,), {"__init__": __init__})
    config = folder / "processor_config.json"
    settings = json.loads(config.read_text()) if config.is_file() else {}
    template = (folder / "chat_template.jinja").read_text() if (folder / "chat_template.jinja").is_file() else None
    return cls(AutoImageProcessor.from_pretrained(folder, backend="pil"), AutoTokenizer.from_pretrained(folder),
               chat_template=template, **settings)


def eager(folder: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
