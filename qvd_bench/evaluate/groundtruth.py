"""Ground-truth metrics: analytic detectors that score clips of shapes against their captions.

The clips are those of ``qvd_bench.datasets.shapes`` (or generated to look like them):
(N, 3, 8, 16, 16) RGB in [0, 1]. No learned weights are involved; every decision is a
threshold on a pixel measurement, stated below, and the thresholds sit halfway between
what the dataset's classes produce, so Gaussian pixel noise of standard deviation 0.1 does
not move a decision.

1. Foreground: pixels farther than ``FOREGROUND_DISTANCE`` (Euclidean RGB) from the
   background colour, less those with fewer than two foreground 4-neighbours (isolated
   noise; every pixel of a dataset shape has at least two).
2. Objects: 4-connected components within a frame; those of ``MIN_AREA`` pixels or more
   count. For a one-object caption the object is the largest component of the foreground;
   for a caption of several objects, object i is the largest component of the foreground
   pixels whose nearest palette colour is object i's colour (so an object of the wrong
   colour is not found at all).
3. Colour: the most frequent nearest palette colour of the object's pixels, all frames.
4. Shape: per frame, the object's box over rows and columns holding at least two of its
   pixels (a stray pixel does not widen it); the medians over frames of the box's aspect
   (width / height) and of the share of the box the object fills. Aspect above
   ``BAR_ASPECT``: horizontal bar; below its inverse: vertical bar; else fill at least
   ``SQUARE_FILL``: square (dataset squares fill 100 %), below it: disc (75-85 %).
5. Motion, from the frames where the object is present (at least two):
   - grow (shrink): the area grows (shrinks) by a factor of at least ``GROWTH`` from the
     first to the last frame and never shrinks (grows) by more than ``AREA_JITTER``
     between consecutive frames;
   - left/right/up/down: the centroid travels at least ``MIN_TRAVEL`` pixels along one
     axis, less than ``MIN_TRAVEL / 2`` along the other, and never steps back by more
     than ``STEP_BACK`` pixels (so shuffled frames are not a motion);
   - still: every centroid within ``STILL_SPREAD`` pixels of the median centroid and
     the area steady (within a factor ``GROWTH``);
   - anything else is "erratic", which no caption names.
6. Persistence: the object is present and single (exactly one counted component in its
   mask) in every frame. For a one-object caption a second object of any colour breaks it.

``score_clips`` returns the accuracies (``gt_color_acc``, ``gt_shape_acc``,
``gt_motion_acc``, ``gt_persistence``, ``gt_all_acc``: share of objects right on all four),
counted per caption object. ``groundtruth_fd`` is a Frechet distance between analytic
features of two clip sets (``clip_features``: centroid trajectory, size trajectory, mean
colour, box fill and aspect, presence), protocol ``PROTOCOL_ID``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.ndimage

from qvd_bench.datasets.shapes import (
    BACKGROUND,
    CHANNELS,
    COLORS,
    FRAMES,
    HEIGHT,
    PALETTE,
    WIDTH,
    ObjectSpec,
    caption_of,
    make_clips,
    parse_caption,
)
from qvd_bench.errors import UserError
from qvd_bench.evaluate.frechet import frechet_distance_of_features

PROTOCOL_ID = "groundtruth-fd/shapes-3x8x16x16/features-v1"
METRICS = ("gt_color_acc", "gt_shape_acc", "gt_motion_acc", "gt_persistence", "gt_all_acc")

FOREGROUND_DISTANCE = 0.4
MIN_AREA = 4
BAR_ASPECT = 1.4
SQUARE_FILL = 0.92
GROWTH = 1.6
AREA_JITTER = 1.15
MIN_TRAVEL = 3.0
STEP_BACK = 0.6
STILL_SPREAD = 1.0

_PALETTE = np.asarray([PALETTE[c] for c in COLORS], dtype=np.float32)  # (K, 3)
_BACKGROUND = np.asarray(BACKGROUND, dtype=np.float32)
# Connects pixels to their 4-neighbours within a frame, never across frames.
_IN_FRAME_CROSS = np.zeros((3, 3, 3), dtype=bool)
_IN_FRAME_CROSS[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]


@dataclass(frozen=True)
class ObjectDetection:
    """What the detectors see of one caption object, and whether it matches the caption.

    Attributes:
        expected: the caption's object.
        color, shape, motion: the detected attributes (None where no object was found;
            motion "erratic" for a trajectory no caption names).
        persistent: present and single in every frame.
        areas: (F,) pixel count of the object per frame (0 where absent).
        centers: (F,) centroid (x, y) per frame, None where absent.
    """

    expected: ObjectSpec
    color: str | None
    shape: str | None
    motion: str | None
    persistent: bool
    areas: tuple[int, ...]
    centers: tuple[tuple[float, float] | None, ...]

    @property
    def color_ok(self) -> bool:
        return self.color == self.expected.color

    @property
    def shape_ok(self) -> bool:
        return self.shape == self.expected.shape

    @property
    def motion_ok(self) -> bool:
        return self.motion == self.expected.motion

    @property
    def all_ok(self) -> bool:
        return self.color_ok and self.shape_ok and self.motion_ok and self.persistent


@dataclass(frozen=True)
class ClipDetection:
    """The detections of one clip, one per object its caption names."""

    caption: str
    objects: tuple[ObjectDetection, ...]


def as_clips(clips) -> np.ndarray:
    """Checks and converts clips to float32 numpy (N, 3, F, H, W) clamped to [0, 1].

    Args:
        clips: numpy array or torch tensor, (N, 3, 8, 16, 16) or one clip (3, 8, 16, 16).

    Raises:
        UserError: another shape, or NaN values.
    """
    if hasattr(clips, "detach"):
        clips = clips.detach().float().cpu().numpy()
    array = np.asarray(clips, dtype=np.float32)
    clip_shape = (CHANNELS, FRAMES, HEIGHT, WIDTH)
    if array.shape == clip_shape:
        array = array[None]
    if array.ndim != 5 or array.shape[1:] != clip_shape:
        raise UserError(
            f"clips must be (N, {', '.join(map(str, clip_shape))}) RGB in [0, 1], laid out "
            f"(batch, channel, frame, height, width); got shape {tuple(array.shape)}"
        )
    if np.isnan(array).any():
        raise UserError("clips contain NaN values; check the generation that produced them")
    return np.clip(array, 0.0, 1.0)


def _foreground(clips: np.ndarray) -> np.ndarray:
    """(N, F, H, W) bool: the foreground of step 1 of the module doc."""
    distance = np.linalg.norm(clips - _BACKGROUND[None, :, None, None, None], axis=1)
    fg = distance > FOREGROUND_DISTANCE
    padded = np.pad(fg, ((0, 0), (0, 0), (1, 1), (1, 1)))
    neighbours = (
        padded[..., :-2, 1:-1].astype(np.int8)
        + padded[..., 2:, 1:-1]
        + padded[..., 1:-1, :-2]
        + padded[..., 1:-1, 2:]
    )
    return fg & (neighbours >= 2)


def _nearest_colors(clips: np.ndarray) -> np.ndarray:
    """(N, F, H, W) int64: index into ``COLORS`` of each pixel's nearest palette colour."""
    pixels = np.moveaxis(clips, 1, -1)  # (N, F, H, W, 3)
    distances = ((pixels[..., None, :] - _PALETTE) ** 2).sum(-1)  # (N, F, H, W, K)
    return distances.argmin(-1)


def _largest_components(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The largest component per frame, and how many components count per frame.

    Args:
        masks: (M, F, H, W) bool.

    Returns:
        largest (M, F, H, W) bool, counts (M, F) int64 (components of ``MIN_AREA`` or more).
    """
    m, f = masks.shape[:2]
    labels, num = scipy.ndimage.label(masks.reshape(m * f, HEIGHT, WIDTH), _IN_FRAME_CROSS)
    labels = labels.reshape(masks.shape)
    areas = np.bincount(labels.ravel(), minlength=num + 1)
    areas[0] = 0
    # Each component lies in one frame: find the frame of each label and its biggest label.
    frame_of_pixel = np.broadcast_to(np.arange(m * f).reshape(m, f, 1, 1), masks.shape)
    frame_of_label = np.zeros(num + 1, dtype=np.int64)
    frame_of_label[labels.ravel()] = frame_of_pixel.ravel()
    counted = areas >= MIN_AREA
    counted[0] = False
    counts = np.bincount(frame_of_label[counted], minlength=m * f).reshape(m, f)
    # Largest per frame, ties to the higher label: rank by area · (num + 1) + label.
    rank = areas * (num + 1) + np.arange(num + 1)
    rank[0] = -1
    best = np.full(m * f, -1, dtype=np.int64)
    np.maximum.at(best, frame_of_label[1:], rank[1:])
    best_label = np.where(best >= 0, best % (num + 1), -1).reshape(m, f)
    largest = (labels == best_label[:, :, None, None]) & (labels > 0)
    largest &= counted[labels]
    return largest, counts


def _frame_measurements(objects: np.ndarray) -> dict[str, np.ndarray]:
    """Per-frame area, centroid, trimmed-box fill and aspect of (M, F, H, W) object masks."""
    area = objects.sum((2, 3))
    safe = np.maximum(area, 1)
    ys = np.arange(HEIGHT, dtype=np.float64)
    xs = np.arange(WIDTH, dtype=np.float64)
    row_counts = objects.sum(3)  # (M, F, H)
    col_counts = objects.sum(2)  # (M, F, W)
    cx = (col_counts * xs).sum(-1) / safe
    cy = (row_counts * ys).sum(-1) / safe
    rows, cols = row_counts >= 2, col_counts >= 2
    has_box = rows.any(-1) & cols.any(-1)
    y0, y1 = rows.argmax(-1), HEIGHT - 1 - rows[..., ::-1].argmax(-1)
    x0, x1 = cols.argmax(-1), WIDTH - 1 - cols[..., ::-1].argmax(-1)
    box_h = np.maximum(y1 - y0 + 1, 1)
    box_w = np.maximum(x1 - x0 + 1, 1)
    in_rows = (ys >= y0[..., None]) & (ys <= y1[..., None])  # (M, F, H)
    in_cols = (xs >= x0[..., None]) & (xs <= x1[..., None])  # (M, F, W)
    inside = (objects & in_rows[..., :, None] & in_cols[..., None, :]).sum((2, 3))
    return {
        "area": area,
        "cx": cx,
        "cy": cy,
        "fill": inside / (box_w * box_h),
        "log_aspect": np.log(box_w / box_h),
        "has_box": has_box,
    }


def _shape(fill: np.ndarray, log_aspect: np.ndarray) -> str:
    aspect = float(np.median(log_aspect))
    if aspect > np.log(BAR_ASPECT):
        return "horizontal bar"
    if aspect < -np.log(BAR_ASPECT):
        return "vertical bar"
    return "square" if float(np.median(fill)) >= SQUARE_FILL else "disc"


def _motion(area: np.ndarray, cx: np.ndarray, cy: np.ndarray) -> str:
    """Classifies one object's trajectory over its present frames (module doc, step 5)."""
    log_area = np.log(area.astype(np.float64))
    growth = log_area[-1] - log_area[0]
    area_steps = np.diff(log_area)
    if growth >= np.log(GROWTH) and (area_steps >= -np.log(AREA_JITTER)).all():
        return "grow"
    if growth <= -np.log(GROWTH) and (area_steps <= np.log(AREA_JITTER)).all():
        return "shrink"
    for (along, across), (negative, positive) in (
        ((cx, cy), ("left", "right")),
        ((cy, cx), ("up", "down")),
    ):
        travel = along[-1] - along[0]
        straight = abs(travel) >= MIN_TRAVEL and abs(across[-1] - across[0]) < MIN_TRAVEL / 2
        if straight and (np.sign(travel) * np.diff(along) >= -STEP_BACK).all():
            return positive if travel > 0 else negative
    spread = np.hypot(cx - np.median(cx), cy - np.median(cy)).max()
    if spread <= STILL_SPREAD and abs(growth) < np.log(GROWTH):
        return "still"
    return "erratic"


def _as_specs(caption) -> tuple[ObjectSpec, ...]:
    if isinstance(caption, str):
        return parse_caption(caption)
    return tuple(caption)


def detect(clips, captions: Sequence) -> tuple[ClipDetection, ...]:
    """Runs the detectors on clips against their captions.

    Args:
        clips: (N, 3, 8, 16, 16) in [0, 1] (numpy or torch; values outside are clamped).
        captions: N captions (strings, or sequences of ``ObjectSpec``).

    Returns:
        One ``ClipDetection`` per clip.

    Raises:
        UserError: clips of another shape, NaN values, a caption count other than N, an
            unknown caption word.
    """
    clips = as_clips(clips)
    if isinstance(captions, str) or len(captions) != len(clips):
        count = 1 if isinstance(captions, str) else len(captions)
        raise UserError(f"need one caption per clip: got {count} captions for {len(clips)} clips")
    specs = [_as_specs(caption) for caption in captions]
    fg = _foreground(clips)
    colors = _nearest_colors(clips)
    masks = []
    for i, clip_specs in enumerate(specs):
        for spec in clip_specs:
            if len(clip_specs) == 1:
                masks.append(fg[i])
            else:
                masks.append(fg[i] & (colors[i] == COLORS.index(spec.color)))
    if not masks:
        return ()
    objects, counts = _largest_components(np.stack(masks))
    measured = _frame_measurements(objects)
    owner = np.repeat(np.arange(len(specs)), [len(s) for s in specs])
    color_counts = np.stack(
        [(objects & (colors[owner] == k)).sum((1, 2, 3)) for k in range(len(COLORS))], axis=1
    )
    detections = []
    m = 0
    for clip_specs in specs:
        found = []
        for spec in clip_specs:
            found.append(_detect_object(spec, m, measured, counts, color_counts))
            m += 1
        detections.append(ClipDetection(caption=caption_of(clip_specs), objects=tuple(found)))
    return tuple(detections)


def _detect_object(
    spec: ObjectSpec,
    m: int,
    measured: dict[str, np.ndarray],
    counts: np.ndarray,
    color_counts: np.ndarray,
) -> ObjectDetection:
    area = measured["area"][m]
    present = area >= MIN_AREA
    cx, cy = measured["cx"][m], measured["cy"][m]
    centers = tuple(
        (float(x), float(y)) if p else None for x, y, p in zip(cx, cy, present, strict=True)
    )
    color = shape = motion = None
    if present.any():
        color = COLORS[int(color_counts[m].argmax())]
        boxed = present & measured["has_box"][m]
        if boxed.any():
            shape = _shape(measured["fill"][m][boxed], measured["log_aspect"][m][boxed])
        motion = _motion(area[present], cx[present], cy[present]) if present.sum() >= 2 else None
    return ObjectDetection(
        expected=spec,
        color=color,
        shape=shape,
        motion=motion,
        persistent=bool((counts[m] == 1).all() and present.all()),
        areas=tuple(int(a) for a in area),
        centers=centers,
    )


def accuracies(detections: Sequence[ClipDetection]) -> dict[str, float]:
    """Shares of caption objects with the right colour, shape, motion, persistence, all four."""
    objects = [obj for clip in detections for obj in clip.objects]
    if not objects:
        raise UserError("no clips to score: pass at least one clip and its caption")
    checks = {
        "gt_color_acc": lambda o: o.color_ok,
        "gt_shape_acc": lambda o: o.shape_ok,
        "gt_motion_acc": lambda o: o.motion_ok,
        "gt_persistence": lambda o: o.persistent,
        "gt_all_acc": lambda o: o.all_ok,
    }
    return {name: float(np.mean([check(o) for o in objects])) for name, check in checks.items()}


def score_clips(clips, captions: Sequence) -> dict[str, float]:
    """Ground-truth accuracies of clips against their captions (``METRICS``; module doc).

    Args:
        clips: (N, 3, 8, 16, 16) in [0, 1].
        captions: N captions.

    Returns:
        {"gt_color_acc", "gt_shape_acc", "gt_motion_acc", "gt_persistence", "gt_all_acc"}
        each in [0, 1]. ``detect`` gives the per-clip detections behind them.
    """
    return accuracies(detect(clips, captions))


FEATURE_DIM = 4 * FRAMES + 7


def clip_features(clips) -> np.ndarray:
    """Analytic features of clips for the Frechet distance (caption-free).

    Per clip, of the largest foreground component per frame (step 2 of the module doc,
    one-object reading): centroid x and y per frame (/ 16; the clip's mean centroid where
    absent), √area per frame (/ 16), presence per frame, mean colour (3), median box fill,
    median log aspect, mean number of counted components, and the share of foreground
    pixels outside the object.

    Args:
        clips: (N, 3, 8, 16, 16) in [0, 1].

    Returns:
        (N, ``FEATURE_DIM``) float64.
    """
    clips = as_clips(clips)
    fg = _foreground(clips)
    objects, counts = _largest_components(fg)
    measured = _frame_measurements(objects)
    present = measured["area"] >= MIN_AREA
    weights = np.where(present.any(1, keepdims=True), present, True).astype(np.float64)
    features = []
    for axis in ("cx", "cy"):
        centre = measured[axis]
        mean = (centre * weights).sum(1, keepdims=True) / weights.sum(1, keepdims=True)
        mean = np.where(present.any(1, keepdims=True), mean, (WIDTH - 1) / 2.0)
        features.append(np.where(present, centre, mean) / WIDTH)
    features.append(np.sqrt(measured["area"]) / WIDTH)
    features.append(present.astype(np.float64))
    pixels = objects.sum((1, 2, 3))
    mean_color = (clips * objects[:, None]).sum((2, 3, 4)) / np.maximum(pixels, 1)[:, None]
    boxed = present & measured["has_box"]
    fill = np.where(boxed, measured["fill"], np.nan)
    aspect = np.where(boxed, measured["log_aspect"], np.nan)
    with warnings.catch_warnings():
        # A clip with no object has an all-NaN row; its median is NaN, then 0.
        warnings.simplefilter("ignore", RuntimeWarning)
        median_fill = np.nan_to_num(np.nanmedian(fill, axis=1))
        median_aspect = np.nan_to_num(np.nanmedian(aspect, axis=1))
    stray = 1.0 - pixels / np.maximum(fg.sum((1, 2, 3)), 1)
    features += [
        mean_color,
        median_fill[:, None],
        median_aspect[:, None],
        counts.mean(1, keepdims=True),
        stray[:, None],
    ]
    return np.concatenate(features, axis=1).astype(np.float64)


def groundtruth_fd(clips, reference_clips) -> float:
    """Frechet distance between the ``clip_features`` of two clip sets (``PROTOCOL_ID``).

    Uses ``qvd_bench.evaluate.frechet`` (covariances divide by N); it warns when either
    set has fewer than 2 × ``FEATURE_DIM`` clips. The reference is usually dataset clips:
    ``shapes.make_clips(seed, count)[0]``.

    Args:
        clips, reference_clips: (N, 3, 8, 16, 16) and (M, 3, 8, 16, 16) in [0, 1].
    """
    return frechet_distance_of_features(clip_features(clips), clip_features(reference_clips))


# --- the ``groundtruth`` metric family of ``qvd-bench evaluate`` -------------------------------

# Accuracies are exact counts of detector decisions; their protocol names the detectors.
ACCURACY_PROTOCOL_ID = "groundtruth-acc/shapes-3x8x16x16/detectors-v1"
FD_METRIC = "gt_fd"
# The Frechet reference: this many dataset clips of all combinations, one object, from
# this seed (part of the protocol id, so numbers against another reference never mix).
REFERENCE_SEED = 0
REFERENCE_CLIPS = 1024
FD_PROTOCOL_ID = f"{PROTOCOL_ID}/dataset-all-seed{REFERENCE_SEED}-n{REFERENCE_CLIPS}"
RESULT_METRICS = (*METRICS, FD_METRIC)


def clips_from_latents(latents, layout: str = "BCFHW") -> np.ndarray:
    """The clips a pixel-space shapes model's final latents stand for.

    Args:
        latents: (N, 3, 8, 16, 16) ("BCFHW") or (N, 8, 3, 16, 16) ("BFCHW") in [−1, 1],
            the scaling the shapes models are trained on.
        layout: the latents' layout.

    Returns:
        (N, 3, 8, 16, 16) float32 in [0, 1] (clamped).

    Raises:
        UserError: latents of another shape (a model that does not make shapes clips).
    """
    if hasattr(latents, "detach"):
        latents = latents.detach().float().cpu().numpy()
    array = np.asarray(latents, dtype=np.float32)
    if layout == "BFCHW" and array.ndim == 5:
        array = array.transpose(0, 2, 1, 3, 4)
    return as_clips((array + 1.0) / 2.0)


@functools.cache
def reference_features() -> np.ndarray:
    """``clip_features`` of the Frechet reference clips (computed once per process; do not
    modify the returned array)."""
    clips, _ = make_clips(REFERENCE_SEED, REFERENCE_CLIPS, split="all")
    return clip_features(clips)


def check_captions(captions: Sequence[str]) -> None:
    """Refuses prompts that are not dataset captions (``shapes.parse_caption``).

    Raises:
        UserError: naming the caption and the unknown word (or the grammar expected).
    """
    for caption in captions:
        parse_caption(caption)


def evaluation_scores(clips, captions: Sequence[str]) -> dict[str, float]:
    """The ``groundtruth`` metric family of one set of generated clips.

    Args:
        clips: (N, 3, 8, 16, 16) in [0, 1], clip i generated from ``captions[i]``.
        captions: dataset captions.

    Returns:
        ``score_clips``' accuracies (protocol ``ACCURACY_PROTOCOL_ID``) and ``FD_METRIC``,
        the Frechet distance of the clips' features to the dataset reference
        (``FD_PROTOCOL_ID``; with fewer than 2 × ``FEATURE_DIM`` clips it warns).
    """
    clips = as_clips(clips)
    scores = score_clips(clips, captions)
    scores[FD_METRIC] = frechet_distance_of_features(clip_features(clips), reference_features())
    return scores
