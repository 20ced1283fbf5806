"""PSNR / SSIM per frame on RGB in [-1, 1] against an independent numpy computation; LPIPS from weight files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from isa4d.metrics.reconstruction import VideoLPIPS, VideoPSNR, VideoSSIM, psnr_per_frame, ssim_per_frame
from isa4d.models.vae.lpips import LPIPSWeightsMissing, _vgg_features


def _videos(seed=0, shape=(2, 3, 3, 24, 20)):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=g) * 2 - 1
    preds = (target + 0.15 * torch.randn(shape, generator=g)).clamp(-1, 1)
    return preds, target


def _numpy_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """One frame (3, H, W) in [-1, 1]: mapped to [0, 255] floats, PSNR with peak 255 (the same number)."""
    x, y = (a.astype(np.float64) + 1) * 127.5, (b.astype(np.float64) + 1) * 127.5
    return 10 * np.log10(255.0**2 / np.mean((x - y) ** 2))


def _numpy_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. 2004 with an 11-tap Gaussian (sigma 1.5), valid region, per channel on [0, 1], averaged."""
    r = np.arange(11) - 5
    w = np.exp(-(r**2) / (2 * 1.5**2))
    w /= w.sum()

    def filt(z):
        rows = np.apply_along_axis(lambda v: np.convolve(v, w, mode="valid"), 0, z)
        return np.apply_along_axis(lambda v: np.convolve(v, w, mode="valid"), 1, rows)

    c1, c2 = 0.01**2, 0.03**2
    out = []
    for x, y in zip((a.astype(np.float64) + 1) / 2, (b.astype(np.float64) + 1) / 2):
        mx, my = filt(x), filt(y)
        vx, vy, cxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
        s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        out.append(s.mean())
    return float(np.mean(out))


def test_psnr_and_ssim_match_numpy_per_frame():
    preds, target = _videos()
    p, t = preds.numpy(), target.numpy()
    want_psnr = np.array([[_numpy_psnr(p[b, i], t[b, i]) for i in range(3)] for b in range(2)])
    want_ssim = np.array([[_numpy_ssim(p[b, i], t[b, i]) for i in range(3)] for b in range(2)])
    np.testing.assert_allclose(psnr_per_frame(preds, target).numpy(), want_psnr, rtol=1e-6)
    np.testing.assert_allclose(ssim_per_frame(preds, target).numpy(), want_ssim, atol=2e-5)
    psnr, ssim = VideoPSNR(), VideoSSIM()
    for b in range(2):  # batches of one clip: the mean over all frames
        psnr.update(preds[b:b + 1], target[b:b + 1])
        ssim.update(preds[b:b + 1], target[b:b + 1])
    assert psnr.compute().item() == pytest.approx(want_psnr.mean(), rel=1e-6)
    assert ssim.compute().item() == pytest.approx(want_ssim.mean(), abs=2e-5)


def test_no_uint8_overflow_no_grayscale():
    """A colour swap keeps luminance-ish structure but must score badly; uint8 inputs are refused."""
    _, target = _videos(1)
    swapped = target[:, :, [2, 0, 1]]
    assert ssim_per_frame(swapped, target).mean() < 0.5
    assert ssim_per_frame(target, target).mean().item() == pytest.approx(1.0, abs=1e-6)
    assert psnr_per_frame(target, target).max().item() == pytest.approx(100.0)  # capped, finite
    # a dark pred vs bright target: uint8 subtraction would wrap around; here the error is large, the PSNR low
    dark, bright = torch.full((1, 1, 3, 16, 16), -1.0), torch.full((1, 1, 3, 16, 16), 1.0)
    assert psnr_per_frame(dark, bright).item() == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(TypeError, match="uint8"):
        psnr_per_frame(torch.zeros(1, 1, 3, 16, 16, dtype=torch.uint8), torch.zeros(1, 1, 3, 16, 16, dtype=torch.uint8))


def test_lpips_metric_needs_weight_files(tmp_path):
    with pytest.raises(LPIPSWeightsMissing, match="vgg_path"):
        VideoLPIPS(vgg_path=str(tmp_path / "vgg16.pth"), lin_path=str(tmp_path / "vgg.pth"))


def test_lpips_metric_with_weight_files(tmp_path):
    """Random weights in the two files' formats: the metric loads them, is 0 for identical videos, > 0 otherwise."""
    torch.manual_seed(0)
    vgg = {f"features.{k}": v for k, v in _vgg_features().state_dict().items()}
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lin, tmp_path / "vgg.pth")
    metric = VideoLPIPS(str(tmp_path / "vgg16.pth"), str(tmp_path / "vgg.pth"))
    assert not list(metric.state_dict())  # the network stays out of checkpoints
    preds, target = _videos(2, (1, 2, 3, 32, 32))
    metric.update(target, target)
    assert metric.compute().item() == pytest.approx(0.0, abs=1e-7)
    metric.reset()
    metric.update(preds, target)
    assert metric.compute().item() > 0
