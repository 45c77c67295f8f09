"""Direct logit attribution (DLA): how much each head, each MLP and the embedding write, at one position,
along the unembedding direction of a token (or of a token difference).

The residual stream entering the final norm is a sum of components (Elhage et al. 2021, "A Mathematical
Framework for Transformer Circuits"): x = embedding + sum_l (sum_h z_h W_O_h^T + b_O) + sum_l mlp_l.
The final norm is linear once its scale is frozen at the value it took in the run (RMSNorm:
s = 1 / sqrt(mean(x^2) + eps); LayerNorm: s = 1 / sqrt(var(x) + eps), with its centring), so

    logit(target) - logit(foil) = sum over components c of  s * (c . e) + const,
    e = w * (W_U[target] - W_U[foil])   (centred for a LayerNorm),  const = b . (W_U[target] - W_U[foil]) + lm_head bias

exactly, at the run's own scale: the standard approximation (TransformerLens' `accumulated_resid` /
`apply_ln_to_stack` with the cached scale) is in reading a component's term as its effect, since
removing the component would change s.  The probe records the components of every position in one
forward (z through the o_proj pre-hook's `head_outputs` callback, the MLP outputs and the embedding
through forward hooks) and projects each position onto its own direction: by default the next token of
the text (the model's top prediction at the last position), or one given token / token difference.

Post-norms (Gemma 2 / 3, OLMo 2 normalise each attention and MLP output before the residual): the MLP's
term is its normed output; the attention's post-norm is frozen like the final norm (its gain and its
scale from the run), so each head's term stays linear in its z and the terms still sum to the logit.
A norm's gain is read from the norm itself (Gemma's 1 + w).  Gemma 2 soft-caps its logits
(c * tanh(logit / c)); its terms sum to the logit before the cap, as the record says (`logit_softcap`).
Families (analytics.attribution.TEXT_FAMILIES, each checked on a tiny random model): Llama-style causal LMs
(Llama, SmolLM2, Mistral, Qwen2, Qwen3, StableLM, StarCoder2, Phi-3), Gemma, Gemma 2, Gemma 3, OLMo 2, GPT-2,
GPT-J, Phi and GPT-NeoX (Pythia, parallel or sequential residual), and ViT image classifiers (the class
logit, read at the CLS token); anything else is refused with one sentence, and so is a run whose terms do
not rebuild the residual and the logit (EXACT): DLA is served only where it decomposes the model's logit.
"""
from __future__ import annotations

import numpy as np
import torch

from analytics.attribution import TEXT_FAMILIES
from cache.store import Store
from capture.engine.handle import ModelHandle, attention_layers
from capture.engine.hooks import hidden_arg, removing
from capture.engine.session import session
from core.errors import InputError
from core.probe_results import DLAParams
from core.progress import Progress
from probes.common import top_heads

VISION_FAMILIES = ("vit",)
EXACT = 1e-2  # the components must rebuild the final residual, and the terms the logit, this closely (relative):
# float rounding is ~1e-7 in float32 and ~1e-3 in bfloat16; a family that scales its outputs before the residual
# (Granite's multipliers) or normalises in a way HeadScope does not read (OLMo's weightless LayerNorm) is off by ~1


def one_token(tokenizer, text: str, role: str) -> int:
    """The id of `text` as one token (no special tokens); InputError naming its pieces otherwise."""
    ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    if len(ids) != 1:
        pieces = " + ".join(repr(tokenizer.decode([i])) for i in ids) or "nothing"
        raise InputError(f"The {role} {text!r} is {len(ids)} tokens ({pieces}), not one; pick a word that is one "
                         "token (with its leading space, like ' Mary').")
    return ids[0]


def class_id(config, text: str) -> int:
    """An image classifier's class by label (case-insensitive) or index."""
    labels = {str(v).lower(): int(k) for k, v in (getattr(config, "id2label", None) or {}).items()}
    if text.strip().lower() in labels:
        return labels[text.strip().lower()]
    if text.strip().isdigit() and int(text) < len(labels):
        return int(text)
    raise InputError(f"{text!r} is not a class of this classifier; give a label it has or a class number.")


def language_family(handle: ModelHandle) -> str:
    """The family of the model DLA decomposes: a VLM's language model's (its text config), else the model's."""
    config = handle.model.config
    text = config.get_text_config() if handle.meta.modality == "vlm" and hasattr(config, "get_text_config") else config
    return str(getattr(text, "model_type", handle.meta.family))


def _family_check(handle: ModelHandle) -> None:
    meta = handle.meta
    family = language_family(handle)
    known = TEXT_FAMILIES if meta.modality in ("text", "vlm") else VISION_FAMILIES if meta.modality == "vision" else ()
    classifier = meta.modality != "vision" or hasattr(handle.model, "classifier")
    if family not in known or not classifier or (meta.modality == "text" and not meta.causal):
        raise InputError(f"Direct logit attribution knows the causal LMs {', '.join(TEXT_FAMILIES)} (also as a VLM's "
                         f"language model) and ViT image classifiers; {meta.name} ({family}, {meta.modality}) is none "
                         "of them.")


def _final_norm(handle: ModelHandle) -> torch.nn.Module:
    """The norm between the last block and the unembedding (Llama `norm`, GPT-2 `ln_f`, ViT `layernorm`, Phi
    `final_layernorm`, GPT-NeoX `final_layer_norm`)."""
    base = getattr(handle.model, getattr(handle.model, "base_model_prefix", ""), handle.model)
    # a VLM's language model sits one level further down (LLaVA: model.language_model; Idefics3: model.text_model)
    for owner in (base, *(getattr(o, name, None) for o in (base, handle.model) for name in ("language_model",
                                                                                             "text_model"))):
        for name in ("norm", "ln_f", "layernorm", "final_layernorm", "final_layer_norm"):
            if isinstance(getattr(owner, name, None), torch.nn.Module):
                return getattr(owner, name)
    raise InputError(f"HeadScope cannot find the final norm of {handle.meta.name}.")


def _unembedding(handle: ModelHandle) -> torch.nn.Module:
    head = handle.model.classifier if handle.meta.modality == "vision" else handle.model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise InputError(f"{handle.meta.name}'s output head is not one linear map; DLA needs one.")
    return head


def _out_weight(out: torch.nn.Module) -> torch.Tensor:
    """The output projection as W  # [dim, head * head_dim] (nn.Linear; GPT-2's Conv1D stores it transposed)."""
    return out.weight.T if type(out).__name__ == "Conv1D" else out.weight


def _layers(handle: ModelHandle) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(attention, output projection) of the layers HeadScope indexes (a VLM's language model, not its tower)."""
    outs = {id(attn): out for attn, out in attention_layers(handle.model)}
    return [(attn, outs[id(attn)]) for attn in handle.attention_modules]


def blocks_of(handle: ModelHandle) -> list[torch.nn.Module]:
    """The block around each attention layer: the ancestor that is an item of a ModuleList (a Llama
    decoder layer, a GPT-2 `h[i]`, a ViT `encoder.layer[i]`)."""
    modules = dict(handle.model.named_modules())
    names = {id(m): n for n, m in modules.items()}
    found = []
    for attn in handle.attention_modules:
        path = names.get(id(attn), "")
        while "." in path and not isinstance(modules.get(path.rsplit(".", 1)[0]), torch.nn.ModuleList):
            path = path.rsplit(".", 1)[0]
        if "." not in path:
            raise InputError(f"HeadScope cannot find the layers of {handle.meta.name}.")
        found.append(modules[path])
    return found


def post_norms(block: torch.nn.Module) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """The norms a block applies to its attention output and its MLP output before adding them to the
    residual (Gemma 2 / 3, OLMo 2: `post_attention_layernorm`, `post_feedforward_layernorm`), or (None, None)
    for a pre-norm block (in Llama `post_attention_layernorm` is the MLP's input norm: no
    `post_feedforward_layernorm` beside it)."""
    after_mlp = getattr(block, "post_feedforward_layernorm", None)
    if not isinstance(after_mlp, torch.nn.Module):
        return None, None
    return getattr(block, "post_attention_layernorm"), after_mlp


def _eps(norm: torch.nn.Module) -> float:
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))


def rms_gain(norm: torch.nn.Module, dim: int) -> torch.Tensor:
    """An RMS norm's per-channel gain g  # [dim], whatever its parametrisation (Llama's w, Gemma's 1 + w):
    read from the norm itself on a vector of ones, whose scale 1 / sqrt(1 + eps) is known."""
    ones = torch.ones(1, dim, dtype=next(norm.parameters(), torch.ones(())).dtype)  # a norm may have no weight
    return norm(ones)[0].float() * (1.0 + _eps(norm)) ** 0.5


def rms_scale(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """The scale an RMS norm applies to each row of x  # [token, dim] -> [token], frozen from the run."""
    return torch.rsqrt(x.pow(2).mean(-1) + _eps(norm))


def _mlp_hook(block: torch.nn.Module, store: list, layer: int):
    """A forward hook recording the MLP's contribution to the residual  # [token, dim] (after its post-norm,
    where the block has one)."""
    after_mlp = post_norms(block)[1]
    if after_mlp is not None:
        def hook(_module, _args, out):
            store[layer] = out[0].float()
        return after_mlp.register_forward_hook(hook)
    if isinstance(getattr(block, "mlp", None), torch.nn.Module):
        def hook(_module, _args, out):
            store[layer] = out[0].float()
        return block.mlp.register_forward_hook(hook)
    if isinstance(getattr(block, "output", None), torch.nn.Module):  # ViT: ViTOutput adds the residual itself
        def hook(_module, args, out):
            store[layer] = (out[0] - args[1][0]).float()
        return block.output.register_forward_hook(hook)
    raise InputError("HeadScope cannot find the MLP of this model's layers.")


def _forward(handle: ModelHandle, inputs: dict) -> dict:
    """One forward; the components of the residual stream at every position, float32, and the logits."""
    blocks = blocks_of(handle)
    L = handle.meta.n_layers
    z: list = [None] * L  # z[l]  # [token, head, head_dim]
    mlp: list = [None] * L  # mlp[l]  # [token, dim]
    held: dict = {}

    def take_z(layer: int, heads: torch.Tensor) -> None:
        z[layer] = heads[0].float().clone()

    def embedding(_module, args, kwargs):
        held["embed"] = hidden_arg(args, kwargs)[0].float()  # [token, dim]

    def final(_module, args):
        held["final"] = args[0][0].float()  # [token, dim] the residual entering the final norm

    attn_out: list = [None] * L  # attn_out[l]  # [token, dim] entering the attention's post-norm, if any

    def post_attention(layer: int):
        def hook(_module, args):
            attn_out[layer] = args[0][0].float()
        return hook

    hooks = [blocks[0].register_forward_pre_hook(embedding, with_kwargs=True),
             _final_norm(handle).register_forward_pre_hook(final)]
    hooks += [_mlp_hook(block, mlp, l) for l, block in enumerate(blocks)]
    after_attention = [post_norms(block)[0] for block in blocks]
    hooks += [norm.register_forward_pre_hook(post_attention(l)) for l, norm in enumerate(after_attention) if norm]
    with removing(hooks), session(head_outputs=take_z):
        out = handle.model(**inputs)
    held.update(z=z, mlp=mlp, attn_out=attn_out, logits=out.logits[0].float())  # logits: text [token, vocab]
    return held


@torch.inference_mode()
def attribute(handle: ModelHandle, inputs: dict, targets: torch.Tensor | None = None,
              foils: torch.Tensor | None = None) -> dict:
    """Every component's term at every position, onto targets  # [token] minus foils  # [token] (None:
    no foil); targets None = the next token of the text and the top prediction at the last position
    (a classifier: its top class, at every position).

    Returns heads [layer, head, token], mlps [layer, token], embed, bias, logit, scale, targets [token],
    sum_error (the largest |sum of terms - logit|) and residual_error: |final residual - the components| / |final residual|, the largest over positions
    (~1e-7: the components are the residual stream).  `logit` is the model's own logit (difference); the
    terms sum to it, at the frozen scale, to float rounding."""
    _family_check(handle)
    held = _forward(handle, inputs)
    final, logits = held["final"], held["logits"]  # [token, dim]
    n = final.shape[0]
    if targets is None:
        top = logits.argmax(-1)  # text [token]; a classifier: one class
        if handle.meta.modality == "text":
            targets = torch.cat([inputs["input_ids"][0, 1:], top[-1:]])
        else:
            targets = top.expand(n)
    unembed = _unembedding(handle)
    W_U = unembed.weight.float()  # [vocab, dim]
    u = W_U[targets] - (W_U[foils] if foils is not None else 0)  # [token, dim]
    const = torch.zeros(n)
    if unembed.bias is not None:
        b_U = unembed.bias.float()
        const += b_U[targets] - (b_U[foils] if foils is not None else 0)
    norm = _final_norm(handle)
    if isinstance(norm, torch.nn.LayerNorm):
        e = norm.weight.float() * u  # [token, dim]
        scale = torch.rsqrt(final.var(-1, unbiased=False) + norm.eps)  # [token]
        e = e - e.mean(-1, keepdim=True)  # LayerNorm's centring, moved onto the direction
        norm_bias = u @ norm.bias.float() if norm.bias is not None else 0
    else:
        e = rms_gain(norm, final.shape[-1]) * u  # [token, dim]
        scale = rms_scale(final, norm)  # [token]
        norm_bias = 0
    e = e * scale[:, None]  # the frozen scale: each term is linear in its component
    L, H = handle.meta.n_layers, handle.meta.n_heads
    heads = torch.zeros(L, H, n)
    bias = const + norm_bias
    rebuilt = held["embed"] + sum(held["mlp"])  # [token, dim], the attention outputs added below
    blocks = blocks_of(handle)
    for l, (_, out) in enumerate(_layers(handle)):
        W_O = _out_weight(out).float()  # [dim, head * head_dim]
        z = held["z"][l]  # [token, head, head_dim]
        after = post_norms(blocks[l])[0]
        # a post-norm's gain and scale, frozen from the run like the final norm's: the heads' outputs stay linear
        through = rms_gain(after, W_O.shape[0]) * rms_scale(held["attn_out"][l], after)[:, None] \
            if after is not None else torch.ones(1, W_O.shape[0])  # [token or 1, dim]
        e_l = e * through  # [token, dim]
        heads[l] = (z * (e_l @ W_O).view(n, H, -1)).sum(-1).T  # [head, token]
        rebuilt = rebuilt + (z.reshape(n, -1) @ W_O.T) * through
        if out.bias is not None:
            bias = bias + e_l @ out.bias.float()
            rebuilt = rebuilt + out.bias.float() * through
    mlps = torch.stack([(m * e).sum(-1) for m in held["mlp"]])  # [layer, token]
    embed = (held["embed"] * e).sum(-1)  # [token]
    logit = (norm(final).float() * u).sum(-1) + const  # the model's own logit (difference)
    error = ((final - rebuilt).norm(dim=-1) / final.norm(dim=-1).clamp_min(1e-12)).max()
    total = heads.sum((0, 1)) + mlps.sum(0) + embed + bias  # [token]
    size = heads.abs().sum((0, 1)) + mlps.abs().sum(0) + embed.abs() + bias.abs() + 1  # [token]
    off = float(((total - logit).abs() / size).max())
    if error > EXACT or off > EXACT:  # a residual multiplier, a norm HeadScope does not know
        raise InputError(f"{handle.meta.name}'s logit is not the sum of its heads', MLPs' and embedding's terms "
                         f"(the residual is off by {float(error):.2g}, the logit by {off:.2g}), so its DLA would not "
                         "be the model's; HeadScope refuses it.")
    return {"heads": heads.numpy(), "mlps": mlps.numpy(), "embed": embed.numpy(), "bias": bias.numpy(),
            "logit": logit.numpy(), "scale": scale.numpy(), "targets": targets.numpy().astype(np.int64),
            "residual_error": float(error), "sum_error": float((total - logit).abs().max())}


def dla_probe(handle: ModelHandle, p: DLAParams, put, progress: Progress, store: Store | None = None) -> dict:
    """DLA of one capture's tokens (DLAParams): stores heads [layer, head, token], mlps [layer, token], embed,
    bias, logit, scale and targets [token]; the record names the answer position (the last token; a ViT's
    CLS token) and sum_error, the largest |sum of terms - the model's logit| over positions."""
    from capture.api import load_capture
    from capture.vision.adapter import VisionAdapter
    from capture.vlm.adapter import VlmAdapter
    from capture.vlm.inputs import placed

    capture = load_capture(p.capture, store)
    if capture is None:
        raise InputError(f"No capture with key {p.capture} in the cache; `python -m headscope ls` lists them.")
    _family_check(handle)
    if capture.spec.intervention.edits:
        raise InputError("DLA reads the plain model; this capture ran with an intervention.")
    progress(0.1, "one forward with the components recorded")
    if handle.meta.modality == "vision":
        adapter = VisionAdapter(handle)
        inputs = adapter.forward_kwargs(adapter.encode(capture.spec)[0])
        tok = None
        target = torch.tensor([class_id(handle.model.config, p.target)]) if p.target else None
        foil = torch.tensor([class_id(handle.model.config, p.foil)]) if p.foil else None
        position = 0
    else:
        ids = capture.output.token_ids
        if handle.meta.modality == "vlm":  # the capture's tokens with its picture, as the recorded pass ran them
            adapter = VlmAdapter(handle)
            inputs = {**placed(adapter.encode(capture.spec)[0].answered(list(ids)), handle.model), "use_cache": False}
            tok = adapter.tokenizer
        else:
            inputs = {"input_ids": torch.tensor([ids]), "use_cache": False}
            tok = handle.tokenizer
        n = len(ids)
        target = torch.full((n,), one_token(tok, p.target, "target")) if p.target else None
        foil = torch.full((n,), one_token(tok, p.foil, "foil")) if p.foil else None
        # a VLM's answer: read where its first token is predicted (the last prompt token); else the last token
        answer = capture.spans.get("answer", range(0))
        position = answer.start - 1 if handle.meta.modality == "vlm" and len(answer) else n - 1
    if target is not None and foil is not None and bool((target == foil).all()):
        raise InputError("The target and the foil are the same token; their logit difference is always 0.")
    if handle.meta.modality == "vision" and target is not None:
        target = target.expand(capture.n_tokens)
        foil = None if foil is None else foil.expand(capture.n_tokens)
    terms = attribute(handle, inputs, target, foil)
    progress(0.9, "storing")
    for name in ("heads", "mlps", "embed", "bias", "logit", "scale", "targets"):
        put(name, terms[name])
    target_id = int(terms["targets"][position])
    label = (handle.model.config.id2label.get(target_id, str(target_id)) if tok is None
             else tok.decode([target_id]))
    return {"n_tokens": int(terms["logit"].shape[0]), "capture": p.capture, "answer_position": position,
            "summary": {"answer": label, "logit": float(terms["logit"][position]),
                        # Gemma 2 soft-caps its logits (c * tanh(logit / c)): the terms sum to the logit before it
                        "logit_softcap": getattr(handle.model.config, "final_logit_softcapping", None),
                        "sum_error": terms["sum_error"],
                        "residual_error": terms["residual_error"],
                        "top": top_heads(terms["heads"][:, :, position]),
                        "bottom": top_heads(-terms["heads"][:, :, position])}}
