"""Diffusers pipeline folders, tiny and random: SD3 (with SD3.5's dual attention), Flux, Chroma, PixArt-Σ, Sana,
Qwen-Image, FLUX.2 [klein], CogView 4, AuraFlow, HunyuanDiT, Lumina 2 and Z-Image.

Each family's pipeline is built and saved once per module (tests/models/tiny_pipelines.py) and sampled at
32 x 32 px with 2 steps.  Held: the captured image is the plain pipeline's bit for bit (a one-row call on a
CPU: within one 8-bit level); the recorded maps equal an independent recording of softmax(q kᵀ · scale + mask)
(Sana's self-attention: the linear map φ(q)·φ(k) normalised per row) at a recorded step; rows sum to 1; the
spans name the image and the text tokens; a head scaled to 0 changes the image and equals zeroing that head's
slice before the output projection; SoftPAG with u = 0 changes nothing; the "split" layout of real sizes keeps
what the "full" one does; bad input is one sentence and nothing is cached.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tiny_pipelines
from capture import registry
from capture.api import run
from capture.dit import presets as dit_presets
from capture import api as capture_api
from capture.dit.adapter import DitAdapter, plan_key
from capture.dit.record import RecordPlan
from core import dit_capture
from core.errors import USER_ERRORS, InputError, ModelUnavailable
from core.interventions import HeadEdit, Intervention
from core.types import RunSpec

PROMPT = "a red circle at the top left"
SIZE, STEPS, SEED = tiny_pipelines.SIZE, 2, 3
FAMILIES = tiny_pipelines.FAMILIES
# one batch row per recorded transformer call (no guidance batch)
ONE_ROW = ("flux", "chroma", "qwenimage", "flux2", "flux2dev", "cogview4", "lumina2")
JOINT = ("sd3", "flux", "chroma", "qwenimage", "flux2", "flux2dev", "cogview4", "auraflow", "lumina2",
         "zimage")  # others: cross
TEXT_FIRST = ("flux", "chroma", "qwenimage", "flux2", "flux2dev", "cogview4", "auraflow", "lumina2")  # [text, image]
CROSS = ("pixart", "sana", "hunyuandit")  # the word maps are a cross-attention's
MASKED = ("pixart", "sana")  # the text encoder's padding is masked out of the attention
SEPARATE_CFG = ("chroma", "qwenimage", "flux2", "cogview4", "lumina2")  # guidance: a second transformer call a step
COND_FIRST = ("zimage",)  # the guidance batch is [conditional, unconditional], not the other way round
REFINED = ("lumina2", "zimage")  # an image-only and a caption-only refiner layer (layers 0, 1) before the joint ones


@pytest.fixture(scope="module", autouse=True)
def full_layout():
    """Every family's default capture in the full layout, whose maps these tests hold against independent
    ones.  Tiny Flux's and Chroma's 2.7 MB steps are split by default (core.dit_capture.FULL_STEP_BYTES):
    test_split_layout_keeps_what_the_full_one_does holds that layout against the full one, and the browser
    test of a saved pipeline opens it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dit_capture, "FULL_STEP_BYTES", dit_capture.FULL_BYTES)
        yield


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {family: tiny_pipelines.save(family, root / family) for family in FAMILIES}


def _side(folder) -> int:
    """The picture side a family's tests sample at (the folders are named for their family)."""
    return tiny_pipelines.size(Path(folder).name)


def _spec(folder, **kwargs) -> RunSpec:
    side = _side(folder)
    fields = dict(model=str(folder), prompt=PROMPT, seed=SEED, steps=STEPS, height=side, width=side)
    fields.update(kwargs)
    return RunSpec(**fields)


def _plain(folder):
    """The same pipeline loaded afresh by diffusers, with its own processors.  FLUX.2 [dev]'s PixtralProcessor
    needs torchvision, so its tokenizer comes in with the chat template saved beside it: the tiny template opens
    with the bos token, so the processor's rendering and tokens are the tokenizer's."""
    from diffusers import DiffusionPipeline
    from transformers import AutoTokenizer

    released = json.loads((Path(folder) / "model_index.json").read_text())["tokenizer"][1] == "PixtralProcessor"
    pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32,
                                             **({"tokenizer": None} if released else {}))
    if released:
        pipe.tokenizer = AutoTokenizer.from_pretrained(Path(folder) / "tokenizer")
        assert pipe.tokenizer.chat_template == tiny_pipelines.MISTRAL_TEMPLATE
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, folder) -> np.ndarray:
    """The plain pipeline's picture, called as HeadScope calls it (the family's fixed arguments)."""
    runner = registry.load(str(folder)).tokenizer
    side = _side(folder)
    image = pipe(prompt=PROMPT, height=side, width=side, num_inference_steps=STEPS, output_type="np",
                 generator=torch.Generator().manual_seed(SEED), **runner.call_kwargs()).images[0]
    return (image * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def captures(folders, tmp_path_factory):
    from cache.store import Store

    store = Store(tmp_path_factory.mktemp("cache"), size_limit=2**30)
    yield {family: run(_spec(folder), store) for family, folder in folders.items()}, store
    store.close()


# ---- the picture --------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_image_is_the_plain_pipelines(family, folders, captures):
    caps, _store = captures
    cap = caps[family]
    plain = _sample(_plain(folders[family]), folders[family])
    image = dit_capture.generated_image(cap)
    if family in ONE_ROW:  # the recorded call's output from the recorded weights (capture.dit.attend)
        assert np.abs(image.astype(int) - plain.astype(int)).max() <= 1
    else:
        np.testing.assert_array_equal(image, plain)  # bit for bit, recording on
    assert cap.meta.family == family and cap.meta.modality == "dit" and cap.meta.grid == (
        (16, 16) if family == "sana" else (8, 8))


# ---- the maps -----------------------------------------------------------------------------------------

class _Independent:
    """diffusers' own processors, each wrapped to note which module runs, and F.scaled_dot_product_attention
    wrapped to keep softmax(q kᵀ · scale + mask) of every call; Sana's linear attention from its q / k."""

    def __init__(self, pipe, cond_first: bool = False):
        from diffusers.models.attention import AttentionModuleMixin
        from diffusers.models.attention_processor import Attention

        self.maps, self.module, self.step, self.cond = {}, None, 0, 0 if cond_first else -1
        self.layer_of, layer = {}, -1
        for _path, module in pipe.transformer.named_modules():
            if isinstance(module, (Attention, AttentionModuleMixin)):
                cross = getattr(module, "is_cross_attention", False)
                layer = layer if cross else layer + 1
                self.layer_of[module] = (layer, "cross" if cross else "main")
                module.processor = self._wrap(module, module.processor)

    def _wrap(self, module, processor):
        outer = self

        class Wrapped:
            def __call__(self, attn, *args, **kwargs):
                outer.module = module
                if type(processor).__name__ == "SanaLinearAttnProcessor2_0":
                    hidden = args[0]
                    q = F.relu(attn.to_q(hidden)).unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # [b, h, n, d]
                    k = F.relu(attn.to_k(hidden)).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
                    s = q @ k.transpose(-1, -2)
                    outer.keep(s / (s.sum(-1, keepdim=True) + 1e-15))
                try:
                    return processor(attn, *args, **kwargs)
                finally:
                    outer.module = None

            def __getattr__(self, name):
                return getattr(processor, name)

        # diffusers' Attention passes a processor only the keyword arguments its __call__ names (Qwen-Image's mask
        # and rotary embedding): the wrapper shows the processor's own signature
        Wrapped.__call__.__signature__ = inspect.signature(type(processor).__call__)
        return Wrapped()

    def keep(self, weights):  # [batch, head, q, k]: the conditional row is the last (Z-Image's: the first)
        layer, kind = self.layer_of[self.module]
        self.maps[(self.step, layer, kind)] = weights[self.cond].float().numpy()

    def sdpa(self, original):
        def wrapped(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
            if self.module is not None:
                s = (query.float() @ key.float().transpose(-1, -2)) * (scale or query.shape[-1] ** -0.5)
                if attn_mask is not None and attn_mask.dtype == torch.bool:  # True: attend
                    s = s.masked_fill(~attn_mask, float("-inf"))
                elif attn_mask is not None:
                    s = s + attn_mask.float()
                self.keep(torch.softmax(s, -1))
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, **kwargs)
        return wrapped


@pytest.mark.parametrize("family", FAMILIES)
def test_maps_equal_an_independent_recording(family, folders, captures, monkeypatch):
    caps, _store = captures
    cap = caps[family]
    pipe = _plain(folders[family])
    independent = _Independent(pipe, cond_first=family in COND_FIRST)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        independent.sdpa(torch.nn.functional.scaled_dot_product_attention))
    pipe.transformer.register_forward_pre_hook(lambda *_: setattr(independent, "step", independent.step + 1))
    independent.step = -1
    _sample(pipe, folders[family])
    assert cap.output.recorded_steps == [0, 1]
    step = 1
    call = step * (2 if family in SEPARATE_CFG else 1)  # a second transformer call for the negative prompt
    for layer in range(cap.meta.n_layers):
        ours = dit_capture.step_attention(cap, step, layer).astype(np.float32)  # [head, n, n] on the capture's axis
        theirs = independent.maps[(call, layer, "main")]
        part = _part(cap, theirs.shape[1], layer)
        n = len(part)  # Lumina 2's caption refiner: its first n rows and keys, the caption's masked padding beyond
        np.testing.assert_allclose(ours[:, part.start:part.stop, part.start:part.stop], theirs[:, :n, :n], atol=2e-3)
        outside = np.ones(cap.n_tokens, bool)
        outside[part.start:part.stop] = False
        assert not ours[:, outside].any() and not ours[:, :, outside].any()  # a refiner: nothing outside its part
        if (call, layer, "cross") in independent.maps:  # PixArt / Sana: the word maps are the cross-attention's
            words = dit_capture.image_to_text(cap, step)[0, layer]
            np.testing.assert_allclose(words, independent.maps[(call, layer, "cross")], atol=2e-3)


def _part(cap, n: int, layer: int) -> range:
    """The part of a capture's token axis layer `layer`, a module of n tokens, attends over: all of it, the image
    (an image-only layer: PixArt's, Sana's, SD3.5's extra one, the refined families' layer 0) or the text (their
    layer 1, the caption refiner: Z-Image's of the text's length; Lumina 2's padded beyond it)."""
    if cap.meta.family in REFINED and layer < 2:
        return cap.spans["image" if layer == 0 else "text"]
    return range(0, cap.n_tokens) if n == cap.n_tokens else cap.spans["image"]


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_sum_to_one_and_spans_name_the_tokens(family, captures):
    caps, _store = captures
    cap = caps[family]
    image, text = cap.spans["image"], cap.spans["text"]
    assert all(t.startswith("patch(") for t in cap.tokens[image.start:image.stop])
    assert not any(t.startswith("patch(") for t in cap.tokens[text.start:text.stop])
    assert (image.start == 0) == (family not in TEXT_FIRST)
    if family == "auraflow":  # the transformer's own 8 register tokens open the text: a segment, no words
        assert cap.spans["registers"] == range(0, 8) and cap.tokens[:8] == [f"<register {i}>" for i in range(8)]
        assert min(dit_capture.word_columns(cap)) == 8
    prompt = cap.spans["prompt"]
    words = [t.strip("▁Ġ").replace("</w>", "") for t in cap.tokens[prompt.start:prompt.stop]]
    assert "red" in words and "circle" in words
    padding = cap.spans["padding"]
    assert all(t in ("<pad>", "!", "<|endoftext|>") for t in cap.tokens[padding.start:padding.stop])
    for layer in range(cap.meta.n_layers):
        sums = dit_capture.step_attention(cap, 0, layer).astype(np.float32).sum(-1)  # [head, n]
        live = sums > 0.5  # rows the layer computes (an image-only layer's text rows are empty)
        block = image if family in REFINED and not live[:, text.start:text.stop].any() else \
            text if family in REFINED and not live[:, image.start:image.stop].any() else image
        assert live[:, block.start:block.stop].all() or family == "sana"
        np.testing.assert_allclose(sums[live], 1.0, atol=5e-3)
        assert (sums[~live] == 0).all()  # Sana: a linear-attention row is empty where φ(q) is all zeros
        if family == "sana":
            assert live[:, image.start:image.stop].mean() > 0.5
    words = dit_capture.image_to_text(cap)  # [step, layer, head, image, text]
    if family in CROSS:
        np.testing.assert_allclose(words.sum(-1), 1.0, atol=5e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_image_only_layers_store_their_block_and_read_as_whole_maps(family, captures):
    """A layer whose attention sees the image tokens only (PixArt's and Sana's self-attention, SD3.5's extra
    one, Lumina 2's and Z-Image's image refiners) or the caption only (their caption refiners) stores that block;
    every generic read pads it back: the maps equal the step mean of the whole step maps, and the thumbnails their
    block maxima."""
    from core.layouts import max_pool

    caps, store = captures
    cap = capture_api.load_capture(caps[family].key, store)  # read back from its record
    image, text, n = cap.spans["image"], cap.spans["text"], cap.n_tokens
    refiners = [[image.start] * 2, [text.start] * 2, None, None]  # the tiny Lumina 2's, Z-Image's: image, caption
    expected = {"sd3": [None, [0, 0], None], "flux": None, "chroma": None, "qwenimage": None, "flux2": None,
                "flux2dev": None, "cogview4": None, "auraflow": None, "lumina2": refiners, "zimage": refiners}.get(
        family, [[0, 0]] * cap.meta.n_layers)
    assert cap.layout_info.get("blocks") == expected
    thumbs = cap.overview()
    for layer in range(cap.meta.n_layers):
        stored = store.get_array(cap.key, f"T{layer:03d}")
        steps = dit_capture.all_steps(cap, layer)
        whole = np.stack([dit_capture.step_attention(cap, s, layer) for s in range(STEPS)])  # [step, head, n, n]
        assert steps.shape == whole.shape == (STEPS, cap.meta.n_heads, n, n)
        if expected and expected[layer] is not None:
            part = image if expected[layer][0] == image.start else text
            assert stored.shape[2:] == (len(part), len(part))  # the image x image (or text x text) block only
            outside = np.ones(n, bool)
            outside[part.start:part.stop] = False
            assert not whole[:, :, outside].any() and not whole[:, :, :, outside].any()
        mean = whole.astype(np.float32).mean(0).astype(np.float16)
        np.testing.assert_array_equal(cap.attention(layer), mean)
        np.testing.assert_array_equal(cap.head(layer, 1), mean[1])
        np.testing.assert_array_equal(cap.row(layer, n - 1), mean[:, n - 1])
        np.testing.assert_array_equal(cap.rows(layer, 3, 40), mean[:, 3:40].astype(np.float32))
        np.testing.assert_array_equal(cap.window(layer, 0, 5, 60, 2, 90), mean[0, 5:60, 2:90])
        np.testing.assert_array_equal(thumbs[layer], max_pool(mean.astype(np.float32), thumbs.shape[-1])
                                      .astype(np.float16))
    np.testing.assert_array_equal(cap.export_arrays()["layer000"], cap.attention(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_disk_estimate_is_what_the_capture_stores(family, captures):
    """The estimate said before a capture runs (and checked against the cache's budget) is the bytes of its
    arrays (files, and the small ones in the index), within 10%; SD3.5's extra self-attention layer and Lumina 2's
    and Z-Image's refiners as the blocks they store."""
    caps, store = captures
    cap = caps[family]
    from cache.store import MODE_NPY_INLINE

    files = sum(p.stat().st_size for p in (store.directory / "index" / cap.key).glob("*.npy"))
    inline = store._cache._sql("SELECT COALESCE(SUM(LENGTH(value)), 0) FROM Cache WHERE tag = ? AND mode = ?",
                               (cap.key, MODE_NPY_INLINE)).fetchone()[0]  # arrays under 32 KB: in the index
    stored = files + inline
    if family in MASKED:  # PixArt, Sana: their masked padding's word maps (zeros) are not stored
        assert 0 < dit_capture.layout(cap).words < len(dit_capture.text_tokens(cap))
    estimated = cap.timings["disk_mb"] * 2**20
    assert 0.9 * stored <= estimated <= 1.1 * stored, (estimated, stored)


@pytest.mark.parametrize("family", FAMILIES)
def test_split_estimate_is_what_the_capture_stores(family, folders, tmp_path, monkeypatch):
    """The layout of real sizes ("split": word, text -> image and pooled maps of every step, the kept step's queries
    and keys, Chroma's attention mask with them) is estimated before the run as the bytes its capture stores,
    within 10%, at a few steps and at more (the text's columns: FLUX.2's chat templates, padding runs as one)."""
    from cache.store import MODE_NPY_INLINE, Store

    monkeypatch.setattr(dit_capture, "FULL_BYTES", 0)
    store = Store(tmp_path / "cache", size_limit=2**30)
    try:
        for steps in (2, 12):
            cap = run(_spec(folders[family], steps=steps), store)
            assert dit_capture.layout(cap).mode == "split"
            files = sum(p.stat().st_size for p in (store.directory / "index" / cap.key).glob("*.npy"))
            inline = store._cache._sql("SELECT COALESCE(SUM(LENGTH(value)), 0) FROM Cache WHERE tag = ? AND mode = ?",
                                       (cap.key, MODE_NPY_INLINE)).fetchone()[0]
            estimated = cap.timings["disk_mb"] * 2**20
            assert 0.9 * (files + inline) <= estimated <= 1.1 * (files + inline), (steps, estimated, files + inline)
    finally:
        store.close()


# ---- interventions ------------------------------------------------------------------------------------

def _zero_head_before_projection(pipe, family, layer: int, head: int) -> None:
    """Zero head `head`'s slice of the head outputs before layer `layer`'s output projection(s), by hand."""
    from capture.dit.attention import attention_modules

    module = [m for _p, m, kind in attention_modules(pipe.transformer) if kind != "cross"][layer]
    width = module.inner_dim // module.heads

    def zero(_m, args):
        z = args[0].clone()
        z[..., head * width:(head + 1) * width] = 0
        return (z,) + args[1:]

    if getattr(module, "pre_only", False):  # Flux single-stream: the head outputs open proj_out's input
        block = next(b for b in pipe.transformer.single_transformer_blocks if b.attn is module)
        block.proj_out.register_forward_pre_hook(zero)
        return
    if isinstance(module.to_out, torch.nn.Linear):  # FLUX.2 single-stream: [head outputs, MLP] into to_out
        module.to_out.register_forward_pre_hook(zero)
        return
    module.to_out[0].register_forward_pre_hook(zero)
    if getattr(module, "to_add_out", None) is not None:
        module.to_add_out.register_forward_pre_hook(zero)


@pytest.mark.parametrize("family", FAMILIES)
def test_head_scaled_to_zero_equals_zeroing_its_slice(family, folders, captures):
    caps, store = captures
    layer = 1  # SD3: block 0's image-only self-attention (SD3.5); Flux, FLUX.2: the single-stream block
    masked = run(_spec(folders[family], intervention=dit_presets.scale_heads([(layer, 1)], 0.0)), store)
    after = dit_capture.generated_image(masked)
    assert not np.array_equal(after, dit_capture.generated_image(caps[family]))
    pipe = _plain(folders[family])
    _zero_head_before_projection(pipe, family, layer, 1)
    np.testing.assert_array_equal(after, _sample(pipe, folders[family]))


@pytest.mark.parametrize("family", FAMILIES)
def test_softpag_guides_and_u0_changes_nothing(family, folders, captures):
    caps, store = captures
    plain = dit_capture.generated_image(caps[family])
    zero = run(_spec(folders[family], intervention=dit_presets.softpag([(0, 0)], u=0.0, scale=2.0)), store)
    if family == "hunyuandit":  # the perturbed copy's attention is computed explicitly (u = 0: the plain weights),
        # the model's rows by its kernel: rounding apart, which 128 x 128 px of DDPM's output show in 2 pixels
        assert np.abs(dit_capture.generated_image(zero).astype(int) - plain.astype(int)).max() <= 1
    else:
        np.testing.assert_array_equal(dit_capture.generated_image(zero), plain)
    pag = run(_spec(folders[family], intervention=dit_presets.softpag([(0, 0), (1, 1)], u=1.0, scale=2.0)), store)
    assert not np.array_equal(dit_capture.generated_image(pag), plain)
    assert any("SoftPAG" in n for n in pag.output.notes)
    # the recorded (conditional) branch is not perturbed: its first step is the plain run's
    np.testing.assert_allclose(dit_capture.step_attention(pag, 0, 0).astype(np.float32),
                               dit_capture.step_attention(caps[family], 0, 0).astype(np.float32), atol=2e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_redistribute_away_from_padding(family, folders, captures):
    """Every family: beta 0 on some text tokens empties what one head's image rows read there (SD3, Flux: the
    padding run, a RefAM sink; PixArt, Sana mask their padding out, an edit that reaches the cross-attention,
    and Qwen-Image's text has none: the prompt's first two tokens; Lumina 2, Z-Image: their first joint layer)."""
    caps, store = captures
    before = caps[family]
    padded = family in JOINT and len(before.spans["padding"]) > 0
    taken = list(before.spans["padding"]) if padded else list(before.spans["prompt"])[:2]
    layer = 2 if family in REFINED else 0
    edited = run(_spec(folders[family], intervention=dit_presets.redistribute_from([(layer, 1)], taken, beta=0.0)),
                 store)
    columns = [p - before.spans["text"].start for p in taken]
    was = dit_capture.image_to_text(before, 0)[0, layer, 1][:, columns]
    now = dit_capture.image_to_text(edited, 0)[0, layer, 1][:, columns]
    assert was.sum(-1).mean() > 1e-3
    assert now.max() == 0.0
    other = dit_capture.image_to_text(edited, 0)[0, layer, 0]  # head 0 of the same layer: untouched
    np.testing.assert_allclose(other, dit_capture.image_to_text(before, 0)[0, layer, 0], atol=2e-3)


LONG_PROMPT = "a red circle at the top left and a blue square at the bottom right on a green field at noon"


@pytest.mark.parametrize("family", SEPARATE_CFG)
def test_negative_call_takes_the_edits_on_its_own_axis(family, folders):
    """A family that calls the transformer again for the negative prompt: where that text is not as long as the
    prompt's (Qwen-Image's " ", CogView 4's "" against a long prompt), the direct edits act there on the same
    image rows and on the negative text at the same indices (capture.dit.presets.moved), not on positions of the
    prompt's axis: the session each attention call sees names that call's own image span."""
    from capture.engine.session import current_session

    runner = registry.load(str(folders[family])).tokenizer
    transformer = runner.pipe.transformer
    module = next(m for _p, m in transformer.named_modules() if hasattr(m, "headscope_layer"))
    calls = []

    def read(_module, args, kwargs):
        calls.append(runner.family.n_read(runner.pipe, args, kwargs))

    def look(_module, args, kwargs):
        active = current_session()
        calls[-1] = (calls[-1], active.spans["image"], [(e.keys, e.queries) for e in active.intervention.edits])

    hooks = [transformer.register_forward_pre_hook(read, with_kwargs=True),
             module.register_forward_pre_hook(look, with_kwargs=True)]
    side = _side(folders[family])
    n_image = (side // runner.unit) ** 2
    last_two = [0, 1]  # replaced below by the prompt's last two text positions
    try:
        image, layout, _t, _n = runner.run(LONG_PROMPT, SEED, 1, side, side, Intervention())
        prompt = layout.spans()["prompt"]
        last_two = [prompt.stop - 2, prompt.stop - 1]
        iv = Intervention(edits=(HeadEdit(layer=0, head=1, op="redistribute", value=0.0,
                                          keys=f"{last_two[0]}:{last_two[1] + 1}"),
                                 HeadEdit(layer=0, head=0, op="mix", value=1.0, queries="image")))
        calls.clear()
        runner.run(LONG_PROMPT, SEED, 1, side, side, iv)
    finally:
        for hook in hooks:
            hook.remove()
    (n_cond, image_cond, edits_cond), (n_neg, image_neg, edits_neg) = calls
    assert image_cond == range(n_cond, n_cond + n_image) and image_neg == range(n_neg, n_neg + n_image)
    assert edits_cond == [(f"{last_two[0]}:{last_two[1] + 1}", "all"), ("all", "image")]
    kept = [p for p in last_two if p < n_neg]
    assert edits_neg == ([(f"{kept[0]}:{kept[-1] + 1}", "all")] if kept else []) + [("all", "image")]
    if family in ("qwenimage", "cogview4", "lumina2"):
        assert n_neg < n_cond  # the case this test is for
    else:
        assert n_neg == n_cond  # Chroma, FLUX.2: both texts padded alike, nothing moves


def test_lumina2_system_prompt_is_found_or_left_alone(folders):
    """Lumina 2's system prompt span ends where the prompt starts (its ids decode to the prompt); ids without the
    pipeline's prefix get none, so every token stays a word column rather than a wrong cut."""
    from capture.dit.families import lumina2

    pipe = registry.load(str(folders["lumina2"])).tokenizer.pipe
    ids = lumina2._read_ids(pipe, PROMPT)
    told = lumina2._preamble(pipe, ids)
    assert told > 0 and pipe.tokenizer.decode(ids[told:]).strip() == PROMPT
    assert lumina2._preamble(pipe, pipe.tokenizer(PROMPT)["input_ids"]) == 0


def test_flux2_dev_text_is_what_its_encoder_reads(folders, tmp_path):
    """FLUX.2 [dev]'s text processor (MistralText, from the folder's tokenizer and chat template, .jinja or an
    older folder's .json) renders the prompt into the very ids the plain pipeline's Mistral reads; the estimate
    counts them, and the system message is the ids the prompt shares with an empty one."""
    from capture.dit.families import flux2

    plain = _plain(folders["flux2dev"])
    seen = []
    plain.text_encoder.register_forward_pre_hook(lambda _m, _a, kwargs: seen.append(kwargs["input_ids"][0].tolist()),
                                                 with_kwargs=True)
    plain.encode_prompt(PROMPT)
    older = tmp_path / "older"
    shutil.copytree(folders["flux2dev"], older)
    template = older / "tokenizer" / "chat_template.jinja"
    (older / "tokenizer" / "chat_template.json").write_text(json.dumps({"chat_template": template.read_text()}))
    template.unlink()
    for folder in (folders["flux2dev"], older):
        runner = registry.load(str(folder)).tokenizer
        assert type(runner.pipe.tokenizer).__name__ == "MistralText"
        runner.pipe.text_encoder.register_forward_pre_hook(
            lambda _m, _a, kwargs: seen.append(kwargs["input_ids"][0].tolist()), with_kwargs=True)
        runner.pipe.encode_prompt(PROMPT)
        assert seen[-1] == seen[0] and len(seen[0]) == 512
        ids = flux2._encode(runner.pipe, PROMPT, 512)
        assert ids == [i for i in seen[0] if i != plain.tokenizer.pad_token_id]
        assert runner.text_length(PROMPT) == (512, len(ids) + 1)  # every position; the words and one padding run
        told = flux2._preamble(runner.pipe, seen[0])
        assert plain.tokenizer.decode(ids[told:]) == PROMPT + "[/INST]"


def test_flux2_dev_tokenizer_padding_on_the_left(folders, tmp_path, store):
    """A Mistral tokenizer that pads on the left (LlamaTokenizerFast's default, where a folder does not say) puts
    FLUX.2 [dev]'s 512 - n padding tokens before its system message: the padding span is that leading run, the
    system span follows it, the words are the prompt's, and the picture is the plain pipeline's."""
    left = tmp_path / "flux2dev-left"
    shutil.copytree(folders["flux2dev"], left)
    config = left / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), padding_side="left")))
    cap = run(_spec(left), store)
    tokens, spans = dit_capture.text_tokens(cap), cap.spans
    t0 = spans["text"].start
    assert tokens[spans["padding"].start - t0].startswith("<pad>") and spans["padding"].start == t0
    assert spans["system"].start == spans["padding"].stop and tokens[spans["system"].start - t0] == "<s>"
    assert [tokens[i] for i in dit_capture.word_columns(cap)] == ["a", "Ġred", "Ġcircle", "Ġat", "Ġthe", "Ġtop",
                                                                    "Ġleft"]
    assert spans["prompt"].start == spans["system"].stop and tokens[spans["prompt"].stop - t0 - 1] == "[/INST]"
    pipe = _plain(left)
    assert pipe.tokenizer.padding_side == "left"
    plain = _sample(pipe, left)
    assert np.abs(dit_capture.generated_image(cap).astype(int) - plain.astype(int)).max() <= 1


def test_zimage_guidance_rows_of_unequal_captions(folders, store, monkeypatch):
    """Z-Image pads each caption of its guidance batch to its own multiple of 32 and masks the shorter row's end:
    a prompt of more than 32 tokens gives the recorded conditional row 64 caption positions and the empty negative
    prompt's row 32.  The maps are still the model's (an independent recording) and the picture the plain
    pipeline's."""
    folder = folders["zimage"]
    prompt = " ".join([PROMPT] * 4)
    cap = run(_spec(folder, prompt=prompt), store)
    assert len(cap.spans["text"]) == 64 and cap.tokens[cap.spans["padding"].start] == "<pad>"
    pipe = _plain(folder)
    independent = _Independent(pipe, cond_first=True)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        independent.sdpa(torch.nn.functional.scaled_dot_product_attention))
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda _m, args: seen.append([len(c) for c in args[2]]))
    pipe.transformer.register_forward_pre_hook(lambda *_: setattr(independent, "step", independent.step + 1))
    independent.step = -1
    image = pipe(prompt=prompt, height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np",
                 generator=torch.Generator().manual_seed(SEED)).images[0]
    assert seen[0][0] > 32 >= seen[0][1]  # the rows' captions: over one multiple of 32, and under
    np.testing.assert_array_equal(dit_capture.generated_image(cap), (image * 255).round().astype(np.uint8))
    for layer in range(cap.meta.n_layers):
        ours = dit_capture.step_attention(cap, 1, layer).astype(np.float32)
        theirs = independent.maps[(1, layer, "main")]
        part = _part(cap, theirs.shape[1], layer)
        np.testing.assert_allclose(ours[:, part.start:part.stop, part.start:part.stop], theirs, atol=2e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_guidance_scale_is_the_pipelines_own(family, folders, store):
    """RunSpec.guidance samples at that classifier-free guidance scale, as the pipeline called with it (its
    `guidance_arg`): the scale of no guidance (0 for Z-Image, 1 elsewhere; Flux's is its distilled guidance
    embedding) gives the plain pipeline's picture at that scale, one batch row or call per step, and a capture of
    its own; a distilled FLUX.2 [klein] would ignore it, and says so."""
    folder = folders[family]
    runner = registry.load(str(folder)).tokenizer
    off = 0.0 if family == "zimage" else 1.0
    cap = run(_spec(folder, guidance=off), store)
    assert cap.key != run(_spec(folder), store).key and cap.spec.guidance == off
    assert any(n.startswith(f"Guidance scale {off:g} (the model's default: {runner.guidance:g})")
               for n in cap.output.notes)
    pipe, side = _plain(folder), _side(folder)
    kwargs = dict(runner.call_kwargs(), **{runner.family.guidance_arg: off})
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda _m, args, kwargs: calls.append(kwargs), with_kwargs=True)
    image = pipe(prompt=PROMPT, height=side, width=side, num_inference_steps=STEPS, output_type="np",
                 generator=torch.Generator().manual_seed(SEED), **kwargs).images[0]
    assert len(calls) == STEPS  # no guidance: one transformer call per step
    plain = (image * 255).round().astype(np.uint8)
    got = dit_capture.generated_image(cap)
    assert np.abs(got.astype(int) - plain.astype(int)).max() <= 1  # one batch row: the CPU's one-pass recording


def test_a_bad_guidance_scale_is_one_sentence(folders, store):
    with pytest.raises(InputError, match="The guidance scale must be from 0 to 30") as caught:
        run(_spec(folders["sd3"], guidance=31.0), store)
    _one_sentence(caught.value)


# ---- the layout of real sizes -------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_split_layout_keeps_what_the_full_one_does(family, folders, captures, store):
    caps, _store = captures
    full = caps[family]
    handle = registry.load(str(folders[family]))
    spec = _spec(folders[family])
    plan = RecordPlan(mode="split", kept=(1,), full_layers=(0,))
    key = plan_key(spec, plan, registry.revision(spec.model))
    assert key != spec.key(registry.revision(spec.model)) == plan_key(spec, RecordPlan(), registry.revision(spec.model))
    with handle.lock:
        split = DitAdapter(handle, plan=plan).capture(spec, key, store, lambda f, m: None)
    store.put_meta(key, split.record())
    assert capture_api.cached(spec, store) is None and capture_api.load_capture(key, store).key == key
    info = dit_capture.layout(split)
    assert info.mode == "split" and info.kept == [1] and info.labels == full.tokens
    # the layers within one part of the axis (SD3.5's extra self-attention, the refiners) store no word maps
    assert info.word_layers == {"sd3": [0, 2], "lumina2": [2, 3], "zimage": [2, 3]}.get(family, [])
    np.testing.assert_array_equal(dit_capture.generated_image(split), dit_capture.generated_image(full))
    # the text's spans name the same tokens on the columns (each padding run one column)
    spans = {name: r for name, r in full.spans.items() if name not in ("image", "text")}
    assert set(spans) <= set(split.spans) and "prompt" in spans
    for name, r in spans.items():
        columns_of = [label for label, positions in info.columns if positions[0] in r]
        assert [split.tokens[i] for i in split.spans[name]] == columns_of
    assert [split.tokens[i] for i in split.spans["prompt"]] == [full.tokens[i] for i in full.spans["prompt"]]
    # the word maps of every step: each padding run is one column holding the attention it receives
    columns = dit_capture.column_positions(split)
    a_full = dit_capture.image_to_text(full)  # [step, layer, head, image, text]
    t0 = full.spans["text"].start
    grouped = np.stack([a_full[..., [p - t0 for p in cols]].sum(-1) for cols in columns], -1)
    np.testing.assert_allclose(dit_capture.image_to_text(split), grouped, atol=4e-3)
    if family in JOINT:
        b_full = dit_capture.text_to_image(full)
        grouped_rows = np.stack([b_full[..., [p - t0 for p in cols], :].mean(-2) for cols in columns], -2)
        np.testing.assert_allclose(dit_capture.text_to_image(split), grouped_rows, atol=4e-3)
    else:
        with pytest.raises(InputError, match="cross-attention"):
            dit_capture.text_to_image(split)
    # full maps of the kept step: stored for layer 0, recomputed from queries and keys for the others
    for layer in range(split.meta.n_layers):
        np.testing.assert_allclose(dit_capture.step_attention(split, 1, layer).astype(np.float32),
                                   dit_capture.step_attention(full, 1, layer).astype(np.float32), atol=2e-3)
    with pytest.raises(InputError, match="keeps full maps at sampling steps 1 only"):
        dit_capture.step_attention(split, 0, 0)
    # the coarse maps of the generic views: regions and columns, rows summing to 1
    back = dit_capture.layout(split)
    grid = full.meta.grid  # at most 16 x 16 patches: one patch per region
    assert split.tokens[split.spans["image"].start].startswith("region(") and back.regions == grid
    coarse = split.attention(0).astype(np.float32)
    rows = coarse.sum(-1)[:, split.spans["image"].start:split.spans["image"].stop]
    if family == "sana":  # a step mean: a linear-attention row is empty in the steps where φ(q) is all zeros
        np.testing.assert_allclose(rows * STEPS, np.round(rows * STEPS), atol=1e-2)
    else:
        np.testing.assert_allclose(rows, 1.0, atol=5e-3)
    regions = grid[0] * grid[1]
    assert dit_capture.image_regions(split, 0).shape == (split.meta.n_layers, split.meta.n_heads, regions, regions)
    # the head metrics read the coarse maps alike (8 x 8 patches: one patch per region)
    from analytics import dit as analytics

    np.testing.assert_allclose(analytics.distance_px(split), analytics.distance_px(full), rtol=1e-2)
    if family in JOINT:
        np.testing.assert_allclose(analytics.text_mass(split), analytics.text_mass(full), atol=3e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_what_a_patch_reads_agrees_across_layouts(family, folders, captures, store, monkeypatch):
    """dit_capture.patch_reads: a full capture's row of the patch; a split capture's the same at its kept step
    (the one row recomputed) and, pooled into 4 x 4 regions (REGION_SIDE 4), at its other steps and over
    the steps: the row of the patch's region (its patches' rows averaged), each region's sum spread evenly."""
    caps, _store = captures
    full = caps[family]
    monkeypatch.setattr(dit_capture, "REGION_SIDE", 4)
    handle = registry.load(str(folders[family]))
    spec = _spec(folders[family])
    plan = RecordPlan(mode="split", kept=(1,))
    with handle.lock:
        split = DitAdapter(handle, plan=plan).capture(spec, plan_key(spec, plan, registry.revision(spec.model)),
                                                      store, lambda f, m: None)
    rows, cols = full.meta.grid  # 8 x 8 patches (Sana 16 x 16): 4 x 4 regions of 2 x 2 (4 x 4)
    pool = rows // 4
    assert dit_capture.layout(split).pool == pool and rows == cols
    image = full.spans["image"]
    region = (np.arange(rows)[:, None] // pool) * 4 + np.arange(cols)[None] // pool  # [row, col]: its region
    patch = (5, 2)
    r0, c0 = 5 // pool * pool, 2 // pool * pool
    mates = [image.start + r * cols + c for r in range(r0, r0 + pool) for c in range(c0, c0 + pool)]  # its region's
    for layer in range(full.meta.n_layers):
        for index in (0, 1, None):
            maps = dit_capture.step_attention(full, index, layer) if index is not None else full.attention(layer)
            maps = maps.astype(np.float32)[:, :, image.start:image.stop].reshape(-1, maps.shape[1], rows, cols)
            exact = maps[:, image.start + patch[0] * cols + patch[1]]  # [head, rows, cols]
            got, side = dit_capture.patch_reads(full, index, layer, patch)
            assert side == 1
            np.testing.assert_allclose(got, exact, atol=1e-3)
            got, side = dit_capture.patch_reads(split, index, layer, patch)
            if index == 1:  # the kept step: the patch's own row, recomputed
                assert side == 1
                np.testing.assert_allclose(got, exact, atol=2e-3)
                continue
            assert side == pool
            pooled = maps[:, mates].mean(1)  # [head, rows, cols]: the region's rows averaged
            sums = np.stack([pooled[:, region == g].sum(-1) for g in range(16)], -1)  # [head, region]
            np.testing.assert_allclose(got, sums[:, region] / pool ** 2, atol=2e-3)


@pytest.mark.parametrize("family", ["sd3", "cogview4", "flux2dev"])
def test_every_page_opens_a_capture_in_the_layout_of_real_sizes(family, folders, monkeypatch, tmp_path):
    """Real pipelines at real sizes are captured "split" (regions and text columns on the generic axis): every
    page that takes a DiT opens such a capture from its link (the tiny SD3, image first, CogView 4, text first
    behind a leading padding run, and FLUX.2 [dev], text first behind its system message, made "split" by a
    FULL_BYTES of 0)."""
    from conftest import open_app

    model = str(folders[family])
    monkeypatch.setattr(dit_capture, "FULL_BYTES", 0)
    monkeypatch.setenv("HEADSCOPE_ALLOWED_MODELS", model)
    monkeypatch.setenv("HEADSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(capture_api, "_default_store", None)
    link = {"model": model, "prompt": PROMPT, "seed": "3", "steps": "2", "width": "32", "height": "32"}
    at = open_app(dict(link, page="dit"))
    assert dit_capture.layout(at.session_state["capture"]).mode == "split"
    assert len(at.get("plotly_chart")) >= 4 and not at.error
    for page in ({"page": "explorer", "view": "model"}, {"page": "explorer", "view": "head", "layer": "1"},
                 {"page": "explorer", "view": "token"}, {"page": "atlas"}, {"page": "intervene"}):
        at = open_app(dict(link, **page))  # no exception on the page
        assert not at.error, (page, [e.value for e in at.error])


def test_a_kept_step_picked_on_the_page_is_sampled_again_with_its_full_maps(folders, monkeypatch, tmp_path):
    """At a step whose full maps a split capture did not keep, the patch tab's button samples the same picture
    again keeping them too (RunSpec.keep, the link's `keep`): the patch's own row at that step, recomputed."""
    from conftest import open_app

    model = str(folders["sd3"])
    monkeypatch.setattr(dit_capture, "FULL_BYTES", 0)
    monkeypatch.setattr(dit_capture, "REGION_SIDE", 4)  # 8 x 8 patches in 2 x 2 regions
    monkeypatch.setenv("HEADSCOPE_ALLOWED_MODELS", model)
    monkeypatch.setenv("HEADSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(capture_api, "_default_store", None)
    link = {"page": "dit", "model": model, "prompt": PROMPT, "seed": "3", "steps": "4", "width": "32",
            "height": "32", "step": "0", "layer": "1", "head": "-1", "patch": "5,2"}
    at = open_app(link)
    before = at.session_state["capture"]
    assert dit_capture.layout(before).kept == [2] and dit_capture.patch_reads(before, 0, 1, (5, 2))[1] == 2
    assert any("pooled into 2 x 2-patch regions" in c.value for c in at.caption)
    at.button(key="dit_patch_keep").click().run()
    assert not at.exception, [e.value for e in at.exception]
    after = at.session_state["capture"]
    assert after.spec.keep == (0, 2) and at.session_state["view"].to_params()["keep"] == "0,2"
    assert dit_capture.layout(after).kept == [0, 2]
    np.testing.assert_array_equal(dit_capture.generated_image(after), dit_capture.generated_image(before))
    row, side = dit_capture.patch_reads(after, 0, 1, (5, 2))
    assert side == 1 and not any("pooled into" in c.value for c in at.caption)
    full = dit_capture.step_attention(after, 0, 1).astype(np.float32)  # recomputed from step 0's queries and keys
    image = range(0, 64)  # SD3: the image first
    np.testing.assert_allclose(row, full[:, 5 * 8 + 2, image.start:image.stop].reshape(-1, 8, 8), atol=1e-3)
    assert open_app(dict(link, keep="0,2")).session_state["capture"].key == after.key  # the link reproduces it


# ---- bad input ----------------------------------------------------------------------------------------

def _one_sentence(exc: Exception) -> None:
    text = str(exc)
    assert isinstance(exc, USER_ERRORS) and "\n" not in text and text.endswith(".") and len(text) < 300


def test_bad_input_is_one_sentence_and_nothing_is_cached(folders, tmp_path, store):
    unknown = tmp_path / "unknown"
    shutil.copytree(folders["pixart"], unknown)
    index = json.loads((unknown / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "HiDreamImageTransformer2DModel"]
    (unknown / "model_index.json").write_text(json.dumps(index))
    fill = tmp_path / "flux2-fill"  # a pipeline around FLUX.2's transformer that neither variant was checked in
    shutil.copytree(folders["flux2"], fill)
    index = json.loads((fill / "model_index.json").read_text())
    (fill / "model_index.json").write_text(json.dumps(dict(index, _class_name="Flux2FillPipeline")))
    empty = tmp_path / "empty"
    empty.mkdir()
    img2img = tmp_path / "sd3-img2img"  # a known transformer in a pipeline whose call was never checked
    shutil.copytree(folders["sd3"], img2img)
    index = json.loads((img2img / "model_index.json").read_text())
    (img2img / "model_index.json").write_text(json.dumps(dict(index, _class_name="StableDiffusion3Img2ImgPipeline")))
    untemplated = tmp_path / "flux2dev-untemplated"  # FLUX.2 [dev] writes its prompt with the chat template
    shutil.copytree(folders["flux2dev"], untemplated)
    (untemplated / "tokenizer" / "chat_template.jinja").unlink()
    cases = [(_spec(unknown), ModelUnavailable, "does not know the HiDreamImageTransformer2DModel"),
             (_spec(untemplated), ModelUnavailable, "could not be loaded .its tokenizer has no chat template"),
             (_spec(fill), ModelUnavailable, "in Flux2KleinPipeline or Flux2Pipeline only; .* is a Flux2FillPipeline"),
             (_spec(img2img), ModelUnavailable, "in StableDiffusion3Pipeline only; .* StableDiffusion3Img2ImgPipeline"),
             (_spec(empty), ModelUnavailable, "neither config.json"),
             (_spec(folders["sd3"], steps=500), InputError, "Steps must be between"),
             (_spec(folders["sd3"], height=33), InputError, "multiples of 4 px"),
             (_spec(folders["flux"], width=4096), InputError, "px; 4096 x 32 is not one"),
             (_spec(folders["zimage"], height=40, width=40), InputError, "number a multiple of 32; 40 x 40 is not one"),
             (_spec(folders["sana"], seed=-1), InputError, "seed"),
             (_spec(folders["sd3"], keep=(2,)), InputError, "sampling steps 0 to 1"),
             (_spec(folders["sd3"], steps=20, keep=tuple(range(9))), InputError, "at most 8")]
    for spec, kind, words in cases:
        with pytest.raises(kind, match=words) as caught:
            run(spec, store)
        _one_sentence(caught.value)
    assert registry.modality(str(folders["flux"])) == "dit" and registry.modality(str(unknown)) == "dit"
    assert store.keys() == []


def test_a_distilled_flux2_klein_makes_one_call_per_step(folders, tmp_path, store):
    """FLUX.2 [klein]'s step-distilled models skip guidance at any scale (`is_distilled`): one transformer call
    per step, each recorded as its step, and the picture is the plain pipeline's."""
    distilled = tmp_path / "flux2-distilled"
    shutil.copytree(folders["flux2"], distilled)
    index = json.loads((distilled / "model_index.json").read_text())
    (distilled / "model_index.json").write_text(json.dumps(dict(index, is_distilled=True)))
    assert registry.load(str(distilled)).tokenizer.guidance == 1.0
    assert registry.load(str(folders["flux2"])).tokenizer.guidance == 4.0
    cap = run(_spec(distilled), store)
    assert cap.output.recorded_steps == [0, 1] and len(cap.output.timesteps) == STEPS
    plain = _sample(_plain(distilled), distilled)
    assert np.abs(dit_capture.generated_image(cap).astype(int) - plain.astype(int)).max() <= 1
    scaled = run(_spec(distilled, guidance=4.0), store)  # a scale it has no use for: the same picture, said
    np.testing.assert_array_equal(dit_capture.generated_image(scaled), dit_capture.generated_image(cap))
    assert any("guidance scale was ignored" in n for n in scaled.output.notes)


def test_pixart_alpha_pipeline(folders, tmp_path, store):
    """PixArt-α's pipeline around the same transformer (120 T5 tokens, no 300): the picture is the plain
    pipeline's and the word maps are the cross-attention's, rows summing to 1 over the unmasked tokens."""
    from diffusers import PixArtAlphaPipeline

    sigma = _plain(folders["pixart"])
    alpha = tmp_path / "pixart-alpha"
    PixArtAlphaPipeline(transformer=sigma.transformer, scheduler=sigma.scheduler, vae=sigma.vae,
                        text_encoder=sigma.text_encoder, tokenizer=sigma.tokenizer).save_pretrained(alpha)
    cap = run(_spec(alpha), store)
    np.testing.assert_array_equal(dit_capture.generated_image(cap), _sample(_plain(alpha), alpha))
    assert len(dit_capture.text_tokens(cap)) == 120
    words = dit_capture.image_to_text(cap).astype(np.float32)  # [step, layer, head, image, text]
    np.testing.assert_allclose(words.sum(-1), 1.0, atol=5e-3)


def test_a_capture_too_large_is_refused_before_it_runs(folders, store, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_CAPTURE_GB", "0.0001")
    with pytest.raises(InputError, match="GB of memory") as caught:
        run(_spec(folders["flux"]), store)
    _one_sentence(caught.value)
    assert store.keys() == []


def test_an_edit_on_a_head_that_does_not_exist_is_refused(folders, store):
    with pytest.raises(USER_ERRORS, match="outside this model"):
        run(_spec(folders["sd3"], intervention=Intervention(edits=(HeadEdit(0, 7, "scale", 0.0),))), store)
    with pytest.raises(USER_ERRORS, match="linear"):
        run(_spec(folders["sana"], intervention=Intervention(edits=(HeadEdit(0, 0, "logit", -1.0, keys="0:4"),))),
            store)


# ---- analytics and HeadHunter on every family ------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_word_maps_sinks_grounding_words_and_head_metrics(family, captures):
    from analytics import dit as analytics
    from core import scenes
    from core.errors import ProbeMissing

    caps, _store = captures
    cap = caps[family]
    a = dit_capture.image_to_text(cap)  # [step, layer, head, image, text]
    heat = analytics.word_heatmaps(a, cap.meta.grid)
    assert heat.shape[:3] == (STEPS, cap.meta.n_layers, cap.meta.n_heads) and heat.shape[-2:] == cap.meta.grid
    stats = analytics.sink_stats(a)
    assert stats.share.shape == (len(dit_capture.text_tokens(cap)),)
    # the prompt's words are found among the model's own tokens (SD3: T5's, after CLIP's), so a picture of
    # the scene it names grounds its colour and shape words
    tokens = dit_capture.text_tokens(cap)
    spelled = [dit_capture.word_label(t) for t in tokens]  # the labels the Diffusion page shows
    assert not any(t.endswith("</w>") or t[:1] in "▁Ġ" for t in spelled if t not in "▁Ġ")
    if family == "qwenimage":  # its template's closing tokens: a newline shown as one, chat markers not words
        assert spelled[-5:] == ["<|im_end|>", "⏎", "<|im_start|>", "assistant", "⏎"]
        assert [tokens[i] for i in dit_capture.word_columns(cap)] == ["a", "Ġred", "Ġcircle", "Ġat", "Ġthe", "Ġtop",
                                                                        "Ġleft"]
    if family == "lumina2":  # the pipeline's system prompt opens the text: the model reads it, no word columns
        assert [tokens[i] for i in dit_capture.word_columns(cap)] == [f"▁{w}" for w in PROMPT.split()]
        assert cap.spans["system"].stop == cap.spans["prompt"].start == cap.spans["gemma"].start > 40
        assert any("refiner" in n for n in cap.output.notes)
    if family == "flux2":  # Qwen3's chat template around the prompt: its role names are no words either
        assert [tokens[i] for i in dit_capture.word_columns(cap)][:2] == ["a", "Ġred"]
    if family == "flux2dev":  # the system message and Mistral's markers: read by the model, no word columns
        assert [tokens[i] for i in dit_capture.word_columns(cap)] == ["a", "Ġred", "Ġcircle", "Ġat", "Ġthe", "Ġtop",
                                                                        "Ġleft"]
        system = cap.spans["system"]
        assert (tokens[system.start], tokens[system.stop - 1]) == ("<s>", "[INST]")
        assert tokens[cap.spans["prompt"].stop - 1] == "[/INST]" and system.stop == cap.spans["prompt"].start
    words = [w for w, _o, _r in scenes.caption_words(PROMPT)]
    where = analytics.word_positions(words, tokens)
    assert where is not None and [spelled[i] for i in where] == words
    if family == "sd3":
        assert where[0] == cap.spans["t5"].start - cap.spans["text"].start
    scene = scenes.scene_from_caption(PROMPT, 1)
    masks = analytics.object_masks(scene.image, PROMPT, tokens)
    assert sorted(masks) == [where[1], where[2]]  # "red", "circle"
    assert analytics.distance_px(cap).shape == (cap.meta.n_layers, cap.meta.n_heads)
    if family in CROSS:
        with pytest.raises(ProbeMissing, match="cross-attention"):
            analytics.text_mass(cap)
    else:
        mass = analytics.text_mass(cap)
        assert mass.shape == (cap.meta.n_layers, cap.meta.n_heads) and ((0 <= mass) & (mass <= 1.001)).all()


def test_headhunter_lite_searches_a_pipeline(folders, store):
    import probes.headhunter as hunt

    params = hunt.HeadHunterParams(n_prompts=1, n_seeds=1, steps=2, rounds=1, candidates=1, height=SIZE, width=SIZE)
    found = hunt.headhunter(str(folders["flux"]), params, store=store)
    assert found.single().shape == (2, 2) and found.single_images().shape == (2, 2, SIZE, SIZE, 3)
    assert 0.0 <= found.baseline <= 1.0 and found.best >= found.baseline
    assert hunt.probe_key("r", hunt.HeadHunterParams()) == hunt.probe_key("r", hunt.HeadHunterParams(height=0))


def test_headhunter_lite_samples_at_the_captures_guidance(folders, store):
    """HeadHunter-lite samples at the guidance scale it is given (the Diffusion page gives its capture's): Z-Image
    at 0, as Turbo samples, searches other pictures than at its default 5; unset, the search's key is the old one."""
    import probes.headhunter as hunt

    params = hunt.HeadHunterParams(n_prompts=1, n_seeds=1, steps=2, rounds=1, candidates=1, height=SIZE, width=SIZE)
    assert hunt.probe_key("r", params) == hunt.probe_key("r", dataclasses.replace(params, guidance=None)) != \
        hunt.probe_key("r", dataclasses.replace(params, guidance=0.0))
    model = str(folders["zimage"])
    off = hunt.headhunter(model, dataclasses.replace(params, guidance=0.0), store=store)
    default = hunt.headhunter(model, params, store=store)
    assert off.key != default.key and not np.array_equal(off.single_images(), default.single_images())
    with pytest.raises(InputError, match="guidance scale must be from 0 to 30"):
        hunt.headhunter(model, dataclasses.replace(params, guidance=-1.0), store=store)


# ---- the page and the command line ---------------------------------------------------------------------

def test_page_takes_a_pipeline_and_its_link_carries_the_size(folders, monkeypatch, tmp_path):
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    model = str(folders["sd3"])
    monkeypatch.setenv("HEADSCOPE_ALLOWED_MODELS", model)
    monkeypatch.setenv("HEADSCOPE_CACHE_DIR", str(tmp_path / "cache"))

    def open_page(params: dict) -> AppTest:
        at = AppTest.from_file(str(Path(__file__).resolve().parents[2] / "app.py"), default_timeout=300)
        at.query_params.update(params)
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    import capture.api

    monkeypatch.setattr(capture.api, "_default_store", None)  # a store in this test's cache directory
    link = {"page": "dit", "model": model, "prompt": PROMPT, "seed": "3", "steps": "2", "width": "32",
            "height": "32", "step": "1", "layer": "0", "head": "1"}
    at = open_page(link)
    spec = at.session_state["capture"].spec
    assert (spec.model, spec.height, spec.width, spec.steps, spec.seed) == (model, 32, 32, 2, 3)
    assert len(at.get("plotly_chart")) >= 4
    at.segmented_control(key="dit_mode").set_value("scale").run()
    assert not at.exception, [e.value for e in at.exception]
    params = at.session_state["view"].to_params()
    assert {k: params[k] for k in ("width", "height", "steps", "step", "head")} == \
        {"width": "32", "height": "32", "steps": "2", "step": "1", "head": "1"}
    fresh = open_page(params)
    assert fresh.session_state["view"].to_params() == params
    assert fresh.segmented_control(key="dit_mode").value == "scale"


def test_cli_size(folders, tmp_path, monkeypatch, capsys):
    from headscope.cli import main

    monkeypatch.setenv("HEADSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    import capture.api

    monkeypatch.setattr(capture.api, "_default_store", None)
    assert main(["run", "--model", str(folders["pixart"]), "--prompt", PROMPT, "--steps", "2", "--size", "48x32",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["grid"] == [8, 12] and out["width"] == 48 and out["height"] == 32  # 4 px patches
    assert main(["run", "--model", str(folders["sd3"]), "--prompt", PROMPT, "--steps", "20", "--keep", "3,15",
                 "--json"]) == 0  # 20 steps of the tiny SD3 are split (18 MB of full maps)
    assert json.loads(capsys.readouterr().out)["full_map_steps"] == [3, 15]
    assert main(["run", "--model", str(folders["sd3"]), "--prompt", PROMPT, "--keep", "3-15"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--keep is a list of sampling steps" in err and "\n" not in err
    assert main(["run", "--model", str(folders["pixart"]), "--prompt", PROMPT, "--size", "big"]) == 2
    err = capsys.readouterr().err.strip()
    assert "WIDTHxHEIGHT" in err and "\n" not in err


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_pipeline_has_its_own_key(family, folders, captures, monkeypatch):
    """HEADSCOPE_DTYPE (capture.engine.device) reaches the pipeline: a bfloat16 run (allowed on the CPU) is
    another capture than the float32 one, every family's processors run in it, and its maps are still computed in
    float32 (rows sum to 1)."""
    caps, store = captures
    monkeypatch.setenv("HEADSCOPE_DTYPE", "bfloat16")
    half = run(_spec(folders[family]), store)
    assert half.key != caps[family].key and registry.load(str(folders[family])).model.dtype == torch.bfloat16
    sums = dit_capture.step_attention(half, 1, 0).astype(np.float32).sum(-1)  # [head, n]
    np.testing.assert_allclose(sums[sums > 0.5], 1.0, atol=5e-3)  # (Sana: a row of all-negative queries is empty)
    if family in CROSS:
        np.testing.assert_allclose(dit_capture.image_to_text(half).sum(-1), 1.0, atol=5e-3)


def test_masked_padding_is_no_choice_on_the_page(folders, monkeypatch, tmp_path):
    """PixArt masks its T5 padding (292 of 300 tokens here): the page offers only the tokens its attention reads,
    for "show padding" word maps and for redistribution, and the default redistribution takes from one of those."""
    from conftest import open_app

    model = str(folders["pixart"])
    monkeypatch.setenv("HEADSCOPE_ALLOWED_MODELS", model)
    monkeypatch.setenv("HEADSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(capture_api, "_default_store", None)
    at = open_app({"page": "dit", "model": model, "prompt": PROMPT, "seed": "3", "steps": "2", "width": "32",
                   "height": "32"})
    cap = at.session_state["capture"]
    read = np.flatnonzero(dit_capture.image_to_text(cap).max(axis=(0, 1, 2, 3)) > 0)
    assert len(read) == 8 and len(dit_capture.text_tokens(cap)) == 300
    at.segmented_control(key="dit_mode").set_value("redistribute").run()
    chosen = at.multiselect(key="dit_sink_tokens")
    assert [int(o.split(":")[0]) for o in chosen.options] == read.tolist()
    assert chosen.value and set(chosen.value) <= set(chosen.options)
    at.checkbox(key="dit_padding").check().run()
    assert not at.exception


def test_the_gpu_bench_runs_its_small_check_on_the_cpu():
    """bench/dit_gpu.py waits for a GPU session with little time: its code path (SD3-medium's width built in
    memory, plain run, processors installed on the loaded pipeline, default capture, eviction) runs here."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(root / "bench" / "dit_gpu.py"), "--small", "--only", "sd3",
                           "--repeats", "1"], capture_output=True, text=True, cwd=root, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("| SD3-medium shape"))
    assert "64² x 2 steps" in row and row.count("|") == 10
