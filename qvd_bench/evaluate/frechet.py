"""Frechet distance between Gaussian fits of two feature sets, and its statistics.

The Frechet (2-Wasserstein) distance between N(μ1, Σ1) and N(μ2, Σ2) is

    FD = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr √(Σ1 Σ2).

Σ1 Σ2 is not symmetric, which is why pytorch-fid, clean-fid and StyleGAN-V take a general
matrix square root (``scipy.linalg.sqrtm``, a Schur decomposition in complex arithmetic)
and torchmetrics takes ``eigvals(Σ1 Σ2)``. Both are slow and can return spurious
imaginary parts. With Σ1 = L Lᵀ (any factor L), Σ1 Σ2 = L (Lᵀ Σ2) has the same eigenvalues
as Lᵀ Σ2 L, which is symmetric positive semi-definite, so

    tr √(Σ1 Σ2) = Σ_i √λ_i(Lᵀ Σ2 L),

computed here in float64 with a Cholesky factor and ``eigvalsh`` (eigenvalues only),
rounding negatives to zero. A singular Σ1 (fewer samples than dimensions) has no Cholesky
factor; then L = V·diag(√λ) from ``eigh(Σ1)`` is used, which is slower but exact. The
"eigh square roots" form (``trace_sqrt_product_eigh``: S = √Σ1 by ``eigh``, then
``eigvalsh(S Σ2 S)``) is kept for comparison; ``qvd-bench perf frechet`` measures both.

Covariances divide by N by default, as StyleGAN-V and cd-fvd do for FVD (``ddof=0``);
pytorch-fid, clean-fid and torchmetrics divide by N − 1 for FID (``ddof=1``).

FD is biased upward by about 1/N (two samples of one distribution give FD > 0); below
N = 2 × dim the bias dominates small differences, and a ``SampleSizeWarning`` says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from qvd_bench.collect.accumulator import ACCUMULATORS, Accumulator

F64 = torch.float64


class SampleSizeWarning(UserWarning):
    """Fewer samples than twice the feature dimension: the FD bias (∝ 1/N) is large."""


def warn_sample_size(n: int, dim: int) -> None:
    """Warns when ``n < 2 * dim`` (the Frechet distance is then dominated by its bias)."""
    if n < 2 * dim:
        warnings.warn(
            f"Frechet distance from N={n} samples of {dim}-d features: N < 2 x dim, so its "
            f"bias (about 1/N) is large; compare numbers only at equal N, or use more samples",
            SampleSizeWarning,
            stacklevel=3,
        )


def _as_f64(x) -> Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).to(F64)


def _symmetric(a: Tensor) -> Tensor:
    return (a + a.mT) * 0.5


def _psd_factor(cov: Tensor) -> Tensor:
    """A factor L with L Lᵀ = cov: Cholesky, or V·√λ from eigh when cov is singular."""
    factor, info = torch.linalg.cholesky_ex(cov)
    if int(info) == 0:
        return factor
    eigenvalues, vectors = torch.linalg.eigh(cov)
    return vectors * eigenvalues.clamp(min=0.0).sqrt()


def trace_sqrt_product(cov1: Tensor, cov2: Tensor) -> float:
    """tr √(Σ1 Σ2) through a Cholesky factor of Σ1 and ``eigvalsh`` (module doc).

    Args:
        cov1, cov2: (d, d) symmetric positive semi-definite, float64.
    """
    factor = _psd_factor(cov1)
    inner = _symmetric(factor.mT @ (cov2 @ factor))
    return float(torch.linalg.eigvalsh(inner).clamp(min=0.0).sqrt().sum())


def trace_sqrt_product_eigh(cov1: Tensor, cov2: Tensor) -> float:
    """tr √(Σ1 Σ2) through the symmetric square root of Σ1 (``eigh``); the slower form."""
    eigenvalues, vectors = torch.linalg.eigh(cov1)
    root = (vectors * eigenvalues.clamp(min=0.0).sqrt()) @ vectors.mT
    inner = _symmetric(root @ cov2 @ root)
    return float(torch.linalg.eigvalsh(inner).clamp(min=0.0).sqrt().sum())


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Frechet distance between two Gaussians, in float64 (formula in the module doc).

    Agrees with the ``scipy.linalg.sqrtm(Σ1 @ Σ2)`` computation to about
    1e-9·(tr Σ1 + tr Σ2) on well-conditioned inputs, and stays real on singular ones.
    Rounding that takes it below zero is clamped (a distance is never negative), and
    identical Gaussians give exactly 0.

    Args:
        mu1, mu2: (d,) means (tensors or arrays).
        cov1, cov2: (d, d) covariances.

    Returns:
        The distance, a Python float, at least 0.
    """
    mu1, mu2, cov1, cov2 = (_as_f64(x) for x in (mu1, mu2, cov1, cov2))
    d = mu1.shape[0]
    if mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(
            f"expected means (d,) and covariances (d, d), got {tuple(mu1.shape)}, "
            f"{tuple(cov1.shape)}, {tuple(mu2.shape)}, {tuple(cov2.shape)}"
        )
    if torch.equal(mu1, mu2) and torch.equal(cov1, cov2):
        return 0.0  # a set against itself: exactly, not a rounding error either side of 0
    cov1, cov2 = _symmetric(cov1), _symmetric(cov2)
    diff = mu1 - mu2
    trace_sqrt = trace_sqrt_product(cov1, cov2)
    distance = float(diff @ diff) + float(cov1.trace() + cov2.trace()) - 2.0 * trace_sqrt
    return max(distance, 0.0)


class FeatureStats(Accumulator):
    """Streaming sufficient statistics of features: count, sum and sum of outer products.

    Merging adds the three sums, so it is exact up to float64 rounding (bitwise exact for
    data whose sums are representable) and independent of batching and order. It is the
    state StyleGAN-V, cd-fvd and torchmetrics keep; the covariance S/N − μμᵀ loses about
    log10((|μ|/σ)²) digits of float64's 16 when the mean is large against the spread,
    which does not happen for network logits and pooled activations.

    Args:
        num_features: d.
        device: where the state starts; it follows the inputs of ``update``.

    State: count () float64; total (d,) float64; outer (d, d) float64.
    """

    STATE = ("count", "total", "outer")

    def __init__(self, num_features: int, device: torch.device | str | None = None):
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.count = torch.zeros((), dtype=F64, device=device)
        self.total = torch.zeros(num_features, dtype=F64, device=device)
        self.outer = torch.zeros(num_features, num_features, dtype=F64, device=device)

    @property
    def num_features(self) -> int:
        return self.total.shape[0]

    @property
    def n(self) -> int:
        return int(self.count)

    def _validate(self) -> None:
        d = self.total.shape[0] if self.total.ndim == 1 else -1
        if self.count.shape != () or d < 1 or self.outer.shape != (d, d):
            raise ValueError("FeatureStats state needs count (), total (d,) and outer (d, d)")

    def update(self, features: Tensor) -> None:
        """Adds features (N, d) of any float dtype (accumulated in float64)."""
        features = torch.as_tensor(features).detach()
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(
                f"expected features (N, {self.num_features}), got {tuple(features.shape)}"
            )
        if features.device != self.device:
            self.to(features.device)
        x = features.to(F64)
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.outer += x.mT @ x

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Adds another's sums; returns self."""
        other = self._mergeable(other)
        if other.num_features != self.num_features:
            raise ValueError(
                f"cannot merge {other.num_features}-d feature statistics into "
                f"{self.num_features}-d ones"
            )
        self.count += other.count
        self.total += other.total
        self.outer += other.outer
        return self

    def mean(self) -> Tensor:
        """(d,) float64."""
        if self.n < 1:
            raise ValueError("FeatureStats holds no features")
        return self.total / self.count

    def cov(self, ddof: int = 0) -> Tensor:
        """(d, d) float64 covariance: divides by N − ddof (0: StyleGAN-V, 1: FID tools)."""
        if self.n <= ddof:
            raise ValueError(f"covariance with ddof={ddof} needs more than {ddof} features")
        mu = self.mean()
        scatter = self.outer - self.count * torch.outer(mu, mu)
        return _symmetric(scatter) / (self.count - ddof)

    def distance(self, other: FeatureStats, ddof: int = 0) -> float:
        """Frechet distance to another set; warns when either has N < 2 × d."""
        for stats in (self, other):
            warn_sample_size(stats.n, stats.num_features)
        return frechet_distance(self.mean(), self.cov(ddof), other.mean(), other.cov(ddof))

    @classmethod
    def of(cls, features: Tensor) -> FeatureStats:
        """Statistics of one (N, d) array of features."""
        features = torch.as_tensor(features)
        stats = cls(features.shape[-1], device=features.device)
        stats.update(features)
        return stats


# Lets collect.distributed.merge_across_processes rebuild FeatureStats by name.
ACCUMULATORS.setdefault(FeatureStats.__name__, FeatureStats)


def frechet_distance_of_features(features_a, features_b, ddof: int = 0) -> float:
    """Frechet distance between the Gaussian fits of two (N, d) feature arrays."""
    a = FeatureStats.of(_as_f64(features_a))
    b = FeatureStats.of(_as_f64(features_b))
    return a.distance(b, ddof)


@dataclass(frozen=True)
class BootstrapInterval:
    """A bootstrap interval of a Frechet distance.

    Attributes:
        point: the distance on all the data.
        low, high: the interval at ``level``.
        level: e.g. 0.95.
        n_boot: number of resamples.
        shift: median of the resampled distances minus ``point`` (their extra bias).
    """

    point: float
    low: float
    high: float
    level: float
    n_boot: int
    shift: float


def _weighted_fd(x_a: Tensor, x_b: Tensor, weights: Tensor, ddof: int) -> float:
    stats = []
    for x in (x_a, x_b):
        n = weights.sum()
        mu = (weights @ x) / n
        centred = x - mu
        cov = (centred.mT * weights) @ centred / (n - ddof)
        stats.append((mu, cov))
    (mu_a, cov_a), (mu_b, cov_b) = stats
    return frechet_distance(mu_a, cov_a, mu_b, cov_b)


def bootstrap_interval(
    features_a,
    features_b,
    prompt_ids: Sequence | np.ndarray | Tensor,
    n_boot: int = 200,
    seed: int = 0,
    level: float = 0.95,
    ddof: int = 0,
) -> BootstrapInterval:
    """Bootstrap interval of FD(a, b), resampling prompts jointly for both sets.

    Row i of ``features_a`` and row i of ``features_b`` belong to prompt ``prompt_ids[i]``
    (e.g. the FP and the quantized generation of one prompt and seed; a prompt may own
    several rows). Each resample draws as many prompts as there are, with replacement, and
    takes all rows of the drawn prompts from both sets, so the pairing is kept.

    Resampling with replacement repeats rows, which raises FD's small-sample bias: the
    resampled distances sit above the point estimate by ``shift`` (their median minus the
    point). The interval therefore uses the spread of the resamples around their median,
    placed on the point estimate: [point − (median − q_lo), point + (q_hi − median)],
    with q_lo, q_hi the (1 ± level)/2 quantiles. It always contains the point estimate.

    Args:
        features_a, features_b: (N, d) features.
        prompt_ids: (N,) hashable prompt identifiers (ints or strings).
        n_boot: number of resamples.
        seed: seed of the resampling (numpy's default generator).
        level: coverage of the interval, in (0, 1).
        ddof: covariance normalisation, 0 (divide by N) or 1.

    Returns:
        A ``BootstrapInterval``.
    """
    x_a, x_b = _as_f64(features_a), _as_f64(features_b)
    if x_a.ndim != 2 or x_a.shape != x_b.shape:
        raise ValueError(
            f"expected two (N, d) feature arrays of one shape, got {tuple(x_a.shape)} and "
            f"{tuple(x_b.shape)}"
        )
    ids = prompt_ids.cpu().numpy() if isinstance(prompt_ids, Tensor) else np.asarray(prompt_ids)
    if ids.shape != (x_a.shape[0],):
        raise ValueError(f"expected prompt_ids ({x_a.shape[0]},), got {ids.shape}")
    if not 0.0 < level < 1.0 or n_boot < 1:
        raise ValueError(f"need 0 < level < 1 and n_boot >= 1, got {level}, {n_boot}")
    warn_sample_size(x_a.shape[0], x_a.shape[1])
    _, row_prompt = np.unique(ids, return_inverse=True)
    n_prompts = int(row_prompt.max()) + 1
    row_prompt = torch.from_numpy(row_prompt.reshape(-1))

    point = _weighted_fd(x_a, x_b, torch.ones(x_a.shape[0], dtype=F64), ddof)
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    for i in range(n_boot):
        drawn = np.bincount(rng.integers(0, n_prompts, n_prompts), minlength=n_prompts)
        weights = torch.from_numpy(drawn.astype(np.float64))[row_prompt]
        values[i] = _weighted_fd(x_a, x_b, weights, ddof)
    tail = (1.0 - level) / 2.0
    q_lo, median, q_hi = np.quantile(values, [tail, 0.5, 1.0 - tail])
    return BootstrapInterval(
        point=point,
        low=point - (median - q_lo),
        high=point + (q_hi - median),
        level=level,
        n_boot=n_boot,
        shift=float(median - point),
    )
