"""Pinhole cameras in the OpenCV convention, and the exact intrinsics update for image resizing and cropping.

Conventions used everywhere in isa4d (docs/data_format.md):
- `K (3,3)` in pixels; `w2c (4,4)` world-to-camera; camera axes x right, y down, z forward.
- Pixel (i, j) (column i, row j) has its centre at (u, v) = (i, j); an image of width W covers u in [-0.5, W-0.5].

With that convention, scaling an image by s maps a continuous coordinate u to (u + 0.5) * s - 0.5, and cropping at
column x0 maps u to u - x0. Both are affine, so they fold into K exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class CropResize:
    """Resize a (src_h, src_w) image to (scaled_h, scaled_w), then crop a (out_h, out_w) window at (top, left)."""

    src_h: int
    src_w: int
    scaled_h: int
    scaled_w: int
    top: int
    left: int
    out_h: int
    out_w: int

    def __post_init__(self) -> None:
        if self.top < 0 or self.left < 0 or self.top + self.out_h > self.scaled_h or self.left + self.out_w > self.scaled_w:
            raise ValueError(f"crop window {self} lies outside the scaled image")

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy): per-axis scale from source to scaled image."""
        return self.scaled_w / self.src_w, self.scaled_h / self.src_h

    def matrix(self) -> np.ndarray:
        """3x3 affine map of homogeneous pixel coordinates, source image -> output image."""
        sx, sy = self.scale
        return np.array(
            [[sx, 0.0, 0.5 * sx - 0.5 - self.left], [0.0, sy, 0.5 * sy - 0.5 - self.top], [0.0, 0.0, 1.0]]
        )

    def apply_to_K(self, K: np.ndarray) -> np.ndarray:
        """K (..., 3, 3) of the source image -> K of the output image (exact, since the map is affine)."""
        return self.matrix() @ K


def cover_crop(src_h: int, src_w: int, out_h: int, out_w: int, *, rng: np.random.Generator | None = None,
               jitter: float = 0.0) -> CropResize:
    """Scale the image so it covers (out_h, out_w) with the aspect ratio kept, then crop.

    The crop is centred; with `rng` and `jitter` in [0, 1] its position moves by up to `jitter` of the slack.
    Scaled sizes are rounded up so the crop always fits; the scale is per axis so K stays exact.
    """
    if min(src_h, src_w, out_h, out_w) <= 0:
        raise ValueError(f"sizes must be positive, got source {src_h}x{src_w}, output {out_h}x{out_w}")
    s = max(out_h / src_h, out_w / src_w)
    scaled_h, scaled_w = max(out_h, round(src_h * s)), max(out_w, round(src_w * s))
    slack_h, slack_w = scaled_h - out_h, scaled_w - out_w
    top, left = slack_h // 2, slack_w // 2
    if rng is not None and jitter > 0:
        top = int(np.clip(round(top + rng.uniform(-jitter, jitter) * slack_h / 2), 0, slack_h))
        left = int(np.clip(round(left + rng.uniform(-jitter, jitter) * slack_w / 2), 0, slack_w))
    return CropResize(src_h, src_w, scaled_h, scaled_w, top, left, out_h, out_w)


def project(points: torch.Tensor, K: torch.Tensor, w2c: torch.Tensor) -> torch.Tensor:
    """World points (..., N, 3) -> (u, v, z): pixel coordinates and camera depth, (..., N, 3).

    K (..., 3, 3) and w2c (..., 4, 4) broadcast against the points' leading dimensions.
    """
    cam = points @ w2c[..., :3, :3].transpose(-1, -2) + w2c[..., None, :3, 3]  # (..., N, 3)
    pix = cam @ K.transpose(-1, -2)  # (..., N, 3)
    z = cam[..., 2:3]
    return torch.cat([pix[..., :2] / z, z], dim=-1)


def camera_center(w2c: torch.Tensor) -> torch.Tensor:
    """World position of the camera centre, (..., 3), from w2c (..., 4, 4)."""
    R, t = w2c[..., :3, :3], w2c[..., :3, 3:]
    return -(R.transpose(-1, -2) @ t)[..., 0]


def is_rigid(w2c: np.ndarray, atol: float = 1e-3) -> np.ndarray:
    """Whether each (..., 4, 4) matrix is a rigid transform: orthonormal rotation, det +1, last row (0, 0, 0, 1)."""
    R = w2c[..., :3, :3]
    ortho = np.abs(R @ np.swapaxes(R, -1, -2) - np.eye(3)).max(axis=(-1, -2)) < atol
    det = np.abs(np.linalg.det(R) - 1.0) < atol
    last = np.abs(w2c[..., 3, :] - np.array([0.0, 0.0, 0.0, 1.0])).max(axis=-1) < atol
    return ortho & det & last


def look_at(eye: np.ndarray, target: np.ndarray, up=(0.0, 1.0, 0.0)) -> np.ndarray:
    """w2c (4,4) of an OpenCV camera (x right, y down, z forward) at `eye` looking at `target`; `up` is world up."""
    eye = np.asarray(eye, dtype=np.float64)
    z = np.asarray(target, dtype=np.float64) - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, np.asarray(up, dtype=np.float64))
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z])
    w2c = np.eye(4)
    w2c[:3, :3], w2c[:3, 3] = R, -R @ eye
    return w2c


def intrinsics_from_fov(fov_y_deg: float, height: int, width: int) -> np.ndarray:
    """K for a vertical field of view, square pixels, principal point at the image centre."""
    f = 0.5 * height / np.tan(np.deg2rad(fov_y_deg) / 2)
    return np.array([[f, 0.0, (width - 1) / 2], [0.0, f, (height - 1) / 2], [0.0, 0.0, 1.0]])
