"""Write a procedural, license-free humanoid as SMPL-format model files that ``smplx`` loads unchanged.

    python -m data_prep.make_toy_body --out DIR

writes ``DIR/smpl/SMPL_{NEUTRAL,MALE,FEMALE}.pkl`` (plain numpy / scipy.sparse, no chumpy),
``DIR/smpl/toy_body_parts.json`` (part name -> id) and ``DIR/smpl/toy_body_vertex_ids.json``
(smplx extra-keypoint name -> vertex). All three genders share one topology (6,890 vertices,
13,776 faces, SMPL's counts), skinning weights, joint regressor, shape directions and parts; only
the template differs (male/female are the neutral body pushed along the shape directions).
The mesh comes from :mod:`data_prep.toy_body_geometry`. Deterministic: no randomness anywhere.

The toy body has no pose correctives: ``posedirs`` is all zeros (float32 to keep files small).
"""

from __future__ import annotations

import argparse
import json
import pickle
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy.optimize import nnls

from data_prep import toy_body_geometry as geo
from data_prep.toy_body_geometry import REST_JOINTS
from isa4d.body.smpl import JOINT_NAMES, PARENTS, PART_NAMES, part_ids_from_weights

J = {n: i for i, n in enumerate(JOINT_NAMES)}
PARENTS = np.array(PARENTS)

N_BETAS, N_POSEDIRS = 10, 207
SKIN_TAU = 0.012        # softness (m) of the primitive -> joint affinity
SKIN_SMOOTH_ITERS = 25  # graph-diffusion iterations widening the transitions at joints
SKIN_PRUNE = 0.01       # drop weights below this, then renormalise


# ----------------------------------------------------------------------------- skeleton helpers
def _bone_segments(joints: np.ndarray) -> np.ndarray:
    """(24, 2, 3): the segment each joint's vertices hang on (joint -> its main child / an end)."""
    child = {"pelvis": "spine1", "spine1": "spine2", "spine2": "spine3", "spine3": "neck", "neck": "head"}
    ends = {"head": (0.0, 0.15, 0.0)}
    for s, sx in (("left", 1.0), ("right", -1.0)):
        child.update({f"{s}_hip": f"{s}_knee", f"{s}_knee": f"{s}_ankle", f"{s}_ankle": f"{s}_foot",
                      f"{s}_collar": f"{s}_shoulder", f"{s}_shoulder": f"{s}_elbow",
                      f"{s}_elbow": f"{s}_wrist", f"{s}_wrist": f"{s}_hand"})
        ends.update({f"{s}_foot": (0.0, 0.0, 0.07), f"{s}_hand": (sx * 0.09, 0.0, 0.0)})
    seg = np.zeros((24, 2, 3))
    for n, i in J.items():
        seg[i, 0] = joints[i]
        seg[i, 1] = joints[J[child[n]]] if n in child else joints[i] + np.asarray(ends[n])
    return seg


def _closest_on_segments(v: np.ndarray, seg: np.ndarray):
    """Closest points (V, 24, 3) and segment parameters t (V, 24) of vertices on every bone."""
    a, ab = seg[:, 0], seg[:, 1] - seg[:, 0]
    t = np.clip(np.einsum("vjk,jk->vj", v[:, None] - a, ab) / (ab * ab).sum(1), 0.0, 1.0)
    return a + t[..., None] * ab, t


# ----------------------------------------------------------------------------- rig
def skinning_weights(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Soft assignment to the joint of the nearest primitives, diffused over the mesh graph."""
    d = geo.primitive_distances(verts)
    aff = np.exp(-(d - d.min(1, keepdims=True)) / SKIN_TAU)
    w = np.zeros((len(verts), 24))
    np.add.at(w.T, geo.primitive_joints(), aff.T)
    w /= w.sum(1, keepdims=True)
    adj = geo.vertex_adjacency(len(verts), faces)
    deg = np.asarray(adj.sum(1)).ravel()[:, None]
    for _ in range(SKIN_SMOOTH_ITERS):
        w = 0.5 * w + 0.5 * (adj @ w) / deg
    w[w < SKIN_PRUNE] = 0.0
    return w / w.sum(1, keepdims=True)


def joint_regressor(verts: np.ndarray, joints: np.ndarray, spacing: float = 0.0185) -> sp.csc_matrix:
    """Each joint as a near-uniform convex combination of a ring of vertices around it.

    The ring is the vertices within a thin band of the plane through the joint orthogonal to its
    bone (horizontal for the trunk, neck, head and hips); weights are the closest-to-uniform
    non-negative weights that reproduce the joint exactly (NNLS with heavily weighted equality rows).
    """
    seg = _bone_segments(joints)
    rows, cols, vals = [], [], []
    for n, j in J.items():
        if n in ("pelvis", "spine1", "spine2", "spine3", "neck", "head") or n.endswith("hip"):
            normal = np.array([0.0, 1.0, 0.0])
        else:
            normal = seg[j, 1] - seg[j, 0]
        normal /= np.linalg.norm(normal)
        dist = np.linalg.norm(verts - joints[j], axis=1)
        radius = 2.5 * dist.min()
        for band in spacing * np.array([0.6, 0.9, 1.3, 2.0, 3.0]):
            ring = np.flatnonzero((np.abs((verts - joints[j]) @ normal) < band) & (dist < radius))
            k, mu = len(ring), 1e3
            a = np.concatenate([mu * np.vstack([verts[ring].T, np.ones(k)]), np.eye(k)])
            b = np.concatenate([mu * np.append(joints[j], 1.0), np.full(k, 1.0 / k)])
            w, _ = nnls(a, b, maxiter=50 * k)
            w /= w.sum()
            if np.linalg.norm(w @ verts[ring] - joints[j]) < 1e-5:
                break
        else:
            raise RuntimeError(f"could not regress joint {n} from its vertex ring")
        keep = w > 1e-6
        rows += [j] * int(keep.sum())
        cols += ring[keep].tolist()
        vals += (w[keep] / w[keep].sum()).tolist()
    return sp.csc_matrix((vals, (rows, cols)), shape=(24, len(verts)))


def shape_directions(verts: np.ndarray, weights: np.ndarray, joints: np.ndarray) -> np.ndarray:
    """(V, 3, 10) displacement per unit beta: 0 height, 1 girth, 2 limb length, 3 shoulder width,
    4 head size, 5..9 zero. Per-joint motions are blended with the skinning weights, so joints
    regressed from the shaped vertices follow the surface."""
    dirs = np.zeros((len(verts), 3, N_BETAS))
    seg = _bone_segments(joints)
    closest, t = _closest_on_segments(verts, seg)
    # 0: height ~4 cm per unit: y scaled about the pelvis, x/z a third as much
    k = 0.024
    dirs[:, :, 0] = k * (verts - np.array([0.0, joints[0, 1], 0.0])) * np.array([0.3, 1.0, 0.3])
    # 1: girth, radial growth away from each bone (7% of the local radius per unit on trunk/limbs)
    girth = np.full(24, 0.07)
    girth[[J["head"]]] = 0.0
    girth[[J[n] for n in JOINT_NAMES if n.endswith(("hand", "wrist", "foot", "ankle"))]] = 0.02
    dirs[:, :, 1] = np.einsum("vj,vjk->vk", weights * girth, verts[:, None] - closest)
    # 2: limb length, arm and leg bones stretched 3.5% per unit, children translated along
    stretch, shift = np.zeros(24), np.zeros((24, 3))
    for s in ("left", "right"):
        for n in ("hip", "knee", "shoulder", "elbow"):
            stretch[J[f"{s}_{n}"]] = 0.035
    for j in range(1, 24):  # parents precede children in SMPL order
        p = PARENTS[j]
        shift[j] = shift[p] + stretch[p] * (seg[p, 1] - seg[p, 0]) * (seg[p, 1] == joints[j]).all()
    bone = seg[:, 1] - seg[:, 0]
    dirs[:, :, 2] = np.einsum("vj,vjk->vk", weights, shift[None] + (stretch * t)[..., None] * bone[None])
    # 3: shoulder width, 1.5 cm per unit for each side (collars half as much)
    side = np.zeros((24, 3))
    for s, sx in (("left", 1.0), ("right", -1.0)):
        side[J[f"{s}_collar"], 0] = 0.5 * 0.015 * sx
        for n in ("shoulder", "elbow", "wrist", "hand"):
            side[J[f"{s}_{n}"], 0] = 0.015 * sx
    dirs[:, :, 3] = weights @ side
    # 4: head size, 8% scale about the head joint per unit
    dirs[:, :, 4] = 0.08 * weights[:, [J["head"]]] * (verts - joints[J["head"]])
    return dirs


def hip_width_direction(verts: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Wider hips (used only for the female template): legs apart, pelvis widened, ~1 cm per unit."""
    shift = np.zeros((24, 3))
    for s, sx in (("left", 1.0), ("right", -1.0)):
        for n in ("hip", "knee", "ankle", "foot"):
            shift[J[f"{s}_{n}"], 0] = 0.01 * sx
    return weights @ shift + 0.08 * weights[:, [0]] * verts * np.array([1.0, 0.0, 0.0])


def select_vertex_ids(verts: np.ndarray, parts: np.ndarray) -> dict[str, int]:
    """Vertices for smplx's extra keypoints (face, feet, finger tips) on the toy body."""
    head = parts == PART_NAMES.index("head")

    def nearest(target, mask):
        idx = np.flatnonzero(mask)
        return int(idx[np.argmin(np.linalg.norm(verts[idx] - np.asarray(target), axis=1))])

    ids = {"nose": nearest((0.0, 0.445, 0.2), head)}
    for s, sx in (("l", 1.0), ("r", -1.0)):
        side = "left" if s == "l" else "right"
        ids[f"{s}eye"] = nearest((sx * 0.033, 0.475, 0.12), head)
        ids[f"{s}ear"] = nearest((sx * 0.12, 0.45, 0.02), head)
        hand = parts == PART_NAMES.index(f"{side}_hand")
        ids[f"{s}thumb"] = nearest((sx * 0.80, 0.19, 0.08), hand)
        # mitten: the four finger tips spread over the rim of the finger ellipsoid's far end
        for name, dz in (("index", 0.033), ("middle", 0.011), ("ring", -0.011), ("pinky", -0.033)):
            x_tip = 0.81 + 0.06 * np.sqrt(1.0 - (dz / 0.043) ** 2)
            ids[f"{s}{name}"] = nearest((sx * x_tip, 0.205, -0.045 + dz), hand)
        foot = parts == PART_NAMES.index(f"{side}_foot")
        S = s.upper()
        ids[f"{S}BigToe"] = nearest((sx * 0.08, -1.16, 0.2), foot)
        ids[f"{S}SmallToe"] = nearest((sx * 0.15, -1.165, 0.17), foot)
        ids[f"{S}Heel"] = nearest((sx * 0.095, -1.17, -0.12), foot)
    if len(set(ids.values())) != len(ids):
        raise RuntimeError(f"extra keypoints share vertices: {ids}")
    return ids


# ----------------------------------------------------------------------------- assembly
GENDER_BETAS = {  # templates of the gendered variants, in units of the toy shape directions
    "neutral": (np.zeros(N_BETAS), 0.0),
    "male": (np.array([1.0, 0.4, 0.3, 1.2, 0.2, 0, 0, 0, 0, 0], dtype=np.float64), 0.0),
    "female": (np.array([-1.0, -0.3, -0.2, -1.2, -0.3, 0, 0, 0, 0, 0], dtype=np.float64), 1.2),
}


def build_toy_body() -> dict:
    """Everything except the per-gender templates: mesh, rig and metadata (neutral)."""
    verts, faces = geo.build_mesh()
    weights = skinning_weights(verts, faces)
    parts = part_ids_from_weights(weights)
    jreg = joint_regressor(verts, REST_JOINTS)
    return {
        "v_template": verts,
        "f": faces.astype(np.int64),
        "weights": weights,
        "J_regressor": jreg,
        "shapedirs": shape_directions(verts, weights, REST_JOINTS),
        "hipdir": hip_width_direction(verts, weights),
        "part_ids": parts.astype(np.int64),
        "vertex_ids": select_vertex_ids(verts, parts),
    }


def write_toy_body(out_dir) -> dict[str, Path]:
    out = Path(out_dir) / "smpl"
    out.mkdir(parents=True, exist_ok=True)
    body = build_toy_body()
    v, sd = body["v_template"], body["shapedirs"]
    kintree = np.stack([np.where(PARENTS < 0, 4294967295, PARENTS), np.arange(24)]).astype(np.int64)
    paths = {}
    for gender, (betas, hip) in GENDER_BETAS.items():
        v_g = v + sd @ betas + hip * body["hipdir"]
        model = {
            "v_template": v_g,
            "shapedirs": sd,
            "posedirs": np.zeros((len(v), 3, N_POSEDIRS), dtype=np.float32),
            "J_regressor": body["J_regressor"],
            "J": np.asarray(body["J_regressor"] @ v_g),
            "weights": body["weights"],
            "kintree_table": kintree,
            "f": body["f"],
            "vertex_ids": dict(body["vertex_ids"]),
            "part_ids": body["part_ids"],
            "part_names": list(PART_NAMES),
            "joint_names": list(JOINT_NAMES),
            "toy_body": True,
        }
        paths[gender] = out / f"SMPL_{gender.upper()}.pkl"
        with open(paths[gender], "wb") as fh:
            pickle.dump(model, fh, protocol=pickle.HIGHEST_PROTOCOL)
    paths["parts"] = out / "toy_body_parts.json"
    paths["parts"].write_text(json.dumps({n: i for i, n in enumerate(PART_NAMES)}, indent=1) + "\n")
    paths["vertex_ids"] = out / "toy_body_vertex_ids.json"
    paths["vertex_ids"].write_text(json.dumps(body["vertex_ids"], indent=1) + "\n")
    return paths


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="model folder; files go to OUT/smpl/")
    args = ap.parse_args(argv)
    t0 = time.time()
    paths = write_toy_body(args.out)
    print(f"wrote toy SMPL body to {paths['neutral'].parent} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
