"""Data converters (data_prep/convert_*.py): fixtures are built in each source's own format from known SMPL
parameters; the written shards must put every SMPL joint where the source's convention puts it (1e-3 px) and the
frames must line up with the bodies."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.transform import Rotation

from conftest import import_script
from data_prep import convert_easymocap, convert_phalp
from data_prep.converters_common import (PickleFormatError, load_pickle, rotmat_to_axis_angle, runs, split_run)
from isa4d.geometry.camera import look_at
from isa4d.body.smpl import BodyModel
from isa4d.data.contract import parse_sample
from isa4d.data.shards import iter_samples
from isa4d.data.video import decode_all, encode_video
from isa4d.geometry.camera import project

ASSETS = Path(__file__).parent / "assets"
TOL_PX = 1e-3


def _fail(url, exn):
    raise exn


def read_shards(paths) -> dict:
    return {s.key: s for s in map(parse_sample, iter_samples(paths, _fail))}


@pytest.fixture(scope="module")
def body(toy_body_dir) -> BodyModel:
    return BodyModel(toy_body_dir, dtype=torch.float64)


def smpl_joints(body, betas, global_orient, body_pose, transl=None, *, rotmats=False) -> np.ndarray:
    """SMPL joints (N, 24, 3), float64. With rotmats, poses are (N, 1, 3, 3) / (N, 23, 3, 3) matrices (PHALP's
    SMPLLayer call with pose2rot=False); else axis-angle."""
    t = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float64)  # noqa: E731
    if rotmats:
        n = len(betas)
        with torch.no_grad():
            out = body.smpl(betas=t(betas), global_orient=t(global_orient), body_pose=t(body_pose),
                            transl=torch.zeros(n, 3, dtype=torch.float64), pose2rot=False)
        return out.joints[:, :24].numpy()
    with torch.no_grad():
        _, joints = body(t(betas), t(global_orient)[:, None], t(body_pose)[:, None],
                         None if transl is None else t(transl)[:, None])
    return joints[:, 0].numpy()


def sample_projection(body, s) -> np.ndarray:
    """(P, F, 24, 2) pixels of the written sample's SMPL joints through its written cameras."""
    P, F = s.smpl.num_people, s.smpl.num_frames
    rep = lambda x: np.repeat(x[:, None], F, 1).reshape(P * F, -1)  # noqa: E731
    joints = smpl_joints(body, rep(s.smpl.betas), s.smpl.global_orient.reshape(P * F, 3),
                         s.smpl.body_pose.reshape(P * F, 69), s.smpl.transl.reshape(P * F, 3))
    joints = torch.as_tensor(joints.reshape(P, F, 24, 3))
    K, w2c = (torch.as_tensor(x, dtype=torch.float64) for x in (s.cam.K, s.cam.w2c))
    uvz = project(joints, K, w2c)
    return uvz[..., :2].numpy()


def check_frames(s, uv_pelvis: np.ndarray, source_frames: list[int]) -> None:
    """Each decoded frame shows its source frame's gray level (5 per frame index) and a marker at each pelvis."""
    video = decode_all(s.video).astype(np.float64)
    for i, f in enumerate(source_frames):
        assert abs(video[i, :4, :4].mean() - 5 * f) < 4, (s.key, i, f)
        for u, v in uv_pelvis[:, i]:
            assert video[i, int(round(v)), int(round(u))].mean() > 180, (s.key, i, u, v)


def draw(gray: int, height: int, width: int, points) -> np.ndarray:
    """A frame of one gray level with a 5x5 white marker at each (u, v) pixel (pixel centres at integers)."""
    img = np.full((height, width, 3), gray, np.uint8)
    for u, v in points:
        c, r = int(round(u)), int(round(v))
        img[max(r - 2, 0) : r + 3, max(c - 2, 0) : c + 3] = 255
    return img


# ------------------------------------------------------------------------------------------------- rotations


def test_rotmat_to_axis_angle_round_trip_including_pi():
    rng = np.random.default_rng(0)
    axes = rng.normal(size=(12, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angles = np.array([0.0, 1e-9, 1e-5, 0.3, 2.0, np.pi - 1e-3, np.pi - 1e-7, np.pi, np.pi, np.pi, 3.0, 1.0])
    aa = np.concatenate([axes * angles[:, None], [[np.pi, 0, 0], [0, np.pi, 0], [0, 0, -np.pi]],
                         Rotation.random(20, random_state=1).as_rotvec()])
    R = Rotation.from_rotvec(aa).as_matrix()
    back = rotmat_to_axis_angle(R)
    assert np.abs(Rotation.from_rotvec(back).as_matrix() - R).max() < 1e-9
    assert (np.linalg.norm(back, axis=1) <= np.pi + 1e-12).all()
    away = np.linalg.norm(aa, axis=1) < np.pi - 1e-3  # unique axis-angle: must equal the input
    assert np.abs(back[away] - aa[away]).max() < 1e-9
    # float32 network output, slightly off orthonormal, batched with leading dims
    R32 = R.astype(np.float32).reshape(5, 7, 3, 3)
    assert np.abs(Rotation.from_rotvec(rotmat_to_axis_angle(R32).reshape(-1, 3)).as_matrix() - R).max() < 1e-6


def test_runs_and_split():
    assert runs([(), (1,), (1,), (1, 2), (), (1, 2)]) == [(1, 3, (1,)), (3, 4, (1, 2)), (5, 6, (1, 2))]
    assert split_run(10, 20, None) == [(10, 20)]
    assert split_run(0, 25, 10) == [(0, 8), (8, 16), (16, 25)]


# ----------------------------------------------------------------------------------------------- PHALP / 4D-Humans

H, W, FPS = 64, 96, 25.0
PHALP_FRAMES = 20
# track id -> observed frames (frame 10 of track 2 is a "ghost": tracked_time 1, a stale copy of frame 9)
TRACKS = {1: range(0, 20), 2: [*range(2, 10), *range(11, 20)], 3: range(15, 20)}


def phalp_reference_uv(joints_cam: np.ndarray) -> np.ndarray:
    """4D-Humans' projection: focal 5000 at 256 px on the centred padded square, principal point at its centre
    (corner convention), back to this frame's pixels with centres at integers."""
    S = max(H, W)
    top, left = (S - H) // 2, (S - W) // 2
    u256 = 5000.0 * joints_cam[..., :2] / joints_cam[..., 2:] + 128.0
    return u256 * S / 256.0 - np.array([left, top]) - 0.5


@pytest.fixture(scope="module")
def phalp_case(tmp_path_factory, body):
    """A PHALP results pickle (3 tracks, 20 frames) and its video with a marker on each observed pelvis."""
    rng = np.random.default_rng(3)
    root = tmp_path_factory.mktemp("phalp")
    flip = Rotation.from_euler("x", np.pi)  # upright in the y-down camera: a half turn about x
    results, truth = {}, {}
    for tid, frames in TRACKS.items():
        n = len(frames)
        go = (flip * Rotation.from_rotvec(rng.normal(0, 0.3, (n, 3)))).as_matrix()[:, None].astype(np.float32)
        bp = Rotation.from_rotvec(rng.normal(0, 0.25, (n * 23, 3))).as_matrix().reshape(n, 23, 3, 3).astype(np.float32)
        betas = np.repeat(rng.normal(0, 1, (1, 10)), n, 0).astype(np.float32)
        if tid == 2:  # per-frame betas, as HMR2 predicts them
            betas += rng.normal(0, 0.3, betas.shape).astype(np.float32)
        x0 = {1: -1.0, 2: -0.2, 3: 0.3}[tid]
        cam_t = np.stack([x0 + 0.03 * np.asarray(frames), rng.normal(0.1, 0.05, n), rng.uniform(58, 62, n)], 1)
        joints = smpl_joints(body, betas, go, bp, rotmats=True) + cam_t[:, None]
        truth[tid] = {t: phalp_reference_uv(joints[i]) for i, t in enumerate(frames)}
        for i, t in enumerate(frames):
            fr = results.setdefault(f"outputs/_DEMO/clip/img/{t + 1:06d}.jpg", {
                "time": t, "shot": 0, "frame_path": f"outputs/_DEMO/clip/img/{t + 1:06d}.jpg", "tid": [],
                "tracked_ids": [], "tracked_time": [], "bbox": [], "smpl": [], "camera": [], "size": [], "conf": []})
            fr["tid"].append(tid)
            fr["tracked_ids"].append(tid)
            fr["tracked_time"].append(0)
            fr["bbox"].append(np.array([10.0, 5.0, 20.0, 50.0]))
            fr["smpl"].append({"global_orient": go[i], "body_pose": bp[i], "betas": betas[i]})
            fr["camera"].append(cam_t[i].astype(np.float32))
            fr["size"].append([H, W])
            fr["conf"].append(np.float32(0.99))
    ghost, last_seen = results["outputs/_DEMO/clip/img/000011.jpg"], results["outputs/_DEMO/clip/img/000010.jpg"]
    ghost["tid"].append(2)  # time 10: track 2 lost; PHALP repeats its time-9 state with tracked_time 1
    ghost["tracked_time"].append(1)
    for key in ("bbox", "smpl", "camera", "size", "conf"):
        ghost[key].append(last_seen[key][1])
    with open(root / "demo_clip.pkl", "wb") as fh:
        pickle.dump(results, fh)
    frames = [draw(5 * t, H, W, [truth[tid][t][0] for tid in TRACKS if t in truth[tid]]) for t in range(PHALP_FRAMES)]
    (root / "clip.mp4").write_bytes(encode_video(np.stack(frames), FPS))
    return root, truth


def test_phalp_single_tracks(phalp_case, body, toy_body_dir, tmp_path, capsys):
    root, truth = phalp_case
    rc = convert_phalp.main(["--phalp", str(root / "demo_clip.pkl"), "--video", str(root / "clip.mp4"), "--out",
                             str(tmp_path), "--min-frames", "8", "--license", "CC0", "--body-model-dir",
                             str(toy_body_dir)])
    assert rc == 0
    err = capsys.readouterr().err
    assert "track 3: frames 15-19 (5 frames) shorter than --min-frames 8: skipped" in err
    samples = read_shards(sorted(map(str, tmp_path.glob("*.tar"))))
    assert sorted(samples) == ["clip_t1_000000", "clip_t2_000002", "clip_t2_000011"]
    for key, (tid, first, count) in {"clip_t1_000000": (1, 0, 20), "clip_t2_000002": (2, 2, 8),
                                     "clip_t2_000011": (2, 11, 9)}.items():
        s = samples[key]
        assert s.meta["source"] == "4d-humans-phalp" and s.meta["license"] == "CC0" and s.gender == "neutral"
        assert s.fps == FPS and s.smpl.num_frames == count and s.meta["track_ids"] == [tid]
        np.testing.assert_array_equal(s.cam.w2c, np.broadcast_to(np.eye(4), (count, 4, 4)))
        uv = sample_projection(body, s)[0]  # (F, 24, 2)
        ref = np.stack([truth[tid][t] for t in range(first, first + count)])
        # betas of track 2 vary per frame: the mean-beta body keeps only the pelvis where the source put it
        err_px = np.abs(uv - ref)[:, :1] if tid == 2 else np.abs(uv - ref)
        assert err_px.max() < TOL_PX, (key, err_px.max())
        check_frames(s, uv[None, :, 0], list(range(first, first + count)))


def test_phalp_multi(phalp_case, body, tmp_path, capsys):
    root, truth = phalp_case
    paths = convert_phalp.convert(root / "demo_clip.pkl", root / "clip.mp4", tmp_path, min_frames=8, multi=True,
                                  per_shard=1)
    assert len(paths) == 2  # one sample per shard
    assert "track 3: observed on 5 frames, fewer than --min-frames 8: ignored" in capsys.readouterr().err
    samples = read_shards(paths)
    assert sorted(samples) == ["clip_multi_000002", "clip_multi_000011"]
    s = samples["clip_multi_000002"]
    assert s.smpl.num_people == 2 and s.meta["track_ids"] == [1, 2] and s.smpl.num_frames == 8
    uv = sample_projection(body, s)  # (2, 8, 24, 2)
    assert np.abs(uv[0] - np.stack([truth[1][t] for t in range(2, 10)])).max() < TOL_PX
    check_frames(s, uv[:, :, 0], list(range(2, 10)))


def test_phalp_frame_folder_follows_phalp_numbering(phalp_case, body, tmp_path):
    """PHALP's own frame folder names time t `{t+1:06d}.jpg`; the converter pairs time t with that file (the clip of
    track 1 starts at t = 0, which has no 000000.jpg), and a folder whose files are not the ones PHALP named is
    refused with both names."""
    root, truth = phalp_case
    folder = tmp_path / "img"
    folder.mkdir()
    for t, frame in enumerate(decode_all((root / "clip.mp4").read_bytes())):
        Image.fromarray(frame).save(folder / f"{t + 1:06d}.jpg", quality=98)
    out = tmp_path / "out"
    paths = convert_phalp.convert(root / "demo_clip.pkl", folder, out, min_frames=8, fps=FPS)
    samples = read_shards(paths)
    s = samples["img_t1_000000"]
    assert s.smpl.num_frames == 20 and s.meta["source_frames"] == [0, 20]
    uv = sample_projection(body, s)[0]
    assert np.abs(uv - np.stack([truth[1][t] for t in range(20)])).max() < TOL_PX
    check_frames(s, uv[None, :, 0], list(range(20)))
    (folder / "000001.jpg").rename(folder / "000000.jpg")  # numbered from 0: not PHALP's folder
    with pytest.raises(ValueError, match="PHALP time 0 is frame 000001.jpg, but file 0 of .* is 000000.jpg"):
        convert_phalp.convert(root / "demo_clip.pkl", folder, tmp_path / "bad", min_frames=8, fps=FPS)


def test_phalp_rotated_video(phalp_case, body, tmp_path):
    """A phone clip stored sideways with a display rotation: PHALP (through OpenCV) saw the upright frames, so the
    converter must decode them upright too; its K then projects the bodies onto their markers. Without the
    rotation, PHALP's 64x96 frames do not match the stored 96x64 ones."""
    from video_pathologies import mux

    root, truth = phalp_case
    upright = decode_all((root / "clip.mp4").read_bytes())
    stored = np.ascontiguousarray(np.rot90(upright, 1, axes=(1, 2)))  # sensor orientation; shown turned back
    video = tmp_path / "clip.mp4"
    video.write_bytes(mux(stored, rotation=-90, rate=int(FPS)))
    paths = convert_phalp.convert(root / "demo_clip.pkl", video, tmp_path / "out", min_frames=8)
    s = read_shards(paths)["clip_t1_000000"]
    uv = sample_projection(body, s)[0]
    assert np.abs(uv - np.stack([truth[1][t] for t in range(20)])).max() < TOL_PX
    check_frames(s, uv[None, :, 0], list(range(20)))


def test_phalp_reads_joblib_files():
    """PHALP saves with joblib.dump(..., compress=3); the asset was written by joblib itself."""
    want = import_script(ASSETS, "make_joblib_fixture").expected()
    for name in ("phalp_like.joblib", "phalp_like.joblib.z"):
        got = load_pickle(ASSETS / name)
        np.testing.assert_array_equal(got["fortran"], want["fortran"])
        assert got["big_endian"].tolist() == want["big_endian"].tolist() and got["empty"].shape == (0, 3)
        assert got["objects"].tolist() == want["objects"].tolist() and got["mask_rle"] == want["mask_rle"]
        times, tracks = convert_phalp.read_tracks({"f": got["frame"]})
        assert times == [3] and list(tracks) == [1]  # track 2 is a ghost on that frame
        det, smpl = tracks[1][3], want["frame"]["smpl"][0]
        assert det.size == (64, 96) and det.body_pose.shape == (69,)
        np.testing.assert_array_equal(det.cam_t, want["frame"]["camera"][0])
        np.testing.assert_array_equal(det.betas, smpl["betas"])


def test_pickles_are_restricted(tmp_path):
    """Plain data loads (old PHALP versions stored torch tensors); anything that could run code is refused."""
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps({"t": torch.arange(3.0), "n": [np.int64(2)]}))
    got = load_pickle(path)
    assert got["t"].tolist() == [0.0, 1.0, 2.0] and got["n"] == [2]
    for name, obj in (("pathlib", Path("x")), ("posix.system", _RunsCode())):
        path.write_bytes(pickle.dumps({"a": obj}))
        with pytest.raises(PickleFormatError, match=f"refusing to unpickle {name}"):
            load_pickle(path)


class _RunsCode:
    def __reduce__(self):
        import os

        return os.system, ("echo unpickled",)


# ------------------------------------------------------------------------------------------- EasyMocap / ZJU-MoCap

EM_FRAMES = 12
CAMS = {"1": (64, 80), "B2": (48, 64)}  # name -> (H, W)
DIST_B2 = np.array([-0.08, 0.02, 0.002, -0.001, 0.0])

INTRI_YML = """%YAML:1.0
---
names:
   - "1"
   - "B2"
K_1: !!opencv-matrix
   rows: 3
   cols: 3
   dt: d
   data: [ 1.0500000000000000e+02, 0., 4.0250000000000000e+01, 0.,
       1.0300000000000000e+02, 3.1000000000000000e+01, 0., 0., 1. ]
dist_1: !!opencv-matrix
   rows: 1
   cols: 5
   dt: d
   data: [ 0., 0., 0., 0., 0. ]
K_B2: !!opencv-matrix
   rows: 3
   cols: 3
   dt: d
   data: [ 8.0000000000000000e+01, 0., 3.2000000000000000e+01, 0.,
       8.1000000000000000e+01, 2.3250000000000000e+01, 0., 0., 1. ]
dist_B2: !!opencv-matrix
   rows: 1
   cols: 5
   dt: d
   data: [ -8.0000000000000002e-02, 2.0000000000000000e-02,
       2.0000000000000000e-03, -1.0000000000000000e-03, 0. ]
H_1: 64
W_1: 80
"""


def _mat(key: str, a: np.ndarray) -> str:
    """One matrix as EasyMocap's own FileStorage writer prints it (CRLF line ends, %.6f would lose precision)."""
    a = np.atleast_2d(a)
    return "\r\n".join([f"{key}: !!opencv-matrix", f"  rows: {a.shape[0]}", f"  cols: {a.shape[1]}", "  dt: d",
                        f"  data: [{', '.join(repr(float(v)) for v in a.reshape(-1))}]"]) + "\r\n"


def em_cameras() -> dict:
    """name -> (K, dist, R, T) of the two synthetic cameras, in a z-up world."""
    K = {"1": np.array([[105.0, 0, 40.25], [0, 103.0, 31.0], [0, 0, 1]]),
         "B2": np.array([[80.0, 0, 32.0], [0, 81.0, 23.25], [0, 0, 1]])}
    out = {}
    for (name, eye), dist in zip({"1": (0.3, -4.5, 0.3), "B2": (-3.8, -2.5, 0.6)}.items(), (np.zeros(5), DIST_B2)):
        w2c = look_at(np.array(eye), np.array([0.0, 0.0, -0.2]), up=(0.0, 0.0, 1.0))
        out[name] = (K[name], dist, w2c[:3, :3], w2c[:3, 3])
    return out


def em_project(X: np.ndarray, K, dist, R, T) -> np.ndarray:
    """OpenCV camera model written out (pinhole when dist is zero): (N, 3) world points -> (N, 2) pixels."""
    c = X @ R.T + T
    x, y = c[:, 0] / c[:, 2], c[:, 1] / c[:, 2]
    k1, k2, p1, p2, k3 = dist
    r2 = x * x + y * y
    rad = 1 + k1 * r2 + k2 * r2**2 + k3 * r2**3
    xd, yd = x * rad + 2 * p1 * x * y + p2 * (r2 + 2 * x * x), y * rad + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return np.stack([K[0, 0] * xd + K[0, 2], K[1, 1] * yd + K[1, 2]], 1)


@pytest.fixture(scope="module")
def easymocap_case(tmp_path_factory, body):
    """An EasyMocap capture: 2 cameras (B2 distorted, given by Rot_ only), 12 frames, 2 people (id 1 is absent
    on frame 6, has a non-zero poses[:3] and per-frame shapes), jpg image folders with a marker on each pelvis."""
    rng = np.random.default_rng(5)
    root = tmp_path_factory.mktemp("easymocap") / "CoreView_test"
    (root / "smpl").mkdir(parents=True)
    cams = em_cameras()
    (root / "intri.yml").write_text(INTRI_YML)
    extri = "%YAML:1.0\r\n---\r\nnames:\r\n  - \"1\"\r\n  - \"B2\"\r\n"
    R1, T1 = cams["1"][2:]
    extri += _mat("R_1", Rotation.from_matrix(R1).as_rotvec()[:, None]) + _mat("Rot_1", R1) + _mat("T_1", T1[:, None])
    extri += _mat("Rot_B2", cams["B2"][2]) + _mat("T_B2", cams["B2"][3][:, None])
    (root / "extri.yml").write_bytes(extri.encode())
    stand = Rotation.from_euler("x", np.pi / 2)  # SMPL's y-up body into the z-up world
    people = {0: range(EM_FRAMES), 1: [f for f in range(EM_FRAMES) if f != 6]}
    truth, fits = {}, {f: [] for f in range(EM_FRAMES)}
    for pid, frames in people.items():
        n = len(frames)
        Rh = (Rotation.from_euler("z", ([0.4, 2.9][pid] + 0.05 * np.arange(n))[:, None]) * stand).as_rotvec()
        Th = np.stack([[-0.4, 0.5][pid] + 0.02 * np.arange(n), np.full(n, [0.1, -0.3][pid]), np.full(n, 0.05)], 1)
        poses = np.concatenate([rng.normal(0, 0.4, (n, 3)) * pid, rng.normal(0, 0.25, (n, 69))], 1)
        shapes = np.repeat(rng.normal(0, 1, (1, 10)), n, 0) + pid * rng.normal(0, 0.3, (n, 10))
        joints = smpl_joints(body, shapes, poses[:, :3], poses[:, 3:])  # no translation, root about J0
        world = np.einsum("nij,nkj->nki", Rotation.from_rotvec(Rh).as_matrix(), joints) + Th[:, None]
        truth[pid] = {f: world[i] for i, f in enumerate(frames)}
        for i, f in enumerate(frames):
            fits[f].append({"id": pid, "Rh": Rh[i : i + 1].tolist(), "Th": Th[i : i + 1].tolist(),
                            "poses": poses[i : i + 1].tolist(), "shapes": shapes[i : i + 1].tolist()})
    for f, ps in fits.items():
        (root / "smpl" / f"{f:06d}.json").write_text(json.dumps(ps))
    for name, (h, w) in CAMS.items():
        (root / "images" / name).mkdir(parents=True)
        for f in range(EM_FRAMES):
            pts = [em_project(truth[pid][f][:1], *cams[name])[0] for pid in truth if f in truth[pid]]
            Image.fromarray(draw(5 * f, h, w, pts)).save(root / "images" / name / f"{f:06d}.jpg", quality=95)
    return root, truth


def test_easymocap(easymocap_case, body, toy_body_dir, tmp_path, capsys):
    root, truth = easymocap_case
    rc = convert_easymocap.main(["--root", str(root), "--out", str(tmp_path), "--body-model-dir", str(toy_body_dir),
                                 "--fps", "50", "--min-frames", "5", "--frames", "0:12", "--license", "research-only"])
    assert rc == 0
    assert "people [0]: frames 6-6 (1 frames) shorter than --min-frames 5: skipped" in capsys.readouterr().err
    samples = read_shards(sorted(map(str, tmp_path.glob("*.tar"))))
    assert sorted(samples) == ["CoreView_test_1_000000", "CoreView_test_1_000007", "CoreView_test_B2_000000",
                               "CoreView_test_B2_000007"]
    cams = em_cameras()
    for key, s in samples.items():
        name, first = key.split("_")[2], int(key.split("_")[3])
        frames = list(range(first, first + s.smpl.num_frames))
        K, _, R, T = cams[name]
        assert s.meta["camera"] == name and s.meta["person_ids"] == [0, 1] and s.fps == 50.0
        assert s.meta["license"] == "research-only" and "dist" not in s.meta
        uv = sample_projection(body, s)  # (2, F, 24, 2)
        for p in (0, 1):
            ref = np.stack([em_project(truth[p][f], K, np.zeros(5), R, T) for f in frames])
            # person 1's shapes vary per frame: with the mean betas only its pelvis stays exactly in place
            err_px = np.abs(uv[p] - ref)[:, : 1 if p else 24].max()
            assert err_px < TOL_PX, (key, p, err_px)
        check_frames(s, uv[:, :, 0], frames)  # B2's markers were drawn distorted: the frames were undistorted


def test_easymocap_npy_fits_keep_distortion(easymocap_case, body, toy_body_dir, tmp_path):
    """ZJU-MoCap style: one pickled dict per frame in a .npy (person 0 only here); distortion kept and recorded."""
    root, truth = easymocap_case
    (tmp_path / "new_params").mkdir()
    for f in range(EM_FRAMES):
        (p,) = [p for p in json.loads((root / "smpl" / f"{f:06d}.json").read_text()) if p["id"] == 0]
        np.save(tmp_path / "new_params" / f"{f}.npy", {k: np.array(p[k]) for k in ("poses", "Rh", "Th", "shapes")})
    paths = convert_easymocap.convert(root, tmp_path / "out", toy_body_dir, cams=["B2"], fps=50, min_frames=5,
                                      frames="7:", smpl_dir=tmp_path / "new_params", keep_distortion=True)
    (s,) = read_shards(paths).values()
    assert s.key == "CoreView_test_B2_000007" and s.smpl.num_frames == 5 and s.meta["person_ids"] == [0]
    np.testing.assert_allclose(s.meta["dist"], DIST_B2)
    K, _, R, T = em_cameras()["B2"]
    ref = np.stack([em_project(truth[0][f], K, np.zeros(5), R, T) for f in range(7, 12)])
    assert np.abs(sample_projection(body, s)[0] - ref).max() < TOL_PX


def test_opencv_yaml_parser():
    d = convert_easymocap.parse_opencv_yaml(INTRI_YML)
    assert d["names"] == ["1", "B2"] and d["H_1"] == 64
    np.testing.assert_array_equal(d["K_B2"], [[80.0, 0, 32.0], [0, 81.0, 23.25], [0, 0, 1]])
    np.testing.assert_allclose(d["dist_B2"], DIST_B2[None])
    d = convert_easymocap.parse_opencv_yaml(_mat("R_1", np.array([[0.1], [-0.2], [3.0]])) + "names: [ a, 2 ]\r\n")
    assert d["R_1"].shape == (3, 1) and d["names"] == ["a", 2]


def test_easymocap_bad_inputs(easymocap_case, toy_body_dir, tmp_path):
    root, _ = easymocap_case
    (tmp_path / "capture").mkdir()
    with pytest.raises(FileNotFoundError, match=r"capture/intri\.yml"):
        convert_easymocap.convert(tmp_path / "capture", tmp_path / "out", toy_body_dir)
    with pytest.raises(ValueError, match="camera '7' is not in"):
        convert_easymocap.convert(root, tmp_path / "out", toy_body_dir, cams=["7"], fps=50)


def test_undistort_moves_points_to_the_pinhole_projection():
    K = np.array([[60.0, 0, 39.5], [0, 61.0, 29.0], [0, 0, 1]])
    dist = np.array([-0.3, 0.08, 0.003, -0.002, 0.01])
    xy = np.array([[-0.55, -0.4], [0.5, 0.38], [0.1, -0.05], [-0.4, 0.35], [0.58, -0.42]])
    X = np.concatenate([xy, np.ones((len(xy), 1))], 1)
    pinhole, distorted = (em_project(X, K, d, np.eye(3), np.zeros(3)) for d in (np.zeros(5), dist))
    assert np.linalg.norm(pinhole - distorted, axis=1)[[0, 1, 3, 4]].min() > 2  # a visible effect to undo
    v, u = np.mgrid[0:60, 0:80]
    img = sum(np.exp(-((u - a) ** 2 + (v - b) ** 2) / (2 * 1.2**2)) for a, b in distorted)
    frames = np.repeat((255 * np.clip(img, 0, 1)).round().astype(np.uint8)[None, ..., None], 3, axis=-1)
    out = convert_easymocap.undistort(frames, K, dist)[0, ..., 0].astype(np.float64)
    for a, b in pinhole:
        r, c = int(round(b)), int(round(a))
        win = out[r - 3 : r + 4, c - 3 : c + 4]
        vv, uu = np.mgrid[r - 3 : r + 4, c - 3 : c + 4]
        centroid = np.array([(win * uu).sum(), (win * vv).sum()]) / win.sum()
        assert np.linalg.norm(centroid - [a, b]) < 0.25, (a, b, centroid)


# --------------------------------------------------------------------------------------------- SMPL chumpy files


def test_convert_chumpy_smpl_pickle(toy_body_dir, body, tmp_path, monkeypatch):
    """A pickle laid out like the SMPL download: chumpy.ch.Ch objects (NEWOBJ + __dict__ state holding 'x')."""
    import types

    from data_prep import convert_smpl_pkl
    from isa4d.body.smpl import load_model_data

    class Ch:  # what chumpy.ch.Ch.__getstate__ leaves: its __dict__ without _parents and _cache
        def __init__(self, x):
            self.x, self._dirty_vars, self._itr, self._depends_on_deps = np.asarray(x), set(), None, {}

    class add(Ch):  # a derived expression: no stored 'x'
        def __init__(self, a, b):
            self.a, self.b, self._dirty_vars = a, b, set()

    for cls, module in ((Ch, "chumpy.ch"), (add, "chumpy.ch_ops")):
        cls.__module__, cls.__qualname__ = module, cls.__name__
        mod = sys.modules.get(module) or types.ModuleType(module)
        setattr(mod, cls.__name__, cls)
        monkeypatch.setitem(sys.modules, module, mod)
    monkeypatch.setitem(sys.modules, "chumpy", types.ModuleType("chumpy"))
    data = load_model_data(toy_body_dir)
    chumpy_keys = ("v_template", "shapedirs", "posedirs", "J", "weights")
    (tmp_path / "good.pkl").write_bytes(pickle.dumps({k: Ch(v) if k in chumpy_keys else v for k, v in data.items()},
                                                     protocol=2))
    (tmp_path / "derived.pkl").write_bytes(pickle.dumps(dict(data, J=add(Ch(data["J"]), Ch(1.0))), protocol=2))
    monkeypatch.undo()  # no chumpy from here on
    assert "chumpy" not in sys.modules

    assert convert_smpl_pkl.main(["--out", str(tmp_path / "body"), "--neutral", str(tmp_path / "good.pkl")]) == 0
    converted = load_model_data(tmp_path / "body")
    for k in chumpy_keys:
        np.testing.assert_array_equal(converted[k], np.asarray(data[k], dtype=np.float64))
    rng = np.random.default_rng(0)
    betas, go, bp = rng.normal(size=(2, 10)), rng.normal(0, 0.3, (2, 3)), rng.normal(0, 0.3, (2, 69))
    np.testing.assert_allclose(smpl_joints(BodyModel(tmp_path / "body", dtype=torch.float64), betas, go, bp),
                               smpl_joints(body, betas, go, bp), atol=1e-9)
    with pytest.raises(ValueError, match="'J' is a derived chumpy expression"):
        convert_smpl_pkl.convert_file(tmp_path / "derived.pkl", tmp_path / "x.pkl")
