"""One camera NDC space for SMPL tokens and video tokens, and the sinusoidal code of it (paper §2.2, ISPE).

Why: interspatial attention compares 3D body tokens with 2D latent-pixel tokens, so both must live in the same
frame. The paper puts both in the camera's normalized device coordinates: 3D tokens by a perspective divide of
clip = MVP · [G; 1], 2D tokens on the z = 0 plane at their image position. A sinusoidal code of those coordinates
is the interspatial positional encoding (ISPE).

Conventions (shared with `isa4d.geometry.camera`): OpenCV pinhole, K in pixels, w2c world-to-camera, camera axes
x right / y down / z forward, pixel (i, j) centred at (u, v) = (i, j), an image of width W covering
u ∈ [-0.5, W-0.5]. NDC x and y follow the image axes: x_ndc = -1 is the left edge of the left pixel column and
y_ndc = -1 the top edge of the top row (y points down, unlike OpenGL). This is exactly the coordinate
`torch.nn.functional.grid_sample(..., align_corners=False)` expects, so NDC of a projected point can index a
feature map directly (§3.2, pixel-aligned lifting of reference features).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange

from isa4d.geometry.camera import project


def pixel_to_ndc(uv: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel coordinates (..., 2) as (u, v) -> NDC (..., 2): x = (2u + 1)/W - 1, y = (2v + 1)/H - 1.

    The image extent [-0.5, W-0.5] maps to [-1, 1], so the pixel-centre grid of any resolution lands on the same
    NDC positions as a coarser grid's cell centres (the property `token_grid_ndc` relies on).
    """
    size = uv.new_tensor([width, height])  # (2,)
    return (2.0 * uv + 1.0) / size - 1.0


def ndc_to_pixel(ndc: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pixel_to_ndc`: NDC (..., 2) -> pixel coordinates (u, v) (..., 2)."""
    size = ndc.new_tensor([width, height])  # (2,)
    return ((ndc + 1.0) * size - 1.0) / 2.0


def depth_to_ndc(z: torch.Tensor, near: float, far: float) -> torch.Tensor:
    """Camera depth z -> OpenGL-style perspective NDC depth, (f+n)/(f-n) - 2fn/((f-n) z); near -> -1, far -> +1.

    This is what the perspective divide of a model-view-projection matrix gives (the paper's
    g_ndc = clip.xyz / w with w = z), so it is isa4d's default depth code. It is monotone increasing in z for
    z > 0 and spends most of its range near the camera, where occlusion ordering of body parts matters most.
    It diverges as z -> 0 and changes sign behind the camera; `points_to_ndc` flags those points.
    """
    return (far + near) / (far - near) - 2.0 * far * near / ((far - near) * z)


def depth_to_unit(z: torch.Tensor, near: float, far: float) -> torch.Tensor:
    """Linear alternative to `depth_to_ndc`: (z - near)/(far - near), near -> 0, far -> 1 (not clamped).

    Not the default: isa4d follows the paper's perspective divide. Kept for ablations where uniform depth
    resolution over [near, far] is wanted.
    """
    return (z - near) / (far - near)


def points_to_ndc(points: torch.Tensor, K: torch.Tensor, w2c: torch.Tensor, height: int, width: int,
                  near: float = 0.1, far: float = 20.0) -> tuple[torch.Tensor, torch.Tensor]:
    """World points (..., N, 3) -> (ndc (..., N, 3), valid (..., N) bool) for camera K (..., 3, 3), w2c (..., 4, 4).

    ndc = (x_ndc, y_ndc, z_ndc) with x, y from `pixel_to_ndc` of the projection and z from `depth_to_ndc`,
    equal to clip.xyz / w for the MVP matrix built from K, near, far (tested against one).
    Points at or behind the camera still get coordinates (possibly huge or non-finite), so shapes stay fixed;
    `valid` = z > near / 2 tells the caller which to trust. The margin of near/2 keeps points slightly in front
    of the near plane (z_ndc a little below -1) valid while excluding the blow-up as z -> 0 and everything behind.
    """
    uvz = project(points, K, w2c)  # (..., N, 3)
    xy = pixel_to_ndc(uvz[..., :2], height, width)  # (..., N, 2)
    z = uvz[..., 2]  # (..., N)
    ndc = torch.cat([xy, depth_to_ndc(z, near, far)[..., None]], dim=-1)  # (..., N, 3)
    return ndc, z > 0.5 * near


def token_grid_ndc(grid_h: int, grid_w: int, *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """NDC of the centres of a grid_h × grid_w token grid covering the image, row-major, (grid_h*grid_w, 3), z = 0.

    Token (row r, column c) sits at ((2c+1)/grid_w - 1, (2r+1)/grid_h - 1, 0). The paper writes
    (2 s_x/w - 1, 2 s_y/h - 1, 0), i.e. cell corners; centres are used instead so that a token whose patch covers
    pixels [p·c, p·(c+1)) gets exactly `pixel_to_ndc` of its centre pixel coordinate p·c + (p-1)/2 for any patch
    size p, i.e. video tokens and projected 3D tokens agree with no half-cell offset.
    """
    ys = (2.0 * torch.arange(grid_h, dtype=dtype, device=device) + 1.0) / grid_h - 1.0  # (grid_h,)
    xs = (2.0 * torch.arange(grid_w, dtype=dtype, device=device) + 1.0) / grid_w - 1.0  # (grid_w,)
    y, x = torch.meshgrid(ys, xs, indexing="ij")  # (grid_h, grid_w) each
    grid = torch.stack([x, y, torch.zeros_like(x)], dim=-1)  # (grid_h, grid_w, 3)
    return rearrange(grid, "h w c -> (h w) c")


def sinusoidal_embedding(x: torch.Tensor, num_freqs: int, *, include_input: bool = False,
                         base_scale: float = math.pi) -> torch.Tensor:
    """NeRF-style code of x (..., C): [sin(2^k·s·x), cos(2^k·s·x)] for k = 0..num_freqs-1, s = base_scale (π).

    This is the paper's ISPE (§2.2): added to both token kinds before Q/K/V so that their dot products depend on
    NDC differences. With s = π the lowest frequency has period 2, one cycle over the NDC range [-1, 1], so the
    code is unambiguous over the image; higher k resolve finer offsets.
    Layout: per channel, num_freqs sines then num_freqs cosines -> (..., C * 2 * num_freqs); with include_input,
    x itself is prepended -> (..., C + C * 2 * num_freqs).
    """
    freqs = base_scale * 2.0 ** torch.arange(num_freqs, dtype=x.dtype, device=x.device)  # (F,)
    angles = x[..., None] * freqs  # (..., C, F)
    code = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (..., C, 2F)
    code = rearrange(code, "... c f -> ... (c f)")  # (..., C*2F)
    return torch.cat([x, code], dim=-1) if include_input else code
