"""Inputs of `isa4d sample`: motion files (contract, AMASS-style npz) and camera paths (docs/inference.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from isa4d.body import BodyModel
from isa4d.data.contract import SMPLSequence, npz_bytes
from isa4d.geometry.camera import camera_center, cover_crop, is_rigid, project
from isa4d.inference.camera_path import (CameraPathError, camera_path, dolly, from_npz, orbit, parse_spec,
                                         spec_keys, static)
from isa4d.inference.motion import (Z_UP_TO_Y_UP, Motion, MotionError, combine_people, heading, load_motion,
                                    look_target, posed_vertices, resample, rest_pelvis)

HEAD, PELVIS = 15, 0


def _write(path, **arrays):
    path.write_bytes(npz_bytes(**arrays))
    return path


def _amass(path, poses, trans=None, betas=None, fps=30.0, **extra):
    """An AMASS-style npz: poses (F, W), trans (F, 3), betas (16,), mocap_framerate, gender."""
    F = poses.shape[0]
    trans = np.zeros((F, 3)) if trans is None else trans
    betas = np.zeros(16) if betas is None else betas
    return _write(path, poses=poses, trans=trans, betas=betas, mocap_framerate=np.float64(fps),
                  gender=np.str_("neutral"), **extra)


def _random_amass(rng, frames: int, width: int = 72) -> dict[str, np.ndarray]:
    poses = rng.normal(0, 0.3, (frames, width))
    poses[:, :3] = rng.normal(0, 1.0, (frames, 3))
    return {"poses": poses, "trans": rng.normal(0, 1.0, (frames, 3)), "betas": rng.normal(0, 1.0, 16)}


def _raw_smpl(a: dict[str, np.ndarray]) -> SMPLSequence:
    """The AMASS arrays as they are (z up), for posing before conversion (SMPL width 72 only)."""
    poses = a["poses"][None]
    return SMPLSequence(a["betas"][None, :10], poses[..., :3], poses[..., 3:72], a["trans"][None])


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def _joints(smpl: SMPLSequence, body_dir) -> np.ndarray:
    body = BodyModel(body_dir, dtype=torch.float64)
    with torch.no_grad():
        return body(*map(_t, (smpl.betas, smpl.global_orient, smpl.body_pose, smpl.transl)))[1].numpy()


# ------------------------------------------------------------------------------------------ AMASS conversion


def test_upright_z_up_body_stands_upright_in_y_up(tmp_path, toy_body_dir):
    """Standing in z-up (root +90 deg about x, head along +z) -> identity root, head straight above pelvis.

    (A zero root in z-up is a body lying down: its head points along +y, which is horizontal there.)
    """
    poses = np.zeros((2, 72))
    poses[:, 0] = math.pi / 2
    path = _amass(tmp_path / "stand.npz", poses, trans=np.tile([0.3, -0.2, 0.95], (2, 1)))
    m = load_motion(path, body_model_dir=toy_body_dir)
    np.testing.assert_allclose(m.smpl.global_orient, 0.0, atol=1e-6)
    j = _joints(m.smpl, toy_body_dir)[0, 0]
    up = (j[HEAD] - j[PELVIS]) / np.linalg.norm(j[HEAD] - j[PELVIS])
    assert up[1] > 0.99, up


def test_z_up_conversion_rotates_posed_vertices(tmp_path, toy_body_dir):
    """Posed vertices after = R @ posed vertices before; the naive transl' = R transl is off by ~0.2 m."""
    a = _random_amass(np.random.default_rng(0), 4)
    m = load_motion(_amass(tmp_path / "m.npz", **a), body_model_dir=toy_body_dir)
    before = posed_vertices(_raw_smpl(a), toy_body_dir)
    after = posed_vertices(m.smpl, toy_body_dir)
    np.testing.assert_allclose(after, before @ Z_UP_TO_Y_UP.T, atol=2e-5)
    naive = SMPLSequence(m.smpl.betas, m.smpl.global_orient, m.smpl.body_pose,
                         a["trans"][None] @ Z_UP_TO_Y_UP.T)
    assert np.abs(posed_vertices(naive, toy_body_dir) - before @ Z_UP_TO_Y_UP.T).max() > 0.05


def test_face_forward_turns_the_body_rigidly(tmp_path, toy_body_dir):
    a = _random_amass(np.random.default_rng(1), 3)
    plain = load_motion(_amass(tmp_path / "m.npz", **a), body_model_dir=toy_body_dir)
    turned = load_motion(tmp_path / "m.npz", body_model_dir=toy_body_dir, face_forward=True)
    assert abs(heading(turned.smpl.global_orient[0, 0])) < 1e-5
    turn = Rotation.from_rotvec([0, -heading(plain.smpl.global_orient[0, 0]), 0]).as_matrix()
    np.testing.assert_allclose(posed_vertices(turned.smpl, toy_body_dir),
                               posed_vertices(plain.smpl, toy_body_dir) @ turn.T, atol=2e-5)


@pytest.mark.parametrize("width", [66, 72, 156, 165])
def test_pose_widths_keep_the_body_joints(tmp_path, width):
    """SMPL-H/-X: 21 body joints kept, SMPL's hand joints zero, hands and face dropped; betas cut to 10."""
    rng = np.random.default_rng(width)
    poses = rng.normal(0, 0.3, (5, width))
    betas = rng.normal(0, 1, 16)
    m = load_motion(_amass(tmp_path / "m.npz", poses, betas=betas), up_axis="y")
    body = m.smpl.body_pose[0]
    assert body.shape == (5, 69) and m.smpl.betas.shape == (1, 10)
    np.testing.assert_allclose(m.smpl.global_orient[0], poses[:, :3], rtol=1e-6)
    np.testing.assert_allclose(body[:, :63], poses[:, 3:66], rtol=1e-6)
    np.testing.assert_allclose(body[:, 63:], poses[:, 66:72] if width == 72 else 0.0, rtol=1e-6)
    np.testing.assert_allclose(m.smpl.betas[0], betas[:10], rtol=1e-6)


def test_contract_file_loads_one_person_unchanged(tmp_path):
    rng = np.random.default_rng(2)
    arrays = {"betas": rng.normal(0, 1, (2, 10)), "global_orient": rng.normal(0, 1, (2, 6, 3)),
              "body_pose": rng.normal(0, 0.3, (2, 6, 69)), "transl": rng.normal(0, 1, (2, 6, 3))}
    path = _write(tmp_path / "clip.smpl.npz", fps=np.float64(25),
                  **{k: v.astype(np.float32) for k, v in arrays.items()})
    m = load_motion(path, person=1)
    assert m.fps == 25 and m.gender == "neutral" and m.smpl.num_people == 1
    for k, v in arrays.items():
        np.testing.assert_allclose(getattr(m.smpl, k)[0], v[1], rtol=1e-6)


# ------------------------------------------------------------------------------------------------ time


def test_resample_30_to_15_keeps_every_second_frame(tmp_path):
    a = _random_amass(np.random.default_rng(3), 30)
    m = load_motion(_amass(tmp_path / "m.npz", **a), up_axis="y", fps=15)
    assert m.num_frames == 15 and m.fps == 15
    np.testing.assert_array_equal(m.smpl.global_orient[0], a["poses"][::2, :3].astype(np.float32))
    np.testing.assert_array_equal(m.smpl.body_pose[0], a["poses"][::2, 3:].astype(np.float32))
    np.testing.assert_array_equal(m.smpl.transl[0], a["trans"][::2].astype(np.float32))


def test_resample_slerps_rotations_and_lerps_translation():
    """1 -> 2 fps: the middle frame is the geodesic midpoint of every joint's two rotations."""
    rng = np.random.default_rng(4)
    go = np.stack([np.zeros(3), [0, 0, math.pi / 2]])[None]  # 0 and 90 deg about z
    bp = rng.normal(0, 1.0, (1, 2, 69))
    smpl = SMPLSequence(np.zeros((1, 10)), go, bp, np.array([[[0.0, 0, 0], [1.0, 2, -4]]]))
    out = resample(smpl, 1.0, 2.0)
    assert out.num_frames == 3
    np.testing.assert_allclose(out.global_orient[0, 1], [0, 0, math.pi / 4], atol=1e-12)
    np.testing.assert_allclose(out.transl[0, 1], [0.5, 1, -2])
    r0, r1 = (Rotation.from_rotvec(bp[0, i].reshape(23, 3)) for i in (0, 1))
    mid = Rotation.from_rotvec(out.body_pose[0, 1].reshape(23, 3))
    half = (r0.inv() * r1).magnitude() / 2
    np.testing.assert_allclose((r0.inv() * mid).magnitude(), half, atol=1e-9)
    np.testing.assert_allclose((mid.inv() * r1).magnitude(), half, atol=1e-9)
    np.testing.assert_allclose(out.body_pose[0, 2], bp[0, 1])


def test_trim_and_ground(tmp_path, toy_body_dir):
    a = _random_amass(np.random.default_rng(5), 20)
    m = load_motion(_amass(tmp_path / "m.npz", **a), body_model_dir=toy_body_dir, start=4, num_frames=9,
                    ground=True)
    full = load_motion(tmp_path / "m.npz", body_model_dir=toy_body_dir)
    assert m.num_frames == 9
    np.testing.assert_allclose(m.smpl.body_pose[0], full.smpl.body_pose[0, 4:13])
    assert abs(posed_vertices(m.smpl, toy_body_dir, frames=np.array([0]))[..., 1].min()) < 1e-5
    np.testing.assert_allclose(np.diff(m.smpl.transl[0] - full.smpl.transl[0, 4:13], axis=0), 0.0, atol=1e-5)


def test_look_target_is_the_mean_posed_pelvis(toy_body_dir):
    rng = np.random.default_rng(6)
    smpl = SMPLSequence(rng.normal(0, 1, (2, 10)), rng.normal(0, 1, (2, 3, 3)),
                        rng.normal(0, 0.3, (2, 3, 69)), rng.normal(0, 1, (2, 3, 3)))
    pelvis = _joints(smpl, toy_body_dir)[:, :, PELVIS]
    np.testing.assert_allclose(look_target(smpl, toy_body_dir), pelvis.reshape(-1, 3).mean(0), atol=1e-6)
    assert rest_pelvis(smpl.betas, toy_body_dir).shape == (2, 3)


# ------------------------------------------------------------------------------------------------ errors


def _bad(name: str, a: dict) -> dict:
    a = dict(a, mocap_framerate=np.float64(30))
    if name == "missing":
        del a["trans"]
    elif name == "width":
        a["poses"] = a["poses"][:, :70]
    elif name == "frames":
        a["trans"] = a["trans"][:-1]
    elif name == "nonfinite":
        a["poses"][3, 7] = np.nan
    elif name == "millimetres":
        a["trans"] = a["trans"] * 1000
    elif name == "degrees":
        a["poses"] = np.degrees(a["poses"])
    elif name == "nofps":
        del a["mocap_framerate"]
    elif name == "layout":
        a = {"foo": np.zeros(3)}
    elif name == "contract":
        a = {"betas": np.zeros((1, 10)), "global_orient": np.zeros((1, 10, 3)),
             "body_pose": np.zeros((1, 10, 72)), "transl": np.zeros((1, 10, 3)), "fps": np.float64(30)}
    return a


@pytest.mark.parametrize("name, expected", [
    ("missing", "'trans' is missing"),
    ("width", "'poses' has shape (10, 70), expected (frames, width) with width one of: 66"),
    ("frames", "'trans' has 9 frames, 'poses' has 10"),
    ("nonfinite", "'poses' holds NaN or inf"),
    ("millimetres", "'trans' reaches"),
    ("degrees", "degrees?"),
    ("nofps", "has no frame rate"),
    ("layout", "is neither a contract smpl.npz"),
    ("contract", "bad.npz['body_pose'] has shape (1, 10, 72), expected (1, 10, 69)"),
])
def test_motion_errors_name_file_key_and_reason(tmp_path, name, expected):
    path = _write(tmp_path / "bad.npz", **_bad(name, _random_amass(np.random.default_rng(7), 10)))
    with pytest.raises(MotionError) as err:
        load_motion(path, up_axis="y")
    message = str(err.value)
    assert str(path) in message and expected in message, message
    if name == "width":
        assert all(str(w) in message for w in (72, 156, 165))
    if name == "millimetres":
        assert "millimetres or centimetres" in message


def test_too_few_frames_for_the_requested_count(tmp_path):
    path = _amass(tmp_path / "short.npz", **_random_amass(np.random.default_rng(8), 10))
    with pytest.raises(MotionError, match=r"short\.npz: 'poses' is too short at 15 fps: asked for 33 frame"):
        load_motion(path, up_axis="y", fps=15, num_frames=33)


def test_z_up_needs_the_body_model(tmp_path):
    path = _amass(tmp_path / "m.npz", **_random_amass(np.random.default_rng(9), 3))
    with pytest.raises(ValueError, match="pass body_model_dir"):
        load_motion(path)


# -------------------------------------------------------------------------------------------- several people


def _person(frames: int, start, fps: float = 30.0) -> Motion:
    transl = np.tile(np.asarray(start, np.float32), (1, frames, 1)) + np.linspace(0, 1, frames)[None, :, None]
    smpl = SMPLSequence(np.zeros((1, 10)), np.zeros((1, frames, 3)), np.zeros((1, frames, 69)), transl)
    return Motion(smpl, fps)


def test_combine_people_side_by_side_trimmed_to_shortest():
    a, b = _person(10, [5.0, 0.9, 3.0]), _person(8, [-2.0, 1.0, 1.0])
    with pytest.warns(UserWarning, match=r"\[10, 8\] frames; trimming all to the shortest \(8\)"):
        both = combine_people([a, b], spacing=1.2)
    assert both.smpl.num_people == 2 and both.num_frames == 8 and both.fps == 30
    np.testing.assert_allclose(both.smpl.transl[:, 0], [[-0.6, 0.9, 0.0], [0.6, 1.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(both.smpl.transl[1, 1:] - both.smpl.transl[1, :-1], b.smpl.transl[0, 1:8] -
                               b.smpl.transl[0, :7], atol=1e-6)  # the motion itself is kept
    with pytest.raises(ValueError, match="trimming all"):
        combine_people([a, b], on_length_mismatch="error")


def test_combine_people_offsets_override():
    a, b = _person(4, [5.0, 0.9, 3.0]), _person(4, [-2.0, 1.0, 1.0])
    both = combine_people([a, b], offsets=[[0, 0, 0], [2, 0, -1]])
    np.testing.assert_allclose(both.smpl.transl[:, 0], [[0, 0.9, 0], [2, 1.0, -1]], atol=1e-6)
    kept = combine_people([a, b], offsets=np.zeros((2, 3)), recenter=False)
    np.testing.assert_allclose(kept.smpl.transl[:, 0], [[5, 0.9, 3], [-2, 1, 1]], atol=1e-6)
    with pytest.raises(ValueError, match=r"offsets must have shape \(2, 3\)"):
        combine_people([a, b], offsets=[[0, 0]])
    with pytest.raises(ValueError, match="different frame rates"):
        combine_people([a, _person(4, [0, 0, 0], fps=25.0)])


# ---------------------------------------------------------------------------------------------- camera paths

TARGET = np.array([0.2, 0.9, -0.1])


def _centres(cams) -> np.ndarray:
    return camera_center(_t(cams.w2c)).numpy()


def _assert_looks_at_target(cams, target=TARGET):
    assert is_rigid(cams.w2c.astype(np.float64)).all()
    uvz = project(_t(target)[None, None].expand(len(cams.K), 1, 3), _t(cams.K), _t(cams.w2c))  # (F, 1, 3)
    np.testing.assert_allclose(uvz[:, 0, :2].numpy(), cams.K[:, :2, 2], atol=1e-3)  # the principal point
    assert (uvz[..., 2] > 0).all()


def test_orbit_geometry():
    cams = orbit(12, 48, 64, TARGET, degrees=360, radius=3.0, elevation=10, azimuth=30)
    assert cams.K.shape == (12, 3, 3) and cams.w2c.shape == (12, 4, 4)
    d = _centres(cams) - TARGET
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 3.0, atol=1e-5)
    np.testing.assert_allclose(d[:, 1], 3.0 * math.sin(math.radians(10)), atol=1e-5)
    az = np.degrees(np.arctan2(d[:, 0], d[:, 2]))
    assert abs(az[0] - 30) < 1e-4
    steps = np.diff(np.append(az, az[0])) % 360  # includes the wrap from the last view back to the first
    np.testing.assert_allclose(steps, 30.0, atol=1e-3)  # equal steps, and the end view is not the first again
    _assert_looks_at_target(cams)


def test_default_camera_sees_the_front_upright():
    """Azimuth 0 is on +z, where the rest body faces; world up is image up; the subject's left (+x) is on the
    image's right."""
    cams = static(5, 48, 64, TARGET)
    c = _centres(cams)
    assert np.allclose(c, c[0], atol=1e-6) and c[0, 2] > TARGET[2] + 1 and abs(c[0, 0] - TARGET[0]) < 1e-6
    uvz = project(_t([[TARGET + [0, 0.1, 0], TARGET + [0.1, 0, 0]]]), _t(cams.K[:1]), _t(cams.w2c[:1]))
    assert uvz[0, 0, 1] < cams.K[0, 1, 2] and uvz[0, 1, 0] > cams.K[0, 0, 2]
    _assert_looks_at_target(cams)


def test_dolly_distances_are_linear():
    cams = dolly(9, 48, 64, TARGET, start=4.0, end=2.0, azimuth=-20)
    d = _centres(cams) - TARGET
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), np.linspace(4, 2, 9), atol=1e-5)
    unit = d / np.linalg.norm(d, axis=1, keepdims=True)
    np.testing.assert_allclose(unit, unit[:1].repeat(9, 0), atol=1e-6)  # along one view axis
    _assert_looks_at_target(cams)


def test_npz_round_trip_and_rescale(tmp_path):
    cams = orbit(6, 48, 64, TARGET, degrees=90)
    path = _write(tmp_path / "cam.npz", K=cams.K, w2c=cams.w2c)
    back = from_npz(path, 6, 48, 64)
    np.testing.assert_allclose(back.K, cams.K)
    np.testing.assert_allclose(back.w2c, cams.w2c)
    big = _write(tmp_path / "big.npz", K=cover_crop(48, 64, 96, 128).apply_to_K(cams.K), w2c=cams.w2c,
                 height=96, width=128)
    np.testing.assert_allclose(from_npz(big, 6, 48, 64).K, cams.K, atol=1e-4)  # 2x K mapped back to 48 x 64
    with pytest.raises(CameraPathError, match=r"cam\.npz: 'w2c' has 6 frames, the video has 7"):
        from_npz(path, 7, 48, 64)
    unsized = _write(tmp_path / "unsized.npz", K=cover_crop(48, 64, 96, 128).apply_to_K(cams.K), w2c=cams.w2c)
    with pytest.raises(CameraPathError, match="store that size as 'height' and 'width'"):
        from_npz(unsized, 6, 24, 32)


def test_camera_path_specs(tmp_path):
    np.testing.assert_array_equal(camera_path("static", 4, 48, 64, TARGET).w2c, static(4, 48, 64, TARGET).w2c)
    got = camera_path("orbit:degrees=360,radius=3,elevation=10", 8, 48, 64, TARGET)
    np.testing.assert_array_equal(got.w2c, orbit(8, 48, 64, TARGET, degrees=360, radius=3, elevation=10).w2c)
    d = np.linalg.norm(_centres(camera_path("dolly:start=4,end=2", 5, 48, 64, TARGET)) - TARGET, axis=1)
    np.testing.assert_allclose(d, [4, 3.5, 3, 2.5, 2], atol=1e-5)
    narrow = camera_path("orbit: fov=30 ", 2, 48, 64, TARGET, fov=60)
    wide = camera_path("orbit", 2, 48, 64, TARGET, fov=60)
    assert narrow.K[0, 1, 1] > wide.K[0, 1, 1]  # the spec's fov wins
    cams = orbit(3, 48, 64, TARGET)
    path = _write(tmp_path / "c.npz", K=cams.K, w2c=cams.w2c)
    np.testing.assert_array_equal(camera_path(str(path), 3, 48, 64, TARGET).w2c, cams.w2c)
    assert parse_spec("Orbit:degrees=90,") == ("orbit", {"degrees": 90.0})
    assert spec_keys("orbit") == ("degrees", "radius", "elevation", "azimuth", "fov")


@pytest.mark.parametrize("spec, expected", [
    ("spiral", "unknown camera path 'spiral': use one of static, orbit, dolly"),
    ("orbit:speed=2", "unknown option 'speed'; orbit takes degrees, radius, elevation, azimuth, fov"),
    ("dolly:start", "'start' is not key=value; dolly takes start, end, elevation, azimuth, fov"),
    ("orbit:radius=far", "'radius' must be a number, got 'far'"),
    ("orbit:radius=2,radius=3", "'radius' is given twice"),
    ("orbit:radius=-1", "camera distances must be positive"),
    ("static:elevation=90", "elevation must be in (-90, 90)"),
])
def test_camera_path_spec_errors(spec, expected):
    with pytest.raises(CameraPathError) as err:
        camera_path(spec, 4, 48, 64, TARGET)
    assert expected in str(err.value), str(err.value)
