"""Captures and links made before the restructure (issue 19) still open: same keys, same maps, same view.

tests/fixtures/cache-v1 was written by the code as it was before the modules moved (commit 055ba00):
two SmolLM2 captures (plain and with head L3H2 pruned), one MiniLM capture, the pruned run's
intervention stored by key, and a share link naming it.  Nothing here loads a model.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import capture
from cache.store import Store
from state import ViewState

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "cache-v1"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
CAPTURES = ("plain", "pruned", "minilm")


@pytest.fixture
def old_store(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "cache-v1")
    store = Store(tmp_path / "cache-v1" / "store", size_limit=2**30)
    yield store
    store.close()


@pytest.mark.parametrize("name", CAPTURES)
def test_keys_of_old_specs_are_unchanged(name):
    old = EXPECTED[name]
    spec = capture.RunSpec.from_json(old["spec"])
    assert capture.revision(spec.model) == old["revision"]
    assert spec.key(old["revision"]) == old["key"]


@pytest.mark.parametrize("name", CAPTURES)
def test_old_captures_open_with_the_same_maps(name, old_store):
    old = EXPECTED[name]
    spec = capture.RunSpec.from_json(old["spec"])
    found = capture.cached(spec, old_store)  # found by the key the new code computes
    assert found is not None and found.key == old["key"]
    assert found.tokens == old["tokens"] and found.output.text == old["text"]
    assert found.n_tokens == old["n_tokens"] and found.layout == old["layout"]
    row = np.asarray(found.row(3, found.n_tokens - 1)[2], dtype=np.float32)
    np.testing.assert_array_equal(row, np.asarray(old["head_3_2_row_last"], dtype=np.float32))
    assert capture.load_capture(old["key"], old_store).key == old["key"]


def test_old_intervention_link_restores_the_same_edits(tmp_path):
    shutil.copytree(FIXTURE / "interventions", tmp_path / "interventions")
    key = EXPECTED["intervention_key"]
    intervention = capture.recall(key, tmp_path / "interventions")
    assert intervention is not None and intervention.key() == key
    assert intervention.heads() == [(3, 2)] and intervention.edits[0].op == "scale"
    pruned = capture.RunSpec.from_json(EXPECTED["pruned"]["spec"])
    assert pruned.intervention == intervention
    params = dict(part.split("=", 1) for part in EXPECTED["link"].lstrip("?").split("&"))
    params["prompt"] = params["prompt"].replace("+", " ")
    state, warnings = ViewState.from_params(params)
    assert not warnings
    assert (state.page, state.model, state.prompt, state.max_new_tokens, state.intervention) == \
        ("intervene", "smollm2", "The cat sat", 2, key)


def test_kept_steps_stay_out_of_a_default_specs_key_and_travel_in_links():
    """RunSpec.keep (the DiT steps whose full maps a capture keeps) is left out of the JSON, and so of the key,
    when empty, like the picture size; set, it is its own capture, and a link carries it as `keep`."""
    plain = capture.RunSpec(model="shapes-dit", prompt="a red circle", steps=20)
    kept = capture.RunSpec(model="shapes-dit", prompt="a red circle", steps=20, keep=(5, 15))
    assert "keep" not in plain.to_json() and kept.to_json()["keep"] == [5, 15]
    assert capture.RunSpec.from_json(json.loads(json.dumps(kept.to_json()))) == kept
    assert kept.key() != plain.key()
    state, warnings = ViewState.from_params({"page": "dit", "model": "shapes-dit", "keep": "15,5,15"})
    assert not warnings and state.kept_steps() == (5, 15) and state.to_params()["keep"] == "15,5,15"
    for bad in ("5-15", "x", ",".join(["1"] * 9), "300"):
        state, warnings = ViewState.from_params({"keep": bad})
        assert state.keep == "" and len(warnings) == 1


def test_guidance_travels_in_links_and_bad_scales_are_ignored_with_a_warning():
    """A link's `guidance` (the DiT's classifier-free guidance scale) is a number from 0 to MAX_GUIDANCE, kept as
    written once normalised ("4.50" -> "4.5"), and becomes RunSpec.guidance; none: the model's default."""
    state, warnings = ViewState.from_params({"page": "dit", "model": "shapes-dit", "guidance": "4.50"})
    assert not warnings and state.guidance == "4.5" and state.guidance_scale() == 4.5
    assert state.to_params()["guidance"] == "4.5"
    state, warnings = ViewState.from_params({"page": "dit", "model": "shapes-dit", "guidance": "0"})
    assert not warnings and state.guidance_scale() == 0.0
    assert ViewState.from_params({"page": "dit"})[0].guidance_scale() is None
    for bad in ("-1", "31", "nan", "four"):
        state, warnings = ViewState.from_params({"guidance": bad})
        assert state.guidance == "" and len(warnings) == 1
