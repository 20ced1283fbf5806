"""Silhouettes and body-part maps of the conditioning SMPL bodies, rendered with the clip's cameras.

They are the references of pose adherence (`pose.SilhouetteIoU`) and body-part appearance
(`appearance.PartAppearance`). Rendering is exact rasterisation (`isa4d.render.MeshRenderer`, headless EGL, or
`isa4d.render.TorchRenderer`, the same maps in PyTorch where EGL is missing: `isa4d.render.make_renderer`),
one frame at a time on the CPU side; create the renderer once (at the video's size) and reuse it.
"""

from __future__ import annotations

import numpy as np
import torch

from isa4d.body.smpl import PART_NAMES
from isa4d.render import Mesh, MeshRenderer

NUM_PARTS = len(PART_NAMES)


def render_body_maps(renderer: MeshRenderer, vertices: torch.Tensor, faces: torch.Tensor, part_ids: torch.Tensor,
                     K: torch.Tensor, w2c: torch.Tensor, person_mask: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Silhouettes and part maps of posed bodies.

    vertices (B, P, T, V, 3) world (e.g. `BodyModel` output), faces (F, 3), part_ids (V,) indexing `PART_NAMES`,
    K (B, T, 3, 3) pixels and w2c (B, T, 4, 4) OpenCV of frames of the renderer's size, person_mask (B, P).
    Returns silhouette (B, T, H, W) bool (any person) and parts (B, T, H, W) long: p * NUM_PARTS + part id of
    the visible surface of person p, -1 for background; occlusion between people is resolved by depth.
    """
    B, P, T = vertices.shape[:3]
    if person_mask is None:
        person_mask = torch.ones(B, P, dtype=torch.bool)
    verts = vertices.detach().float().cpu().numpy()
    faces_np = faces.detach().cpu().numpy().astype(np.int64)
    parts_np = part_ids.detach().cpu().numpy().astype(np.int64)
    Ks, w2cs, alive = K.detach().double().cpu().numpy(), w2c.detach().double().cpu().numpy(), person_mask.cpu().numpy()
    out = np.full((B, T, renderer.height, renderer.width), -1, dtype=np.int64)
    for b in range(B):
        for t in range(T):
            meshes = [Mesh(vertices=verts[b, p, t], faces=faces_np, part_ids=parts_np, instance_id=p + 1)
                      for p in range(P) if alive[b, p]]
            if not meshes:
                continue
            r = renderer.render(meshes, Ks[b, t], w2cs[b, t], with_normal=False)
            covered = r.part > 0
            out[b, t][covered] = (r.instance[covered].astype(np.int64) - 1) * NUM_PARTS + r.part[covered] - 1
    parts = torch.from_numpy(out)
    return parts >= 0, parts
