"""The vision-language families HeadScope places on the picture, by config `model_type`.

A `Family` says what differs between them: the transformers processor class HeadScope builds from a
folder's parts (capture.vlm.chat), where each image token sits on the picture (`places`, capture.vlm.places),
how to run its vision tower alone for the tower's own maps (`tower`), whether its mask lets a token see
later ones (`layout` "full": Gemma 3's bidirectional image block, PaliGemma's prefix-LM; "tril" for the
causal ones), the value a generated token takes in each per-token input (`fills`), the special tokens
around and between its image tokens (`markers`), whether it needs a chat template (PaliGemma's
processor writes its own prompt) and whether a question's answers may continue from a cached prefix of
system prompt and picture (`shares_prefix`: causal masks with 1-D positions only).  One module per
family holds its `places` and `tower`.  Importing this package is torch-free.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from capture.vlm.families.family import Family


def family_of(model_type: str) -> Family | None:
    """The Family of a config's model_type (None: not one HeadScope places on the picture)."""
    from capture.vlm.families import gemma, idefics3, llava, llava_next, qwen2_vl

    return {"llava": llava.LLAVA, "llava_next": llava_next.LLAVA_NEXT, "llava_onevision": llava_next.ONEVISION,
            "qwen2_vl": qwen2_vl.QWEN2_VL, "qwen2_5_vl": qwen2_vl.QWEN2_5_VL, "idefics3": idefics3.IDEFICS3,
            "gemma3": gemma.GEMMA3, "paligemma": gemma.PALIGEMMA}.get(model_type)


__all__ = ["family_of"]
