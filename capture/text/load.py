"""Loading a text model: a causal LM (generates) or a bidirectional encoder, with its tokenizer."""
from __future__ import annotations

from capture.engine.handle import ModelHandle, prepare

ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "albert", "camembert", "mpnet",
                 "deberta", "deberta-v2", "modernbert"}


def is_causal_lm(config, causal_types) -> bool:
    """Causal LM (generates) or encoder, from the config's architectures, else its model type."""
    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    if getattr(config, "is_encoder_decoder", False) or config.model_type in ENCODER_TYPES:
        return bool(getattr(config, "is_decoder", False))
    return config.model_type in causal_types




def load_text(name: str, source: str, config, kwargs: dict) -> ModelHandle:
    """A causal LM (AutoModelForCausalLM) or an encoder (AutoModel) with its tokenizer; modality "text"."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    auto = AutoModelForCausalLM if is_causal_lm(config, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) else AutoModel
    model = auto.from_pretrained(source, trust_remote_code=False, dtype=torch.float32,
                                 attn_implementation="sdpa", **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **kwargs)
    return prepare(name, model, tokenizer)
