"""Fixed SMPL surface samples: the 3D tokens' points (PAPER.md §2.1).

The paper samples points on the SMPL surface every frame but does not say whether the sample set is
fixed. isa4d fixes it: one set of (face, barycentric) pairs is drawn once on the rest template and
reused every frame, so token ``k`` is the same body point in every frame and the 3D temporal
transformer can attend along time per point. Posing is then a gather + weighted sum of the posed
vertices, which is cheap, differentiable and exactly follows the mesh.

Sampling is area-weighted (uniform in surface measure, so no region is over-represented by its
triangle density) and then thinned by farthest point sampling (FPS) on the rest mesh, so the tokens
cover the body evenly instead of clumping like i.i.d. samples do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange

# Candidates per kept point: enough that FPS has near-uniform choices, small enough to stay fast.
OVERSAMPLE = 8


@dataclass(frozen=True)
class SurfaceSamples:
    """A fixed point set on a triangle mesh: ``face_index (N,)`` long, ``barycentric (N, 3)`` float.

    Stored as (face, barycentric) rather than 3D positions so the same body points can be re-posed
    by any deformation of the mesh's vertices.
    """

    face_index: torch.Tensor
    barycentric: torch.Tensor

    @property
    def num_points(self) -> int:
        return int(self.face_index.shape[0])


def face_part_ids(faces, part_ids) -> np.ndarray:
    """(F,) part of each face: the majority part of its three vertices (vertex 0's when all differ).

    Faces on a part seam need one owner so that per-part quotas in ``sample_surface`` are well defined.
    """
    tri = np.asarray(part_ids)[np.asarray(faces)]  # (F, 3)
    return np.where(tri[:, 1] == tri[:, 2], tri[:, 1], tri[:, 0])


def _face_areas(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    tri = vertices[faces]  # (F, 3, 3)
    return 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=-1)


def _random_area_samples(rng: np.random.Generator, areas: np.ndarray, faces_subset: np.ndarray, count: int):
    """``count`` i.i.d. points uniform in surface area over ``faces_subset``: (face ids, barycentrics)."""
    w = areas[faces_subset]
    face = faces_subset[rng.choice(len(faces_subset), size=count, p=w / w.sum())]
    # sqrt trick: (1 - s, s (1 - v), s v) with s = sqrt(u) is uniform over the triangle
    s, v = np.sqrt(rng.random(count)), rng.random(count)
    bary = np.stack([1.0 - s, s * (1.0 - v), s * v], axis=-1)
    return face, bary


def _farthest_point_sampling(points: np.ndarray, num: int, groups: np.ndarray | None,
                             quota: int) -> np.ndarray:
    """Greedy FPS over ``points (M, 3)``; indices of ``num`` picks, starting from candidate 0.

    With ``groups`` and ``quota``, once the free slots left equal the total shortfall of groups below
    ``quota``, picks are restricted to those short groups, so every group ends with >= ``quota`` while
    keeping the FPS spacing (the forced picks are still the farthest available in their group).
    """
    m = len(points)
    chosen = np.empty(num, dtype=np.int64)
    dist = np.full(m, np.inf)
    taken = np.zeros(m, dtype=bool)
    counts = np.zeros(int(groups.max()) + 1 if groups is not None else 1, dtype=np.int64)
    present = np.unique(groups) if groups is not None else np.zeros(0, dtype=np.int64)
    nxt = 0
    for i in range(num):
        if groups is not None and quota > 0:
            short = present[counts[present] < quota]
            shortfall = int((quota - counts[short]).sum())
            if shortfall >= num - i and shortfall > 0:
                score = np.where(np.isin(groups, short) & ~taken, dist, -1.0)
                nxt = int(np.argmax(score))
        chosen[i] = nxt
        taken[nxt] = True
        if groups is not None:
            counts[groups[nxt]] += 1
        dist = np.minimum(dist, np.einsum("mc,mc->m", points - points[nxt], points - points[nxt]))
        dist[taken] = -1.0
        nxt = int(np.argmax(dist))
    return chosen


def sample_surface(vertices_rest, faces, num_points: int, seed: int = 0, part_ids=None,
                   min_per_part: int = 0) -> SurfaceSamples:
    """``num_points`` evenly spread, area-weighted surface samples of the rest mesh; deterministic per seed.

    Draws ``OVERSAMPLE * num_points`` area-uniform candidates, then keeps ``num_points`` of them by
    farthest point sampling in 3D. With ``part_ids (V,)``, every part present gets at least
    ``min_per_part`` points, so small parts (hands, feet, head) are never left without tokens.
    """
    verts = np.asarray(torch.as_tensor(vertices_rest).detach().cpu(), dtype=np.float64)
    faces_np = np.asarray(torch.as_tensor(faces).detach().cpu(), dtype=np.int64)
    rng = np.random.default_rng(seed)
    areas = _face_areas(verts, faces_np)
    face, bary = _random_area_samples(rng, areas, np.arange(len(faces_np)), OVERSAMPLE * num_points)
    groups = None
    if part_ids is not None and min_per_part > 0:
        fpart = face_part_ids(faces_np, np.asarray(torch.as_tensor(part_ids).cpu()))
        parts = np.unique(fpart)
        if min_per_part * len(parts) > num_points:
            raise ValueError(f"num_points={num_points} < min_per_part={min_per_part} x {len(parts)} parts")
        # top up parts too small to hold their quota among the candidates
        extra = [_random_area_samples(rng, areas, np.flatnonzero(fpart == p), need)
                 for p in parts if (need := OVERSAMPLE * min_per_part - int((fpart[face] == p).sum())) > 0]
        if extra:
            face = np.concatenate([face, *(f for f, _ in extra)])
            bary = np.concatenate([bary, *(b for _, b in extra)])
        groups = fpart[face]
    points = np.einsum("mk,mkc->mc", bary, verts[faces_np[face]])  # (M, 3)
    keep = _farthest_point_sampling(points, num_points, groups, min_per_part)
    return SurfaceSamples(torch.as_tensor(face[keep], dtype=torch.long),
                          torch.as_tensor(bary[keep], dtype=torch.float32))


class BodySurface(torch.nn.Module):
    """Fixed surface points of a posed mesh: ``forward(vertices (..., V, 3)) -> points (..., N, 3)``.

    The samples (face index, barycentrics) are persistent buffers, because they define which body
    point each 3D token is and must survive checkpointing unchanged. The triangle vertex indices
    come from the body model's faces (licensed SMPL data), so they are non-persistent, like
    ``BodyModel``'s buffers.
    """

    def __init__(self, faces, samples: SurfaceSamples):
        super().__init__()
        faces = torch.as_tensor(faces, dtype=torch.long)
        self.register_buffer("face_index", samples.face_index.clone().long())
        self.register_buffer("barycentric", samples.barycentric.clone().float())
        self.register_buffer("tri_vertex", faces[samples.face_index].clone(), persistent=False)  # (N, 3)

    @classmethod
    def from_body_model(cls, body_model, num_points: int, seed: int = 0, part_ids=None,
                        min_per_part: int = 0) -> "BodySurface":
        """Samples drawn on ``body_model``'s rest template (zero shape, zero pose) and its faces."""
        v_rest = body_model.smpl.v_template
        samples = sample_surface(v_rest, body_model.faces, num_points, seed, part_ids, min_per_part)
        return cls(body_model.faces, samples)

    @property
    def num_points(self) -> int:
        return int(self.face_index.shape[0])

    def _triangles(self, vertices: torch.Tensor) -> torch.Tensor:
        tri = vertices.index_select(-2, self.tri_vertex.flatten())  # (..., N*3, 3)
        return rearrange(tri, "... (n k) c -> ... n k c", k=3)  # (..., N, 3, 3)

    def forward(self, vertices: torch.Tensor) -> torch.Tensor:
        tri = self._triangles(vertices)  # (..., N, 3, 3)
        return torch.einsum("...nkc,nk->...nc", tri, self.barycentric.to(tri.dtype))  # (..., N, 3)

    def normals(self, vertices: torch.Tensor) -> torch.Tensor:
        """Unit face normals at the samples, (..., N, 3); right-handed in the faces' winding order."""
        tri = self._triangles(vertices)  # (..., N, 3, 3)
        n = torch.linalg.cross(tri[..., 1, :] - tri[..., 0, :], tri[..., 2, :] - tri[..., 0, :], dim=-1)
        return torch.nn.functional.normalize(n, dim=-1)  # (..., N, 3)


def pose_points(body_model, surface: BodySurface, betas, global_orient, body_pose,
                transl=None) -> torch.Tensor:
    """Surface points of posed bodies, (..., T, N, 3): ``BodyModel`` then ``BodySurface``."""
    vertices, _ = body_model(betas, global_orient, body_pose, transl)  # (..., T, V, 3)
    return surface(vertices)  # (..., T, N, 3)
