"""Fidelity of a quantized model against the full-precision one: SQNR, cosine, PSNR, SSIM.

SQNR and cosine similarity compare any two tensors (denoiser outputs, latents); compare
outputs in x0-space (``to_x0``) so that ε-, v- and flow-prediction models are on one
footing. PSNR and SSIM compare frames with values in [0, 1] (data_range 1).

Every metric comes per sample (over all dimensions but the first) and aggregated. The
aggregate of SQNR and PSNR is taken from the total energies (not the mean of dB values),
as torchmetrics' ``PeakSignalNoiseRatio`` does; the aggregate of cosine and SSIM is the
mean over samples (for SSIM: over frames), as torchmetrics' SSIM does. All arithmetic is in
float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

F64 = torch.float64


def _pair(reference: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    if reference.shape != test.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} and {tuple(test.shape)}")
    return reference.detach().to(F64), test.detach().to(F64)


def _per_sample(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(1, -1)


def sqnr(reference: Tensor, test: Tensor, per_sample: bool = False) -> Tensor:
    """Signal-to-quantization-noise ratio in dB: 10·log10(Σ ref² / Σ (ref − test)²).

    Args:
        reference: the full-precision tensor, (B, ...).
        test: the quantized one, same shape.
        per_sample: one value per index of dim 0 instead of one over everything.

    Returns:
        () or (B,) float64; +inf where the two are equal.
    """
    ref, out = _pair(reference, test)
    if per_sample:
        ref, out = _per_sample(ref), _per_sample(out)
        signal, noise = ref.square().sum(1), (ref - out).square().sum(1)
    else:
        signal, noise = ref.square().sum(), (ref - out).square().sum()
    return 10.0 * torch.log10(signal / noise)


def cosine_similarity(reference: Tensor, test: Tensor, per_sample: bool = False) -> Tensor:
    """Cosine similarity of the flattened tensors (per sample: of each flattened sample).

    Args:
        reference, test: (B, ...) of one shape.
        per_sample: (B,) values instead of their mean.

    Returns:
        () or (B,) float64; the aggregate is the mean of the per-sample values.
    """
    ref, out = _pair(reference, test)
    ref, out = _per_sample(ref), _per_sample(out)
    values = F.cosine_similarity(ref, out, dim=1, eps=1e-30)
    return values if per_sample else values.mean()


def psnr(
    reference: Tensor, test: Tensor, data_range: float = 1.0, per_sample: bool = False
) -> Tensor:
    """Peak signal-to-noise ratio in dB: 10·log10(data_range² / MSE).

    Args:
        reference, test: frames in [0, data_range], (B, ...) of one shape (e.g. frames
            (N, C, H, W) or videos (B, T, C, H, W)).
        data_range: the value span, 1 for frames in [0, 1].
        per_sample: (B,) values (MSE per sample) instead of one over everything.

    Returns:
        () or (B,) float64; +inf where the two are equal.
    """
    ref, out = _pair(reference, test)
    if per_sample:
        mse = (_per_sample(ref) - _per_sample(out)).square().mean(1)
    else:
        mse = (ref - out).square().mean()
    return 10.0 * torch.log10(data_range**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    """Normalised 1-d Gaussian window (size,) float64, centred on the middle tap."""
    offsets = torch.arange(size, dtype=F64) - (size - 1) / 2.0
    window = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return window / window.sum()


def ssim(
    reference: Tensor,
    test: Tensor,
    data_range: float = 1.0,
    per_sample: bool = False,
    window_size: int = 11,
    sigma: float = 1.5,
    border: str = "reflect",
) -> Tensor:
    """Structural similarity (Wang et al. 2004) per frame, 11×11 Gaussian window σ = 1.5.

    Local means, variances (clamped at 0) and covariance come from the separable Gaussian
    filter on each channel; constants C1 = (0.01·L)², C2 = (0.03·L)² with L = data_range.
    A frame's SSIM is the mean of its SSIM map over channels and positions. With
    ``border="reflect"`` the frame is reflect-padded so the map covers every pixel, as
    torchmetrics' ``StructuralSimilarityIndexMeasure`` does; ``border="valid"`` averages
    only where the window fits, as Wang et al.'s reference code and scikit-image do. The
    two differ by the weight they give the border pixels.

    Args:
        reference, test: frames (..., C, H, W) with H, W >= window_size; leading
            dimensions are flattened into frames.
        data_range: the value span, 1 for frames in [0, 1].
        per_sample: one value per frame, shaped like the leading dimensions.
        window_size, sigma: the Gaussian window.
        border: ``"reflect"`` (torchmetrics) or ``"valid"`` (Wang et al., scikit-image).

    Returns:
        () float64 mean over frames, or the per-frame values.
    """
    if border not in ("reflect", "valid"):
        raise ValueError(f"border must be 'reflect' or 'valid', got {border!r}")
    ref, out = _pair(reference, test)
    if ref.ndim < 3 or min(ref.shape[-2:]) < window_size:
        raise ValueError(
            f"expected frames (..., C, H, W) with H, W >= {window_size}, got {tuple(ref.shape)}"
        )
    leading, (c, h, w) = ref.shape[:-3], ref.shape[-3:]
    # Channels become batch entries so one single-channel filter serves all of them.
    x = ref.reshape(-1, 1, h, w)
    y = out.reshape(-1, 1, h, w)
    if border == "reflect":
        pad = (window_size - 1) // 2
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        y = F.pad(y, (pad, pad, pad, pad), mode="reflect")
    window = gaussian_window(window_size, sigma).to(x.device)
    stacked = torch.cat([x, y, x * x, y * y, x * y])
    filtered = F.conv2d(F.conv2d(stacked, window.view(1, 1, 1, -1)), window.view(1, 1, -1, 1))
    mu_x, mu_y, xx, yy, xy = filtered.chunk(5)
    var_x = (xx - mu_x**2).clamp(min=0.0)
    var_y = (yy - mu_y**2).clamp(min=0.0)
    cov_xy = xy - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    per_frame = ssim_map.reshape(-1, c, *ssim_map.shape[-2:]).mean(dim=(1, 2, 3))
    return per_frame.reshape(leading) if per_sample else per_frame.mean()


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def _broadcast(values: Tensor, like: Tensor) -> Tensor:
    """(B,) or () per-sample values -> shape (B, 1, 1, ...) to scale ``like``."""
    return values.reshape(-1, *([1] * (like.ndim - 1))) if values.ndim else values


def to_x0(
    prediction: Tensor,
    latents: Tensor,
    timestep: Tensor | float | int,
    scheduler,
    prediction_type: str | None = None,
) -> Tensor:
    """Converts a denoiser output to its estimate of the clean sample x0.

    With ᾱ_t = ``scheduler.alphas_cumprod[t]`` (DDPM-family schedulers) and
    x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε:

    - ``"epsilon"``: x0 = (x_t − √(1 − ᾱ_t)·ε̂) / √ᾱ_t
    - ``"v_prediction"`` (v = √ᾱ_t·ε − √(1 − ᾱ_t)·x0): x0 = √ᾱ_t·x_t − √(1 − ᾱ_t)·v̂
    - ``"sample"``: x0 = the prediction
    - ``"flow"`` (rectified flow, x_t = (1 − σ)·x0 + σ·noise, v = noise − x0):
      x0 = x_t − σ·v̂ with σ = t / num_train_timesteps (1000 unless the scheduler's config
      says otherwise), as diffusers' flow-matching schedulers set t = σ·1000.

    Args:
        prediction: the denoiser output, (B, ...).
        latents: x_t, the denoiser input, same shape.
        timestep: () or (B,) timesteps; integer indices into ``alphas_cumprod`` except
            for ``"flow"``.
        scheduler: a diffusers scheduler (its ``alphas_cumprod`` or config is read).
        prediction_type: one of ``PREDICTION_TYPES``; by default the scheduler config's
            ``prediction_type``, or ``"flow"`` for flow-matching schedulers (``_is_flow``).

    Returns:
        x0, float64, shaped like ``prediction``.
    """
    config = getattr(scheduler, "config", {})
    if prediction_type is None:
        if _is_flow(scheduler):
            prediction_type = "flow"
        else:
            prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; known: {', '.join(PREDICTION_TYPES)}"
        )
    if prediction.shape != latents.shape:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and latents {tuple(latents.shape)} differ"
        )
    pred, x_t = prediction.detach().to(F64), latents.detach().to(F64)
    t = torch.as_tensor(timestep, device=pred.device)
    if prediction_type == "sample":
        return pred
    if prediction_type == "flow":
        total = config.get("num_train_timesteps", 1000)
        sigma = _broadcast(t.to(F64) / total, pred)
        return x_t - sigma * pred
    alphas = torch.as_tensor(scheduler.alphas_cumprod).to(device=pred.device, dtype=F64)
    if t.is_floating_point() and not bool((t == t.round()).all()):
        raise ValueError(f"{prediction_type} needs integer timesteps, got {t.tolist()}")
    alpha = _broadcast(alphas[t.long()], pred)
    sqrt_alpha, sqrt_one_minus = alpha.sqrt(), (1.0 - alpha).sqrt()
    if prediction_type == "epsilon":
        return (x_t - sqrt_one_minus * pred) / sqrt_alpha
    return sqrt_alpha * x_t - sqrt_one_minus * pred


def x0_coefficients(scheduler, timestep: float) -> tuple[float, float]:
    """(a, b) with x0 = a·model_input + b·prediction for one step of a diffusers scheduler.

    ``model_input`` is what the denoiser saw at that step (the scheduler's
    ``scale_model_input`` of x_t). For every DDPM-family scheduler that input is the
    variance-preserving x_t = √ᾱ·x0 + √(1 − ᾱ)·ε: DDIM-like schedulers feed x_t as it is,
    and sigma-parameterized ones (Euler, Karras) feed x_t/√(σ² + 1), which is that x_t with
    ᾱ = 1/(σ² + 1). So ``to_x0``'s formulas hold with ᾱ from the step's σ where the
    scheduler has sigmas, else from ``alphas_cumprod[t]``. Flow-matching schedulers (no
    ``alphas_cumprod``, or UniPC / DPM-Solver on flow sigmas): x0 = x_t − σ·v, with the
    step's σ (t / num_train_timesteps where the scheduler keeps no sigmas); with
    ``invert_sigmas`` (Mochi) the scheduler's σ is 1 − the noise level and the model
    predicts x0 − noise: x0 = x_t + (1 − σ)·v̂.

    Args:
        scheduler: the scheduler after the run (its ``timesteps`` and ``sigmas`` are those
            of the run's steps).
        timestep: the step's timestep value as the denoiser received it.

    Returns:
        (a, b) as Python floats.
    """
    config = getattr(scheduler, "config", {})
    sigma = _step_sigma(scheduler, timestep)
    if _is_flow(scheduler):
        if sigma is None:
            sigma = timestep / config.get("num_train_timesteps", 1000)
        if config.get("invert_sigmas"):
            # Mochi: the schedule runs s = 1 − σ upwards, x_t = s·x0 + (1 − s)·noise, and
            # the model predicts dx/ds = x0 − noise, so x0 = x_t + (1 − s)·prediction.
            return 1.0, 1.0 - float(sigma)
        return 1.0, -float(sigma)
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES or prediction_type == "flow":
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    if prediction_type == "sample":
        return 0.0, 1.0
    if sigma is not None:
        alpha = 1.0 / (float(sigma) ** 2 + 1.0)
    else:
        if timestep != round(timestep):
            raise ValueError(f"{prediction_type} needs integer timesteps, got {timestep}")
        alpha = float(torch.as_tensor(scheduler.alphas_cumprod, dtype=F64)[int(round(timestep))])
    sqrt_alpha, sqrt_one_minus = alpha**0.5, (1.0 - alpha) ** 0.5
    if prediction_type == "epsilon":
        return 1.0 / sqrt_alpha, -sqrt_one_minus / sqrt_alpha
    return sqrt_alpha, -sqrt_one_minus


def _is_flow(scheduler) -> bool:
    """A flow-matching schedule: a scheduler without ``alphas_cumprod``, or a multistep
    solver on flow sigmas (UniPC or DPM-Solver with ``prediction_type="flow_prediction"``,
    as Wan and SkyReels-V2 ship them; they keep betas they do not use)."""
    config = getattr(scheduler, "config", {})
    return (
        not hasattr(scheduler, "alphas_cumprod")
        or config.get("prediction_type") == "flow_prediction"
    )


def _step_sigma(scheduler, timestep: float) -> float | None:
    """The σ of the scheduler step whose timestep is ``timestep``, or None without sigmas."""
    sigmas = getattr(scheduler, "sigmas", None)
    timesteps = getattr(scheduler, "timesteps", None)
    if sigmas is None or timesteps is None or len(timesteps) == 0:
        return None
    values = torch.as_tensor(timesteps, dtype=F64).cpu()
    index = int((values - timestep).abs().argmin())
    if abs(float(values[index]) - timestep) > 1e-3 * max(1.0, abs(timestep)):
        return None
    return float(torch.as_tensor(sigmas, dtype=F64).cpu()[index])
