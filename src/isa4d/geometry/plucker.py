"""Camera conditioning as Plücker ray maps, grouped per VAE latent frame (paper §3.2, Camera Transformer).

Why: a Plücker map gives every pixel its world ray (moment o × d, direction d), which is a dense, pose-aware code
of the camera that does not depend on the choice of ray origin along the ray. The paper concatenates the maps of
the several video frames that fall into one latent frame along channels; with the causal video VAE (temporal
factor 4) latent frame 0 holds frame 0 alone and latent frame i ≥ 1 holds frames 4(i-1)+1..4i.

Conventions as in `isa4d.geometry.camera`: OpenCV pinhole, K in pixels, w2c world-to-camera, pixel (i, j) centred
at (u, v) = (i, j).
"""

from __future__ import annotations

import torch
from einops import rearrange

from isa4d.geometry.camera import camera_center


def pixel_rays(K: torch.Tensor, w2c: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """World rays through the pixel centres (u, v) = (i, j): (origins (..., H, W, 3), unit directions (..., H, W, 3)).

    K (..., 3, 3), w2c (..., 4, 4). Origins are the camera centre for every pixel.
    """
    dtype, device = K.dtype, K.device
    v, u = torch.meshgrid(torch.arange(height, dtype=dtype, device=device),
                          torch.arange(width, dtype=dtype, device=device), indexing="ij")  # (H, W) each
    pix = torch.stack([u, v, torch.ones_like(u)], dim=-1)  # (H, W, 3)
    cam = pix @ torch.linalg.inv(K)[..., None, :, :].transpose(-1, -2)  # (..., H, W, 3) camera-frame directions
    world = cam @ w2c[..., None, :3, :3]  # (..., H, W, 3): R^T d as a row-vector product d^T R
    directions = world / world.norm(dim=-1, keepdim=True)  # (..., H, W, 3)
    origins = camera_center(w2c)[..., None, None, :].expand_as(directions)  # (..., H, W, 3)
    return origins, directions


def plucker(K: torch.Tensor, w2c: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Plücker ray map (..., 6, H, W): channels 0..2 the moment o × d, channels 3..5 the unit direction d.

    Moment first, then direction: the CameraCtrl convention (several ISA authors are CameraCtrl authors).
    The moment is the same for any origin on the ray, so the code depends on the ray, not on the camera
    centre's position along it.
    """
    origins, directions = pixel_rays(K, w2c, height, width)  # (..., H, W, 3) each
    rays = torch.cat([torch.linalg.cross(origins, directions, dim=-1), directions], dim=-1)  # (..., H, W, 6)
    return rearrange(rays, "... h w c -> ... c h w")


def latent_frame_groups(num_frames: int, temporal_factor: int = 4) -> torch.Tensor:
    """Video-frame indices of each latent frame of a causal VAE, (T_lat, temporal_factor).

    Row 0 is frame 0 repeated temporal_factor times (the causal VAE encodes frame 0 alone); row i ≥ 1 is frames
    temporal_factor·(i-1)+1 .. temporal_factor·i. Raises ValueError unless num_frames = 1 + temporal_factor·k.
    """
    if num_frames < 1 or (num_frames - 1) % temporal_factor:
        raise ValueError(f"frame count must be 1 + {temporal_factor}·k for a causal VAE, got {num_frames}")
    rest = torch.arange(1, num_frames).reshape(-1, temporal_factor)  # (T_lat - 1, tf)
    return torch.cat([torch.zeros(1, temporal_factor, dtype=torch.long), rest], dim=0)  # (T_lat, tf)


def plucker_latent(K: torch.Tensor, w2c: torch.Tensor, height: int, width: int, temporal_factor: int = 4,
                   spatial_factor: int = 8, patch: int = 2) -> torch.Tensor:
    """Per-latent-frame Plücker maps, (B, T_lat, 6·temporal_factor, H/spatial_factor, W/spatial_factor).

    K (B, T, 3, 3) and w2c (B, T, 4, 4) are the per-video-frame cameras of an H × W video, T = 1 + temporal_factor·k.
    Rays are evaluated at the centre of each latent pixel's footprint: latent pixel (a, b) covers image pixels
    [sf·a, sf·(a+1)) and gets the ray through image coordinate sf·a + (sf-1)/2. That is the ray map of K rescaled
    to the latent grid (exact, as in `CropResize`), not an average of the sf² pixel maps, which would give
    non-unit directions and moments of no single ray.
    Channels: 6k..6k+5 of latent frame i hold the map of the k-th frame of `latent_frame_groups` row i.
    Patchification is the DiT's job; `patch` is only checked, so the latent grid is divisible by the DiT patch.
    """
    B, T = K.shape[:2]
    if height % spatial_factor or width % spatial_factor:
        raise ValueError(f"image {height}x{width} is not divisible by the spatial factor {spatial_factor}")
    h, w = height // spatial_factor, width // spatial_factor
    if h % patch or w % patch:
        raise ValueError(f"latent grid {h}x{w} is not divisible by the DiT patch {patch}")
    groups = latent_frame_groups(T, temporal_factor).to(K.device)  # (T_lat, tf)
    s = 1.0 / spatial_factor
    to_latent = K.new_tensor([[s, 0.0, 0.5 * s - 0.5], [0.0, s, 0.5 * s - 0.5], [0.0, 0.0, 1.0]])  # (3, 3)
    maps = plucker(to_latent @ K, w2c, h, w)  # (B, T, 6, h, w)
    grouped = maps[:, groups]  # (B, T_lat, tf, 6, h, w)
    return rearrange(grouped, "b t f c h w -> b t (f c) h w")
