"""Camera-space normal maps of posed meshes, many frames in one batched rasterisation, on any device.

The 2D-map baseline of ISA-DiT (paper §4, the ControlNet comparison, which conditioned on SMPL normal maps) reads
them. Each pixel holds the unit normal, in the frame's OpenCV camera coordinates, of the nearest face covering its
centre (flat shading: one normal per face, `(v1 - v0) x (v2 - v0)` in the mesh's winding), and 0 where no mesh
covers it. Coverage, depth order and tie rules are `TorchRenderer`'s, so a map's non-zero pixels are exactly the
silhouette that `TorchRenderer.render` gives for the same meshes and camera.
"""

from __future__ import annotations

import torch
from einops import rearrange

from isa4d.render.torch_raster import _EMPTY, TorchRenderer

# Pixels of slack around a face's box in the float32 pre-cull: far above its rounding, far below a pixel.
CULL_MARGIN = 0.01
# Meshes culled at once hold about this many faces (the cull keeps ~24 bytes per face).
MAX_FACES = 1 << 22


@torch.no_grad()
def normal_maps(vertices: torch.Tensor, faces: torch.Tensor, K: torch.Tensor, w2c: torch.Tensor,
                present: torch.Tensor, height: int, width: int, near: float = 0.05, far: float = 100.0,
                max_faces: int = MAX_FACES) -> torch.Tensor:
    """vertices (N, M, V, 3) world positions of M meshes in each of N frames (sharing `faces` (F, 3)), cameras
    K (N, 3, 3) in pixels of a height x width image and w2c (N, 4, 4) OpenCV, present (N, M) bool (an absent
    mesh draws nothing) -> normals (N, 3, H, W) float32 in camera coordinates, 0 on background."""
    N, M, V, _ = vertices.shape
    if K.shape != (N, 3, 3) or w2c.shape != (N, 4, 4) or present.shape != (N, M):
        raise ValueError(f"normal_maps: cameras {tuple(K.shape)}, {tuple(w2c.shape)} and present "
                         f"{tuple(present.shape)} do not match {N} frames of {M} meshes")
    device = vertices.device
    faces = faces.to(device).long()
    frame, mesh = torch.nonzero(present.to(device), as_tuple=True)  # the meshes to draw, frame by frame
    # 1. a float32 cull to the faces that may cover a pixel centre (on small frames, most of a body's faces cover
    #    none, and the rasteriser's exact float64 set-up of each face costs far more than this box)
    selected = []
    step = max(1, max_faces // max(1, faces.shape[0]))
    for k0 in range(0, len(frame), step):
        f_k, m_k = frame[k0:k0 + step], mesh[k0:k0 + step]
        cam = _to_camera(vertices[f_k, m_k].float(), w2c[f_k].float())  # (k, V, 3)
        q = torch.einsum("kij,kvj->kvi", K[f_k].float(), cam)[:, faces]  # (k, F, 3, 3)
        k, f = torch.nonzero(_may_cover_a_pixel(q, height, width, near), as_tuple=True)
        selected.append((k + k0, f))
    out = torch.zeros(N * height * width, 3, dtype=torch.float32, device=device)
    k = torch.cat([s[0] for s in selected]) if selected else frame
    f = torch.cat([s[1] for s in selected]) if selected else frame
    if len(k):
        # 2. exact float64 rasterisation of the kept faces, in draw order (frame, mesh, face), into one buffer
        corners = vertices[frame[k][:, None], mesh[k][:, None], faces[f]]  # (F', 3, 3) world
        tri = _to_camera(corners.double(), w2c[frame[k]].double())  # (F', 3, 3) camera
        q = torch.einsum("fij,fcj->fci", K[frame[k]].double(), tri)  # (F', 3, 3) K @ camera corners
        key = torch.full((N * height * width,), _EMPTY, dtype=torch.int64, device=device)
        TorchRenderer(height, width, near, far, device=device)._rasterise(q, key, frame[k] * (height * width))
        normal = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
        normal = torch.nn.functional.normalize(normal, dim=-1).float()  # (F', 3)
        covered = key != _EMPTY
        out = torch.where(covered[:, None], normal[torch.where(covered, key & 0xFFFFFFFF, 0)], 0.0)
    return rearrange(out, "(n h w) c -> n c h w", n=N, h=height)


def _to_camera(verts: torch.Tensor, w2c: torch.Tensor) -> torch.Tensor:
    """World points (k, V, 3) -> camera coordinates (k, V, 3) with each row's w2c (k, 4, 4)."""
    return torch.einsum("kij,kvj->kvi", w2c[:, :3, :3], verts) + w2c[:, None, :3, 3]


def _may_cover_a_pixel(q: torch.Tensor, height: int, width: int, near: float) -> torch.Tensor:
    """(...,) bool of faces q (..., 3, 3) (K @ camera corners) that may cover a pixel centre: every face with a
    corner near or behind the near plane (the rasteriser clips those), and faces in front whose box, widened by
    CULL_MARGIN, holds a pixel centre inside the image."""
    z = q[..., 2]  # (..., 3)
    front = (z >= near * (1 + 1e-3)).all(-1)
    uv = q[..., :2] / z.clamp_min(near)[..., None]  # (..., 3, 2)
    lo, hi = uv.amin(-2) - CULL_MARGIN, uv.amax(-2) + CULL_MARGIN  # (..., 2)
    size = torch.tensor([width - 1, height - 1], dtype=q.dtype, device=q.device)
    lo, hi = lo.clamp_min(0), torch.minimum(hi, size)
    return ~front | (torch.ceil(lo) <= torch.floor(hi)).all(-1)
