"""Geometry of the procedural toy humanoid: skeleton, implicit surface and mesh extraction.

Coordinates follow SMPL: metres, y up, subject faces +z, subject's left is +x, T-pose, pelvis
near the origin (SMPL's pelvis joint sits at y ~ -0.22). The body is a smooth union (polynomial
smooth-min) of ellipsoids, tapered capsules and rounded boxes laid along the skeleton; every
primitive carries the SMPL joint whose bone it dresses, which seeds the skinning weights. The
zero level set is extracted with :mod:`data_prep.marching_cubes`, cleaned to a single closed
component, relaxed (tangential smoothing + projection back onto the surface) and refined by edge
splits to exactly ``N_VERTS`` vertices (SMPL's count, so per-vertex tensors have SMPL's shape).
"""

from __future__ import annotations

import numpy as np

from data_prep.marching_cubes import marching_cubes
from isa4d.body.smpl import JOINT_NAMES

N_VERTS = 6890  # SMPL's vertex count; a genus-0 mesh then has SMPL's 13,776 faces

# design rest joints (neutral), close to SMPL's neutral template joints; right = mirrored left
_LEFT_AND_CENTRE = {
    "pelvis": (0.0, -0.22, 0.02), "left_hip": (0.07, -0.31, 0.02), "spine1": (0.0, -0.11, 0.0),
    "left_knee": (0.10, -0.70, 0.01), "spine2": (0.0, 0.02, 0.02), "left_ankle": (0.09, -1.10, -0.03),
    "spine3": (0.0, 0.08, 0.02), "left_foot": (0.12, -1.16, 0.09), "neck": (0.0, 0.29, -0.01),
    "left_collar": (0.08, 0.20, -0.01), "head": (0.0, 0.37, 0.04), "left_shoulder": (0.17, 0.22, -0.02),
    "left_elbow": (0.43, 0.21, -0.04), "left_wrist": (0.69, 0.21, -0.04), "left_hand": (0.77, 0.20, -0.05),
}


def _mirror(p):
    return (-p[0], p[1], p[2])


REST_JOINTS = np.array([
    _LEFT_AND_CENTRE[n] if n in _LEFT_AND_CENTRE else _mirror(_LEFT_AND_CENTRE[n.replace("right", "left")])
    for n in JOINT_NAMES
], dtype=np.float64)
J = {n: i for i, n in enumerate(JOINT_NAMES)}


# ----------------------------------------------------------------------------- primitives (SDFs)
def _norm(x):
    return np.sqrt(np.einsum("...i,...i->...", x, x))


def sd_ellipsoid(p, c, r):
    q = (p - np.asarray(c)) / np.asarray(r)
    k0 = _norm(q)
    k1 = _norm(q / np.asarray(r))
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-9)


def sd_cone(p, a, b, ra, rb):
    """Tapered capsule from a (radius ra) to b (radius rb)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ab = b - a
    t = np.clip(((p - a) @ ab) / (ab @ ab), 0.0, 1.0)
    return _norm(p - (a + t[:, None] * ab)) - (ra + t * (rb - ra))


def sd_rbox(p, c, half, r):
    q = np.abs(p - np.asarray(c)) - (np.asarray(half) - r)
    return _norm(np.maximum(q, 0.0)) + np.minimum(q.max(-1), 0.0) - r


def smin(a, b, k):
    h = np.maximum(k - np.abs(a - b), 0.0) / k
    return np.minimum(a, b) - h * h * k * 0.25


def _primitives():
    """(kind, args, joint, blend radius) for every body primitive, left limbs mirrored to right."""
    jt = {n: REST_JOINTS[J[n]] for n in JOINT_NAMES}
    body = [  # torso and head (centre line)
        ("ell", ((0.0, -0.25, 0.005), (0.165, 0.115, 0.11)), "pelvis", 0.0),
        ("ell", ((0.0, -0.09, 0.01), (0.145, 0.13, 0.105)), "spine1", 0.05),
        ("ell", ((0.0, 0.04, 0.01), (0.155, 0.12, 0.11)), "spine2", 0.05),
        ("ell", ((0.0, 0.15, 0.0), (0.165, 0.11, 0.105)), "spine3", 0.05),
        ("cone", ((0.0, 0.22, -0.015), (0.0, 0.40, 0.01), 0.052, 0.05), "neck", 0.04),
        ("ell", ((0.0, 0.455, 0.035), (0.078, 0.105, 0.095)), "head", 0.03),
        ("ell", ((0.0, 0.443, 0.128), (0.014, 0.024, 0.02)), "head", 0.012),
    ]
    left = [
        ("cone", ((0.03, 0.215, -0.02), (0.16, 0.215, -0.025), 0.06, 0.058), "left_collar", 0.04),
        ("cone", (jt["left_shoulder"], jt["left_elbow"], 0.05, 0.038), "left_shoulder", 0.03),
        ("cone", (jt["left_elbow"], jt["left_wrist"], 0.038, 0.028), "left_elbow", 0.02),
        ("ell", ((0.745, 0.205, -0.04), (0.06, 0.022, 0.046)), "left_wrist", 0.02),
        ("ell", ((0.81, 0.205, -0.045), (0.06, 0.02, 0.043)), "left_hand", 0.02),
        ("cone", ((0.715, 0.195, 0.0), (0.775, 0.19, 0.045), 0.018, 0.016), "left_wrist", 0.015),
        ("cone", ((0.083, -0.30, 0.02), jt["left_knee"], 0.08, 0.052), "left_hip", 0.04),
        ("cone", (jt["left_knee"], jt["left_ankle"], 0.052, 0.033), "left_knee", 0.03),
        ("ell", ((0.097, -0.82, -0.02), (0.048, 0.10, 0.05)), "left_knee", 0.03),
        ("cone", ((0.09, -1.09, -0.035), (0.10, -1.14, 0.03), 0.037, 0.03), "left_ankle", 0.03),
        ("rbox", ((0.095, -1.155, 0.0), (0.04, 0.025, 0.08), 0.022), "left_ankle", 0.03),
        ("rbox", ((0.11, -1.163, 0.115), (0.045, 0.018, 0.05), 0.016), "left_foot", 0.02),
    ]
    prims = list(body)
    for kind, args, joint, k in left:
        prims.append((kind, args, joint, k))
    for kind, args, joint, k in left:
        m = np.array([-1.0, 1.0, 1.0])
        if kind == "cone":
            margs = (np.asarray(args[0]) * m, np.asarray(args[1]) * m, args[2], args[3])
        else:
            margs = (np.asarray(args[0]) * m,) + tuple(args[1:])
        prims.append((kind, margs, joint.replace("left", "right"), k))
    return prims


PRIMITIVES = _primitives()
_SD = {"ell": sd_ellipsoid, "cone": sd_cone, "rbox": sd_rbox}


def primitive_distances(p: np.ndarray) -> np.ndarray:
    """(N, n_primitives) signed distances of points to each primitive."""
    return np.stack([_SD[kind](p, *args) for kind, args, _, _ in PRIMITIVES], axis=1)


def primitive_joints() -> np.ndarray:
    return np.array([J[joint] for _, _, joint, _ in PRIMITIVES])


def field(p: np.ndarray) -> np.ndarray:
    """Implicit body: negative inside, zero on the skin."""
    d = primitive_distances(p)
    f = d[:, 0]
    for i, (_, _, _, k) in enumerate(PRIMITIVES[1:], start=1):
        f = smin(f, d[:, i], k) if k > 0 else np.minimum(f, d[:, i])
    return f


def field_and_grad(p: np.ndarray, eps: float = 1e-5):
    """Field value and forward-difference gradient in a single batched evaluation."""
    off = np.concatenate([np.zeros((1, 3)), eps * np.eye(3)])
    f = field((p[None] + off[:, None]).reshape(-1, 3)).reshape(4, -1)
    return f[0], (f[1:] - f[0]).T / eps


# ----------------------------------------------------------------------------- mesh utilities
def edges_of(faces: np.ndarray) -> np.ndarray:
    """Unique undirected edges (E, 2), sorted."""
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    return np.unique(np.sort(e, axis=1), axis=0)


def vertex_adjacency(n_verts: int, faces: np.ndarray):
    import scipy.sparse as sp

    e = edges_of(faces)
    a = sp.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n_verts, n_verts))
    return (a + a.T).tocsr()


def connected_components(n_verts: int, faces: np.ndarray, mask=None):
    from scipy.sparse.csgraph import connected_components as cc

    adj = vertex_adjacency(n_verts, faces)
    if mask is not None:
        idx = np.flatnonzero(mask)
        return cc(adj[idx][:, idx], directed=False)
    return cc(adj, directed=False)


def keep_largest_component(verts, faces):
    _, labels = connected_components(len(verts), faces)
    keep = labels == np.bincount(labels).argmax()
    remap = -np.ones(len(verts), dtype=np.int64)
    remap[keep] = np.arange(keep.sum())
    faces = remap[faces[keep[faces[:, 0]]]]
    return verts[keep], faces


def vertex_normals(verts, faces):
    fn = np.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]])
    vn = np.zeros_like(verts)
    for k in range(3):
        np.add.at(vn, faces[:, k], fn)
    return vn / np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-12)


def project_to_surface(verts, steps: int = 3):
    for _ in range(steps):
        f, g = field_and_grad(verts)
        verts = verts - (f / np.maximum((g * g).sum(1), 1e-12))[:, None] * g
    return verts


def relax(verts, faces, iters: int = 10, step: float = 0.5):
    """Tangential Laplacian smoothing, re-projected onto the implicit surface each iteration."""
    adj = vertex_adjacency(len(verts), faces)
    deg = np.asarray(adj.sum(1)).ravel()
    for _ in range(iters):
        lap = adj @ verts / deg[:, None] - verts
        n = vertex_normals(verts, faces)
        lap -= (lap * n).sum(1, keepdims=True) * n
        verts = project_to_surface(verts + step * lap, steps=1)
    return project_to_surface(verts, steps=2)


def split_longest_edges(verts, faces, n_target: int):
    """Add vertices by splitting the longest edges (each face split at most once per round)
    until the mesh has exactly ``n_target`` vertices; new vertices are projected to the surface."""
    verts, faces = verts.copy(), faces.copy()
    while len(verts) < n_target:
        de = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
        fid = np.tile(np.arange(len(faces)), 3)
        key = np.sort(de, axis=1)
        order = np.lexsort((key[:, 1], key[:, 0]))
        key, fid, de = key[order], fid[order], de[order]
        # closed manifold: each undirected edge appears exactly twice, adjacent after sorting
        e, f1, f2 = key[0::2], fid[0::2], fid[1::2]
        length = np.linalg.norm(verts[e[:, 0]] - verts[e[:, 1]], axis=1)
        used = np.zeros(len(faces), dtype=bool)
        new_faces, new_verts, dead = [], [], []
        need = n_target - len(verts)
        for i in np.argsort(-length, kind="stable"):
            if need == 0:
                break
            if used[f1[i]] or used[f2[i]]:
                continue
            used[f1[i]] = used[f2[i]] = True
            a, b = e[i]
            m = len(verts) + len(new_verts)
            new_verts.append(0.5 * (verts[a] + verts[b]))
            for fi in (f1[i], f2[i]):
                tri = list(faces[fi])
                k = tri.index(a)
                if tri[(k + 1) % 3] == b:  # (a, b, c) -> (a, m, c), (m, b, c)
                    c = tri[(k + 2) % 3]
                    new_faces += [(a, m, c), (m, b, c)]
                else:  # (b, a, c) -> (b, m, c), (m, a, c)
                    c = tri[(k + 1) % 3]
                    new_faces += [(b, m, c), (m, a, c)]
                dead.append(fi)
            need -= 1
        keep = np.ones(len(faces), dtype=bool)
        keep[dead] = False
        faces = np.concatenate([faces[keep], np.array(new_faces, dtype=np.int64)])
        verts = np.concatenate([verts, project_to_surface(np.array(new_verts))])
    return verts, faces


def build_mesh(spacing: float = 0.0185, n_verts: int = N_VERTS):
    """Marching cubes on the implicit body, cleaned, relaxed and refined to ``n_verts`` vertices."""
    lo = np.array([-0.92, -1.22, -0.16])
    hi = np.array([0.92, 0.60, 0.22])
    axes = [np.arange(lo[a], hi[a] + spacing, spacing) for a in range(3)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    vals = field(grid.reshape(-1, 3)).reshape(grid.shape[:3])
    verts, faces = marching_cubes(vals, lo, spacing)
    verts, faces = keep_largest_component(verts, faces)
    if len(verts) > n_verts:
        raise RuntimeError(f"marching cubes gave {len(verts)} > {n_verts} vertices; raise `spacing`")
    verts = relax(verts, faces, iters=6)
    verts, faces = split_longest_edges(verts, faces, n_verts)
    verts = relax(verts, faces, iters=10)
    return verts, faces
