"""Stored layouts read back: a block of zero-padded maps (core.layouts.PaddedBlock) and its thumbnails
(capture.dit.write.pooled_block) equal what the whole maps give."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from capture.dit.write import pooled, pooled_block
from core.layouts import PaddedBlock

N = 23


def _maps(q0: int, k0: int, rows: int, keys: int, lead=(3, 2)) -> tuple[np.ndarray, np.ndarray]:
    """whole  # [*lead, N, N], zero outside the block  # [*lead, rows, keys] at (q0, k0)."""
    block = np.random.default_rng(q0 * 31 + k0).random(lead + (rows, keys)).astype(np.float16) + np.float16(0.01)
    whole = np.zeros(lead + (N, N), np.float16)
    whole[..., q0:q0 + rows, k0:k0 + keys] = block
    return whole, block


@pytest.mark.parametrize("q0, k0, rows, keys", [(0, 0, 9, 9), (14, 14, 9, 9), (5, 0, 11, 23), (0, 0, N, N)])
def test_padded_block_reads_like_the_whole_maps(q0, k0, rows, keys):
    whole, block = _maps(q0, k0, rows, keys)
    padded = PaddedBlock(block, N, q0, k0)
    assert padded.shape == whole.shape and len(padded) == 3 and padded.dtype == whole.dtype
    np.testing.assert_array_equal(np.asarray(padded), whole)
    for index in [1, (1, 0), (-1, slice(None), 4), (slice(None), slice(None), slice(2, 19), slice(0, 6)),
                  (2, 1, slice(10, 30), slice(12, None)), (0, slice(1, 2), 22, 3), (..., 5, slice(None)),
                  (slice(None), 1, slice(0, 0)), (..., slice(15, 20))]:
        np.testing.assert_array_equal(padded[index], whole[index], err_msg=str(index))
    with pytest.raises(IndexError):
        padded[0, 0, N]
    with pytest.raises(IndexError):
        padded[0, 0, ::2]


@pytest.mark.parametrize("q0, k0, rows, keys, bins", [(0, 0, 9, 9, 4), (14, 14, 9, 9, 4), (3, 7, 11, 16, 5),
                                                        (0, 0, 9, 9, 32), (12, 0, 11, 23, 7)])
def test_thumbnails_of_a_block_equal_the_whole_maps(q0, k0, rows, keys, bins):
    whole, block = _maps(q0, k0, rows, keys, lead=(2,))
    expected = pooled(torch.from_numpy(whole.astype(np.float32)), bins)
    got = pooled_block(torch.from_numpy(block.astype(np.float32)), q0, k0, N, bins)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
