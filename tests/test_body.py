"""Tests for the procedural toy SMPL body (data_prep.make_toy_body) and isa4d.body loading."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import smplx
import torch
from scipy.sparse.csgraph import connected_components
from scipy.spatial import ConvexHull
from scipy.spatial.transform import Rotation
from smplx.vertex_ids import vertex_ids as SMPLX_VERTEX_IDS

from data_prep.make_toy_body import write_toy_body
from data_prep.toy_body_geometry import REST_JOINTS, vertex_adjacency
from isa4d.body import (
    JOINT_NAMES, PARENTS, PART_NAMES, BodyModel, load_body_model, load_model_data, part_ids,
    part_ids_from_weights,
)

J = {n: i for i, n in enumerate(JOINT_NAMES)}


@pytest.fixture(scope="module")
def data(toy_body_dir):
    return load_model_data(toy_body_dir, "neutral")


@pytest.fixture(scope="module")
def model(toy_body_dir):
    return load_body_model(toy_body_dir, "neutral")


def _dense(a):
    return np.asarray(a.todense()) if hasattr(a, "todense") else np.asarray(a)


def _run(model, betas=None, body_pose=None, global_orient=None, transl=None):
    kw = {k: torch.as_tensor(np.asarray(v), dtype=torch.float32)[None]
          for k, v in dict(betas=betas, body_pose=body_pose, global_orient=global_orient,
                           transl=transl).items() if v is not None}
    with torch.no_grad():
        out = model(**kw)
    return out.vertices[0].numpy().astype(np.float64), out.joints[0].numpy().astype(np.float64)


def _pose(**angles_deg):
    """body_pose (69,) from {joint: axis-angle in degrees}."""
    p = np.zeros(69)
    for name, aa in angles_deg.items():
        p[3 * (J[name] - 1): 3 * J[name]] = np.deg2rad(aa)
    return p


# ----------------------------------------------------------------------------- file format
def test_files_and_arrays(toy_body_dir, data):
    d = toy_body_dir / "smpl"
    for g in ("NEUTRAL", "MALE", "FEMALE"):
        assert (d / f"SMPL_{g}.pkl").is_file()
    V, F = data["v_template"].shape[0], data["f"].shape[0]
    assert 3000 <= V <= 7000 and V == 6890 and F == 2 * V - 4  # SMPL's counts
    assert data["v_template"].shape == (V, 3) and data["v_template"].dtype == np.float64
    assert data["shapedirs"].shape == (V, 3, 10)
    assert data["posedirs"].shape == (V, 3, 207)
    assert _dense(data["J_regressor"]).shape == (24, V)
    assert data["weights"].shape == (V, 24)
    kt = data["kintree_table"]
    assert kt.shape == (2, 24) and kt.dtype == np.int64
    assert kt[0, 0] == 4294967295 and list(kt[0, 1:]) == list(PARENTS[1:])
    assert list(kt[1]) == list(range(24))
    assert data["f"].shape == (F, 3) and data["f"].min() == 0 and data["f"].max() == V - 1
    assert json.loads((d / "toy_body_parts.json").read_text()) == {n: i for i, n in enumerate(PART_NAMES)}
    assert json.loads((d / "toy_body_vertex_ids.json").read_text()) == data["vertex_ids"]
    # gendered variants: same topology and rig, different proportions
    male, female = (load_model_data(toy_body_dir, g) for g in ("male", "female"))
    assert np.array_equal(male["f"], data["f"]) and np.array_equal(female["weights"], data["weights"])
    heights = [np.ptp(m["v_template"][:, 1]) for m in (female, data, male)]
    assert heights[0] < heights[1] < heights[2]


def test_smplx_loads_unchanged(toy_body_dir, data):
    ids = json.loads((toy_body_dir / "smpl" / "toy_body_vertex_ids.json").read_text())
    assert set(ids) == set(SMPLX_VERTEX_IDS["smplh"])
    for gender in ("neutral", "male", "female"):
        m = smplx.create(str(toy_body_dir), model_type="smpl", gender=gender, vertex_ids=ids)
        assert m.parents.tolist() == list(PARENTS)
        with torch.no_grad():
            out = m()
        assert out.vertices.shape == (1, 6890, 3) and out.joints.shape == (1, 24 + 21, 3)
        assert torch.isfinite(out.vertices).all()
    # without vertex_ids smplx falls back to SMPL's ids, which are in range since V == 6890
    with torch.no_grad():
        assert smplx.create(str(toy_body_dir), model_type="smpl")().joints.shape == (1, 45, 3)


# ----------------------------------------------------------------------------- skeleton and joints
def test_rest_joints_and_regressor(data, model):
    jreg, v = _dense(data["J_regressor"]), data["v_template"]
    assert (jreg >= 0).all() and np.allclose(jreg.sum(1), 1.0)
    rest = jreg @ v
    np.testing.assert_allclose(rest, REST_JOINTS, atol=1e-4)
    np.testing.assert_allclose(data["J"], rest)
    _, joints = _run(model)
    np.testing.assert_allclose(joints[:24], rest, atol=1e-5)
    # SMPL conventions: ~1.7 m tall, y up, pelvis near the origin, left = +x, facing +z
    assert 1.65 < np.ptp(v[:, 1]) < 1.85
    assert np.linalg.norm(rest[J["pelvis"]]) < 0.3
    assert rest[J["head"], 1] > rest[J["neck"], 1] > rest[J["pelvis"], 1] > rest[J["left_knee"], 1]
    for left in [n for n in JOINT_NAMES if n.startswith("left")]:
        assert rest[J[left], 0] > 0.05 and rest[J[left.replace("left", "right")], 0] < -0.05
    nose, heel = v[data["vertex_ids"]["nose"]], v[data["vertex_ids"]["LHeel"]]
    assert nose[2] > rest[J["head"], 2] + 0.05 and heel[2] < rest[J["left_foot"], 2] - 0.1


def test_joints_follow_smplx_invariants(data, model):
    rng = np.random.default_rng(0)
    jreg = _dense(data["J_regressor"])
    for _ in range(3):
        betas, transl = rng.normal(size=10), rng.normal(scale=0.3, size=3)
        # rest pose: joints are regressed from the shaped vertices
        verts, joints = _run(model, betas=betas, transl=transl)
        np.testing.assert_allclose(verts, data["v_template"] + data["shapedirs"] @ betas + transl, atol=1e-5)
        np.testing.assert_allclose(joints[:24], jreg @ verts, atol=1e-5)
        # posed: joints are the forward kinematics of the shaped rest joints
        pose = rng.normal(scale=0.4, size=72)
        verts, joints = _run(model, betas=betas, body_pose=pose[3:], global_orient=pose[:3], transl=transl)
        rest = jreg @ (data["v_template"] + data["shapedirs"] @ betas)
        rot = Rotation.from_rotvec(pose.reshape(24, 3)).as_matrix()
        glob, pos = [None] * 24, np.zeros((24, 3))
        for j, p in enumerate(PARENTS):
            glob[j] = rot[j] if p < 0 else glob[p] @ rot[j]
            pos[j] = rest[j] if p < 0 else pos[p] + glob[p] @ (rest[j] - rest[p])
        np.testing.assert_allclose(joints[:24], pos + transl, atol=1e-4)
        # and the regressor stays close to the posed joints (rings move with their joints)
        assert np.linalg.norm(jreg @ verts - joints[:24], axis=1).max() < 0.04


# ----------------------------------------------------------------------------- mesh
def test_watertight_manifold(data):
    v, f = data["v_template"], data["f"].astype(np.int64)
    directed = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    assert len(np.unique(directed, axis=0)) == len(directed)  # consistent orientation
    und, counts = np.unique(np.sort(directed, axis=1), axis=0, return_counts=True)
    assert (counts == 2).all()  # every edge shared by exactly two faces
    assert len(v) - len(und) + len(f) == 2  # Euler characteristic of a sphere
    assert connected_components(vertex_adjacency(len(v), f), directed=False)[0] == 1
    # vertex manifold: the faces around each vertex form a single fan
    link = {}
    for a, b, c in f:
        for x, y, z in ((a, b, c), (b, c, a), (c, a, b)):
            link.setdefault(x, {})[y] = z
    for x, nxt in link.items():
        start = cur = next(iter(nxt))
        for _ in range(len(nxt)):
            cur = nxt[cur]
            if cur == start:
                break
        assert cur == start and _ == len(nxt) - 1, f"vertex {x} is not manifold"
    vol = np.einsum("ij,ij->i", v[f[:, 0]], np.cross(v[f[:, 1]], v[f[:, 2]])).sum() / 6.0
    assert 0.04 < vol < 0.10  # m^3, outward normals; an adult is ~0.06-0.08
    area = np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1) / 2
    assert area.min() > 1e-7


def test_skinning_weights(data):
    w = data["weights"]
    assert (w >= 0).all() and np.allclose(w.sum(1), 1.0)
    assert (w.max(0) > 0.5).all()  # every joint dominates somewhere


def test_large_poses_do_not_tear(model, data):
    f = data["f"].astype(np.int64)
    e = np.unique(np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1), axis=0)
    rest, _ = _run(model)
    pose = _pose(left_knee=(120, 0, 0), right_knee=(120, 0, 0), left_elbow=(0, -130, 0),
                 right_elbow=(0, 130, 0), left_shoulder=(0, 0, 90), right_shoulder=(0, 0, -90),
                 left_hip=(-100, 0, 0), spine2=(30, 0, 0), neck=(0, 45, 0))
    verts, _ = _run(model, body_pose=pose)
    assert np.isfinite(verts).all()
    ratio = (np.linalg.norm(verts[e[:, 0]] - verts[e[:, 1]], axis=1)
             / np.linalg.norm(rest[e[:, 0]] - rest[e[:, 1]], axis=1))
    assert ratio.max() < 3.0, ratio.max()


# ----------------------------------------------------------------------------- shape space
def test_shape_directions(model, data, toy_body_dir):
    parts = part_ids(toy_body_dir)
    assert not data["shapedirs"][..., 5:].any()

    def measure(k, amount):
        betas = np.zeros(10)
        betas[k] = amount
        v, j = _run(model, betas=betas)
        waist = (parts == PART_NAMES.index("torso")) & (np.abs(v[:, 1] - j[J["spine1"], 1]) < 0.03)
        def chain(*names):
            return sum(np.linalg.norm(j[J[a]] - j[J[b]]) for a, b in zip(names, names[1:]))

        return {
            "height": np.ptp(v[:, 1]),
            "waist": ConvexHull(v[waist][:, [0, 2]]).area,
            "legs": chain("left_hip", "left_knee", "left_ankle")
            + chain("right_hip", "right_knee", "right_ankle"),
            "arms": chain("left_shoulder", "left_elbow", "left_wrist")
            + chain("right_shoulder", "right_elbow", "right_wrist"),
            "shoulders": np.linalg.norm(j[J["left_shoulder"]] - j[J["right_shoulder"]]),
            "head": np.ptp(v[parts == PART_NAMES.index("head")][:, 1]),
        }

    base = measure(0, 0.0)
    grow = {k: {m: measure(k, 1.0)[m] - base[m] for m in base} for k in range(5)}
    assert 0.02 < grow[0]["height"] < 0.08  # a few cm per unit, like SMPL
    assert 0.02 < grow[1]["waist"] < 0.15 and abs(grow[1]["height"]) < 0.01
    assert grow[2]["legs"] > 0.02 and grow[2]["arms"] > 0.02 and abs(grow[2]["waist"]) < 1e-3
    assert 0.01 < grow[3]["shoulders"] < 0.06 and abs(grow[3]["legs"]) < 1e-6
    assert grow[4]["head"] > 0.01 and abs(grow[4]["legs"]) < 1e-6
    assert measure(2, -2.0)["legs"] < base["legs"] < measure(2, 2.0)["legs"]


# ----------------------------------------------------------------------------- parts and keypoints
def test_parts(toy_body_dir, data, tmp_path):
    parts = part_ids(toy_body_dir)
    f = data["f"].astype(np.int64)
    assert parts.shape == (6890,) and set(np.unique(parts)) == set(range(len(PART_NAMES)))
    np.testing.assert_array_equal(parts, part_ids_from_weights(data["weights"]))
    adj = vertex_adjacency(len(parts), f)
    for i, name in enumerate(PART_NAMES):
        idx = np.flatnonzero(parts == i)
        _, lab = connected_components(adj[idx][:, idx], directed=False)
        assert np.bincount(lab).max() >= 0.95 * len(idx), name
    # a real SMPL file has no part data: parts come from argmax weights, vertex ids default
    real = tmp_path / "smpl"
    real.mkdir()
    plain = {k: v for k, v in data.items() if k not in ("part_ids", "vertex_ids")}
    with open(real / "SMPL_NEUTRAL.pkl", "wb") as fh:
        pickle.dump(plain, fh)
    np.testing.assert_array_equal(part_ids(tmp_path), parts)
    assert load_body_model(tmp_path).vertex_joint_selector.extra_joints_idxs.max() < 6890


def test_vertex_ids(model, data):
    ids, v = data["vertex_ids"], data["v_template"]
    parts = part_ids_from_weights(data["weights"])
    assert len(set(ids.values())) == len(ids) == 21
    on = lambda name, part: parts[ids[name]] == PART_NAMES.index(part)  # noqa: E731
    assert on("nose", "head") and on("leye", "head") and on("rear", "head")
    assert v[ids["leye"], 0] > 0 > v[ids["reye"], 0] and v[ids["lear"], 0] > 0 > v[ids["rear"], 0]
    for s, side in (("l", "left"), ("r", "right")):
        assert all(on(f"{s}{t}", f"{side}_hand") for t in ("thumb", "index", "middle", "ring", "pinky"))
        assert all(on(f"{s.upper()}{t}", f"{side}_foot") for t in ("BigToe", "SmallToe", "Heel"))
    verts, joints = _run(model)
    tips = ("thumb", "index", "middle", "ring", "pinky")
    order = ["nose", "reye", "leye", "rear", "lear", "LBigToe", "LSmallToe", "LHeel", "RBigToe",
             "RSmallToe", "RHeel"] + [h + t for h in "lr" for t in tips]
    np.testing.assert_allclose(joints[24:], verts[[ids[n] for n in order]])


# ----------------------------------------------------------------------------- wrapper and errors
def test_body_model_batched(toy_body_dir, model):
    bm = BodyModel(toy_body_dir)
    assert not list(bm.parameters()) and not bm.state_dict()
    assert bm.faces.shape == (13776, 3) and bm.faces.dtype == torch.long and bm.num_verts == 6890
    g = torch.Generator().manual_seed(0)
    B, P, T = 2, 3, 5
    betas = torch.randn(B, P, 10, generator=g)
    go, bp = 0.3 * torch.randn(B, P, T, 3, generator=g), 0.3 * torch.randn(B, P, T, 69, generator=g)
    tr = torch.randn(B, P, T, 3, generator=g)
    verts, joints = bm(betas, go, bp, tr)
    assert verts.shape == (B, P, T, 6890, 3) and joints.shape == (B, P, T, 24, 3)
    with torch.no_grad():
        ref = model(betas=betas[1, 2][None], global_orient=go[1, 2, 4][None], body_pose=bp[1, 2, 4][None],
                    transl=tr[1, 2, 4][None])
    torch.testing.assert_close(verts[1, 2, 4], ref.vertices[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(joints[1, 2, 4], ref.joints[0, :24], atol=1e-5, rtol=0)
    # per-frame betas and no translation
    v2, _ = bm(betas[:, :, None].expand(B, P, T, 10), go, bp)
    torch.testing.assert_close(v2 + tr[..., None, :], verts, atol=1e-5, rtol=0)


def test_missing_model_error(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_body_model(tmp_path / "nowhere")
    msg = str(err.value)
    assert str(tmp_path / "nowhere" / "smpl" / "SMPL_NEUTRAL.pkl") in msg and "make toy-body" in msg
    with pytest.raises(ValueError):
        load_body_model(tmp_path, gender="robot")


def test_chumpy_pickle_rejected(tmp_path):
    (tmp_path / "smpl").mkdir()
    # a pickle referencing chumpy.ch.Ch, like the original SMPL download
    (tmp_path / "smpl" / "SMPL_NEUTRAL.pkl").write_bytes(b"\x80\x02cchumpy.ch\nCh\nq\x00.")
    with pytest.raises(RuntimeError, match="chumpy"):
        load_body_model(tmp_path)


def test_generation_is_deterministic(toy_body_dir, tmp_path):
    write_toy_body(tmp_path)
    for g in ("NEUTRAL", "FEMALE"):
        a = (toy_body_dir / "smpl" / f"SMPL_{g}.pkl").read_bytes()
        assert a == (tmp_path / "smpl" / f"SMPL_{g}.pkl").read_bytes()
