"""Training-time video augmentations for the VAE (paper §4).

Random structured motion: every clip gets a smooth random trajectory of whole-frame translations, so the VAE sees
displacements as large and fast as squats and jumps. Dynamic speed adjustment (frame-rate modulation) happens in the
loader, whose `stride_jitter` varies the frame stride per clip.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch.nn import functional as F


def random_trajectories(batch: int, frames: int, max_shift: float, generator: torch.Generator | None = None,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """(batch, frames, 2) translations in units of half the frame size (grid_sample's [-1, 1] coordinates).

    A random start, velocity and acceleration per clip (a parabola in time, like a jump), clipped to `max_shift`.
    """
    t = torch.linspace(0, 1, frames, device=device)[None, :, None]  # (1, T, 1)
    r = lambda: (torch.rand(batch, 1, 2, generator=generator) * 2 - 1).to(device)  # noqa: E731
    shift = max_shift * (0.5 * r() + r() * t + 2 * r() * t * (1 - t))
    return shift.clamp(-max_shift, max_shift)


def structured_motion(video: torch.Tensor, max_shift: float = 0.25, p: float = 0.5,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate each frame of (B, C, T, H, W) videos along a smooth random trajectory; each clip with probability p.

    Pixels shifted in from outside are reflected, so no black borders teach the VAE a false edge.
    """
    b, _, t, h, w = video.shape
    if max_shift <= 0 or p <= 0:
        return video
    shift = random_trajectories(b, t, max_shift, generator, video.device)  # (B, T, 2)
    keep = (torch.rand(b, generator=generator) >= p).to(video.device)
    shift = shift.masked_fill(keep[:, None, None], 0.0)
    theta = torch.zeros(b * t, 2, 3, device=video.device, dtype=video.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = rearrange(shift, "b t k -> (b t) k").to(video.dtype)
    frames = rearrange(video, "b c t h w -> (b t) c h w")
    grid = F.affine_grid(theta, list(frames.shape), align_corners=False)
    out = F.grid_sample(frames, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return rearrange(out, "(b t) c h w -> b c t h w", b=b)
