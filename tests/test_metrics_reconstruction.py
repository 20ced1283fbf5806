"""PSNR / SSIM per frame on RGB in [-1, 1] against an independent numpy computation; LPIPS from weight files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from isa4d.metrics.reconstruction import (VideoLPIPS, VideoPSNR, VideoSSIM, lowpass_baseline, psnr_per_frame,
                                         ssim_per_frame)
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


def _cubic_weights(s: float, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution weights of the 4 taps around fractional offset s (PyTorch's bicubic uses a = -0.75)."""
    def k(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        if x < 2:
            return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
        return 0.0
    return np.array([k(s + 1), k(s), k(1 - s), k(2 - s)])


def _bicubic_up_numpy(img: np.ndarray, f: int) -> np.ndarray:
    """Separable bicubic upscaling by f, half-pixel centres, edge samples replicated: a loop written from the kernel."""
    def up_axis(a: np.ndarray) -> np.ndarray:
        n = a.shape[0]
        out = np.zeros((n * f,) + a.shape[1:])
        for i in range(n * f):
            src = (i + 0.5) / f - 0.5
            i0 = int(np.floor(src))
            w = _cubic_weights(src - i0)
            for tap, wt in zip(range(i0 - 1, i0 + 3), w):
                out[i] += wt * a[min(max(tap, 0), n - 1)]
        return out
    return up_axis(up_axis(img).T).T


def test_lowpass_baseline_against_hand_computation():
    rng = np.random.default_rng(3)
    video = rng.uniform(-0.9, 0.9, size=(1, 3, 2, 24, 32))  # (B, C, T, H, W)
    got = lowpass_baseline(torch.tensor(video, dtype=torch.float64), 8).numpy()
    for c in range(3):
        for t in range(2):
            img = video[0, c, t]
            means = img.reshape(3, 8, 4, 8).mean(axis=(1, 3))  # area downscale by hand: block means
            want = np.clip(_bicubic_up_numpy(means, 8), -1, 1)
            np.testing.assert_allclose(got[0, c, t], want, atol=1e-6)  # torch's taps are float32


def test_lowpass_baseline_keeps_smooth_frames_and_loses_detail():
    y, x = torch.meshgrid(torch.linspace(-0.5, 0.5, 64), torch.linspace(-0.5, 0.5, 64), indexing="ij")
    smooth = (0.5 * torch.sin(2 * torch.pi * x) * torch.cos(torch.pi * y)).expand(1, 3, 3, 64, 64)
    fine = (0.5 * torch.tensor([1.0, 1.0, -1.0, -1.0]).repeat(16)).expand(1, 3, 3, 64, 64)  # period 4 px
    assert psnr_per_frame(lowpass_baseline(smooth, 8), smooth).min() > 35  # (b, t, c, h, w) layout works too
    assert lowpass_baseline(fine, 8).abs().max() < 1e-6  # stripes of period 4 px average out in 8 px blocks
    with pytest.raises(ValueError, match="divide by the low-pass factor 8"):
        lowpass_baseline(torch.zeros(1, 3, 1, 60, 64))
