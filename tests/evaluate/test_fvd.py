"""FVD end to end under both protocols, with detectors built here (never downloaded)."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import Tensor, nn

from qvd_bench.errors import UserError
from qvd_bench.evaluate.frechet import SampleSizeWarning
from qvd_bench.evaluate.fvd import PROTOCOLS, fvd, load_detector, to_uint8_videos
from tests.evaluate.helpers import ScriptedDetector, random_videos

# The StyleGAN-V detector is TorchScript by publication; torch's deprecation notice is noise.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory):
    from cdfvd.third_party.i3d.pytorch_i3d import InceptionI3d

    torch.manual_seed(0)
    model = InceptionI3d(400, in_channels=3)
    # Variance-preserving conv weights: with PyTorch's default init the signal fades over
    # the network's depth and every video gets almost the same logits.
    for module in model.modules():
        if isinstance(module, nn.Conv3d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("weights") / "i3d_pretrained_400.pt"
    torch.save(model.state_dict(), path)
    return path


def cdfvd_fvd(i3d_path, videos_a: Tensor, videos_b: Tensor) -> tuple[float, np.ndarray]:
    """cd-fvd's own path: its loader, preprocessing and feature statistics; FD as its
    ``compute_fvd_from_stats`` takes it (scipy sqrtm of the covariance product)."""
    from cdfvd.third_party.i3d.utils import load_i3d_model, preprocess_i3d
    from cdfvd.utils.metric_utils import FeatureStats as CdFeatureStats

    model = load_i3d_model(torch.device("cpu"), ckpt_path=str(i3d_path))
    stats, features = [], []
    for videos in (videos_a, videos_b):
        s = CdFeatureStats(capture_mean_cov=True)
        with torch.no_grad():
            logits = model(preprocess_i3d(videos.numpy()))
        s.append_torch(logits, rank=0, num_gpus=1)
        stats.append(s.get_mean_cov())
        features.append(logits.numpy())
    (mu_a, cov_a), (mu_b, cov_b) = stats
    with warnings.catch_warnings():
        # Two clips per set: the covariances are singular, as sqrtm notes.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    value = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * root)
    return float(value), np.concatenate(features)


def test_cd_fvd_protocol_matches_cd_fvd(i3d_file):
    # Two clips per set at the network's minimum of 9 frames keep this to a few seconds.
    videos_a = random_videos(2, 9, 32, seed=1)
    videos_b = random_videos(2, 9, 40, seed=2)
    detector = load_detector("cd-fvd-i3d400", i3d_file)
    features_a, features_b = detector.features(videos_a), detector.features(videos_b)
    expected, their_features = cdfvd_fvd(i3d_file, videos_a, videos_b)
    ours = torch.cat([features_a, features_b]).numpy()
    assert np.abs(ours[:2] - ours[2:]).mean() > 0.01  # the detector tells the sets apart
    np.testing.assert_allclose(ours, their_features, rtol=1e-5, atol=1e-5)
    with pytest.warns(SampleSizeWarning):
        value = fvd(features_a, features_b)
    scale = float(features_a.var(0).sum() + features_b.var(0).sum())
    assert value == pytest.approx(expected, abs=1e-6 * scale)
    assert value > 0
    digest = hashlib.sha256(i3d_file.read_bytes()).hexdigest()
    assert detector.protocol_id == f"fvd/cd-fvd-i3d400/sha256:{digest}"


@pytest.fixture(scope="module")
def torchscript_file(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "i3d_torchscript.pt"
    torch.jit.script(ScriptedDetector()).save(str(path))
    return path


def test_stylegan_v_protocol_calls_the_torchscript_detector(torchscript_file):
    videos_a = random_videos(40, 16, 12, seed=3)
    videos_b = random_videos(40, 16, 12, seed=4)
    detector = load_detector("stylegan-v", torchscript_file.parent)  # a directory works too
    features = detector.features(videos_a, batch_size=16)
    # The detector itself, called as StyleGAN-V calls it on [B, C, T, H, W] uint8.
    module = torch.jit.load(str(torchscript_file))
    clips = videos_a.permute(0, 4, 1, 2, 3).contiguous()
    with torch.no_grad():
        expected = module(clips, rescale=True, resize=True, return_features=True)
        probabilities = module(clips)
    torch.testing.assert_close(features, expected.double())
    assert not torch.allclose(features, probabilities.double())
    with pytest.warns(SampleSizeWarning):  # 40 < 2 × 400
        value = fvd(features, detector.features(videos_b))
    assert value > 0
    digest = hashlib.sha256(torchscript_file.read_bytes()).hexdigest()
    assert detector.protocol_id == f"fvd/stylegan-v/sha256:{digest}"


def test_protocol_ids_differ(i3d_file, torchscript_file):
    ids = {
        load_detector(p, f).protocol_id
        for p, f in [("cd-fvd-i3d400", i3d_file), ("stylegan-v", torchscript_file)]
    }
    assert len(ids) == 2


def test_frame_count_and_layout_checks(i3d_file, torchscript_file):
    stylegan = load_detector("stylegan-v", torchscript_file)
    with pytest.raises(UserError, match="exactly 16 frames, got 8"):
        stylegan(random_videos(1, 8, 12, seed=0))
    with pytest.raises(UserError, match="exactly 16 frames, got 17"):
        stylegan(random_videos(1, 17, 12, seed=0))
    with pytest.raises(UserError, match="uint8 videos"):
        stylegan(torch.rand(1, 16, 12, 12, 3))
    gray = random_videos(2, 16, 12, seed=0)[..., :1]
    torch.testing.assert_close(stylegan(gray), stylegan(gray.expand(-1, -1, -1, -1, 3)))
    with pytest.raises(UserError, match="at least 9 frames, got 8"):
        load_detector("cd-fvd-i3d400", i3d_file)(random_videos(1, 8, 12, seed=0))


def test_to_uint8_videos_rounds_like_stylegan_v():
    frames = torch.rand(2, 3, 3, 5, 4)  # (B, T, C, H, W) in [0, 1]
    videos = to_uint8_videos(frames)
    assert videos.shape == (2, 3, 5, 4, 3) and videos.dtype == torch.uint8
    minus_one_one = frames * 2 - 1
    stylegan = (minus_one_one * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    assert (videos.permute(0, 1, 4, 2, 3).int() - stylegan.int()).abs().max() <= 1


def test_missing_and_wrong_weights(tmp_path, torchscript_file, i3d_file):
    with pytest.raises(UserError) as missing:
        load_detector("stylegan-v", tmp_path / "nowhere.pt")
    message = str(missing.value)
    assert "i3d_torchscript.pt not found" in message
    assert "universome/stylegan-v" in message and "--" not in message
    with pytest.raises(UserError, match=r"i3d_pretrained_400.pt.*songweige/TATS"):
        load_detector("cd-fvd-i3d400", None)
    with pytest.raises(UserError, match="unknown FVD protocol"):
        load_detector("tf-i3d", i3d_file)
    # A state dict where the TorchScript archive belongs, and the other way round.
    with pytest.raises(UserError, match="not a TorchScript archive"):
        load_detector("stylegan-v", i3d_file)
    with pytest.raises(UserError, match="is a TorchScript archive, not a PyTorch state dict"):
        load_detector("cd-fvd-i3d400", torchscript_file)
    garbage = tmp_path / "i3d_pretrained_400.pt"
    garbage.write_bytes(b"<html>not found</html>")
    with pytest.raises(UserError, match="not a PyTorch state dict"):
        load_detector("cd-fvd-i3d400", garbage)
    torch.save({"conv.weight": torch.zeros(1)}, garbage)
    with pytest.raises(UserError, match=r"not an InceptionI3d\(400\) state dict"):
        load_detector("cd-fvd-i3d400", garbage)


def test_protocol_table():
    assert PROTOCOLS["stylegan-v"].min_frames == PROTOCOLS["stylegan-v"].max_frames == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fvd(torch.randn(10, 2), torch.randn(10, 2))
