"""Captioned clips of coloured shapes that move: a video dataset whose ground truth is known.

Each clip is 8 frames of 16×16 RGB, float32 in [0, 1], laid out (C, F, H, W) = (3, 8, 16, 16)
as a pixel-space Wan pipeline takes its latents (a batch is (N, 3, 8, 16, 16)). A clip shows
one object (or two, as an extra) on a black background; its caption names each object's
colour, shape and motion from a closed vocabulary, e.g. "a red disc moving left" or
"a blue square growing and a cyan vertical bar moving up".

- Colours (``PALETTE``): red, green, blue, yellow, cyan, magenta; every channel is 0.1 or
  0.9, so two colours differ by at least 0.8 in some channel and each by at least 0.9
  (Euclidean) from the background.
- Shapes (``STEADY_SIZES``, width × height in pixels): square 7×7, disc of diameter 7
  (fills 76 % of its box, the square 100 %), horizontal bar 10×5, vertical bar 5×10.
- Motions: ``left``, ``right``, ``up``, ``down`` (the object's box moves 6 pixels over the
  8 frames, by round(6·t/7) at frame t), ``still``, ``grow`` and ``shrink`` (the object
  keeps its centre; squares and discs go through sizes 5, 5, 7, 7, 9, 9, 11, 11 and bars
  from 8×5 to 14×7, ``GROW_SIZES``; shrinking is growing backwards). Objects stay whole
  inside the frame.

Captions read "a <colour> <shape> <motion phrase>", motion phrases "moving left",
"moving right", "moving up", "moving down", "standing still", "growing", "shrinking";
two objects are joined by "and". ``parse_caption`` turns a caption back into its
attributes and rejects unknown words.

Held-out split: of the 4 × 6 × 7 = 168 (shape, colour, motion) combinations, the 24 with
(shape index + colour index + motion index) divisible by 7, indices in the order of
``SHAPES``, ``COLORS`` and ``MOTIONS``, never appear in training (``combinations("unseen")``).
Each excluded triple differs from the others by more than one attribute, so every pair
of attributes (e.g. a red disc, a disc growing, a red object growing) is still seen in
training: the unseen captions test composition, not new words.

Determinism: clip ``index`` of a stream is a pure function of (seed, split, number of
objects, index) through ``numpy.random.default_rng``; ``render_truth`` redraws a clip from its
ground truth alone. Streams are unlimited (any non-negative index).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

from qvd_bench.errors import UserError

FRAMES = 8
HEIGHT = WIDTH = 16
CHANNELS = 3
CLIP_SHAPE = (CHANNELS, FRAMES, HEIGHT, WIDTH)

BACKGROUND = (0.0, 0.0, 0.0)
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.9, 0.1),
    "blue": (0.1, 0.1, 0.9),
    "yellow": (0.9, 0.9, 0.1),
    "cyan": (0.1, 0.9, 0.9),
    "magenta": (0.9, 0.1, 0.9),
}
COLORS = tuple(PALETTE)
SHAPES = ("square", "disc", "horizontal bar", "vertical bar")
MOTIONS = ("left", "right", "up", "down", "still", "grow", "shrink")
MOTION_PHRASES = {
    "left": "moving left",
    "right": "moving right",
    "up": "moving up",
    "down": "moving down",
    "still": "standing still",
    "grow": "growing",
    "shrink": "shrinking",
}
# Unit steps (x, y) of the translations; y grows downwards, as image rows do.
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
DISPLACEMENT = 6
STEADY_SIZES = {
    "square": (7, 7),
    "disc": (7, 7),
    "horizontal bar": (10, 5),
    "vertical bar": (5, 10),
}
_ROUND_SIDES = (5, 5, 7, 7, 9, 9, 11, 11)
_BAR_LENGTHS = (8, 8, 10, 10, 12, 12, 14, 14)
_BAR_WIDTHS = (5, 5, 5, 5, 7, 7, 7, 7)
GROW_SIZES = {
    "square": tuple(zip(_ROUND_SIDES, _ROUND_SIDES)),
    "disc": tuple(zip(_ROUND_SIDES, _ROUND_SIDES)),
    "horizontal bar": tuple(zip(_BAR_LENGTHS, _BAR_WIDTHS)),
    "vertical bar": tuple(zip(_BAR_WIDTHS, _BAR_LENGTHS)),
}
VOCABULARY = tuple(
    sorted(
        {"a", "and"}
        | set(COLORS)
        | {word for shape in SHAPES for word in shape.split()}
        | {word for phrase in MOTION_PHRASES.values() for word in phrase.split()}
    )
)
SPLITS = ("train", "unseen", "all")
# Separates the random streams of the splits and object counts for one seed.
_STREAM_IDS = {"train": 0, "unseen": 1, "all": 2}
_PLACEMENT_TRIES = 5


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption says about one object: its shape, colour and motion."""

    shape: str
    color: str
    motion: str

    @property
    def phrase(self) -> str:
        """E.g. "a red disc moving left"."""
        return f"a {self.color} {self.shape} {MOTION_PHRASES[self.motion]}"


@dataclass(frozen=True)
class ObjectTruth:
    """One object of a clip: its attributes and its box in every frame.

    Attributes:
        shape, color, motion: as in ``ObjectSpec``.
        boxes: per frame (x0, y0, width, height) in pixels; the object covers columns
            x0 .. x0 + width − 1 and rows y0 .. y0 + height − 1 (a disc the ellipse inside).
    """

    shape: str
    color: str
    motion: str
    boxes: tuple[tuple[int, int, int, int], ...]

    @property
    def spec(self) -> ObjectSpec:
        return ObjectSpec(self.shape, self.color, self.motion)

    def centers(self) -> np.ndarray:
        """(F, 2) float64: the box centres (x, y) per frame."""
        boxes = np.asarray(self.boxes, dtype=np.float64)
        return boxes[:, :2] + (boxes[:, 2:] - 1.0) / 2.0


@dataclass(frozen=True)
class ClipTruth:
    """Ground truth of a clip: its objects, drawn in this order (later ones on top)."""

    objects: tuple[ObjectTruth, ...]

    @property
    def specs(self) -> tuple[ObjectSpec, ...]:
        return tuple(obj.spec for obj in self.objects)

    @property
    def caption(self) -> str:
        return caption_of(self.specs)


def caption_of(specs: Sequence[ObjectSpec]) -> str:
    """The caption of objects: their phrases joined by "and"."""
    return " and ".join(spec.phrase for spec in specs)


def _check_spec(spec: ObjectSpec) -> None:
    for value, known, what in (
        (spec.shape, SHAPES, "shape"),
        (spec.color, COLORS, "color"),
        (spec.motion, MOTIONS, "motion"),
    ):
        if value not in known:
            raise UserError(f"unknown {what} {value!r}; known: {', '.join(known)}")


def parse_caption(caption: str) -> tuple[ObjectSpec, ...]:
    """Reads a caption back into the attributes of its objects.

    Args:
        caption: e.g. "a red disc moving left", or two such phrases joined by "and";
            case and surrounding spaces do not matter.

    Returns:
        One ``ObjectSpec`` per object, in caption order.

    Raises:
        UserError: a word outside ``VOCABULARY`` (the error names it and lists the
            vocabulary), or known words in an order the grammar does not allow.
    """
    words = caption.lower().split()
    for word in words:
        if word not in VOCABULARY:
            raise UserError(
                f"unknown word {word!r} in caption {caption!r}; vocabulary: {' '.join(VOCABULARY)}"
            )
    specs = []
    phrase: list[str] = []
    for word in [*words, "and"]:
        if word != "and":
            phrase.append(word)
            continue
        spec = _parse_phrase(phrase)
        if spec is None:
            raise UserError(
                f"cannot read caption {caption!r}: expected 'a <color> <shape> <motion>' "
                f"phrases joined by 'and', e.g. 'a red disc moving left'"
            )
        specs.append(spec)
        phrase = []
    return tuple(specs)


def _parse_phrase(words: list[str]) -> ObjectSpec | None:
    if len(words) < 4 or words[0] != "a" or words[1] not in PALETTE:
        return None
    rest = " ".join(words[2:])
    for shape in SHAPES:
        if rest.startswith(shape + " "):
            motion_phrase = rest[len(shape) + 1 :]
            for motion, phrase in MOTION_PHRASES.items():
                if motion_phrase == phrase:
                    return ObjectSpec(shape, words[1], motion)
    return None


def is_unseen(spec: ObjectSpec) -> bool:
    """Whether a (shape, colour, motion) combination is held out of training (module doc)."""
    index_sum = SHAPES.index(spec.shape) + COLORS.index(spec.color) + MOTIONS.index(spec.motion)
    return index_sum % 7 == 0


@cache
def combinations(split: str = "train") -> tuple[ObjectSpec, ...]:
    """The (shape, colour, motion) combinations of a split, in vocabulary order.

    Args:
        split: "train" (144 combinations), "unseen" (the 24 held out of training) or
            "all" (168).
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    every = [ObjectSpec(s, c, m) for s in SHAPES for c in COLORS for m in MOTIONS]
    if split == "all":
        return tuple(every)
    return tuple(spec for spec in every if is_unseen(spec) == (split == "unseen"))


HELDOUT_KINDS = ("seen", "unseen", "two-object")
HELDOUT_SEED = 20


@cache
def heldout_captions(kind: str) -> tuple[str, ...]:
    """The fixed evaluation captions.

    Args:
        kind: "seen" (one caption per training combination, 144), "unseen" (one per
            held-out combination, 24) or "two-object" (24 fixed two-object captions of
            training combinations, drawn with seed ``HELDOUT_SEED``).
    """
    if kind == "seen":
        return tuple(spec.phrase for spec in combinations("train"))
    if kind == "unseen":
        return tuple(spec.phrase for spec in combinations("unseen"))
    if kind == "two-object":
        rng = np.random.default_rng(HELDOUT_SEED)
        pool = combinations("train")
        return tuple(_draw_truth(rng, pool, 2).caption for _ in range(24))
    raise UserError(f"unknown held-out caption kind {kind!r}; known: {', '.join(HELDOUT_KINDS)}")


def _sizes(spec: ObjectSpec) -> tuple[tuple[int, int], ...]:
    if spec.motion == "grow":
        return GROW_SIZES[spec.shape]
    if spec.motion == "shrink":
        return GROW_SIZES[spec.shape][::-1]
    return (STEADY_SIZES[spec.shape],) * FRAMES


def _relative_boxes(spec: ObjectSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A motion's boxes relative to an anchor, and the anchors that keep them all inside.

    Returns:
        corners (F, 2) int64 top-left (x, y) relative to the anchor, sizes (F, 2) int64
        (width, height), and the lowest and highest valid anchor (2,) int64.
    """
    sizes = np.asarray(_sizes(spec), dtype=np.int64)
    step_x, step_y = DIRECTIONS.get(spec.motion, (0, 0))
    travelled = np.rint(np.arange(FRAMES) * DISPLACEMENT / (FRAMES - 1)).astype(np.int64)
    offsets = np.stack([step_x * travelled, step_y * travelled], axis=1)
    # Top-left = anchor − size // 2 + offset, so growing objects keep their centre.
    corners = offsets - sizes // 2
    low = (-corners).max(0)
    high = (np.array([WIDTH, HEIGHT]) - sizes - corners).min(0)
    return corners, sizes, low, high


def _free_anchors(
    corners: np.ndarray, sizes: np.ndarray, low: np.ndarray, high: np.ndarray, placed
) -> np.ndarray:
    """(K, 2) anchors keeping a background pixel between the box and every placed one."""
    xs, ys = np.meshgrid(np.arange(low[0], high[0] + 1), np.arange(low[1], high[1] + 1))
    anchors = np.stack([xs.ravel(), ys.ravel()], axis=1)  # (K, 2)
    start = anchors[:, None, :] + corners[None]  # (K, F, 2)
    end = start + sizes[None]  # one past the last pixel
    free = np.ones(len(anchors), dtype=bool)
    for obj in placed:
        other = np.asarray(obj.boxes, dtype=np.int64)  # (F, 4)
        other_start, other_end = other[:, :2], other[:, :2] + other[:, 2:]
        # Boxes touch or overlap when their ranges, widened by one pixel, meet on both axes.
        meet = (start <= other_end) & (other_start <= end)  # (K, F, 2)
        free &= ~meet.all(axis=2).any(axis=1)
    return anchors[free]


def _place(specs: Sequence[ObjectSpec], rng: np.random.Generator) -> ClipTruth | None:
    """Places the objects apart from each other, or None when they do not fit.

    The first object's anchor is uniform over the valid ones; each further object's is
    uniform over those that keep it apart from the objects already placed.
    """
    for _ in range(_PLACEMENT_TRIES):
        objects: list[ObjectTruth] = []
        for spec in specs:
            corners, sizes, low, high = _relative_boxes(spec)
            if objects:
                free = _free_anchors(corners, sizes, low, high, objects)
                if len(free) == 0:
                    break
                anchor = free[int(rng.integers(len(free)))]
            else:
                anchor = rng.integers(low, high + 1)
            boxes = tuple(
                (int(x), int(y), int(w), int(h)) for (x, y), (w, h) in zip(anchor + corners, sizes)
            )
            objects.append(ObjectTruth(spec.shape, spec.color, spec.motion, boxes))
        else:
            return ClipTruth(tuple(objects))
    return None


def _draw_truth(
    rng: np.random.Generator, pool: Sequence[ObjectSpec], num_objects: int
) -> ClipTruth:
    """Draws objects from a pool of combinations, each of another colour, and places them."""
    while True:
        specs: list[ObjectSpec] = []
        while len(specs) < num_objects:
            spec = pool[int(rng.integers(len(pool)))]
            if all(spec.color != other.color for other in specs):
                specs.append(spec)
        truth = _place(specs, rng)
        if truth is not None:
            return truth


@cache
def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """(height, width) bool: the pixels a shape covers in its box (a disc: the inscribed ellipse)."""
    if shape != "disc":
        return np.ones((height, width), dtype=bool)
    y = (np.arange(height) - (height - 1) / 2.0) / (height / 2.0)
    x = (np.arange(width) - (width - 1) / 2.0) / (width / 2.0)
    return y[:, None] ** 2 + x[None, :] ** 2 <= 1.0


def render_truth(truth: ClipTruth, out: np.ndarray | None = None) -> np.ndarray:
    """Draws a clip from its ground truth alone.

    Args:
        truth: the objects and their boxes.
        out: optional (3, F, H, W) float32 array to draw into.

    Returns:
        (3, F, H, W) float32 in [0, 1].
    """
    clip = np.empty(CLIP_SHAPE, dtype=np.float32) if out is None else out
    clip[:] = np.asarray(BACKGROUND, dtype=np.float32)[:, None, None, None]
    for obj in truth.objects:
        color = np.asarray(PALETTE[obj.color], dtype=np.float32)[:, None]
        for frame, (x, y, w, h) in enumerate(obj.boxes):
            clip[:, frame, y : y + h, x : x + w][:, shape_mask(obj.shape, w, h)] = color
    return clip


def _check_seed(seed: int) -> None:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")


def render_caption(
    caption: str | Sequence[ObjectSpec], seed: int = 0
) -> tuple[np.ndarray, ClipTruth]:
    """A clip of given objects at random places (a pure function of the caption and seed).

    Args:
        caption: a caption, or its ``ObjectSpec``s.
        seed: non-negative; chooses where the objects are.

    Returns:
        clip (3, F, H, W) float32 and its ``ClipTruth``.

    Raises:
        UserError: an unknown word or attribute, or objects that cannot be placed apart
            in a 16×16 frame.
    """
    _check_seed(seed)
    specs = parse_caption(caption) if isinstance(caption, str) else tuple(caption)
    if not specs:
        raise UserError("caption must name at least one object")
    for spec in specs:
        _check_spec(spec)
    truth = _place(specs, np.random.default_rng([seed, len(specs)]))
    if truth is None:
        raise UserError(
            f"objects of {caption_of(specs)!r} do not fit apart in a {WIDTH}x{HEIGHT} frame; "
            f"choose smaller or slower objects"
        )
    return render_truth(truth), truth


def make_clips(
    seed: int, count: int, start: int = 0, split: str = "train", num_objects: int = 1
) -> tuple[np.ndarray, tuple[ClipTruth, ...]]:
    """Clips ``start .. start + count − 1`` of a stream of random captioned clips.

    Clip i draws its objects uniformly from the split's combinations (each object of a
    different colour) and places them, all from ``numpy.random.default_rng`` seeded with
    (seed, split, num_objects, i), so it does not depend on ``start`` or ``count``.

    Args:
        seed: non-negative.
        count: number of clips.
        start: index of the first clip.
        split: "train", "unseen" or "all" (``combinations``).
        num_objects: 1, or 2 for the two-object extra.

    Returns:
        clips (count, 3, F, H, W) float32 in [0, 1], and one ``ClipTruth`` per clip.
    """
    _check_seed(seed)
    if count < 0 or start < 0:
        raise UserError(f"count and start must be non-negative, got {count} and {start}")
    if num_objects not in (1, 2):
        raise UserError(f"num_objects must be 1 or 2, got {num_objects}")
    pool = combinations(split)
    clips = np.empty((count, *CLIP_SHAPE), dtype=np.float32)
    truths = []
    for i in range(count):
        rng = np.random.default_rng([seed, _STREAM_IDS[split], num_objects, start + i])
        truth = _draw_truth(rng, pool, num_objects)
        render_truth(truth, out=clips[i])
        truths.append(truth)
    return clips, tuple(truths)
