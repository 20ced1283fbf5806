"""Exact z-buffer rasterisation of instance and part ids (and camera depth) in plain PyTorch, for machines
without headless EGL (many GPU cluster nodes ship no libEGL / libGL). No shading: `rgb` and `normal` are None.

Same conventions as `MeshRenderer` (docs/rendering.md, camera_gl.py): OpenCV camera, pixel (i, j) sampled at its
centre (u, v) = (i, j), `part` = part id of the face's first vertex + 1, `instance` = the mesh's instance_id, both
0 on background, the nearest surface wins and a depth tie keeps the face drawn first (GL_LESS in draw order).

Per face, three edge functions e_i(u, v) = a_i (u - u_r) + b_i (v - v_r) + c_i (positive inside) and 1/z, which is
affine in (u, v) (perspective-correct depth), are set up in float64 one of two ways:
  screen:      all corners at z >= near and within +-2^15 px. Corners snap to 1/256 px like GL's 8 sub-pixel bits,
               so the edge functions are exact: a pixel centre on an edge shared by two faces goes to exactly one
               of them, by GL's top-left rule (measured on Mesa llvmpipe: left and top edges are in).
  homogeneous: faces that cross the near plane (or are huge on screen), rasterised without projecting the corners
               (Olano & Greer 1997, "Triangle scan conversion using 2D homogeneous coordinates"): e_i is the pixel
               ray against the plane through the camera and edge i, and the part at z < near is cut per pixel,
               which is GL's near-plane clipping. Not snapped; the top-left rule still breaks exact ties.
Candidate (face, pixel) pairs come from each face's pixel bounding box (for a face crossing the near plane, the
box of its clipped polygon), in chunks of about `max_pairs` pairs; the nearest face per pixel is one scatter
`amin` of the key (float32 depth bits << 32 | face index), which resolves depth and ties in one pass.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from isa4d.render.rasterizer import Mesh, MeshRenderer, RenderError, RenderOutput, mesh_geometry

SUBPIXEL = 256.0          # GL_SUBPIXEL_BITS = 8 on llvmpipe and NVIDIA: window coordinates snap to 1/256 px
SCREEN_LIMIT = 2.0 ** 15  # snapped corners within +-2^15 px keep every edge-function product exact in float64
BOX_MARGIN = 1e-3         # px; widens the boxes of unsnapped faces so rounding never drops a pixel centre
_SHADING_KEYWORDS = frozenset({"background", "light_dir_cam", "ambient"})
_EMPTY = torch.iinfo(torch.int64).max


def _check_mesh(mesh: Mesh) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vertices (V,3) float64, faces (F,3) and the faces' part ids + 1 (F,) int16 (0 without part ids)."""
    verts, faces = mesh_geometry(mesh)
    if not 0 <= int(mesh.instance_id) <= 32767:
        raise ValueError(f"instance_id must be in [0, 32767], got {mesh.instance_id}")
    if mesh.part_ids is None:
        return verts, faces, np.zeros(len(faces), np.int16)
    pid = np.asarray(mesh.part_ids).reshape(len(verts))
    if pid.size and (pid.min() < 0 or pid.max() > 32766):
        raise ValueError("part_ids must be in [0, 32766]")
    return verts, faces, (pid[faces[:, 0]] + 1).astype(np.int16)


def _check_camera(K: np.ndarray, w2c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    K, w2c = np.asarray(K, dtype=np.float64), np.asarray(w2c, dtype=np.float64)
    if K.shape != (3, 3) or abs(K[1, 0]) > 1e-12 or np.abs(K[2] - (0.0, 0.0, 1.0)).max() > 1e-9:
        raise ValueError(f"K must be (3,3) upper-triangular with K[2] = (0, 0, 1), got\n{K}")
    if w2c.shape != (4, 4):
        raise ValueError(f"w2c must be (4,4), got {w2c.shape}")
    return K, w2c


def _face_table(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, ref: torch.Tensor, inv_z: torch.Tensor
                ) -> torch.Tensor:
    """(F, 17): edge coefficients a, b, c (positive inside), top-left flags, reference point, 1/z coefficients.
    A pixel centre exactly on an edge is in for left edges (inside towards +u), then top ones (inside towards +v),
    which is what Mesa llvmpipe draws with this camera convention."""
    top_left = (a > 0) | ((a == 0) & (b > 0))                         # (F, 3)
    return torch.cat([a, b, c, top_left.to(a.dtype), ref, inv_z], 1)


def _screen_setup(q: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Faces with every corner in front: q (F, 3, 3) = K @ camera corners. Returns the face table (F, 17), the
    pixel box lo, hi (F, 2) and whether the face has area (F,)."""
    z = q[..., 2]                                                     # (F, 3)
    uv = torch.round(q[..., :2] / z[..., None] * SUBPIXEL) / SUBPIXEL  # (F, 3, 2) snapped pixel coordinates
    nxt = uv.roll(-1, 1)                                              # (F, 3, 2) edge i starts at corner i+1
    d = uv.roll(-2, 1) - nxt                                          # (F, 3, 2) ... and ends at corner i+2
    a, b = -d[..., 1], d[..., 0]                                      # (F, 3)
    ref = uv[:, 0]                                                    # (F, 2) corner 0; exact offsets from it
    c = a * (ref[:, None, 0] - nxt[..., 0]) + b * (ref[:, None, 1] - nxt[..., 1])  # (F, 3) e_i(ref)
    area2 = c[:, 0]                                                   # (F,) corner 0 against its opposite edge
    s = torch.sign(area2)[:, None]
    a, b, c = a * s, b * s, c * s
    w = 1.0 / z / area2.abs()[:, None]                                # barycentric of corner i = e_i / |area2|
    inv_z = torch.stack([(a * w).sum(-1), (b * w).sum(-1), (c * w).sum(-1)], -1)  # (F, 3)
    return _face_table(a, b, c, ref, inv_z), uv.amin(1), uv.amax(1), area2 != 0


def _homogeneous_setup(q: torch.Tensor, near: float) -> tuple[torch.Tensor, ...]:
    """Any face, without projecting its corners. e_i = (q_{i+1} x q_{i+2}) . (u, v, 1) is the pixel ray against
    the plane through the camera and edge i; all e_i >= 0 (oriented by det) means the ray meets the face in front
    of the camera, at z = |det| / sum e_i. Returns what `_screen_setup` does; the box is that of the face clipped
    to z >= near (its corners in front and its edges' crossings of the near plane), widened by BOX_MARGIN."""
    nxt = q.roll(-1, 1)                                               # (F, 3, 3) corner i+1
    n = torch.linalg.cross(nxt, q.roll(-2, 1), dim=-1)                # (F, 3, 3) edge-plane normals
    det = (q[:, 0] * n[:, 0]).sum(-1)                                 # (F,)
    s = torch.sign(det)[:, None]
    a, b, c = n[..., 0] * s, n[..., 1] * s, n[..., 2] * s             # (F, 3)
    inv_z = torch.stack([a.sum(-1), b.sum(-1), c.sum(-1)], -1) / det.abs()[:, None]
    z, z1 = q[..., 2], nxt[..., 2]                                    # edge from corner i to i+1
    corner = torch.where((z >= near)[..., None], q[..., :2] / z.clamp_min(near)[..., None], torch.nan)
    t = (near - z) / torch.where(z1 == z, 1.0, z1 - z)
    cut = (q + t[..., None] * (nxt - q))[..., :2] / near              # (F, 3, 2) on the near plane
    cut = torch.where(((z - near) * (z1 - near) < 0)[..., None], cut, torch.nan)
    box = torch.cat([corner, cut], 1)                                 # (F, 6, 2)
    lo, hi = box.nan_to_num(torch.inf).amin(1) - BOX_MARGIN, box.nan_to_num(-torch.inf).amax(1) + BOX_MARGIN
    return _face_table(a, b, c, torch.zeros_like(lo), inv_z), lo, hi, det != 0


def _pixel_range(lo: torch.Tensor, hi: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer pixel centres in [lo, hi] within [0, size): first and last (last < first when empty)."""
    first = torch.ceil(lo.clamp(-1.0, size)).long().clamp_min(0)
    last = torch.floor(hi.clamp(-1.0, size)).long().clamp_max(size - 1)
    return first, last


class TorchRenderer:
    """Instance ids, part ids and camera depth of triangle meshes, rendered with an OpenCV camera in PyTorch.

    A drop-in for `MeshRenderer` where only ids / depth are needed (`render_body_maps`): same `render` call and
    output conventions, `rgb` and `normal` are None. device: where the rasterisation runs (None: CPU);
    max_pairs bounds the candidate (face, pixel) pairs handled at once, about 200 bytes each.
    """

    def __init__(self, height: int, width: int, near: float = 0.05, far: float = 100.0,
                 device: str | torch.device | None = None, max_pairs: int = 1 << 20):
        if height <= 0 or width <= 0:
            raise ValueError(f"image size must be positive, got {height}x{width}")
        if not 0.0 < near < far:
            raise ValueError(f"need 0 < near < far, got {near}, {far}")
        if height * width >= 1 << 31:
            raise ValueError(f"image of {height}x{width} pixels is too large")
        if max_pairs <= 0:
            raise ValueError(f"max_pairs must be positive, got {max_pairs}")
        self.height, self.width, self.near, self.far = int(height), int(width), float(near), float(far)
        self.device = torch.device(device if device is not None else "cpu")
        self.max_pairs = int(max_pairs)
        self._closed = False

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> "TorchRenderer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @torch.no_grad()
    def render(self, meshes: Sequence[Mesh], K: np.ndarray, w2c: np.ndarray, *, with_normal: bool = False,
               **shading) -> RenderOutput:
        """Render `meshes` seen by the camera (K, w2c). `MeshRenderer`'s shading keywords (background,
        light_dir_cam, ambient) are accepted and ignored: there is no colour to shade."""
        if self._closed:
            raise RenderError("renderer is closed")
        unknown = sorted(set(shading) - _SHADING_KEYWORDS)
        if unknown:
            raise TypeError(f"render() got unexpected keyword arguments {unknown}")
        if with_normal:
            raise ValueError("TorchRenderer renders ids and depth only; normals need MeshRenderer (EGL)")
        K, w2c = _check_camera(K, w2c)
        H, W = self.height, self.width
        verts, faces, face_part, face_instance, offset = [], [], [], [], 0
        for mesh in meshes:
            v, f, part = _check_mesh(mesh)
            verts.append(v)
            faces.append(f.astype(np.int64) + offset)
            face_part.append(part)
            face_instance.append(np.full(len(f), int(mesh.instance_id), np.int16))
            offset += len(v)
        key = torch.full((H * W,), _EMPTY, dtype=torch.int64, device=self.device)
        if faces and sum(map(len, faces)):
            dev = self.device
            p = torch.from_numpy(np.concatenate(verts)).to(dev)                         # (V, 3) world
            cam = p @ torch.from_numpy(w2c[:3, :3].T).to(dev) + torch.from_numpy(w2c[:3, 3]).to(dev)
            q = (cam @ torch.from_numpy(K.T).to(dev))[torch.from_numpy(np.concatenate(faces)).to(dev)]  # (F, 3, 3)
            self._rasterise(q, key)
        covered = key != _EMPTY
        face = torch.where(covered, key & 0xFFFFFFFF, 0).cpu().numpy()
        depth = (key >> 32).to(torch.int32).view(torch.float32)
        depth = torch.where(covered, depth, torch.inf).cpu().numpy()
        covered = covered.cpu().numpy()
        part = np.zeros(H * W, np.int16)
        instance = np.zeros(H * W, np.int16)
        if covered.any():
            part[covered] = np.concatenate(face_part)[face[covered]]
            instance[covered] = np.concatenate(face_instance)[face[covered]]
        return RenderOutput(rgb=None, depth=depth.reshape(H, W), instance=instance.reshape(H, W),
                            part=part.reshape(H, W), normal=None)

    def _rasterise(self, q: torch.Tensor, key: torch.Tensor, base: torch.Tensor | None = None) -> None:
        """Draw faces q (F, 3, 3) (K @ camera corners, in draw order) into the key buffer (H*W,) by amin.
        `base` (F,) int64: each face's offset into a key buffer of several images (N*H*W,), one per frame."""
        H, W, near, far = self.height, self.width, self.near, self.far
        z = q[..., 2]                                                               # (F, 3)
        # 1. cull faces behind the near plane or beyond the far one; set up the rest, snapped where exact
        ok = torch.isfinite(q).flatten(1).all(-1) & (z >= near).any(-1) & (z <= far).any(-1)
        q = torch.where(ok[:, None, None], q, 1.0)
        table, lo, hi, solid = _screen_setup(q)                                     # (F, 17), (F, 2), (F, 2), (F,)
        screen = (z >= near).all(-1) & (lo.abs() <= SCREEN_LIMIT).all(-1) & (hi.abs() <= SCREEN_LIMIT).all(-1)
        other = torch.nonzero(ok & ~screen)[:, 0]
        if len(other):
            table[other], lo[other], hi[other], solid[other] = _homogeneous_setup(q[other], near)
        # 2. each face's box of pixel centres; keep the faces with any
        x0, x1 = _pixel_range(lo[:, 0], hi[:, 0], W)
        y0, y1 = _pixel_range(lo[:, 1], hi[:, 1], H)
        count = torch.where(ok & solid, (x1 - x0 + 1).clamp_min(0) * (y1 - y0 + 1).clamp_min(0), 0)  # (F,)
        face = torch.nonzero(count)[:, 0]                                           # (F',) in draw order
        if len(face) == 0:
            return
        table, count, x0, y0, width = table[face], count[face], x0[face], y0[face], (x1 - x0 + 1)[face]
        # 3. candidate (face, pixel) pairs in chunks of whole faces, each starting within one window of max_pairs
        ends = count.cumsum(0)
        starts = ends - count
        windows = torch.arange(0, int(ends[-1]), self.max_pairs, device=q.device)
        bounds = torch.unique(torch.cat([torch.searchsorted(starts, windows), windows.new_tensor([len(face)])]))
        bounds = bounds.tolist()
        for f0, f1 in zip(bounds[:-1], bounds[1:]):
            n = int(ends[f1 - 1] - starts[f0])
            i = torch.repeat_interleave(torch.arange(f0, f1, device=q.device), count[f0:f1], output_size=n)  # (N,)
            k = torch.arange(n, device=q.device) + starts[f0] - starts[i]                # (N,) index in the box
            px, py = x0[i] + k % width[i], y0[i] + torch.div(k, width[i], rounding_mode="floor")
            t = table[i]                                                             # (N, 17)
            du, dv = px - t[:, 12], py - t[:, 13]                                    # (N,) exact offsets
            e = t[:, 0:3] * du[:, None] + t[:, 3:6] * dv[:, None] + t[:, 6:9]       # (N, 3)
            inside = ((e > 0) | ((e == 0) & (t[:, 9:12] > 0))).all(-1)
            inv_z = t[:, 14] * du + t[:, 15] * dv + t[:, 16]                         # (N,) 1/z
            inside &= (inv_z <= 1.0 / near) & (inv_z >= 1.0 / far)
            depth = (1.0 / inv_z[inside]).float().view(torch.int32).long()
            pixel = py[inside] * W + px[inside]
            if base is not None:
                pixel = pixel + base[face[i[inside]]]
            key.scatter_reduce_(0, pixel, (depth << 32) | face[i[inside]], reduce="amin")


_warned_fallback = False


def make_renderer(height: int, width: int, backend: str = "auto", device: str | torch.device | None = None):
    """A renderer of ids and depth: "egl" (`MeshRenderer`), "torch" (`TorchRenderer`), or "auto": EGL if it
    initialises, else `TorchRenderer` (warning once per process). device applies to the torch backend; None
    picks the current CUDA device when there is one, else the CPU."""
    global _warned_fallback
    if backend not in ("auto", "egl", "torch"):
        raise ValueError(f"backend must be 'auto', 'egl' or 'torch', got {backend!r}")
    if backend != "torch":
        try:
            return MeshRenderer(height, width)
        except RenderError as e:
            if backend == "egl":
                raise
            if not _warned_fallback:
                _warned_fallback = True
                warnings.warn(f"headless EGL is unavailable ({e}); rendering ids and depth with the PyTorch "
                              "rasteriser (isa4d.render.TorchRenderer) instead", stacklevel=2)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return TorchRenderer(height, width, device=device)
