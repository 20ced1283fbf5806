"""Identity as body-part appearance: colour statistics per visible body part, generated frames vs the reference.

Face embeddings need human faces, which the toy world does not have; clothing and skin colours per body part
measure identity preservation on any data. Each body part (from the part map rendered from the conditioning
SMPL, `body_maps.render_body_maps`) gets the mean and standard deviation of its RGB values, in the generated frame
and in the reference image; their distance is the 2-Wasserstein distance between the two axis-aligned Gaussians,
sqrt(|mu_g - mu_r|^2 + |sigma_g - sigma_r|^2), in [-1, 1] colour units. A frame's score is the mean over the parts
visible (at least `min_pixels` pixels) in both the frame and the reference; frames sharing no visible part with
the reference are excluded and counted.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torchmetrics import Metric


def part_color_stats(images: torch.Tensor, parts: torch.Tensor, num_ids: int) -> tuple[torch.Tensor, ...]:
    """Per-image, per-part colour statistics.

    images (N, 3, H, W) in [-1, 1], parts (N, H, W) long in [-1, num_ids) (-1 background).
    Returns count (N, num_ids), mean (N, num_ids, 3), std (N, num_ids, 3) (population std; 0 where count is 0).
    """
    n = images.shape[0]
    x = rearrange(images.double(), "n c h w -> n (h w) c")
    ids = parts.flatten(1)  # (N, HW)
    fg = ids >= 0
    flat = (ids.clamp(min=0) + num_ids * torch.arange(n, device=ids.device)[:, None])[fg]  # (K,)
    vals = x[fg]  # (K, 3)
    count = torch.zeros(n * num_ids, dtype=torch.float64, device=x.device).index_add_(0, flat, vals.new_ones(len(flat)))
    s1 = torch.zeros(n * num_ids, 3, dtype=torch.float64, device=x.device).index_add_(0, flat, vals)
    s2 = torch.zeros(n * num_ids, 3, dtype=torch.float64, device=x.device).index_add_(0, flat, vals.square())
    c = count.clamp(min=1)[:, None]
    mean = s1 / c
    std = (s2 / c - mean.square()).clamp(min=0).sqrt()
    return count.view(n, num_ids), mean.view(n, num_ids, 3), std.view(n, num_ids, 3)


class PartAppearance(Metric):
    """Mean per-frame body-part colour distance of generated videos to their reference images (lower is better).

    `update(videos, parts, reference, reference_parts)`: videos (B, T, 3, H, W) and reference (B, 3, H', W') in
    [-1, 1]; parts (B, T, H, W) and reference_parts (B, H', W') long part ids, -1 for background (ids shared by
    frames and reference: `body_maps` gives person p's part k the id p * NUM_PARTS + k).
    `compute()` -> `part_appearance` (mean over scored frames), `num_frames` (scored), `num_frames_excluded`
    (no part visible in both), `parts_per_frame` (mean number of parts compared).
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, min_pixels: int = 16):
        super().__init__()
        self.min_pixels = min_pixels
        self.add_state("distance_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("parts_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_frames", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("num_frames_excluded", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, videos: torch.Tensor, parts: torch.Tensor, reference: torch.Tensor,
               reference_parts: torch.Tensor) -> None:
        B, T = videos.shape[:2]
        if parts.shape != (B, T, *videos.shape[-2:]) or reference_parts.shape != (B, *reference.shape[-2:]):
            raise ValueError(f"parts {tuple(parts.shape)} / reference_parts {tuple(reference_parts.shape)} do not "
                             f"match videos {tuple(videos.shape)} / reference {tuple(reference.shape)}")
        num_ids = int(max(parts.max(), reference_parts.max(), 0)) + 1
        cnt, mu, sd = part_color_stats(rearrange(videos.clamp(-1, 1), "b t c h w -> (b t) c h w"),
                                       parts.flatten(0, 1).long(), num_ids)
        rcnt, rmu, rsd = part_color_stats(reference.clamp(-1, 1), reference_parts.long(), num_ids)
        rcnt, rmu, rsd = (x.repeat_interleave(T, dim=0) for x in (rcnt, rmu, rsd))  # (B*T, ...)
        both = (cnt >= self.min_pixels) & (rcnt >= self.min_pixels)  # (B*T, ids)
        dist = ((mu - rmu).square().sum(-1) + (sd - rsd).square().sum(-1)).sqrt()  # (B*T, ids)
        nparts = both.sum(-1)
        scored = nparts > 0
        per_frame = (dist * both).sum(-1)[scored] / nparts[scored]
        self.distance_sum += per_frame.sum()
        self.parts_sum += nparts[scored].double().sum()
        self.num_frames += int(scored.sum())
        self.num_frames_excluded += int((~scored).sum())

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.num_frames
        nan = torch.tensor(math.nan, dtype=torch.float64)
        return {"part_appearance": self.distance_sum / n if n else nan, "num_frames": n,
                "num_frames_excluded": self.num_frames_excluded, "parts_per_frame": self.parts_sum / n if n else nan}
