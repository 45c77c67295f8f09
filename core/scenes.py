"""Procedural scenes: small RGB pictures of coloured shapes, their captions, ground truth and VQA pairs.

One module shared by the embedded shapes models (`shapes-dit` draws 32 x 32 scenes with 1-2 shapes,
`shapes-vlm` reads ~112 x 112 scenes with 2-4 shapes).  Pure numpy, deterministic: the same seed and
`SceneConfig` give the same pixels, caption, ground truth and questions on every machine.

A scene has
- `image`    # [H, W, 3] uint8: shapes drawn with hard edges on a neutral (grey) background, plain
  or lightly textured (noise or a soft gradient, the same on all three channels, so a pixel's
  chroma max(RGB) - min(RGB) is 0 on the background and large on every shape);
- `caption`: "a red circle at the top left", "a red circle at the top left and a blue square at the
  center", "a ..., a ... and a ..." (optionally with "small" / "large");
- `objects`: per object its shape, colour, position (a cell of the 3 x 3 grid and its name), size,
  centre, box and visible mask (the pixels that carry its colour).

Attributes:
    SHAPES     circle, square, triangle
    COLOURS    red, orange, yellow, green, blue, purple (well separated in RGB and in hue)
    POSITIONS  "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom",
               "bottom right" (row-major over the 3 x 3 grid)

Objects of one scene sit in different cells (they never overlap) and, by default, have different
colours, so "the red object" always names one object.  `parse_caption` reads a caption back into
attributes; `questions` writes VQA pairs (colour of a named shape, shape of a named colour, position,
counts, yes/no presence including absent objects).  Which scenes are for training and which are held
out is core.scene_splits; reading a (generated) picture back against its caption is core.scene_reading.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 20),
    "yellow": (235, 220, 30),
    "green": (30, 170, 50),
    "blue": (35, 75, 225),
    "purple": (150, 45, 195),
}
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
SIZES = ("small", "large")
BACKGROUNDS = ("plain", "noise", "gradient")


def position_name(row: int, col: int) -> str:
    return POSITIONS[3 * row + col]


def position_cell(name: str) -> tuple[int, int]:
    index = POSITIONS.index(name)
    return divmod(index, 3)


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn.  `DIT` and `VLM` below are the two embedded models' settings."""

    size: int = 32  # image height = width, pixels
    min_objects: int = 1
    max_objects: int = 2
    radius: tuple[float, float] = (0.32, 0.46)  # shape radius as a fraction of the cell size (small .. large)
    jitter: float = 0.12  # centre offset inside the cell, fraction of the cell size
    backgrounds: tuple[str, ...] = BACKGROUNDS
    background_levels: tuple[int, int] = (40, 210)  # grey level range of the background
    texture: int = 8  # amplitude (grey levels) of noise / gradient textures
    size_words: bool = False  # captions say "small" / "large"
    distinct_colours: bool = True  # every object of a scene has its own colour

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= 9:
            raise ValueError("object counts must satisfy 1 <= min_objects <= max_objects <= 9")
        if self.distinct_colours and self.max_objects > len(COLOURS):
            raise ValueError(f"at most {len(COLOURS)} objects with distinct colours")
        if self.size < 12:
            raise ValueError("scenes need at least 12 x 12 pixels")

    @property
    def cell(self) -> float:
        return self.size / 3


DIT = SceneConfig(size=32, min_objects=1, max_objects=2)
VLM = SceneConfig(size=112, min_objects=2, max_objects=4, size_words=True)


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption says about one object."""

    shape: str
    colour: str
    position: str
    size: str | None = None  # "small" | "large" | None (not said)

    def phrase(self) -> str:
        words = f"{self.size} {self.colour}" if self.size else self.colour
        article = "an" if words[0] in "aeiou" else "a"
        return f"{article} {words} {self.shape} at the {self.position}"


@dataclass
class SceneObject:
    """One drawn object and its ground truth."""

    shape: str
    colour: str
    position: str
    cell: tuple[int, int]  # (row, col) of the 3 x 3 grid
    size: str  # "small" | "large"
    radius: float  # pixels
    center: tuple[float, float]  # (y, x) pixels
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1), x1 / y1 exclusive, of the visible mask
    mask: np.ndarray = field(repr=False)  # [H, W] bool: the pixels painted in this object's colour

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]

    def spec(self, with_size: bool = False) -> ObjectSpec:
        return ObjectSpec(self.shape, self.colour, self.position, self.size if with_size else None)


@dataclass
class Scene:
    seed: int
    config: SceneConfig
    image: np.ndarray  # [H, W, 3] uint8
    caption: str
    objects: list[SceneObject]
    background: tuple[str, int]  # (texture, grey level)


# ---- captions ------------------------------------------------------------------------------------------

def caption_of(specs: list[ObjectSpec] | tuple[ObjectSpec, ...]) -> str:
    phrases = [s.phrase() for s in specs]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


_PHRASE = re.compile(
    r"^an? (?:(?P<size>" + "|".join(SIZES) + r") )?(?P<colour>" + "|".join(COLOURS) + r") (?P<shape>"
    + "|".join(SHAPES) + r") at the (?P<position>" + "|".join(sorted(POSITIONS, key=len, reverse=True)) + r")$"
)


def parse_caption(caption: str) -> list[ObjectSpec]:
    """The objects a caption names, in order; raises ValueError on text this module did not write."""
    text = caption.strip().lower()
    parts = re.split(r", | and ", text)
    specs = []
    for part in parts:
        m = _PHRASE.match(part.strip())
        if not m:
            raise ValueError(f"not a scene caption phrase: {part!r}")
        specs.append(ObjectSpec(m["shape"], m["colour"], m["position"], m["size"]))
    return specs


def caption_words(caption: str) -> list[tuple[str, int | None, str]]:
    """(word, object index, role) for each word of a caption; role is "colour", "shape", "position",
    "size" or "other" ("a", "an", "at", "the", "and", ",").  Words of one phrase belong to that phrase's
    object; "and" and the commas between phrases belong to none.  Every word is a single WordPiece token of MiniLM's vocabulary."""
    specs = parse_caption(caption)
    out: list[tuple[str, int | None, str]] = []
    for index, spec in enumerate(specs):
        if index:
            out.append(("and", None, "other") if index == len(specs) - 1 else (",", None, "other"))
        first = spec.size or spec.colour
        out += [("an" if first[0] in "aeiou" else "a", index, "other")]
        if spec.size:
            out.append((spec.size, index, "size"))
        out += [(spec.colour, index, "colour"), (spec.shape, index, "shape"), ("at", index, "other"),
                ("the", index, "other")]
        out += [(w, index, "position") for w in spec.position.split()]
    return out


# ---- drawing -------------------------------------------------------------------------------------------

def shape_mask(shape: str, size: int, center: tuple[float, float], radius: float) -> np.ndarray:
    """mask  # [size, size] bool of one shape (pixel centres inside the outline)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    cy, cx = center
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    if shape == "square":
        half = 0.85 * radius  # about the circle's area
        return (np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half)
    if shape == "triangle":  # upright isosceles: apex above the centre, base below it
        top, base = cy - 1.05 * radius, cy + 0.85 * radius
        t = (yy - top) / (base - top)
        return (t >= 0) & (t <= 1) & (np.abs(xx - cx) <= t * 1.1 * radius)
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, config: SceneConfig) -> tuple[np.ndarray, tuple[str, int]]:
    n = config.size
    level = int(rng.integers(config.background_levels[0], config.background_levels[1] + 1))
    texture = str(rng.choice(list(config.backgrounds)))
    grey = np.full((n, n), float(level))
    if texture == "noise":
        grey += rng.uniform(-config.texture, config.texture, size=(n, n))
    elif texture == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:n, 0:n] / max(n - 1, 1) - 0.5
        grey += config.texture * 2 * (np.cos(angle) * xx + np.sin(angle) * yy)
    grey = np.clip(np.round(grey), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2), (texture, level)


def random_specs(rng: np.random.Generator, config: SceneConfig, n_objects: int | None = None) -> list[ObjectSpec]:
    """Attributes of a random scene: distinct cells (and colours, if the config asks)."""
    n = int(rng.integers(config.min_objects, config.max_objects + 1)) if n_objects is None else n_objects
    cells = rng.choice(9, size=n, replace=False)
    colours = list(COLOURS)
    picked = rng.choice(len(colours), size=n, replace=not config.distinct_colours)
    specs = []
    for cell, colour in zip(cells, picked):
        size = str(rng.choice(SIZES)) if config.size_words else None
        specs.append(ObjectSpec(str(rng.choice(SHAPES)), colours[int(colour)], POSITIONS[int(cell)], size))
    return specs


def render(specs: list[ObjectSpec] | tuple[ObjectSpec, ...], seed: int, config: SceneConfig = DIT) -> Scene:
    """Draw the scene `specs` describes; placement jitter, sizes (when not said) and background from `seed`."""
    cells = [position_cell(s.position) for s in specs]
    if len(set(cells)) != len(cells):
        raise ValueError("two objects in the same cell")
    rng = np.random.default_rng([seed, 1])
    image, background = _background(rng, config)
    cell = config.cell
    low, high = config.radius
    objects: list[SceneObject] = []
    painted = np.full(image.shape[:2], -1, dtype=np.int64)  # which object owns each pixel
    for index, (spec, (row, col)) in enumerate(zip(specs, cells)):
        size = spec.size or str(rng.choice(SIZES))
        mid = (low + high) / 2
        frac = rng.uniform(low, mid) if size == "small" else rng.uniform(mid, high)
        radius = frac * cell
        room = max(0.0, 0.5 * cell - 1.05 * radius - 0.5)  # keep the shape inside its cell
        shift = min(config.jitter * cell, room)
        cy = (row + 0.5) * cell + rng.uniform(-shift, shift)
        cx = (col + 0.5) * cell + rng.uniform(-shift, shift)
        mask = shape_mask(spec.shape, config.size, (cy, cx), radius)
        image[mask] = COLOURS[spec.colour]
        painted[mask] = index
        objects.append(SceneObject(spec.shape, spec.colour, spec.position, (row, col), size, float(radius),
                                   (float(cy), float(cx)), (0, 0, 0, 0), mask))
    for index, obj in enumerate(objects):
        obj.mask = painted == index
        ys, xs = np.nonzero(obj.mask)
        obj.box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(ys) else (0, 0, 0, 0)
    caption = caption_of([o.spec(with_size=config.size_words) for o in objects])
    return Scene(seed=seed, config=config, image=image, caption=caption, objects=objects, background=background)


def make_scene(seed: int, config: SceneConfig = DIT, n_objects: int | None = None) -> Scene:
    """A random scene, fully determined by (seed, config, n_objects)."""
    rng = np.random.default_rng([seed, 0])
    return render(random_specs(rng, config, n_objects), seed, config)


def scene_from_caption(caption: str, seed: int, config: SceneConfig = DIT) -> Scene:
    """A drawing of `caption` (one of many: placement, sizes not said and background come from `seed`)."""
    return render(parse_caption(caption), seed, config)


def caption_vocabulary(config: SceneConfig = DIT) -> list[str]:
    """Every word a caption of `config` can contain, sorted."""
    words = {"a", "an", "at", "the", "and"} | set(COLOURS) | set(SHAPES)
    words |= {w for p in POSITIONS for w in p.split()}
    if config.size_words:
        words |= set(SIZES)
    return sorted(words)


# ---- VQA (for the VLM) -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: str  # "colour" | "shape" | "position" | "count" | "count_colour" | "count_shape" | "presence"
    objects: tuple[int, ...] = ()  # the objects the answer is about (empty for an absent object)


KINDS = ("colour", "shape", "position", "count", "count_colour", "count_shape", "presence", "absent")


def kind_of(qa: QA) -> str:
    """The question type as the evaluations report it (one of KINDS): presence questions about absent
    objects (answer "no") are their own kind, "absent", since they measure hallucination."""
    return "absent" if qa.kind == "presence" and qa.answer == "no" else qa.kind


NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _name(obj: SceneObject | ObjectSpec, with_colour: bool = True, with_shape: bool = True) -> str:
    parts = [obj.colour] if with_colour else []
    parts.append(obj.shape if with_shape else "shape")
    return " ".join(parts)


def questions(scene: Scene, seed: int = 0, n_absent: int = 2, numbers_as_words: bool = False) -> list[QA]:
    """Every answerable question about `scene`, deterministic in (scene, seed).

    - colour   "what colour is the circle?" (only when one circle is present) -> "red"
    - shape    "what shape is the red object?" (only when one red object) -> "circle"
    - position "where is the red circle?" -> "top left"
    - count    "how many shapes are there?" -> "3"; per colour and per shape too ("how many circles are there?")
    - presence "is there a red circle?" -> "yes"; and `n_absent` absent objects -> "no" (never a
               colour-shape pair the scene has)
    """
    rng = np.random.default_rng([scene.seed, seed, 2])
    objs = scene.objects
    out: list[QA] = []

    def number(n: int) -> str:
        return NUMBER_WORDS[n] if numbers_as_words else str(n)

    for i, obj in enumerate(objs):
        same_shape = [j for j, o in enumerate(objs) if o.shape == obj.shape]
        same_colour = [j for j, o in enumerate(objs) if o.colour == obj.colour]
        if len(same_shape) == 1:
            out.append(QA(f"what colour is the {obj.shape}?", obj.colour, "colour", (i,)))
        if len(same_colour) == 1:
            out.append(QA(f"what shape is the {obj.colour} object?", obj.shape, "shape", (i,)))
        if sum(o.shape == obj.shape and o.colour == obj.colour for o in objs) == 1:
            out.append(QA(f"where is the {_name(obj)}?", obj.position, "position", (i,)))
            out.append(QA(f"is there a {_name(obj)}?", "yes", "presence", (i,)))
    out.append(QA("how many shapes are there?", number(len(objs)), "count", tuple(range(len(objs)))))
    for shape in SHAPES:
        which = tuple(i for i, o in enumerate(objs) if o.shape == shape)
        out.append(QA(f"how many {shape}s are there?", number(len(which)), "count_shape", which))
    for colour in COLOURS:
        which = tuple(i for i, o in enumerate(objs) if o.colour == colour)
        if which or rng.random() < 0.5:
            out.append(QA(f"how many {colour} shapes are there?", number(len(which)), "count_colour", which))
    present = {(o.colour, o.shape) for o in objs}
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    for k in rng.choice(len(absent), size=min(n_absent, len(absent)), replace=False):
        colour, shape = absent[int(k)]
        out.append(QA(f"is there a {colour} {shape}?", "no", "presence", ()))
    return out


def answer_vocabulary() -> list[str]:
    """Every answer `questions` can give (numbers as digits), sorted."""
    words = set(COLOURS) | set(SHAPES) | set(POSITIONS) | {"yes", "no"} | {str(i) for i in range(10)}
    return sorted(words)


__all__ = ["SHAPES", "COLOURS", "POSITIONS", "SIZES", "BACKGROUNDS", "SceneConfig", "DIT", "VLM", "ObjectSpec",
           "SceneObject", "Scene", "make_scene", "render", "scene_from_caption", "caption_of", "parse_caption",
           "caption_words", "random_specs", "caption_vocabulary", "shape_mask",
           "questions", "QA", "KINDS", "kind_of", "answer_vocabulary", "position_name", "position_cell"]
