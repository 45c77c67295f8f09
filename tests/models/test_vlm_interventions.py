"""VLM interventions: the redistribute target set (mode "to:<keys>", VAR) on the tiny Llama of
test_interventions_ops, the presets of capture/vlm/presets.py, and before | after runs on VLMs."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from probes import vlm as vlm_probes
from test_interventions_ops import _edited_map, tiny  # noqa: F401 - tiny is a fixture

from core.errors import InterventionError
from core.interventions import HeadEdit


def test_redistribute_to_a_target_set_moves_the_mass_there_only(tiny):  # noqa: F811
    beta = 0.4
    base, after, head, _ = _edited_map(tiny, dict(op="redistribute", value=beta, keys="0:2", mode="to:10:20"))
    a0, a1 = base[head].astype(np.float64), after[head].astype(np.float64)
    np.testing.assert_allclose(a1.sum(-1), 1.0, atol=1e-5)
    rows = np.arange(20, a0.shape[0])
    m0 = a0[rows, 0:2].sum(-1)
    np.testing.assert_allclose(a1[rows, 0:2].sum(-1), beta * m0, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(a1[rows, 10:20].sum(-1), a0[rows, 10:20].sum(-1) + (1 - beta) * m0, rtol=1e-4, atol=1e-6)
    for keep in (slice(2, 10), slice(20, None)):  # everything else is untouched
        np.testing.assert_allclose(a1[rows, keep], a0[rows, keep], rtol=1e-4, atol=1e-6)
    ratio = a1[rows, 10:20] / a0[rows, 10:20]  # in proportion
    np.testing.assert_allclose(ratio, ratio[:, :1].repeat(10, 1), rtol=1e-4)
    np.testing.assert_allclose(a1[:10], a0[:10], atol=1e-6)  # rows that see no target key stay as they were


def test_redistribute_target_must_be_a_key_set():
    HeadEdit(0, 0, "redistribute", 0.6, keys="0:1", mode="to:image")
    HeadEdit(0, 0, "redistribute", 0.6, keys="0:1", mode="to:span:answer")
    for bad in ("to:all", "to:last", "to:nonsense words", "image"):
        with pytest.raises(InterventionError):
            HeadEdit(0, 0, "redistribute", 0.6, keys="0:1", mode=bad)
    with pytest.raises(InterventionError):
        HeadEdit(0, 0, "window", 4, keys="0:1", mode="to:image")
    assert "mode" not in HeadEdit(0, 0, "redistribute", 0.6, keys="0:1").to_json()  # old keys unchanged


# ---- the presets (torch-free builders) ----------------------------------------------------------------

def _meta(layers=4, heads=3):
    from core.types import ModelMeta

    return ModelMeta("toy", "llava", "vlm", layers, heads, heads, 8, True, grid=(2, 2))


def test_var_builds_redistribute_to_the_image_and_skips_the_last_layer():
    from capture.vlm import presets as vlm_presets

    iv = vlm_presets.var(_meta(), [(1, 0), (3, 2)], sinks=[0, 9])
    assert iv.preset == "vlm-var" and iv.heads() == [(1, 0)]  # layer 3 is the last: skipped
    assert [(e.op, e.value, e.keys, e.mode) for e in iv.edits] == [("redistribute", 0.6, "0:1", "to:image"),
                                                                   ("redistribute", 0.6, "9:10", "to:image")]
    assert {e.queries for e in iv.edits} == {"all"}
    after_image = vlm_presets.var(_meta(), [(1, 0)], sinks=[0], image=range(3, 11))  # the official code's rows
    assert {e.queries for e in after_image.edits} == {"11:"}
    assert vlm_presets.var(_meta(), [(1, 0)]).edits[0].keys == "allsinks"  # no massive-activation sinks: ACT's
    assert vlm_presets.settings_of(iv) == ("var", {"p": 0.6})
    with pytest.raises(InterventionError):
        vlm_presets.var(_meta(), [(3, 0)])


def test_gift_amplifies_salient_patches_and_the_question_at_decode_rows():
    import math

    from capture.vlm import presets as vlm_presets

    s = np.array([[0.0, 1.0], [0.5, 0.0]])
    iv = vlm_presets.gift(_meta(), s, range(10, 14), heads=[(2, 1)], top_k=16)
    got = {(e.keys, e.queries): e.value for e in iv.edits}
    assert got == {("11:12", "last"): round(math.log1p(1.0), 4), ("12:13", "last"): round(math.log1p(0.5), 4),
                   ("span:question", "last"): round(math.log1p(0.5), 4)}
    assert vlm_presets.settings_of(iv) == ("gift", {"gamma": 1.0, "gamma_q": 0.5, "top_k": 2})
    assert len(vlm_presets.gift(_meta(), s, range(10, 14)).heads()) == 2 * 3  # layers 2..3, every head
    with pytest.raises(InterventionError):
        vlm_presets.gift(_meta(), np.zeros((2, 2)), range(10, 14), gamma_q=0.0)


def test_mask_image():
    from capture.vlm import presets as vlm_presets

    iv = vlm_presets.mask_image(_meta(), [(0, 1)])
    assert [(e.op, e.value, e.keys) for e in iv.edits] == [("logit", -np.inf, "image")]
    assert vlm_presets.settings_of(iv) == ("mask", {"heads": [(0, 1)]})


# ---- on a tiny random LLaVA ----------------------------------------------------------------------------

from test_vlm_capture import QUESTION, tiny_vlm  # noqa: E402,F401 - the fixture


def test_presets_act_on_a_vlm_capture(tiny_vlm, store):  # noqa: F811
    import dataclasses

    from capture.api import run
    from capture.vlm import presets as vlm_presets
    from core.types import RunSpec

    spec = RunSpec(model=str(tiny_vlm), prompt=QUESTION, image="scene-2", max_new_tokens=3)
    base = run(spec, store)
    image = base.spans["image"]
    masked = run(dataclasses.replace(spec, intervention=vlm_probes.for_capture("mask", base, heads=[(1, 2)])), store)
    m = masked.attention(1).astype(np.float32)
    assert np.abs(m[2][:, image.start:image.stop]).max() == 0  # head 2 of layer 1 no longer sees the picture
    np.testing.assert_allclose(m[2].sum(-1), 1.0, atol=3e-3)
    np.testing.assert_allclose(m[0], base.attention(1)[0].astype(np.float32), atol=1e-3)  # other heads: as before
    var_iv = vlm_presets.var(base.meta, [(0, 1)], sinks=[0], image=image)
    after = run(dataclasses.replace(spec, intervention=var_iv), store)
    a0, a1 = base.attention(0)[1].astype(np.float64), after.attention(0)[1].astype(np.float64)
    np.testing.assert_allclose(a1[: image.stop], a0[: image.stop], atol=1e-3)  # the picture's rows: as they were
    rows = range(image.stop, base.n_tokens)
    np.testing.assert_allclose(a1[rows, 0], 0.6 * a0[rows, 0], atol=2e-3)
    gained = a1[rows, image.start:image.stop].sum(-1) - a0[rows, image.start:image.stop].sum(-1)
    np.testing.assert_allclose(gained, 0.4 * a0[rows, 0], atol=3e-3)  # to the image, nowhere else
    gift_iv = vlm_probes.for_capture("gift", base)
    assert run(dataclasses.replace(spec, intervention=gift_iv), store).output.token_ids[:base.spans["prompt"].stop] \
        == base.output.token_ids[:base.spans["prompt"].stop]


def test_batch_accuracy_change_on_a_tiny_vlm(tiny_vlm):  # noqa: F811
    from probes import vlm_accuracy as vlm_batch

    steps = []
    result = vlm_batch.accuracy_change(str(tiny_vlm), "mask", {"heads": [(0, 0), (1, 1)]}, n_scenes=1, per_scene=2,
                                       max_new_tokens=2, progress=lambda f, m: steps.append((f, m)))
    assert len(result.rows) == 2 and "absent" in result.kinds()
    fractions = [f for f, _ in steps]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0  # the bar only moves forward
    assert any("answered" in m for _, m in steps) and any("with mask" in m for _, m in steps)
    before, after, n = result.accuracy()
    assert n == 2 and 0 <= before <= 1 and 0 <= after <= 1
    assert all(r.edited for r in result.rows)  # the same mask on every question, no recorded pass needed
    with pytest.raises(InterventionError, match="at least one head"):
        vlm_batch.accuracy_change(str(tiny_vlm), "mask", n_scenes=1, per_scene=1)
    vhr = vlm_batch.accuracy_change(str(tiny_vlm), "vhr", {"alpha": 2.0}, n_scenes=1, per_scene=1, max_new_tokens=2)
    assert len(vhr.rows) == 1 and vhr.params == {"alpha": 2.0}
    pointing = vlm_batch.gaze_pointing(str(tiny_vlm), n_scenes=2, per_scene=1)
    assert len(pointing.hits) == 2 and 0 < pointing.chance_rate < 1


def test_vhr_selects_heads_above_the_layer_median_without_surges():
    from capture.vlm import presets as vlm_presets

    vhd = np.array([[1.0, 2.0, 3.0, 100.0], [5.0, 5.0, 5.0, 5.0]])  # layer 0: head 3 is a surge
    assert vlm_presets.vhr_heads(vhd) == [(0, 2)]  # median of 1, 2, 3 is 2; layer 1: none above the median
    iv = vlm_presets.vhr(_meta(2, 4), vhd, alpha=2.0)
    assert [(e.layer, e.head, e.op, e.value) for e in iv.edits] == [(0, 2, "scale", 2.0)]
    assert vlm_presets.settings_of(iv) == ("vhr", {"alpha": 2.0})


from test_vlm_capture import shapes_vlm  # noqa: E402,F401 - the fixture


def test_batched_answers_equal_one_at_a_time(shapes_vlm):  # noqa: F811
    """capture.vlm.answers.answers_with: questions of one prompt shape answered together, each row with its own
    intervention, give the answers of answering them one by one; where the picture's prefix is shared
    (no edit, GIFT) they are the answers of generating from the whole prompt (adapter.generate)."""
    from capture.vlm import presets as vlm_presets
    from capture.vlm.adapter import VlmAdapter
    from capture.vlm.answers import answers_with, prefix_shared
    from core.interventions import Intervention
    from core.types import RunSpec
    from probes import vlm_accuracy as vlm_batch

    handle = shapes_vlm
    adapter = VlmAdapter(handle)
    jobs = vlm_batch.batch_questions(n_scenes=3, per_scene=4)
    probe, probe_spans = adapter.encode(RunSpec(model="shapes-vlm", prompt="x", image=f"scene-{jobs[0][0].seed}"))
    image, n_probe = probe_spans["image"], probe.input_ids.shape[1]
    saliency = np.zeros(len(image))
    saliency[[9, 10, 17, 18, 45]] = [1.0, 0.8, 0.6, 0.9, 0.5]
    edits = [Intervention(), vlm_presets.mask_image(handle.meta, [(l, h) for l in range(4, 20) for h in range(9)]),
             vlm_presets.var(handle.meta, [(l, h) for l in range(2, 12) for h in range(0, 9, 2)], sinks=[0]),
             vlm_presets.gift(handle.meta, saliency, image, gamma=4.0, gamma_q=2.0),
             vlm_presets.var(handle.meta, [(l, h) for l in range(2, 20) for h in range(9)], sinks=[0], p=0.2,
                             image=image)]
    specs = [RunSpec(model="shapes-vlm", prompt=qa.question, image=f"scene-{scene.seed}", max_new_tokens=6,
                     intervention=edits[i % len(edits)]) for i, (scene, qa, _) in enumerate(jobs)]
    assert [prefix_shared(e, image.stop, n_probe, probe_spans) for e in edits] == [True, False, False, True, True]
    together = answers_with(handle, specs)
    alone = answers_with(handle, specs, batch=1)
    assert together == alone
    shapes = {adapter.encode(s)[0].input_ids.shape[1] for s in specs}
    assert len(shapes) < len(specs)  # some questions really were answered together
    for spec, said in zip(specs, together):
        inputs, spans = adapter.encode(spec)
        if prefix_shared(spec.intervention, image.stop, inputs.input_ids.shape[1], spans):
            # from the shared prefix: as from the whole prompt
            new_ids, _ = adapter.generate(spec, inputs, spans, lambda *a: None, 0.0)
            assert said == adapter.tokenizer.decode(new_ids, skip_special_tokens=True).strip(), spec.prompt
    assert together != [together[0]] * len(together)

def test_recorded_passes_from_a_shared_prefix_equal_whole_passes(shapes_vlm, store):  # noqa: F811
    """VlmAdapter.record_from: four questions about one picture recorded in one pass continued from the
    picture's recorded prefix give the captures of four whole recorded passes (maps, thumbnails,
    residual stream, tokens, spans, next-token top-k) and the same VAR and GIFT edits; the prefix's
    cache is left as it was, ready for the next picture's questions."""
    from capture.vlm import presets as vlm_presets
    from capture.vlm.adapter import HIDDEN, VlmAdapter
    from core.types import RunSpec

    adapter = VlmAdapter(shapes_vlm)
    questions = ["what colour is the circle?", "how many shapes are there in the picture?", "is there a red square?",
                 "where is the triangle?"]
    specs = [RunSpec(model="shapes-vlm", prompt=q, image="scene-5", max_new_tokens=8) for q in questions]
    encoded = [adapter.encode(s) for s in specs]
    answers = [adapter.generate(s, inputs, spans, lambda *a: None, 0.0)[0] for s, (inputs, spans) in zip(specs, encoded)]
    whole = [adapter.record(s, f"whole{k}", store, inputs, spans, ids, vision=False)
             for k, (s, (inputs, spans), ids) in enumerate(zip(specs, encoded, answers))]
    prefix = adapter.record_prefix(encoded[0][0], encoded[0][1]["image"].stop)
    assert prefix.length == encoded[0][1]["image"].stop and prefix.cache.get_seq_length() == prefix.length
    branched = adapter.record_from(prefix, store, [(s, f"branch{k}", inputs, spans, ids)
                                                   for k, (s, (inputs, spans), ids) in enumerate(zip(specs, encoded, answers))])
    assert prefix.cache.get_seq_length() == prefix.length
    assert len({len(c.tokens) for c in whole}) > 1  # branches of different lengths
    meta = shapes_vlm.meta
    for a, b in zip(whole, branched):
        assert a.tokens == b.tokens and a.spans == b.spans
        for layer in range(meta.n_layers):
            for head in range(meta.n_heads):  # fp16 maps: a rounding step or two apart (other kernels)
                np.testing.assert_allclose(np.asarray(b.head(layer, head), np.float32),
                                           np.asarray(a.head(layer, head), np.float32), atol=1e-3)
        np.testing.assert_allclose(b.overview(), a.overview(), atol=1e-3)
        np.testing.assert_allclose(np.asarray(store.get_array(b.key, HIDDEN), np.float32),
                                   np.asarray(store.get_array(a.key, HIDDEN), np.float32), rtol=2e-3, atol=0.05)
        assert [t for t, _ in a.output.next_top] == [t for t, _ in b.output.next_top]
        for method in ("var", "gift"):
            assert set(vlm_probes.for_capture(method, a).edits) == set(vlm_probes.for_capture(method, b).edits)
    with pytest.raises(ValueError):  # an edited pass cannot continue from an unedited prefix
        edited = dataclasses.replace(specs[0], intervention=vlm_presets.mask_image(meta, [(3, 1)]))
        adapter.record_from(prefix, store, [(edited, "edited", *encoded[0], answers[0])])
