"""A "split" DiT capture's folds onto the coarse tokens (capture.dit.fold, capture.dit.record), against
sums written out with numpy on hand-made maps: the image pooled into ragged regions (a 17 x 18 patch grid,
2 x 2 patches per region), text columns with padding runs, text first or last, row blocks that cut through
the image, and a small capture's steps stored several to an array (the last chunk short)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from capture.dit import record
from capture.dit.attend import Frame
from capture.dit.fold import CoarseFold, pieces_of
from capture.dit.record import MapRecorder, RecordPlan
from capture.dit.tokens import TokenLayout
from core import dit_capture
from core.types import Capture, ModelMeta, Output, RunSpec

GRID = (17, 18)  # more than 16 patches a side: pooled 2 x 2, the last region row and column ragged


def _layout(text_first: bool) -> TokenLayout:
    text = ["<s>", "a", "red", "cube", "</s>"] + ["<pad>"] * 9 + ["<bos>", "cube", "<eos>"] + ["<pad>"] * 6
    return TokenLayout(grid=GRID, text=text, text_first=text_first,
                       segments=[("clip", range(0, 14)), ("t5", range(14, 23))], padding=[range(5, 14), range(17, 23)])


def _coarse(layout: TokenLayout) -> tuple[np.ndarray, int, int, int]:
    """(each position's coarse token, m, first region, first column), written out from the layout."""
    pool = dit_capture.pool_for(layout.grid)
    regions = -(-layout.grid[0] // pool) * -(-layout.grid[1] // pool)
    columns = layout.columns(grouped=True)
    region_base, column_base = (len(columns), 0) if layout.text_first else (0, regions)
    coarse = np.zeros(layout.n, np.int64)
    for patch, position in enumerate(layout.image):
        r, c = divmod(patch, layout.grid[1])
        coarse[position] = region_base + (r // pool) * -(-layout.grid[1] // pool) + c // pool
    for c, (_label, positions) in enumerate(columns):
        coarse[positions] = column_base + c
    return coarse, regions + len(columns), region_base, column_base


@pytest.mark.parametrize("text_first", [False, True])
def test_coarse_fold_sums_each_coarse_token_over_any_range_of_the_axis(text_first):
    layout = _layout(text_first)
    coarse, m, region_base, column_base = _coarse(layout)
    pool = dit_capture.pool_for(layout.grid)
    assert pool == 2
    pieces = pieces_of(layout.image, pool, region_base, column_base, [p for _l, p in layout.columns(grouped=True)])
    assert [p.kind for p in pieces] == (["copy", "sum", "copy", "sum", "scatter"] if text_first else
                                        ["scatter", "copy", "sum", "copy", "sum"])
    fold = CoarseFold(torch.as_tensor(coarse), m, pieces)
    x = torch.rand(2, 5, layout.n)  # [head, rows, position]
    image, text = layout.image, layout.text_span
    for start, stop in [(0, layout.n), (image.start, image.stop), (text.start, text.stop),
                        (text.start + 7, text.stop - 2), (text.start + 2, text.stop - 3), (text.start + 15, text.stop),
                        (image.start + 40, image.stop)]:
        expected = np.zeros((2, 5, m), np.float64)
        np.add.at(expected, (slice(None), slice(None), coarse[start:stop]), x[..., start:stop].double().numpy())
        got = fold.fold(x[..., start:stop], start)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=f"{start}:{stop}")
        # the same positions as rows  # [head, position, col]: alike, added to what `into` holds
        into = torch.ones(2, m, 5)
        rows = fold.fold(x.transpose(1, 2)[:, start:stop], start, into=into, dim=-2)
        assert rows is into
        np.testing.assert_allclose(rows.transpose(1, 2).numpy(), expected + 1, rtol=1e-5, atol=1e-6)


class _Writer:
    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}

    def put_many(self, items):
        self.arrays.update((name, np.array(a)) for name, a in items)


class _Store:
    """What core.dit_capture reads of a store, over the writer's arrays."""

    def __init__(self, arrays):
        self.arrays = arrays

    def get_array(self, key, name):
        return self.arrays[name]


def _maps(n: int, steps: int) -> torch.Tensor:
    scores = torch.randn(steps, 2, n, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64) * 3
    return torch.softmax(scores, -1).float()  # [step, head, query, key]


@pytest.mark.parametrize("text_first, chunk_steps, row_block", [(False, 2, 100), (True, 1, 333), (False, 3, 37)])
def test_split_recorder_keeps_the_sums_and_means_written_out_by_hand(monkeypatch, text_first, chunk_steps, row_block):
    """3 steps of a joint-attention layer's maps, handed over in row blocks; XS / YS / PS and the coarse step
    mean read back through core.dit_capture equal numpy's sums (keys) and means (rows) of the whole maps."""
    layout = _layout(text_first)
    n, steps = layout.n, 3
    coarse, m, region_base, column_base = _coarse(layout)
    columns = [p for _l, p in layout.columns(grouped=True)]
    regions = m - len(columns)
    per_step = 2 * 2 * (2 * layout.n_image * len(columns) + regions * regions)  # bytes of one step's XS, YS, PS
    monkeypatch.setattr(record, "INLINE_BYTES", per_step * chunk_steps)
    writer = _Writer()
    plan = RecordPlan(mode="split").resolve(1, 2, n, steps)
    rec = MapRecorder(plan, steps, 1, 2, False, 0, writer)
    rec.start(layout)
    maps = _maps(n, steps)
    for step in range(steps):
        rec.begin_step(step)
        sink = rec.open(0, "joint", Frame(0, 0), 2, n, n)
        for r0 in range(0, n, row_block):
            sink.rows(r0, maps[step, :, r0:r0 + row_block])
        rec.end_step()
    rec.finish()
    tokens, spans, info = rec.tokens_and_info()
    assert info["dit"]["chunk"] == chunk_steps
    assert sum(name.startswith("XS") for name in writer.arrays) == -(-steps // chunk_steps)
    meta = ModelMeta(name="t", family="sd3", modality="dit", n_layers=1, n_heads=2, n_kv_heads=2, head_dim=4,
                     causal=False, grid=GRID)
    cap = Capture(key="k", spec=RunSpec(model="t", prompt="a red cube"), meta=meta, tokens=tokens, spans=spans,
                  output=Output(recorded_steps=list(range(steps)), timesteps=[0] * steps), layout="full",
                  store=_Store(writer.arrays), layout_info=info)
    # by hand: keys summed per coarse token, rows averaged over their members
    a = maps.double().numpy()  # [step, head, query, key]
    by_key = np.zeros(a.shape[:3] + (m,))
    np.add.at(by_key, (slice(None),) * 3 + (coarse,), a)
    counts = np.bincount(coarse, minlength=m)
    by_both = np.zeros(a.shape[:2] + (m, m))
    np.add.at(by_both, (slice(None), slice(None), coarse), by_key)
    by_both /= counts[:, None]
    image, col = slice(layout.image.start, layout.image.stop), slice(column_base, column_base + len(columns))
    x = dit_capture.image_to_text(cap)[:, 0]  # [step, head, image, column]
    np.testing.assert_allclose(x, by_key[:, :, image, col], atol=2e-3)
    text_rows = np.stack([a[:, :, p, image].mean(2) for p in columns], 2)  # [step, head, column, image]
    np.testing.assert_allclose(dit_capture.text_to_image(cap)[:, 0], text_rows, atol=2e-3)
    reg = slice(region_base, region_base + regions)
    for step in range(steps):
        np.testing.assert_allclose(dit_capture.image_regions(cap, step)[0], by_both[step][:, reg, reg], atol=2e-3)
    np.testing.assert_allclose(cap.attention(0).astype(np.float64), by_both.mean(0), atol=2e-3)
    np.testing.assert_allclose(cap.attention(0).astype(np.float64).sum(-1), 1.0, atol=5e-3)  # rows of means of rows


def test_a_chunk_missing_a_step_is_refused(monkeypatch):
    layout = _layout(False)
    monkeypatch.setattr(record, "INLINE_BYTES", 2**30)
    rec = MapRecorder(RecordPlan(mode="split").resolve(1, 2, layout.n, 3), 3, 1, 2, False, 0, _Writer())
    rec.start(layout)
    for step in (0, 2):  # step 1's transformer call never came
        rec.begin_step(step)
        rec.open(0, "joint", Frame(0, 0), 2, layout.n, layout.n).rows(0, _maps(layout.n, 1)[0])
    with pytest.raises(RuntimeError, match="were not all recorded"):
        rec.finish()


def test_the_layout_is_full_only_while_every_step_and_each_step_fit():
    """"auto" keeps full maps while all steps fit FULL_BYTES and one step fits FULL_STEP_BYTES (in float16)."""
    from core.dit_capture import FULL_BYTES, FULL_STEP_BYTES

    side = int((FULL_STEP_BYTES / 2 / 2) ** 0.5)  # one layer, 2 heads: one step's maps just fit
    assert 2 * side * side * 2 <= FULL_STEP_BYTES < 2 * (side + 1) ** 2 * 2
    fits = FULL_BYTES // (2 * side * side * 2)  # steps that fit FULL_BYTES
    assert RecordPlan().resolve(1, 2, side, 2).mode == "full"
    assert RecordPlan().resolve(1, 2, side + 1, 2).mode == "split"  # one step too large (tiny Flux: 2.7 MB)
    assert RecordPlan().resolve(1, 2, side, fits).mode == "full"
    assert RecordPlan().resolve(1, 2, side, fits + 1).mode == "split"  # every step too large together
    assert RecordPlan(steps=(0, 1)).resolve(1, 2, side, fits + 1).mode == "full"  # only the recorded steps count
    assert RecordPlan(mode="full").resolve(1, 2, side + 1, 2).mode == "full"  # asked for: kept


def test_spans_and_columns_of_a_leading_padding_run():
    """CogView 4 pads its text on the left: the "padding" span is the leading run, the "prompt" what follows it,
    and a split capture's grouped columns make the run one column (capture.dit.tokens)."""
    from capture.dit.tokens import leading_padding, padding_start

    ids = [0, 0, 0, 5, 6, 7]
    assert leading_padding(ids, 0) == 3 and leading_padding(ids, None) == 0 and padding_start(ids, 0, 9) == 6
    text = ["<pad>"] * 3 + ["[gMASK]", "red", "cube"]
    layout = TokenLayout(grid=(2, 2), text=text, text_first=True, segments=[("glm", range(0, 6))],
                         padding=[range(0, 3)])
    spans = layout.spans()
    assert (spans["padding"], spans["prompt"], spans["image"]) == (range(0, 3), range(3, 6), range(6, 10))
    assert [label for label, _p in layout.columns(grouped=True)] == ["<pad> x3", "[gMASK]", "red", "cube"]
    trailing = TokenLayout(grid=(2, 2), text=text[::-1], segments=[("t5", range(0, 6))], padding=[range(3, 6)])
    assert (trailing.spans()["prompt"], trailing.spans()["padding"]) == (range(4, 7), range(7, 10))
