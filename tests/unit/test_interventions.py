"""core.interventions and RunSpec keys: validation, stable keys, JSON round trips, position sets."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.errors import InterventionError
from core.interventions import OPS, HeadEdit, Intervention, ablate_heads, parse_positions
from core.types import RunSpec

ROOT = Path(__file__).resolve().parents[2]


# ---- HeadEdit validation -------------------------------------------------------------------------

VALID = {  # one well-formed edit per op
    "scale": dict(value=0.0),
    "add": dict(value=1.0, direction=(0.5, -0.5)),
    "logit": dict(value=float("-inf"), keys="0:1"),
    "redistribute": dict(value=0.5, keys="sinks"),
    "mix": dict(value=1.0, keys="uniform"),
    "window": dict(value=8.0, keys="0:4"),
}


@pytest.mark.parametrize("op", OPS)
def test_every_op_is_accepted(op):
    assert set(VALID) == set(OPS)
    assert HeadEdit(layer=1, head=2, op=op, **VALID[op]).op == op


@pytest.mark.parametrize("op", ["", "Scale", "ablate", "scale ", "mask", None])
def test_bad_op(op):
    with pytest.raises(InterventionError, match="op"):
        HeadEdit(layer=0, head=0, op=op)


@pytest.mark.parametrize("layer, head", [(-1, 0), (0, -1)])
def test_negative_indices(layer, head):
    with pytest.raises(InterventionError):
        HeadEdit(layer=layer, head=head, op="scale")


GOOD_RANGES = ["span:prompt", "span:needle_2", "0:4", ":4", "4:", ":", "-3:", "2:-1", "-5:-2", "all", "image"]
GOOD_KEYS = GOOD_RANGES + ["sinks", "sinks:0.2", "allsinks", "allsinks:.05"]
GOOD_QUERIES = GOOD_RANGES + ["last"]
BAD_POSITIONS = ["", "ALL", "none", "0", "4", "0-4", "0:4:2", "a:b", "1.5:3", "span:", "span:1abc", "span:a-b",
                 "span:a b", "all\n", "0:4\n", "sinks\n", "span:prompt\n", " all", "sinks,image",
                 "span:prompt;rm", "sinks:", "sinks:x"]


@pytest.mark.parametrize("spec", GOOD_KEYS)
def test_good_key_sets(spec):
    assert HeadEdit(layer=0, head=0, op="logit", value=-1.0, keys=spec).keys == spec


@pytest.mark.parametrize("spec", GOOD_QUERIES)
def test_good_query_sets(spec):
    assert HeadEdit(layer=0, head=0, op="scale", queries=spec).queries == spec


@pytest.mark.parametrize("spec", BAD_POSITIONS)
@pytest.mark.parametrize("field", ["keys", "queries"])
def test_bad_position_strings(spec, field):
    with pytest.raises(InterventionError, match=field):
        HeadEdit(layer=0, head=0, op="logit", **{field: spec})


def test_validate_against_model_shape():
    iv = Intervention(edits=(HeadEdit(29, 8, "scale"),))
    iv.validate(n_layers=30, n_heads=9)
    with pytest.raises(InterventionError, match="outside"):
        iv.validate(n_layers=29, n_heads=9)
    with pytest.raises(InterventionError, match="outside"):
        iv.validate(n_layers=30, n_heads=8)


def test_messages_are_one_sentence():
    for make in (lambda: HeadEdit(0, 0, "nope"), lambda: HeadEdit(0, 0, "scale", keys="x"),
                 lambda: Intervention(edits=(HeadEdit(5, 0, "scale"),)).validate(2, 2)):
        with pytest.raises(InterventionError) as info:
            make()
        text = str(info.value)
        assert "\n" not in text and text.endswith(".")


# ---- Intervention.key ------------------------------------------------------------------------

def test_empty_intervention_key_is_none():
    assert Intervention().key() == "none"
    assert Intervention(edits=()).key() == "none"
    assert Intervention(edits=[]).key() == "none"
    assert Intervention().empty and not ablate_heads([(0, 0)]).empty


def test_same_edits_same_key():
    a = Intervention(edits=(HeadEdit(3, 2, "scale", 0.0), HeadEdit(1, 1, "mix", 0.5, keys="uniform")))
    b = Intervention(edits=[HeadEdit(3, 2, "scale", 0.0), HeadEdit(1, 1, "mix", 0.5, keys="uniform")])
    assert a == b and a.key() == b.key()
    assert ablate_heads([(3, 2)]).key() == Intervention(edits=(HeadEdit(3, 2, "scale", 0.0),)).key()


def test_equal_values_of_other_numeric_types_give_the_same_key():
    """Equal edits must share a key whatever numeric type the UI or CLI hands in (0 vs 0.0, numpy)."""
    base = Intervention(edits=(HeadEdit(3, 2, "scale", 0.0),))
    for layer, head, value in [(3, 2, 0), (np.int64(3), np.int32(2), np.float32(0.0)), (3, 2, np.float64(0))]:
        other = Intervention(edits=(HeadEdit(layer, head, "scale", value),))
        assert other == base
        assert other.key() == base.key()
        json.dumps(other.to_json())  # JSON-able, whatever came in


@pytest.mark.parametrize("change", [
    dict(layer=4), dict(head=3), dict(op="mix"), dict(value=0.25), dict(value=0.5 + 1e-9),
    dict(keys="0:4"), dict(queries="span:prompt"),
])
def test_different_edits_different_key(change):
    base = HeadEdit(3, 2, "logit", 0.5)
    assert Intervention(edits=(base,)).key() != Intervention(edits=(dataclasses.replace(base, **change),)).key()


def test_key_depends_on_order_and_preset_and_count():
    e1, e2 = HeadEdit(0, 0, "scale", 0.0), HeadEdit(1, 1, "scale", 0.0)
    keys = {
        Intervention(edits=(e1, e2)).key(),
        Intervention(edits=(e2, e1)).key(),  # edits compose in order
        Intervention(edits=(e1, e2), preset="act").key(),
        Intervention(edits=(e1,)).key(),
        Intervention(edits=(e1, e1)).key(),
    }
    assert len(keys) == 5


def test_key_is_short_and_url_safe():
    key = ablate_heads([(i, i % 9) for i in range(30)]).key()
    assert len(key) == 16 and all(c in "0123456789abcdef" for c in key)


def test_key_is_the_same_in_another_process():
    """No dependence on hash randomisation, dict order or object ids: a fresh interpreter agrees."""
    iv = Intervention(edits=(HeadEdit(3, 2, "logit", -2.5, keys="sinks"), HeadEdit(0, 8, "window", 16.0, keys="0:4")),
                      preset="duo-streaming")
    spec = RunSpec(model="smollm2", prompt="héllo", max_new_tokens=3, intervention=iv)
    code = (
        "import json, sys; from core.interventions import Intervention; from core.types import RunSpec; "
        "s = RunSpec.from_json(json.loads(sys.argv[1])); print(s.intervention.key(), s.key('rev'))"
    )
    out = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec.to_json())], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60, check=True)
        out.add(proc.stdout.split()[0] + " " + proc.stdout.split()[1])
    assert out == {f"{iv.key()} {spec.key('rev')}"}


def test_key_golden_value():
    """Changing how keys are computed orphans every cached capture and shared link: do it on purpose."""
    assert ablate_heads([(3, 2)]).key() == Intervention(edits=(HeadEdit(3, 2, "scale", 0.0),)).key()
    blob = '{"edits":[{"head":2,"keys":"all","layer":3,"op":"scale","queries":"all","value":0.0}],"preset":null}'
    import hashlib

    assert ablate_heads([(3, 2)]).key() == hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---- JSON round trips ----------------------------------------------------------------------------

def test_intervention_json_round_trip():
    iv = Intervention(edits=(HeadEdit(3, 2, "logit", float("-inf"), keys="0:1"),
                             HeadEdit(7, 0, "redistribute", 0.1, keys="sinks", queries="span:response")),
                      preset="act")
    back = Intervention.from_json(json.loads(json.dumps(iv.to_json())))
    assert back == iv and back.key() == iv.key()
    assert isinstance(back.edits, tuple)
    assert Intervention.from_json({}) == Intervention()


@pytest.mark.parametrize("data", [
    {"edits": [{"layer": 0, "head": 0}]},  # no op
    {"edits": [{"layer": 0, "head": 0, "op": "scale", "colour": "red"}]},
    {"edits": [{"layer": 0, "head": 0, "op": "explode"}]},
    {"edits": [{"layer": 0, "head": 0, "op": "scale", "keys": "everything"}]},
    {"edits": ["scale"]},
])
def test_malformed_intervention_json(data):
    with pytest.raises(InterventionError):
        Intervention.from_json(data)


def test_runspec_json_round_trip():
    spec = RunSpec(model="smollm2", prompt="a\nb", chat=True, image="cat", max_new_tokens=5, seed=3, steps=2,
                   intervention=ablate_heads([(1, 2), (3, 4)], 0.5))
    back = RunSpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert back == spec and back.key("r") == spec.key("r")


# ---- RunSpec.key ---------------------------------------------------------------------------------

OTHER_VALUES = {
    "model": "minilm", "prompt": "The capital of France is!", "chat": True, "image": "cat",
    "max_new_tokens": 7, "seed": 1, "steps": 4, "height": 256, "width": 384, "intervention": ablate_heads([(0, 0)]),
    "keep": (3,), "guidance": 0.0,
}


def test_runspec_key_changes_with_every_field():
    base = RunSpec(model="smollm2", prompt="The capital of France is")
    assert set(OTHER_VALUES) == {f.name for f in dataclasses.fields(RunSpec)}, "a new field needs a value here"
    keys = {base.key("r")}
    for name, value in OTHER_VALUES.items():
        changed = dataclasses.replace(base, **{name: value})
        assert changed.key("r") != base.key("r"), name
        keys.add(changed.key("r"))
    assert len(keys) == len(OTHER_VALUES) + 1


def test_runspec_guidance_keys_by_value_and_unset_leaves_old_keys():
    """A guidance scale is keyed by its value (4 and 4.0 alike; 0, no guidance, is one); unset it is out of the
    JSON, so the keys of captures made before it existed still hold."""
    base = RunSpec(model="shapes-dit", prompt="a red square", seed=1, steps=4)
    assert "guidance" not in base.to_json()
    assert RunSpec(model="shapes-dit", prompt="a red square", seed=1, steps=4, guidance=4).key("r") == \
        dataclasses.replace(base, guidance=4.0).key("r") != dataclasses.replace(base, guidance=0.0).key("r")
    back = RunSpec.from_json(json.loads(json.dumps(dataclasses.replace(base, guidance=0.0).to_json())))
    assert back.guidance == 0.0 and back.key("r") == dataclasses.replace(base, guidance=0.0).key("r")


def test_runspec_key_changes_with_revision_and_capture_version(monkeypatch):
    spec = RunSpec(model="smollm2", prompt="hi")
    assert spec.key("a") != spec.key("b") != spec.key("")
    assert spec.key("a") == RunSpec(model="smollm2", prompt="hi").key("a")
    from core import types

    before = spec.key("a")
    monkeypatch.setattr(types, "CAPTURE_VERSION", types.CAPTURE_VERSION + 1)
    assert spec.key("a") != before


def test_runspec_key_is_a_cache_key():
    from core.keys import is_key

    assert is_key(RunSpec(model="smollm2", prompt="x").key("r"))
    assert RunSpec(model="smollm2", prompt="é").key() != RunSpec(model="smollm2", prompt="e").key()


# ---- parse_positions -----------------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("0:4", range(0, 4)), (":4", range(0, 4)), ("4:", range(4, 10)), (":", range(0, 10)),
    ("-3:", range(7, 10)), ("2:-1", range(2, 9)), ("5:2", range(5, 5)), ("0:100", range(0, 10)),
    ("-100:2", range(0, 2)),
])
def test_parse_positions_ranges(spec, expected):
    assert parse_positions(spec, 10) == expected


def test_parse_positions_all_and_spans():
    assert parse_positions("all", 10) is None
    spans = {"prompt": range(0, 6), "response": range(6, 10)}
    assert parse_positions("span:response", 10, spans) == range(6, 10)
    with pytest.raises(InterventionError, match="needle"):
        parse_positions("span:needle", 10, spans)
    with pytest.raises(InterventionError):
        parse_positions("span:prompt", 10)


@pytest.mark.parametrize("spec", ["sinks", "sinks:0.2", "allsinks", "uniform", "last"])
def test_parse_positions_context_sets_never_mean_all(spec):
    with pytest.raises(InterventionError):
        parse_positions(spec, 10, {"prompt": range(0, 10)})


def test_parse_positions_image_is_the_image_span():
    assert parse_positions("image", 10, {"image": range(1, 5)}) == range(1, 5)
    with pytest.raises(InterventionError):
        parse_positions("image", 10, {"prompt": range(0, 10)})
