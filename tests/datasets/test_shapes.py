"""The shapes dataset: determinism, ground truth checked on the pixels, captions, the split."""

from __future__ import annotations

import numpy as np
import pytest

from qvd_bench.datasets import shapes
from qvd_bench.datasets.shapes import ObjectSpec
from qvd_bench.errors import UserError


@pytest.fixture(scope="module")
def one_object():
    return shapes.make_clips(seed=0, count=1000)


@pytest.fixture(scope="module")
def two_objects():
    return shapes.make_clips(seed=0, count=200, num_objects=2)


def test_clips_are_bit_identical_for_one_seed_and_differ_across_seeds():
    clips, truths = shapes.make_clips(seed=3, count=50)
    again, again_truths = shapes.make_clips(seed=3, count=50)
    assert clips.dtype == np.float32 and clips.shape == (50, 3, 8, 16, 16)
    assert clips.tobytes() == again.tobytes() and truths == again_truths
    other, _ = shapes.make_clips(seed=4, count=50)
    assert not np.array_equal(clips, other)


def test_a_clip_depends_on_its_index_only_and_redraws_from_its_truth():
    clips, truths = shapes.make_clips(seed=5, count=30)
    tail, tail_truths = shapes.make_clips(seed=5, count=10, start=20)
    assert np.array_equal(clips[20:], tail) and truths[20:] == tail_truths
    for clip, truth in zip(clips, truths):
        assert np.array_equal(shapes.render_truth(truth), clip)
    two, two_truths = shapes.make_clips(seed=5, count=5, num_objects=2)
    assert np.array_equal(two, shapes.make_clips(seed=5, count=5, num_objects=2)[0])
    assert not np.array_equal(two[:, :, :1], clips[:5, :, :1])


def pixel_centroids(clip: np.ndarray, color: tuple[float, float, float]) -> np.ndarray:
    """(F, 2) centroid (x, y) of the pixels of exactly one colour, frame by frame."""
    hit = (clip == np.asarray(color, dtype=np.float32)[:, None, None, None]).all(0)
    ys, xs = np.mgrid[0:16, 0:16]
    area = hit.sum((1, 2))
    assert (area > 0).all()
    return np.stack([(hit * xs).sum((1, 2)) / area, (hit * ys).sum((1, 2)) / area], 1)


def check_clip_against_truth(clip: np.ndarray, truth: shapes.ClipTruth) -> None:
    covered = np.zeros((8, 16, 16), dtype=bool)
    for obj in truth.objects:
        color = np.asarray(shapes.PALETTE[obj.color], dtype=np.float32)
        assert len(obj.boxes) == 8
        for frame, (x, y, w, h) in enumerate(obj.boxes):
            assert x >= 0 and y >= 0 and x + w <= 16 and y + h <= 16
            assert min(w, h) >= 5
            mask = shapes.shape_mask(obj.shape, w, h)
            box = clip[:, frame, y : y + h, x : x + w]
            assert (box[:, mask] == color[:, None]).all()
            covered[frame, y : y + h, x : x + w] |= mask
        # The motion, read from the pixels of the object's colour.
        centres = pixel_centroids(clip, shapes.PALETTE[obj.color])
        areas = (clip == color[:, None, None, None]).all(0).sum((1, 2))
        travel = centres[-1] - centres[0]
        steps = np.diff(centres, axis=0)
        if obj.motion in ("left", "right", "up", "down"):
            step = np.asarray(shapes.DIRECTIONS[obj.motion])
            assert travel @ step == 6 and np.abs(travel).sum() == 6
            assert (steps @ step >= 0).all() and (areas == areas[0]).all()
        elif obj.motion == "still":
            assert (np.abs(centres - centres[0]) == 0).all() and (areas == areas[0]).all()
        else:
            sign = 1 if obj.motion == "grow" else -1
            assert (sign * np.diff(areas) >= 0).all() and sign * (areas[-1] - areas[0]) > 0
            assert np.abs(centres - centres[0]).max() <= 0.5
    background = np.asarray(shapes.BACKGROUND, dtype=np.float32)[:, None]
    assert (clip[:, ~covered] == background).all()


def test_every_object_is_where_its_truth_says_and_moves_as_its_caption_says(one_object):
    clips, truths = one_object
    for clip, truth in zip(clips, truths):
        assert shapes.parse_caption(truth.caption) == truth.specs
        check_clip_against_truth(clip, truth)
    seen = {truth.specs[0] for truth in truths}
    assert seen <= set(shapes.combinations("train"))
    assert {spec.motion for spec in seen} == set(shapes.MOTIONS)
    assert {spec.shape for spec in seen} == set(shapes.SHAPES)
    assert {spec.color for spec in seen} == set(shapes.COLORS)


def test_two_object_clips_keep_their_objects_apart(two_objects):
    clips, truths = two_objects
    for clip, truth in zip(clips, truths):
        first, second = truth.objects
        assert first.color != second.color
        check_clip_against_truth(clip, truth)
        for (ax, ay, aw, ah), (bx, by, bw, bh) in zip(first.boxes, second.boxes):
            assert ax + aw < bx or bx + bw < ax or ay + ah < by or by + bh < ay


def test_captions_round_trip_for_every_combination():
    for spec in shapes.combinations("all"):
        assert shapes.parse_caption(spec.phrase) == (spec,)
    for caption in shapes.heldout_captions("two-object"):
        specs = shapes.parse_caption(caption)
        assert len(specs) == 2 and shapes.caption_of(specs) == caption
    assert shapes.parse_caption("  A Red Disc  moving LEFT ") == (
        ObjectSpec("disc", "red", "left"),
    )


def test_unknown_words_and_bad_grammar_are_one_line_errors():
    with pytest.raises(UserError, match="unknown word 'purple'") as info:
        shapes.parse_caption("a purple disc moving left")
    message = str(info.value)
    assert "\n" not in message and "vocabulary: a and bar blue" in message
    for bad in ("a disc red moving left", "a red disc moving", "a red disc moving left and"):
        with pytest.raises(UserError, match="cannot read caption"):
            shapes.parse_caption(bad)
    with pytest.raises(UserError, match="seed must be"):
        shapes.make_clips(seed=-1, count=2)
    with pytest.raises(UserError, match="unknown split"):
        shapes.make_clips(seed=0, count=2, split="test")
    with pytest.raises(UserError, match="do not fit apart"):
        shapes.render_caption("a red horizontal bar moving right and a blue vertical bar moving up")


def test_heldout_split_is_fixed_disjoint_and_covers_every_pair():
    train, unseen = set(shapes.combinations("train")), set(shapes.combinations("unseen"))
    assert len(train) == 144 and len(unseen) == 24 and not train & unseen
    assert train | unseen == set(shapes.combinations("all"))
    assert ObjectSpec("square", "red", "left") in unseen  # indices 0 + 0 + 0
    # Unseen triples are new combinations of attribute pairs seen in training.
    for spec in unseen:
        assert any(s.shape == spec.shape and s.color == spec.color for s in train)
        assert any(s.shape == spec.shape and s.motion == spec.motion for s in train)
        assert any(s.color == spec.color and s.motion == spec.motion for s in train)
    assert len(shapes.heldout_captions("unseen")) == 24
    assert {shapes.parse_caption(c)[0] for c in shapes.heldout_captions("unseen")} == unseen
    assert len(set(shapes.heldout_captions("seen"))) == 144
    _, truths = shapes.make_clips(seed=1, count=300)
    assert not {truth.specs[0] for truth in truths} & unseen
    _, truths = shapes.make_clips(seed=1, count=100, split="unseen")
    assert {truth.specs[0] for truth in truths} <= unseen


def test_render_caption_draws_any_caption_the_same_way_for_a_seed():
    clip, truth = shapes.render_caption("a green square moving right", seed=7)
    assert truth.caption == "a green square moving right"
    assert np.array_equal(clip, shapes.render_caption(truth.specs, seed=7)[0])
    check_clip_against_truth(clip, truth)
