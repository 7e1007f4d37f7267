"""Ground-truth detectors: accurate on dataset clips, and wrong clips are caught."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from qvd_bench.datasets import shapes
from qvd_bench.errors import UserError
from qvd_bench.evaluate import groundtruth
from qvd_bench.evaluate.frechet import SampleSizeWarning

FOUR = ("gt_color_acc", "gt_shape_acc", "gt_motion_acc", "gt_persistence")


@pytest.fixture(scope="module")
def dataset():
    clips, truths = shapes.make_clips(seed=11, count=1200)
    return clips, [truth.caption for truth in truths], truths


def noisy(clips: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(clips.shape).astype(np.float32)
    return np.clip(clips + sigma * noise, 0.0, 1.0)


def test_detectors_are_right_on_dataset_clips(dataset):
    clips, captions, _ = dataset
    scores = groundtruth.score_clips(clips, captions)
    assert set(scores) == set(groundtruth.METRICS)
    # Measured: 1.0 on all of them.
    assert all(scores[name] >= 0.99 for name in FOUR), scores
    assert scores["gt_all_acc"] == 1.0


def test_detectors_are_right_on_noisy_clips(dataset):
    clips, captions, _ = dataset
    scores = groundtruth.score_clips(noisy(clips, 0.1), captions)
    assert all(scores[name] >= 0.99 for name in FOUR), scores


def test_detectors_are_right_on_two_object_clips():
    clips, truths = shapes.make_clips(seed=12, count=200, num_objects=2)
    captions = [truth.caption for truth in truths]
    for batch in (clips, noisy(clips, 0.1)):
        scores = groundtruth.score_clips(batch, captions)
        assert all(scores[name] >= 0.99 for name in FOUR), scores


def test_detections_report_the_trajectory(dataset):
    clips, captions, truths = dataset
    detection = groundtruth.detect(clips[:1], captions[:1])[0]
    (obj,) = detection.objects
    assert detection.caption == captions[0] and obj.all_ok
    expected = truths[0].objects[0]
    assert np.allclose(np.asarray(obj.centers), expected.centers())
    masks = [shapes.shape_mask(obj.shape, w, h).sum() for _, _, w, h in expected.boxes]
    assert list(obj.areas) == masks


def test_a_wrong_colour_is_caught(dataset):
    clips, captions, truths = dataset
    recoloured = clips.copy()
    for clip, truth in zip(recoloured, truths):
        old = np.asarray(shapes.PALETTE[truth.objects[0].color], dtype=np.float32)
        new = shapes.COLORS[(shapes.COLORS.index(truth.objects[0].color) + 1) % 6]
        hit = (clip == old[:, None, None, None]).all(0)
        clip[:, hit] = np.asarray(shapes.PALETTE[new], dtype=np.float32)[:, None]
    scores = groundtruth.score_clips(recoloured, captions)
    assert scores["gt_color_acc"] == 0.0 and scores["gt_shape_acc"] == 1.0


def moving(truths) -> np.ndarray:
    return np.array([truth.objects[0].motion != "still" for truth in truths])


def test_reversed_motion_is_caught(dataset):
    clips, captions, truths = dataset
    keep = moving(truths)
    reversed_clips = clips[keep][:, :, ::-1]
    captions = [c for c, k in zip(captions, keep) if k]
    for batch in (reversed_clips, noisy(reversed_clips, 0.1)):
        scores = groundtruth.score_clips(batch, captions)
        assert scores["gt_motion_acc"] == 0.0 and scores["gt_persistence"] == 1.0


def test_shuffled_frames_are_caught(dataset):
    clips, captions, truths = dataset
    rng = np.random.default_rng(0)
    shuffled, kept = [], []
    for clip, caption, truth in zip(clips, captions, truths):
        if truth.objects[0].motion == "still":
            continue
        order = rng.permutation(8)
        if np.array_equal(clip[:, order], clip):  # a permutation of identical frames only
            continue
        shuffled.append(clip[:, order])
        kept.append(caption)
    assert len(kept) > 900
    scores = groundtruth.score_clips(np.stack(shuffled), kept)
    # Measured: 0.0 (no shuffled clip passes for its caption's motion).
    assert scores["gt_motion_acc"] <= 0.01, scores


def test_an_object_missing_from_one_frame_or_a_second_object_breaks_persistence(dataset):
    clips, captions, _ = dataset
    removed = clips.copy()
    frames = np.random.default_rng(1).integers(0, 8, len(clips))
    removed[np.arange(len(clips)), :, frames] = 0.0
    scores = groundtruth.score_clips(noisy(removed, 0.1), captions)
    assert scores["gt_persistence"] == 0.0 and scores["gt_color_acc"] == 1.0
    doubled = clips.copy()
    doubled[:, :, :, 1:3, 1:7] = np.maximum(clips[:, :, :, 1:3, 1:7], 0.5)  # a grey 2x6 bar
    broken = groundtruth.score_clips(doubled, captions)
    assert broken["gt_persistence"] < 0.5


def test_clips_as_torch_tensors_and_single_clips(dataset):
    clips, captions, _ = dataset
    scores = groundtruth.score_clips(torch.from_numpy(clips[:8]), captions[:8])
    assert scores == groundtruth.score_clips(clips[:8], captions[:8])
    assert groundtruth.score_clips(clips[0], captions[:1])["gt_all_acc"] == 1.0


def test_bad_input_is_a_one_line_error(dataset):
    clips, captions, _ = dataset
    for bad in (clips[:2, :, :4], clips[:2].transpose(0, 2, 1, 3, 4), clips[:2, 0]):
        with pytest.raises(UserError, match=r"clips must be \(N, 3, 8, 16, 16\)") as info:
            groundtruth.score_clips(bad, captions[:2])
        assert "\n" not in str(info.value) and "got shape" in str(info.value)
    with pytest.raises(UserError, match="one caption per clip"):
        groundtruth.score_clips(clips[:2], captions[:3])
    with pytest.raises(UserError, match="unknown word 'teal'"):
        groundtruth.score_clips(clips[:1], ["a teal disc moving left"])
    nan = clips[:1].copy()
    nan[0, 0, 0, 0, 0] = np.nan
    with pytest.raises(UserError, match="NaN"):
        groundtruth.score_clips(nan, captions[:1])


def test_feature_frechet_distance_separates_wrong_clips(dataset):
    clips, _, _ = dataset
    reference, _ = shapes.make_clips(seed=99, count=400)
    features = groundtruth.clip_features(clips)
    assert features.shape == (len(clips), groundtruth.FEATURE_DIM)
    assert np.isfinite(features).all()
    assert groundtruth.PROTOCOL_ID.startswith("groundtruth-fd/")
    same = groundtruth.groundtruth_fd(clips[:400], reference)
    order = np.random.default_rng(0).permuted(np.tile(np.arange(8), (400, 1)), axis=1)
    shuffled = np.stack([clip[:, o] for clip, o in zip(clips[400:800], order)])
    empty = np.zeros_like(clips[:400])
    assert groundtruth.groundtruth_fd(shuffled, reference) > 3 * same
    assert groundtruth.groundtruth_fd(empty, reference) > 10 * same
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groundtruth.groundtruth_fd(clips[:10], reference)
    assert any(issubclass(w.category, SampleSizeWarning) for w in caught)
