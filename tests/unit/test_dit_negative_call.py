"""A direct intervention as the negative prompt's own transformer call takes it, when that call's text is not as
long as the prompt's (capture.dit.tokens.TokenLayout.with_text / moved, capture.dit.presets.moved): the same
image patches, the negative text's tokens at the same text indices, on hand-made axes text first and last."""
from __future__ import annotations

import pytest

from capture.dit import presets
from capture.dit.tokens import TokenLayout
from core.interventions import HeadEdit, Intervention

GRID = (2, 3)  # 6 patches


def _layout(text_first: bool) -> TokenLayout:
    text = ["<s>", "a", "red", "cube", "</s>", "<pad>", "<pad>"]  # 7 text tokens, padding 5..7
    return TokenLayout(grid=GRID, text=text, text_first=text_first, segments=[("t5", range(0, 7))],
                       padding=[range(5, 7)])


def test_with_text_cuts_or_extends_the_text_and_keeps_the_picture():
    layout = _layout(True)
    short = layout.with_text(3)
    assert short.text == ["<s>", "a", "red"] and short.segments == [("t5", range(0, 3))]
    assert short.spans()["image"] == range(3, 9) and short.spans()["padding"] == range(3, 3)
    long = layout.with_text(9)
    assert long.text[7:] == ["<text 7>", "<text 8>"] and long.image == range(9, 15)
    last = _layout(False).with_text(3)
    assert last.image == range(0, 6) and last.text_span == range(6, 9)


@pytest.mark.parametrize("text_first", [True, False])
def test_moved_positions(text_first):
    layout = _layout(text_first)
    t0, i0 = layout.text_span.start, layout.image.start
    short = layout.with_text(3)
    s_t0, s_i0 = short.text_span.start, short.image.start
    # text tokens 1..3 of 7: the negative text has indices 1, 2 only
    assert layout.moved(range(t0 + 1, t0 + 4), short) == [range(s_t0 + 1, s_t0 + 3)]
    assert layout.moved(range(t0 + 4, t0 + 7), short) == []  # gone: the negative text has 3 tokens
    assert layout.moved(range(i0 + 2, i0 + 5), short) == [range(s_i0 + 2, s_i0 + 5)]  # the same patches
    long = layout.with_text(9)
    if text_first:  # text 5..7 and patches 0..2 straddle; on the longer text they are apart
        assert layout.moved(range(5, 9), long) == [range(5, 7), range(9, 11)]
        assert layout.moved(range(5, 9), short) == [range(3, 5)]  # text gone, the patches adjacent to nothing
    else:  # patches 4, 5 then text 0, 1: the image still ends where the text starts
        assert layout.moved(range(4, 8), long) == [range(4, 8)]


def test_presets_moved_edits():
    layout = _layout(True)  # text 0..7, image 7..13
    short = layout.with_text(3)  # text 0..3, image 3..9
    iv = Intervention(edits=(
        HeadEdit(layer=0, head=1, op="redistribute", value=0.0, keys="1:4"),  # text 1..3 -> 1..2 (0..3)
        HeadEdit(layer=0, head=2, op="redistribute", value=0.0, keys="5:7"),  # padding: gone
        HeadEdit(layer=1, head=0, op="mix", value=1.0, keys="all", queries="image"),  # named: stays
        HeadEdit(layer=1, head=1, op="logit", value=-1.0, keys="8:10", queries="7:13"),  # image patches
        HeadEdit(layer=2, head=0, op="scale", value=0.0),
    ), preset="dit-redistribute")
    moved = presets.moved(iv, layout, short)
    assert moved.preset == "dit-redistribute"
    assert [(e.layer, e.head, e.keys, e.queries) for e in moved.edits] == [
        (0, 1, "1:3", "all"), (1, 0, "all", "image"), (1, 1, "4:6", "3:9"), (2, 0, "all", "all")]
    long = layout.with_text(9)  # text 0..9, image 9..15: a straddling range splits into two edits
    split = presets.moved(Intervention(edits=(HeadEdit(layer=0, head=0, op="logit", value=-1.0, keys="5:9"),)),
                          layout, long)
    assert [e.keys for e in split.edits] == ["5:7", "9:11"]
    assert presets.moved(iv, layout, layout.with_text(7)) == iv  # the same length: nothing moves
