"""Vision-aware head divergence (VHD, He et al., ACL 2025, METHODS §3.1): two passes over one VLM capture.

VHD_{l,h}(t) = d(z^{l,h}_t | image + text, z^{l,h}_t | text only): the distance between a head's output
(the o_proj input, a session's `head_outputs` callback in capture.engine.head_outputs) at the same answer
token with and without the picture.  The image branch is the capture's own tokens with its picture
inputs; the text-only branch is the same chat prompt with the picture removed (the image tokens and the
newline after them, or the whole picture block with its marker tokens: span "image_block"), then the
same answer tokens, its per-token inputs (token_type_ids ...) cut alike.  Both passes run without the capture's intervention (VHD
describes the model), on the fast path.

The distance d is unverified in the paper; `distance` "l2" (default: ‖z_img − z_txt‖) or "cos"
(1 − cosine).  The result, vhd  # [layer, head, answer token] float32, is stored with the capture
("vhd"; analytics.vlm reads it, T-VHD_t = the mean of the top-k values at token t, k = 10 by default).
"""
from __future__ import annotations

import numpy as np
import torch

from analytics import vlm
from capture import registry
from capture.engine.device import to_host
from capture.engine.session import session
from capture.vlm import presets
from capture.vlm.inputs import placed
from core.errors import InputError, InterventionError
from core.interventions import Intervention

VHD = "vhd"  # cache entry beside the capture's maps


def _head_outputs(handle, positions: range, **inputs) -> torch.Tensor:
    """z  # [layer, len(positions), head, head_dim]: head outputs at `positions` of one forward."""
    found: dict[int, torch.Tensor] = {}

    def keep(layer: int, z: torch.Tensor) -> None:
        found[layer] = z[0, positions.start:positions.stop].float().clone()

    with session(head_outputs=keep), torch.inference_mode():
        handle.model(**inputs, use_cache=False, logits_to_keep=1)
    return torch.stack([found[l] for l in range(handle.meta.n_layers)])


def picture_tokens(capture) -> range:
    """The positions the text-only branch leaves out: the picture block with its markers ("image_block"),
    else the image tokens (with a kept vision CLS token) and the newline after them."""
    if "image_block" in capture.spans:
        return capture.spans["image_block"]
    image = capture.spans["image"]
    start = capture.spans.get("image_cls", image).start
    stop = image.stop + (1 if image.stop < capture.n_tokens and capture.tokens[image.stop] == "↵" else 0)
    return range(start, stop)


def text_only_ids(capture) -> tuple[list[int], range]:
    """The capture's tokens without the picture (`picture_tokens`), and where its answer tokens sit in
    that sequence."""
    ids = list(capture.output.token_ids)
    removed = picture_tokens(capture)
    kept = ids[:removed.start] + ids[removed.stop:]
    answer = capture.spans["answer"]
    shift = len(removed)
    return kept, range(answer.start - shift, answer.stop - shift)


def vhd(capture, distance: str = "l2", store=None) -> np.ndarray:
    """vhd  # [layer, head, answer token] of a VLM capture with an answer; stored with the capture."""
    from capture import images

    if capture.meta.modality != "vlm" or not len(capture.spans.get("answer", range(0))):
        raise InputError("VHD compares head outputs on the answer tokens of a VLM capture; this one has none.")
    if distance not in ("l2", "cos"):
        raise InputError("VHD's distance is l2 or cos.")
    handle = registry.load(capture.spec.model)
    inputs = handle.tokenizer.encode(images.load_image(capture.spec.image), capture.spec.prompt)
    with_image = inputs.answered(list(capture.output.token_ids))  # the capture's tokens and its picture inputs
    removed = picture_tokens(capture)
    kept = [i for i in range(capture.n_tokens) if i not in removed]
    text_only = {name: with_image[name][:, kept] for name in ("input_ids", "attention_mask", *inputs.token_inputs)}
    _ids, text_answer = text_only_ids(capture)
    with handle.lock:
        # [layer, t, head, head_dim] each
        z_img = _head_outputs(handle, capture.spans["answer"], **placed(with_image, handle.model))
        z_txt = _head_outputs(handle, text_answer, **placed(text_only, handle.model))
    if distance == "l2":
        d = (z_img - z_txt).norm(dim=-1)  # [layer, t, head]
    else:
        d = 1 - torch.nn.functional.cosine_similarity(z_img, z_txt, dim=-1)
    out = to_host(d.permute(0, 2, 1).contiguous()).astype(np.float32)  # [layer, head, t]
    (store or capture.store).put_array(capture.key, VHD, out)
    return out


__all__ = ["vhd", "text_only_ids", "picture_tokens", "VHD"]


def for_capture(method: str, capture, heads: presets.Heads | None = None, **params) -> Intervention:
    """The intervention `method` ("var", "gift", "mask") builds for one VLM capture from its analytics
    (analytics.vlm: visual sinks, image-centric heads, gaze saliency).  `heads` overrides the heads the
    method would pick (the image-centric ones); "mask" needs them."""
    meta = capture.meta
    if method == "mask":
        return presets.mask_image(meta, heads or ())
    if method == "vhr":
        return presets.vhr(meta, vlm.stored_vhd(capture).mean(-1), **params)
    sinks = vlm.capture_sinks(capture)
    if heads is None:
        heads = presets.centric_heads(vlm.head_vision(capture, sinks.visual).centric)
    if method == "var":
        return presets.var(meta, heads, sinks=sinks.tokens, image=capture.spans["image"], **params)
    if method == "gift":
        found = vlm.gaze(capture)
        return presets.gift(meta, found.token_saliency, found.positions, heads or None, **params)
    raise InterventionError(f"Unknown VLM intervention {method!r}; use one of {', '.join(presets.METHODS)}.")
