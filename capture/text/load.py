"""Loading a text model: a causal LM (generates), a bidirectional encoder, or an encoder-decoder, with its tokenizer.

The model loads with the attention implementation it accepts (transformers' default: SDPA, or eager for
Gemma 2, GPT-OSS and BLOOM) on HeadScope's device in its dtype (capture.engine.device.placement), and
is then switched to "headscope" (capture.engine.handle.prepare); Falcon and BLOOM first get their
HeadScope forward (capture.text.families), encoder-decoders their three groups of layers
(capture.text.seq2seq).
"""
from __future__ import annotations

from pathlib import Path

from capture.engine import device
from capture.engine.handle import ModelHandle, prepare

ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "albert", "camembert", "mpnet",
                 "deberta", "deberta-v2", "modernbert"}
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def is_causal_lm(config, causal_types) -> bool:
    """Causal LM (generates) or encoder, from the config's architectures, else its model type."""
    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    if getattr(config, "is_encoder_decoder", False) or config.model_type in ENCODER_TYPES:
        return bool(getattr(config, "is_decoder", False))
    return config.model_type in causal_types


def weight_bytes(source: str, config) -> int | None:
    """About how many bytes the weights take in HeadScope's dtype (from the files of a local folder and
    the dtype they were saved in), or None when that cannot be told without loading."""
    folder = Path(source)
    if not folder.is_dir():
        return None
    stored = sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    saved = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32").split(".")[-1]
    size = {"float32": 4, "float16": 2, "bfloat16": 2}
    return stored * size.get(device.dtype_name(), 4) // size.get(saved, 4)


def load_text(name: str, source: str, config, kwargs: dict) -> ModelHandle:
    """A causal LM (AutoModelForCausalLM), an encoder (AutoModel) or an encoder-decoder
    (AutoModelForSeq2SeqLM), with its tokenizer; modality "text"."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from capture.text import families  # torch-backed: imported when a model is loaded, not with the registry
    from capture.text.seq2seq import prepare_seq2seq

    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    auto = AutoModelForSeq2SeqLM if seq2seq else \
        AutoModelForCausalLM if is_causal_lm(config, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) else AutoModel
    model = auto.from_pretrained(source, trust_remote_code=False, **device.placement(weight_bytes(source, config)),
                                 **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **kwargs)
    if seq2seq:
        return prepare_seq2seq(name, model, tokenizer)
    families.install(model)
    return prepare(name, model, tokenizer)
