"""The metrics of the matrix: the registry, the network metrics, their protocol ids.

Fidelity metrics need nothing and always run; network metrics (FVD, FID, CLIPSIM) need
local weights, given per metric name, and are skipped with a notice when those are absent.
The ground-truth family (``groundtruth``) needs no weights but a model that makes clips of
the shapes dataset (``shapes-wan``) and dataset captions as prompts: it scores each
generated clip against its caption with analytic detectors (``evaluate.groundtruth``).
Frechet metrics carry the protocol id with the detector's SHA-256; numbers under different
protocol ids are never put in one table (``check_protocols``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from qvd_bench.errors import UserError
from qvd_bench.evaluate.results import ALL_STEPS, result_row
from qvd_bench.registry import Registry


@dataclass(frozen=True)
class MetricSpec:
    """A metric of the matrix.

    Attributes:
        name: its name (a key of ``EvalConfig.weights`` for network metrics).
        kind: "fidelity" (always computed, needs nothing), "weights" (needs a local
            network: skipped with a notice when absent) or "groundtruth" (computed when
            asked for, needs shapes clips and dataset captions).
        description: one line.
    """

    name: str
    kind: str
    description: str


METRICS: Registry[MetricSpec] = Registry("metric")
for _spec in (
    MetricSpec("sqnr", "fidelity", "SQNR (dB) against FP, x0-space and final latents"),
    MetricSpec("cosine", "fidelity", "cosine similarity against FP"),
    MetricSpec("psnr", "fidelity", "PSNR (dB) of the final output against FP"),
    MetricSpec("ssim", "fidelity", "SSIM of the final output against FP"),
    MetricSpec("fvd", "weights", "FVD, StyleGAN-V protocol"),
    MetricSpec("fvd-cd", "weights", "FVD, cd-fvd / TATS I3D protocol"),
    MetricSpec("fid", "weights", "per-frame FID, Inception-v3"),
    MetricSpec("clipsim", "weights", "CLIPSIM and CLIP-Temp"),
    MetricSpec(
        "groundtruth",
        "groundtruth",
        "ground truth of shapes clips: colour, shape, motion accuracy, persistence, Frechet "
        "distance of analytic features to dataset clips",
    ),
):
    METRICS.register(_spec.name, _spec)
FIDELITY_METRICS = ("sqnr", "cosine", "psnr", "ssim")


def check_metrics(names: Sequence[str]) -> tuple[str, ...]:
    """The requested metrics plus the fidelity ones (always run), in a stable order.

    Raises:
        UserError: an unknown metric (with a did-you-mean).
    """
    for name in names:
        METRICS.get(name)
    return tuple(dict.fromkeys([*FIDELITY_METRICS, *names]))


def check_protocols(frame: pd.DataFrame) -> None:
    """Refuses a table where one metric is measured under more than one protocol id.

    Raises:
        UserError: naming the metric and the ids.
    """
    if frame.empty:
        return
    ids = frame.groupby("metric")["protocol"].unique()
    for metric, protocols in ids.items():
        protocols = sorted(set(protocols))
        if len(protocols) > 1 and metric not in FIDELITY_METRICS:
            raise UserError(
                f"{metric} is measured under different protocol ids ({', '.join(protocols)}); "
                "numbers of different protocols are never compared"
            )


class WeightMetric:
    """A loaded network metric: features or scores of uint8 videos, with a protocol id."""

    def __init__(self, name: str, path: str):
        self.name = name
        if name in ("fvd", "fvd-cd"):
            from qvd_bench.evaluate.fvd import load_detector

            self.detector = load_detector("stylegan-v" if name == "fvd" else "cd-fvd-i3d400", path)
            self.protocol = self.detector.protocol_id
        elif name == "fid":
            from qvd_bench.evaluate.fid import inception_fid_metric, inception_protocol_id

            self.metric = inception_fid_metric(path)
            self.protocol = inception_protocol_id(path)
        else:
            from qvd_bench.evaluate.clipsim import clip_protocol_id, load_clip

            self.model, self.processor = load_clip(path)
            self.protocol = clip_protocol_id(path)

    def rows(self, videos: torch.Tensor, reference: torch.Tensor, prompts) -> list[dict]:
        n = videos.shape[0]
        if self.name in ("fvd", "fvd-cd"):
            from qvd_bench.evaluate.fvd import fvd

            value = fvd(self.detector.features(reference), self.detector.features(videos))
            return [
                result_row(self.name, "distribution", "cfg", ALL_STEPS, self.protocol, value, n)
            ]
        if self.name == "fid":
            from qvd_bench.evaluate.fid import frame_fid

            self.metric.reset()
            value = frame_fid(self.metric, reference, videos)
            return [result_row("fid", "distribution", "cfg", ALL_STEPS, self.protocol, value, n)]
        from qvd_bench.evaluate.clipsim import clip_scores

        scores = clip_scores(self.model, self.processor, videos, list(prompts)).as_dict()
        return [
            result_row(metric, "distribution", "cfg", ALL_STEPS, self.protocol, scores[metric], n)
            for metric in ("clipsim", "clip_temp")
        ]


def load_weight_metrics(
    metrics: Sequence[str], weights: Mapping[str, str], notices: list[str]
) -> list[WeightMetric]:
    """The requested network metrics whose weights load; a notice for each one skipped.

    Args:
        metrics: metric names (fidelity metrics are passed over).
        weights: metric name -> local weights path.
        notices: where a line per skipped metric is appended; it names the metric's entry
            of ``weights`` as ``weights['<name>']``.
    """
    loaded = []
    for name in metrics:
        spec = METRICS.get(name)
        if spec.kind != "weights":
            continue
        try:
            loaded.append(WeightMetric(name, weights.get(name)))
        except UserError as error:
            notices.append(f"{name} skipped: {error}; pass its path as weights[{name!r}]")
    return loaded


def groundtruth_rows(latents: torch.Tensor, layout: str, prompts) -> list[dict]:
    """The ``groundtruth`` family's result rows of one method's final latents.

    Args:
        latents: final latents of a shapes model, one video per prompt, in ``layout``.
        layout: "BCFHW" or "BFCHW".
        prompts: the dataset captions the videos were generated from.

    Returns:
        Rows (mode "free-running") of ``groundtruth.METRICS`` and, mode "distribution",
        of ``groundtruth.FD_METRIC``; each accuracy is over the caption objects.

    Raises:
        UserError: latents that are not shapes clips.
    """
    from qvd_bench.evaluate import groundtruth

    clips = groundtruth.clips_from_latents(latents, layout)
    scores = groundtruth.evaluation_scores(clips, list(prompts))
    n = clips.shape[0]
    rows = [
        result_row(
            metric, "free-running", "cfg", ALL_STEPS, groundtruth.ACCURACY_PROTOCOL_ID, value, n
        )
        for metric, value in scores.items()
        if metric != groundtruth.FD_METRIC
    ]
    rows.append(
        result_row(
            groundtruth.FD_METRIC,
            "distribution",
            "cfg",
            ALL_STEPS,
            groundtruth.FD_PROTOCOL_ID,
            scores[groundtruth.FD_METRIC],
            n,
        )
    )
    return rows
