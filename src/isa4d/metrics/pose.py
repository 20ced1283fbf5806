"""Pose adherence: IoU between the generated person's silhouette and the conditioning SMPL's rendered silhouette.

The reference silhouette is the conditioning bodies rendered with the clip's cameras (`body_maps`). The generated
silhouette comes from the known background plate where one is given: a pixel belongs to a person when its colour
differs from the plate by more than `threshold` in some channel (in [-1, 1] units; the default 0.15 is about
19/255) and at least 2 of its 8 neighbours do too, which drops isolated pixels (codec and VAE noise). Any other
source of masks (a segmenter) can feed `SilhouetteIoU.update` directly.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F
from torchmetrics import Metric

BACKGROUND_THRESHOLD = 0.15


def silhouette_from_background(videos: torch.Tensor, background: torch.Tensor, threshold: float = BACKGROUND_THRESHOLD,
                               min_neighbors: int = 2) -> torch.Tensor:
    """Person mask (B, T, H, W) bool of videos (B, T, 3, H, W) against their background plates, both in [-1, 1]:
    max over RGB of |frame - plate| > threshold, keeping only pixels with at least `min_neighbors` of their 8
    neighbours also above it (drops isolated noise, keeps 1-pixel-thin limbs that an opening would erase)."""
    if videos.shape != background.shape or videos.ndim != 5:
        raise ValueError(f"videos and background must both be (B, T, 3, H, W), got {tuple(videos.shape)}, "
                         f"{tuple(background.shape)}")
    mask = (videos.float() - background.float()).abs().amax(dim=2) > threshold  # (B, T, H, W)
    if min_neighbors > 0:
        m = mask.flatten(0, 1).unsqueeze(1).float()  # (B*T, 1, H, W)
        neighbours = F.avg_pool2d(m, 3, stride=1, padding=1, count_include_pad=True) * 9 - m
        mask = mask & (neighbours.squeeze(1).view_as(mask) > min_neighbors - 0.5)
    return mask


class SilhouetteIoU(Metric):
    """IoU of predicted vs reference person masks, pooled: sum of intersections / sum of unions over all frames.

    `update(pred, target, valid=None)`: masks (B, T, H, W) (bool, or float thresholded at 0.5), valid (B,) bool
    (clips without a usable prediction are skipped and counted). `update_from_background(videos, background,
    target, has_bg)` derives `pred` with `silhouette_from_background`. `compute()` -> `pose_iou` (pooled),
    `pose_iou_frame_mean` (mean over frames whose union is non-empty), `num_frames`, `num_skipped_clips`.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, threshold: float = BACKGROUND_THRESHOLD, min_neighbors: int = 2):
        super().__init__()
        self.threshold, self.min_neighbors = threshold, min_neighbors
        for name in ("intersection", "union", "frame_iou_sum"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("num_frames", "num_nonempty_frames", "num_skipped_clips"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        if pred.shape != target.shape or pred.ndim != 4:
            raise ValueError(f"pred and target must both be (B, T, H, W), got {tuple(pred.shape)}, "
                             f"{tuple(target.shape)}")
        pred, target = pred > 0.5 if pred.is_floating_point() else pred.bool(), (
            target > 0.5 if target.is_floating_point() else target.bool())
        if valid is not None:
            valid = valid.bool().to(pred.device)
            self.num_skipped_clips += int((~valid).sum())
            pred, target = pred[valid], target[valid]
        inter = (pred & target).flatten(2).sum(-1).double()  # (B, T)
        union = (pred | target).flatten(2).sum(-1).double()
        nonempty = union > 0
        self.intersection += inter.sum()
        self.union += union.sum()
        self.frame_iou_sum += (inter[nonempty] / union[nonempty]).sum()
        self.num_frames += inter.numel()
        self.num_nonempty_frames += int(nonempty.sum())

    def update_from_background(self, videos: torch.Tensor, background: torch.Tensor, target: torch.Tensor,
                               has_bg: torch.Tensor | None = None) -> None:
        """videos, background (B, T, 3, H, W) in [-1, 1]; target (B, T, H, W) rendered SMPL silhouettes."""
        self.update(silhouette_from_background(videos, background, self.threshold, self.min_neighbors), target, has_bg)

    def compute(self) -> dict[str, torch.Tensor]:
        nan = torch.tensor(math.nan, dtype=torch.float64)
        return {
            "pose_iou": self.intersection / self.union if self.union > 0 else nan,
            "pose_iou_frame_mean": self.frame_iou_sum / self.num_nonempty_frames if self.num_nonempty_frames else nan,
            "num_frames": self.num_frames, "num_skipped_clips": self.num_skipped_clips,
        }
