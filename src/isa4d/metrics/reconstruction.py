"""Per-frame reconstruction metrics on RGB videos in [-1, 1]: PSNR, SSIM (Wang et al., 2004) and LPIPS.

Computed in float on the full RGB frames, never on uint8 (older animation papers' scripts overflowed in uint8
PSNR) and never on grayscale (SSIM is per RGB channel, then averaged, as in scikit-image with `channel_axis`).
Both inputs are clamped to [-1, 1]; the data range is 2. Each metric averages over every frame of every clip.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch.nn import functional as F
from torchmetrics import Metric

from isa4d.metrics.network_metric import NetworkMetric
from isa4d.models.vae.lpips import LPIPS

DATA_RANGE = 2.0
PSNR_MAX_DB = 100.0  # identical frames: the MSE is floored so PSNR stays finite
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def _frames(preds: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, 3, H, W) pairs -> float (B*T, 3, H, W) in [-1, 1]."""
    if preds.shape != target.shape or preds.ndim != 5 or preds.shape[2] != 3:
        raise ValueError(f"preds and target must both be (B, T, 3, H, W), got {tuple(preds.shape)}, "
                         f"{tuple(target.shape)}")
    if preds.dtype == torch.uint8 or target.dtype == torch.uint8:
        raise TypeError("videos must be float in [-1, 1] (Batch.normalize()), not uint8")
    flat = lambda v: rearrange(v.float().clamp(-1, 1), "b t c h w -> (b t) c h w")  # noqa: E731
    return flat(preds), flat(target)


def psnr_per_frame(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each frame (B, T): 10 log10(range^2 / MSE), MSE over the 3 channels and all pixels."""
    x, y = _frames(preds, target)
    mse = (x.double() - y.double()).square().mean(dim=(1, 2, 3)).clamp(min=DATA_RANGE**2 * 10 ** (-PSNR_MAX_DB / 10))
    return (10 * torch.log10(DATA_RANGE**2 / mse)).view(preds.shape[:2])


def _gaussian_window(device: torch.device) -> torch.Tensor:
    r = torch.arange(SSIM_WINDOW, dtype=torch.float32, device=device) - SSIM_WINDOW // 2
    g = torch.exp(-r.square() / (2 * SSIM_SIGMA**2))
    return g / g.sum()


def ssim_per_frame(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM of each frame (B, T): 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, on intensities mapped
    from [-1, 1] to [0, 1] (SSIM's luminance term is not shift-invariant: it is defined on intensities from 0),
    over the 'valid' region (no padding), averaged over pixels and then over the RGB channels."""
    x, y = ((v + 1) / DATA_RANGE for v in _frames(preds, target))  # (B*T, 3, H, W) in [0, 1]
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(x.shape[-2:])}")
    g = _gaussian_window(x.device)
    kh, kw = g.view(1, 1, -1, 1).repeat(3, 1, 1, 1), g.view(1, 1, 1, -1).repeat(3, 1, 1, 1)

    def blur(z: torch.Tensor) -> torch.Tensor:  # separable Gaussian, per channel, valid
        return F.conv2d(F.conv2d(z, kh, groups=3), kw, groups=3)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.square()
    var_y = blur(y * y) - mu_y.square()
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # data range 1 after the shift
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return ssim.mean(dim=(1, 2, 3)).view(preds.shape[:2])


class _FrameMean(Metric):
    """Mean of a per-frame score over every frame seen (sums sync across processes)."""

    full_state_update = False
    is_differentiable = False

    def __init__(self):
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_frames", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def per_frame(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """preds, target: (B, T, 3, H, W) float in [-1, 1]."""
        scores = self.per_frame(preds, target)
        self.total += scores.double().sum()
        self.num_frames += scores.numel()

    def compute(self) -> torch.Tensor:
        return self.total / self.num_frames if self.num_frames > 0 else torch.tensor(math.nan, dtype=torch.float64)


class VideoPSNR(_FrameMean):
    """Mean per-frame PSNR (dB) of videos (B, T, 3, H, W) in [-1, 1]; capped at 100 dB for identical frames."""

    higher_is_better = True

    def per_frame(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return psnr_per_frame(preds, target)


class VideoSSIM(_FrameMean):
    """Mean per-frame RGB SSIM of videos (B, T, 3, H, W) in [-1, 1]."""

    higher_is_better = True

    def per_frame(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ssim_per_frame(preds, target)


class VideoLPIPS(_FrameMean, NetworkMetric):
    """Mean per-frame LPIPS (VGG-16, v0.1) of videos (B, T, 3, H, W) in [-1, 1].

    Weights from local files only (`isa4d.models.vae.lpips.LPIPS`): `vgg_path` is torchvision's
    vgg16-397923af.pth, `lin_path` the lpips package's v0.1 vgg.pth; a missing file raises `LPIPSWeightsMissing`
    naming it. The network stays out of `state_dict()` and is run in float32.
    """

    higher_is_better = False

    def __init__(self, vgg_path: str | None, lin_path: str | None):
        super().__init__()
        self.set_network("lpips", LPIPS(vgg_path, lin_path))

    @torch.no_grad()
    def per_frame(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x, y = _frames(preds, target)
        with torch.autocast(x.device.type, enabled=False):
            return self.lpips(x, y).view(preds.shape[:2])


def lowpass_baseline(video: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """The trivial codec a VAE must beat: each frame area-downscaled by `factor`, then bicubic-upscaled back.

    video (B, C, T, H, W) or (B, T, C, H, W) in [-1, 1] (only the last two axes are resized; H and W must divide by
    `factor`). At x8 it keeps 3 numbers per 8 x 8 pixels of each frame, fewer than a 4x8x8x16 latent's 4 per frame,
    and compresses nothing in time. Returned clamped to [-1, 1], in `video`'s layout.
    """
    *lead, h, w = video.shape
    if h % factor or w % factor:
        raise ValueError(f"frame size {h}x{w} must divide by the low-pass factor {factor}")
    frames = video.reshape(-1, 1, h, w).float()  # every channel of every frame as its own image
    small = F.avg_pool2d(frames, factor)  # area downscale: the mean of each factor x factor block
    up = F.interpolate(small, scale_factor=factor, mode="bicubic", align_corners=False)
    return up.clamp(-1, 1).reshape(*lead, h, w).to(video.dtype)
