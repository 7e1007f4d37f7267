"""Fidelity metrics against torchmetrics and numpy; to_x0 on hand-worked cases."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from qvd_bench.evaluate.fidelity import cosine_similarity, psnr, sqnr, ssim, to_x0


def frames_pair(shape=(4, 3, 24, 20), seed=0):
    g = torch.Generator().manual_seed(seed)
    ref = torch.rand(shape, generator=g)
    test = (ref + 0.05 * torch.randn(shape, generator=g)).clamp(0, 1)
    return ref, test


def test_psnr_matches_torchmetrics():
    ref, test = frames_pair()
    expected = PeakSignalNoiseRatio(data_range=1.0)(test, ref)
    assert float(psnr(ref, test)) == pytest.approx(float(expected), rel=1e-5)
    per_frame = PeakSignalNoiseRatio(data_range=1.0, reduction="none", dim=(1, 2, 3))(test, ref)
    np.testing.assert_allclose(
        psnr(ref, test, per_sample=True).numpy(), per_frame.numpy(), rtol=1e-5
    )
    assert math.isinf(float(psnr(ref, ref)))


def test_ssim_matches_torchmetrics():
    ref, test = frames_pair()
    expected = StructuralSimilarityIndexMeasure(data_range=1.0)(test, ref)
    assert float(ssim(ref, test)) == pytest.approx(float(expected), abs=1e-6)
    per_frame = StructuralSimilarityIndexMeasure(data_range=1.0, reduction="none")(test, ref)
    np.testing.assert_allclose(
        ssim(ref, test, per_sample=True).numpy(), per_frame.numpy(), atol=1e-6
    )
    assert float(ssim(ref, ref)) == pytest.approx(1.0, abs=1e-12)


def test_ssim_valid_border_averages_the_interior_of_the_map():
    from torchmetrics.functional.image import structural_similarity_index_measure

    ref, test = frames_pair()
    _, full = structural_similarity_index_measure(
        test.double(), ref.double(), data_range=1.0, reduction="none", return_full_image=True
    )
    interior = full[..., 5:-5, 5:-5].mean(dim=(1, 2, 3))
    np.testing.assert_allclose(
        ssim(ref, test, per_sample=True, border="valid").numpy(), interior.numpy(), atol=1e-12
    )


def test_ssim_of_videos_is_per_frame():
    ref, test = frames_pair(shape=(2, 3, 3, 16, 16))  # (B, T, C, H, W)
    per_frame = ssim(ref, test, per_sample=True)
    assert per_frame.shape == (2, 3)
    flat = ssim(ref.reshape(6, 3, 16, 16), test.reshape(6, 3, 16, 16), per_sample=True)
    torch.testing.assert_close(per_frame.reshape(6), flat)
    with pytest.raises(ValueError, match="H, W >= 11"):
        ssim(ref[..., :8, :8], test[..., :8, :8])


def test_sqnr_and_cosine_match_numpy():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(3, 4, 5, generator=g)
    test = ref + 0.01 * torch.randn(3, 4, 5, generator=g)
    r, t = ref.double().numpy(), test.double().numpy()
    expected = 10 * np.log10((r**2).sum() / ((r - t) ** 2).sum())
    assert float(sqnr(ref, test)) == pytest.approx(expected, rel=1e-12)
    per = [10 * np.log10((r[i] ** 2).sum() / ((r[i] - t[i]) ** 2).sum()) for i in range(3)]
    np.testing.assert_allclose(sqnr(ref, test, per_sample=True).numpy(), per, rtol=1e-12)
    cos = [
        r[i].ravel() @ t[i].ravel() / np.linalg.norm(r[i]) / np.linalg.norm(t[i]) for i in range(3)
    ]
    np.testing.assert_allclose(
        cosine_similarity(ref, test, per_sample=True).numpy(), cos, rtol=1e-12
    )
    assert float(cosine_similarity(ref, test)) == pytest.approx(np.mean(cos), rel=1e-12)
    assert math.isinf(float(sqnr(ref, ref)))
    with pytest.raises(ValueError, match="shapes differ"):
        sqnr(ref, test[:2])


# alphas_cumprod[3] = 0.64: √ᾱ = 0.8, √(1 − ᾱ) = 0.6. With x0 = 1 and ε = 2:
# x_t = 0.8·1 + 0.6·2 = 2.0 and v = 0.8·2 − 0.6·1 = 1.0.
DDPM_LIKE = SimpleNamespace(
    alphas_cumprod=torch.tensor([0.99, 0.9, 0.8, 0.64]), config={"prediction_type": "epsilon"}
)


def test_to_x0_hand_cases():
    x_t = torch.full((1, 2), 2.0)
    x0 = torch.ones(1, 2, dtype=torch.float64)
    torch.testing.assert_close(to_x0(torch.full((1, 2), 2.0), x_t, 3, DDPM_LIKE), x0)
    torch.testing.assert_close(to_x0(torch.ones(1, 2), x_t, 3, DDPM_LIKE, "v_prediction"), x0)
    torch.testing.assert_close(to_x0(x0.float(), x_t, 3, DDPM_LIKE, "sample"), x0)
    # Flow matching at t = 250: σ = 0.25; x0 = 1, noise = 3 -> x_t = 1.5, v = noise − x0 = 2.
    flow = SimpleNamespace(config={"num_train_timesteps": 1000})
    torch.testing.assert_close(
        to_x0(torch.full((1, 2), 2.0), torch.full((1, 2), 1.5), 250.0, flow), x0
    )


def test_to_x0_per_sample_timesteps_and_a_real_scheduler():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 3, 8, 8, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([10, 900])
    x_t = scheduler.add_noise(x0, noise, t)
    torch.testing.assert_close(
        to_x0(noise, x_t, t, scheduler, "epsilon"), x0.double(), atol=2e-5, rtol=0
    )
    v = scheduler.get_velocity(x0, noise, t)
    torch.testing.assert_close(to_x0(v, x_t, t, scheduler), x0.double(), atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="integer timesteps"):
        to_x0(noise, x_t, torch.tensor([10.5, 900.0]), scheduler, "epsilon")
    with pytest.raises(ValueError, match="unknown prediction_type"):
        to_x0(noise, x_t, t, scheduler, "x0")


def test_x0_of_a_multistep_solver_on_flow_sigmas_is_the_solvers_own():
    """UniPC on flow sigmas (Wan's and SkyReels-V2's scheduler) keeps DDPM betas it does not
    use: x0 is the flow one, x_t − σ·v, as the solver computes it at each step."""
    from diffusers import UniPCMultistepScheduler

    from qvd_bench.evaluate.fidelity import x0_coefficients

    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0
    )
    scheduler.set_timesteps(3)
    g = torch.Generator().manual_seed(0)
    x_t, v = torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 4, 3, 8, 8, generator=g)
    for index, t in enumerate(scheduler.timesteps):
        scheduler._step_index = index
        own = scheduler.convert_model_output(v, sample=x_t).double()
        a, b = x0_coefficients(scheduler, float(t))
        torch.testing.assert_close(a * x_t.double() + b * v.double(), own, atol=1e-6, rtol=0)
        # to_x0 knows no step: its σ is t / 1000 (UniPC rounds its timesteps to integers).
        flow = (x_t - float(t) / 1000 * v).double()
        torch.testing.assert_close(to_x0(v, x_t, float(t), scheduler), flow, atol=1e-6, rtol=0)
