"""The token axis of a DiT capture: image patches and text tokens, in the model's order (torch-free).

SD3, PixArt, Sana, Z-Image and shapes-dit put the image first ([patch(0,0) ... patch(R-1,C-1), text tokens]);
Flux, FLUX.2, Chroma, Qwen-Image, CogView 4, AuraFlow and Lumina 2 put the text first.  The text is one or more
segments, one per text encoder whose states the transformer reads (SD3: CLIP, then T5; Flux and PixArt: T5;
Sana: Gemma; Lumina 2: Gemma 2, after its pipeline's system prompt, a segment of its own, as FLUX.2 [dev]'s Mistral 3
after its system message; Qwen-Image, FLUX.2 [klein], Z-Image: Qwen; CogView 4: GLM; shapes-dit: MiniLM; AuraFlow's
own register tokens before its T5's), each ending in a run of padding tokens (CogView 4's starts with it;
Qwen-Image's and Lumina 2's have none; Z-Image's is the transformer's own).

Spans: "image", "text", each segment by name (pipelines), "prompt" (the last segment's tokens but its
padding) and "padding" (that segment's padding run).  Columns (the text axis of the word maps of
a capture too large for full maps, capture.dit.record): every text token but the padding, and one
column per padding run that stands for the whole run ("<pad> x240": the attention it receives summed);
`column_spans` gives the spans on that axis.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass
class TokenLayout:
    """One run's token axis."""

    grid: tuple[int, int]  # (rows, cols) of image patches
    text: list[str]  # text token labels, in order
    text_first: bool = False
    segments: list[tuple[str, range]] = field(default_factory=list)  # (encoder, its range within the text)
    padding: list[range] = field(default_factory=list)  # padding runs within the text, the last segment's last

    @property
    def n_image(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n(self) -> int:
        return self.n_image + len(self.text)

    @property
    def image(self) -> range:
        start = len(self.text) if self.text_first else 0
        return range(start, start + self.n_image)

    @property
    def text_span(self) -> range:
        start = 0 if self.text_first else self.n_image
        return range(start, start + len(self.text))

    def labels(self) -> list[str]:
        rows, cols = self.grid
        patches = [f"patch({r},{c})" for r in range(rows) for c in range(cols)]
        return list(self.text) + patches if self.text_first else patches + list(self.text)

    def spans(self) -> dict[str, range]:
        t0 = self.text_span.start
        spans = {"image": self.image, "text": self.text_span}
        for name, r in self.segments:
            spans[name] = range(t0 + r.start, t0 + r.stop)
        last = self.segments[-1][1] if self.segments else range(0, len(self.text))
        pad = self.padding[-1] if self.padding else range(last.stop, last.stop)
        if len(pad) and pad.stop <= last.start:  # a leading run before a system span (left padding and a preamble)
            prompt = last
        elif len(pad) and pad.start == last.start and pad.stop < last.stop:  # a leading run (CogView 4)
            prompt = range(pad.stop, last.stop)
        else:
            pad = pad if pad.stop == last.stop else range(last.stop, last.stop)
            prompt = range(last.start, pad.start)
        spans["prompt"] = range(t0 + prompt.start, t0 + prompt.stop)
        spans["padding"] = range(t0 + pad.start, t0 + pad.stop)
        return spans

    def with_text(self, n_text: int) -> "TokenLayout":
        """The token axis of another transformer call of the same run whose text has `n_text` positions (the
        negative prompt's own call of Qwen-Image, CogView 4, Lumina 2): the same picture, this text cut to it
        or extended by "<text i>" labels, the segments and padding runs cut to it."""
        text = (list(self.text) + [f"<text {i}>" for i in range(len(self.text), n_text)])[:n_text]

        def cut(r: range) -> range:
            return range(min(r.start, n_text), min(r.stop, n_text))

        return TokenLayout(grid=self.grid, text=text, text_first=self.text_first,
                           segments=[(name, cut(r)) for name, r in self.segments],
                           padding=[cut(r) for r in self.padding])

    def moved(self, positions: range, other: "TokenLayout") -> list[range]:
        """`positions` of this axis on `other`'s (`with_text`): the same image patches, and the text tokens at
        the same text indices where `other` has them; one range, or two where the text and the image parts
        are no longer adjacent (a straddling range, the other text longer), none where nothing is left."""
        image, text = self.image, self.text_span
        found = []
        for p in positions:
            if p in image:
                found.append(other.image.start + p - image.start)
            elif p in text and p - text.start < len(other.text):
                found.append(other.text_span.start + p - text.start)
        out: list[range] = []
        for p in found:  # increasing: image and text each keep their order and side
            if out and out[-1].stop == p:
                out[-1] = range(out[-1].start, p + 1)
            else:
                out.append(range(p, p + 1))
        return out

    def columns(self, grouped: bool) -> list[tuple[str, list[int]]]:
        """(label, capture positions) per word-map column: every text token, or (`grouped`) each padding
        run as one column."""
        t0 = self.text_span.start
        runs = {r.start: r for r in self.padding if len(r)} if grouped else {}
        out, i = [], 0
        while i < len(self.text):
            run = runs.get(i)
            if run is not None:
                out.append((f"{self.text[i]} x{len(run)}", [t0 + j for j in run]))
                i = run.stop
            else:
                out.append((self.text[i], [t0 + i]))
                i += 1
        return out


def column_spans(layout: TokenLayout) -> dict[str, range]:
    """The text's spans (each segment, "prompt", "padding") on the axis of the grouped columns
    (`columns(grouped=True)`), counted from the first column: the columns each covers."""
    firsts = [positions[0] for _label, positions in layout.columns(grouped=True)]  # increasing
    return {name: range(bisect.bisect_left(firsts, span.start), bisect.bisect_left(firsts, span.stop))
            for name, span in layout.spans().items() if name not in ("image", "text")}


def leading_padding(ids: list[int], pad_id: int | None) -> int:
    """How many padding ids open `ids` (CogView 4 pads on the left)."""
    count = 0
    while pad_id is not None and count < len(ids) and ids[count] == pad_id:
        count += 1
    return count


def padding_start(ids: list[int], pad_id: int | None, eos_id: int | None) -> int:
    """Where the trailing run of padding ids starts (len(ids) when there is none).  When the padding token
    is the end-of-text token (CLIP), the first of the run is the real end of the text and stays out."""
    if pad_id is None:
        return len(ids)
    start = len(ids)
    while start > 0 and ids[start - 1] == pad_id:
        start -= 1
    if pad_id == eos_id and start < len(ids):
        start += 1
    return start


def shapes_layout(grid: tuple[int, int], text_tokens: list[str], n_real: int) -> TokenLayout:
    """shapes-dit: patches row by row, then MiniLM's tokens ([CLS] .. [SEP], then [PAD]s)."""
    return TokenLayout(grid=grid, text=list(text_tokens), padding=[range(n_real, len(text_tokens))])


__all__ = ["TokenLayout", "column_spans", "padding_start", "shapes_layout"]
