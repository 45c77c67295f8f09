"""core.scenes: determinism, ground truth against pixels, captions that parse back, VQA pairs."""
from __future__ import annotations

import numpy as np
import pytest

from core import scene_reading, scene_splits, scenes

CONFIGS = {"dit": scenes.DIT, "vlm": scenes.VLM}


@pytest.mark.parametrize("name", CONFIGS)
def test_same_seed_same_scene(name):
    config = CONFIGS[name]
    for seed in (0, 7, 12345):
        a, b = scenes.make_scene(seed, config), scenes.make_scene(seed, config)
        assert np.array_equal(a.image, b.image)
        assert a.caption == b.caption
        assert [o.box for o in a.objects] == [o.box for o in b.objects]
        assert scenes.questions(a, seed=3) == scenes.questions(b, seed=3)
    assert not np.array_equal(scenes.make_scene(1, config).image, scenes.make_scene(2, config).image)


@pytest.mark.parametrize("name", CONFIGS)
def test_ground_truth_matches_pixels(name):
    config = CONFIGS[name]
    for seed in range(60):
        scene = scenes.make_scene(seed, config)
        image = scene.image
        assert image.shape == (config.size, config.size, 3) and image.dtype == np.uint8
        assert config.min_objects <= len(scene.objects) <= config.max_objects
        union = np.zeros(image.shape[:2], dtype=bool)
        for obj in scene.objects:
            assert obj.mask.any()
            assert (image[obj.mask] == np.array(obj.rgb, dtype=np.uint8)).all()  # mask pixels: the object's colour
            assert not (union & obj.mask).any()  # objects never overlap
            union |= obj.mask
            x0, y0, x1, y1 = obj.box
            ys, xs = np.nonzero(obj.mask)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            # the object sits in its named cell of the 3 x 3 grid
            assert scene_reading.cell_of(ys.mean() + 0.5, xs.mean() + 0.5, config.size) == obj.cell
            assert scenes.position_name(*obj.cell) == obj.position
        # the background is neutral grey: no coloured pixel outside the objects
        assert (scene_reading.chroma(image)[~union] == 0).all()
        if config.distinct_colours:
            assert len({o.colour for o in scene.objects}) == len(scene.objects)


@pytest.mark.parametrize("name", CONFIGS)
def test_captions_parse_back(name):
    config = CONFIGS[name]
    for seed in range(60):
        scene = scenes.make_scene(seed, config)
        parsed = scenes.parse_caption(scene.caption)
        assert parsed == [o.spec(with_size=config.size_words) for o in scene.objects]
        assert scenes.caption_of(parsed) == scene.caption
        words = scenes.caption_words(scene.caption)
        assert [w for w, _, _ in words] == scene.caption.replace(",", " ,").split()
        assert set(w for w, _, _ in words) - {","} <= set(scenes.caption_vocabulary(config))
        # rendering a parsed caption gives the same attributes back
        again = scenes.scene_from_caption(scene.caption, seed + 1000, config)
        assert [o.spec(with_size=config.size_words) for o in again.objects] == parsed


def test_caption_grammar():
    one = scenes.ObjectSpec("circle", "red", "top left")
    two = scenes.ObjectSpec("triangle", "orange", "center", "small")
    assert scenes.caption_of([one]) == "a red circle at the top left"
    assert scenes.caption_of([one, two]) == "a red circle at the top left and a small orange triangle at the center"
    assert scenes.caption_of([two]) == "a small orange triangle at the center"
    assert scenes.caption_of([scenes.ObjectSpec("square", "orange", "top")]) == "an orange square at the top"
    three = scenes.caption_of([one, two, scenes.ObjectSpec("square", "blue", "bottom")])
    assert three == "a red circle at the top left, a small orange triangle at the center and a blue square at the bottom"
    assert scenes.parse_caption(three)[2] == scenes.ObjectSpec("square", "blue", "bottom")
    with pytest.raises(ValueError):
        scenes.parse_caption("a pink circle at the top")


def test_readback_of_drawn_scenes():
    """check_image recovers colour and position of every drawn object; shape nearly always (32 px)."""
    ok, shape_ok, total = 0, 0, 0
    for seed in range(200):
        scene = scenes.make_scene(seed, scenes.DIT)
        for check in scene_reading.check_image(scene.image, scene.caption):
            total += 1
            ok += check.colour_ok and check.position_ok
            shape_ok += check.shape_ok
    assert ok == total
    assert shape_ok / total > 0.95


def test_held_out_split():
    rng = np.random.default_rng(0)
    held = [scene_splits.random_caption(rng, split="held_out") for _ in range(50)]
    train = [scene_splits.random_caption(rng, split="train") for _ in range(50)]
    assert all(scene_splits.held_out(c) for c in held) and not any(scene_splits.held_out(c) for c in train)
    share = np.mean([scene_splits.held_out(scenes.make_scene(s).caption) for s in range(2000)])
    assert 0.05 < share < 0.15


def test_vlm_scene_splits_are_apart():
    """shapes-vlm's held-out scenes (seeds from 0) and training scenes (seeds from TRAIN_SEED_BASE) share
    neither a seed nor a caption."""
    held = scene_splits.held_out_scenes(20)
    train = scene_splits.training_scene_seeds(60)
    assert all(scene_splits.held_out(s.caption) and s.seed < scene_splits.TRAIN_SEED_BASE for s in held)
    assert train[0] >= scene_splits.TRAIN_SEED_BASE and len(set(train)) == 60
    train_captions = {scenes.make_scene(seed, scenes.VLM).caption for seed in train}
    assert not any(scene_splits.held_out(c) for c in train_captions)
    assert not train_captions & {s.caption for s in held}


def test_questions():
    scene = scenes.make_scene(3, scenes.VLM)
    qas = scenes.questions(scene, seed=0)
    kinds = {q.kind for q in qas}
    assert {"shape", "position", "count", "count_shape", "presence"} <= kinds
    answers = set(scenes.answer_vocabulary())
    for q in qas:
        assert q.answer in answers
        if q.kind == "colour":
            (i,) = q.objects
            assert q.answer == scene.objects[i].colour and scene.objects[i].shape in q.question
        elif q.kind == "shape":
            (i,) = q.objects
            assert q.answer == scene.objects[i].shape
        elif q.kind == "position":
            (i,) = q.objects
            assert q.answer == scene.objects[i].position
        elif q.kind == "count":
            assert q.answer == str(len(scene.objects))
        elif q.kind == "presence":
            present = {(o.colour, o.shape) for o in scene.objects}
            colour, shape = q.question.removeprefix("is there a ").removesuffix("?").split()
            assert (q.answer == "yes") == ((colour, shape) in present)
    assert any(q.kind == "presence" and q.answer == "no" for q in qas)  # absent objects are asked about
    # a colour question only names a shape that is unique in the scene
    for q in qas:
        if q.kind == "colour":
            shape = q.question.split()[-1].rstrip("?")
            assert sum(o.shape == shape for o in scene.objects) == 1
