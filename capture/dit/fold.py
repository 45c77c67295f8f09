"""Summing a recorded map's keys (or rows) over the coarse tokens of a "split" capture (capture.dit.record).

A "split" capture folds every map row onto its coarse tokens: the image patches pooled into regions of
pool x pool patches (core.dit_capture.region_of) and the text tokens into the word-map columns (each token,
or a padding run as one column: capture.dit.tokens.TokenLayout.columns).  Each column is a contiguous
piece of the axis, and so is the image at one patch per region (up to 16 x 16 patches: shapes-dit, small
pictures), so `CoarseFold` sums a row block with a few slices: runs of single-token columns copied, a
padding run summed; a pooled image goes through index_add_.  index_add_ over the whole last axis, the
obvious way, pays a strided pass per key; on this machine's CPU (2 threads, `bench/dit.py --fold`) a tiny
Flux pipeline's 2 x 576 x 576 block took 1.05 ms that way and 0.08 ms in slices, and SD3-medium's at
1,024² (24 heads x 256 rows x 4,429 keys), whose image is pooled 4 x 4, is as fast as before.  (avg_pool2d
on the image is faster on a contiguous picture, but the image is a slice of each row: the copy cost 3x.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Piece:
    """Positions k .. k + n of the capture's axis and where they go: "copy" to coarse tokens c .., one each;
    "sum" all to coarse token c; "scatter" each to its own coarse token (the pooled image: index_add_)."""

    kind: str
    k: int
    n: int
    c: int


class CoarseFold:
    """`fold(x, start)`: x over positions start .. of the capture's axis (a row block's keys, or its rows)
    -> the sums per coarse token on that axis (module docstring).  `coarse`  # [n] long: each position's
    coarse token; `pieces` cover the axis in order."""

    def __init__(self, coarse: torch.Tensor, m: int, pieces: list[Piece]):
        self.coarse, self.m, self.pieces = coarse, m, pieces
        self._clipped: dict[tuple[int, int], list[Piece]] = {}

    def clipped(self, start: int, n: int) -> list[Piece]:
        """The pieces of positions start .. start + n, counted from start."""
        found = self._clipped.get((start, n))
        if found is None:
            found = self._clipped[(start, n)] = []
            for piece in self.pieces:
                k0, k1 = max(piece.k, start), min(piece.k + piece.n, start + n)
                if k0 < k1:
                    c = piece.c + (k0 - piece.k if piece.kind == "copy" else 0)
                    found.append(Piece(piece.kind, k0 - start, k1 - k0, c))
        return found

    def fold(self, x: torch.Tensor, start: int, into: torch.Tensor | None = None, dim: int = -1) -> torch.Tensor:
        """x  # [..., position] (`dim` -1: a row block's keys) or [..., position, col] (`dim` -2: its rows)
        -> the sums per coarse token on that axis, added to `into` (a step's array) or to zeros."""
        shape = list(x.shape)
        shape[dim] = self.m
        out = torch.zeros(shape, device=x.device) if into is None else into  # [..., coarse] or [..., coarse, col]
        for p in self.clipped(start, x.shape[dim]):
            part = x.narrow(dim, p.k, p.n)
            if p.kind == "copy" and into is None:  # no two pieces share a coarse token: zeros are simply set
                out.narrow(dim, p.c, p.n).copy_(part)
            elif p.kind == "copy":
                out.narrow(dim, p.c, p.n).add_(part)
            elif p.kind == "sum":
                out.select(dim, p.c).add_(part.sum(dim))
            else:
                out.index_add_(dim % out.dim(), self.coarse[start + p.k:start + p.k + p.n], part)
        return out


def pieces_of(image: range, pool: int, region_base: int, column_base: int, columns: list[list[int]]) -> list[Piece]:
    """The pieces of a capture's axis: the image (at capture positions `image`, `pool` x `pool` patches per
    region, regions from `region_base`) and the word-map columns (`columns`: each one's positions,
    contiguous, from `column_base`), in the order of the axis, neighbouring copies merged."""
    found = [(image.start, Piece("copy" if pool == 1 else "scatter", image.start, len(image), region_base))]
    for c, positions in enumerate(columns):
        if list(positions) != list(range(positions[0], positions[0] + len(positions))):
            raise ValueError(f"word-map column {c} is not a contiguous run of tokens")
        kind = "copy" if len(positions) == 1 else "sum"
        found.append((positions[0], Piece(kind, positions[0], len(positions), column_base + c)))
    pieces: list[Piece] = []
    for _k, piece in sorted(found, key=lambda item: item[0]):
        last = pieces[-1] if pieces else None
        if (last is not None and last.kind == piece.kind == "copy" and last.k + last.n == piece.k
                and last.c + last.n == piece.c):
            pieces[-1] = Piece("copy", last.k, last.n + piece.n, last.c)
        else:
            pieces.append(piece)
    return pieces


__all__ = ["CoarseFold", "Piece", "pieces_of"]
