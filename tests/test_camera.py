"""Tests for isa4d.geometry.camera: projection and the exact K update for resize + crop (also on pixels)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_prep.synthetic_shards import COLORS, make_clip
from isa4d.data.buckets import Bucket
from isa4d.data.contract import CameraSequence, SMPLSequence, encode_sample, parse_sample
from isa4d.data.examples import ClipOptions, decode_example
from isa4d.geometry.camera import (
    CropResize, camera_center, cover_crop, intrinsics_from_fov, is_rigid, project,
)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def random_camera(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A pinhole K with fx != fy and an off-centre principal point, and a rigid w2c."""
    fx, fy, cx, cy = rng.uniform(40, 200), rng.uniform(40, 200), rng.uniform(10, 90), rng.uniform(10, 90)
    K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]])
    w2c = np.eye(4)
    w2c[:3, :3], w2c[:3, 3] = random_rotation(rng), rng.normal(0, 0.5, 3)
    return K, w2c


# ------------------------------------------------------------------------------------------------ projection


def test_project_hand_computed_points():
    K = torch.tensor([[100.0, 0, 40], [0, 80, 30], [0, 0, 1]])
    w2c = torch.eye(4)
    w2c[:3, 3] = torch.tensor([0.0, 0.0, 2.0])  # camera 2 m behind the world origin
    points = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 2.0], [0.0, -0.5, 0.0]])
    expected = torch.tensor([[40.0, 30.0, 2.0], [40 + 100 / 4, 30.0, 4.0], [40.0, 30 - 80 * 0.5 / 2, 2.0]])
    torch.testing.assert_close(project(points, K, w2c), expected)


def test_project_broadcasts_over_frames_and_matches_per_frame():
    rng = np.random.default_rng(0)
    cams = [random_camera(rng) for _ in range(4)]
    K = torch.tensor(np.stack([c[0] for c in cams]))
    w2c = torch.tensor(np.stack([c[1] for c in cams]))
    pts = torch.tensor(rng.normal(0, 1, (4, 5, 3)))
    out = project(pts, K, w2c)
    for t in range(4):
        cam = pts[t] @ w2c[t, :3, :3].T + w2c[t, :3, 3]
        uv = (cam @ K[t].T)[:, :2] / cam[:, 2:]
        torch.testing.assert_close(out[t, :, :2], uv)
        torch.testing.assert_close(out[t, :, 2], cam[:, 2])


def test_camera_center_maps_to_camera_origin():
    rng = np.random.default_rng(1)
    w2c = torch.tensor(np.stack([random_camera(rng)[1] for _ in range(3)]))
    c = camera_center(w2c)
    cam = (w2c[:, :3, :3] @ c[:, :, None])[..., 0] + w2c[:, :3, 3]
    torch.testing.assert_close(cam, torch.zeros_like(cam))


def test_is_rigid_rejects_scale_reflection_and_bad_last_row():
    rng = np.random.default_rng(2)
    good = random_camera(rng)[1]
    scaled, reflected, bad_row = good.copy(), good.copy(), good.copy()
    scaled[:3, :3] *= 1.05
    reflected[:3, 0] *= -1
    bad_row[3, 0] = 0.2
    assert is_rigid(np.stack([good, scaled, reflected, bad_row])).tolist() == [True, False, False, False]


def test_intrinsics_from_fov_puts_fov_edge_on_image_edge():
    """A ray at half the vertical field of view lands on the top image edge v = -0.5."""
    H, W, fov = 48, 80, 50.0
    K = torch.tensor(intrinsics_from_fov(fov, H, W))
    a = np.deg2rad(fov / 2)
    pts = torch.tensor([[0.0, -np.tan(a), 1.0], [0.0, np.tan(a), 1.0], [0.0, 0.0, 3.0]])
    uvz = project(pts, K, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(uvz[:, 1], torch.tensor([-0.5, H - 0.5, (H - 1) / 2], dtype=torch.float64))
    assert uvz[2, 0] == (W - 1) / 2


# -------------------------------------------------------------------------------------------- crop and resize


def test_crop_resize_maps_image_edges_onto_image_edges():
    """Scaling keeps the continuous image rectangle: source edges -0.5 and W-0.5 land on the scaled edges."""
    c = CropResize(src_h=30, src_w=40, scaled_h=45, scaled_w=100, top=0, left=0, out_h=45, out_w=100)
    corners = np.array([[-0.5, -0.5, 1.0], [39.5, 29.5, 1.0]])
    np.testing.assert_allclose((c.matrix() @ corners.T).T[:, :2], [[-0.5, -0.5], [99.5, 44.5]])


@pytest.mark.parametrize("seed", range(8))
def test_updated_K_projects_to_affine_map_of_old_pixels(seed):
    rng = np.random.default_rng(seed)
    K, w2c = random_camera(rng)
    src_h, src_w = rng.integers(20, 200, 2)
    out_h, out_w = rng.integers(8, 160, 2)
    crop = cover_crop(int(src_h), int(src_w), int(out_h), int(out_w), rng=rng, jitter=1.0)
    ahead = w2c[:3, :3].T @ (np.array([0, 0, 4.0]) - w2c[:3, 3])  # 4 m in front of the camera
    pts = rng.normal(0, 1, (50, 3)) + ahead
    old = project(torch.tensor(pts), torch.tensor(K), torch.tensor(w2c)).numpy()
    new = project(torch.tensor(pts), torch.tensor(crop.apply_to_K(K)), torch.tensor(w2c)).numpy()
    # pixel-centre convention: scale about the image corner (-0.5, -0.5), then shift by the crop offset
    sx, sy = crop.scaled_w / src_w, crop.scaled_h / src_h
    u = (old[:, 0] + 0.5) * sx - 0.5 - crop.left
    v = (old[:, 1] + 0.5) * sy - 0.5 - crop.top
    np.testing.assert_allclose(new[:, 0], u, atol=1e-9)
    np.testing.assert_allclose(new[:, 1], v, atol=1e-9)
    np.testing.assert_allclose(new[:, 2], old[:, 2])


def test_cover_crop_covers_keeps_aspect_and_jitters_within_slack():
    rng = np.random.default_rng(0)
    for _ in range(200):
        src_h, src_w, out_h, out_w = (int(x) for x in rng.integers(8, 300, 4))
        centred = cover_crop(src_h, src_w, out_h, out_w)
        c = cover_crop(src_h, src_w, out_h, out_w, rng=rng, jitter=float(rng.uniform(0, 1)))
        assert (c.scaled_h, c.scaled_w) == (centred.scaled_h, centred.scaled_w)
        assert c.scaled_h >= out_h and c.scaled_w >= out_w and (c.scaled_h == out_h or c.scaled_w == out_w)
        sx, sy = c.scale
        assert abs(sx / sy - 1) < 2 / min(c.scaled_h, c.scaled_w) + 1e-9  # aspect kept up to rounding
        assert 0 <= c.top <= c.scaled_h - out_h and 0 <= c.left <= c.scaled_w - out_w
        assert (centred.top, centred.left) == ((c.scaled_h - out_h) // 2, (c.scaled_w - out_w) // 2)


def test_cover_crop_jitter_reaches_both_ends_and_zero_jitter_stays_centred():
    rng = np.random.default_rng(0)
    lefts = {cover_crop(40, 100, 40, 40, rng=rng, jitter=1.0).left for _ in range(300)}
    assert min(lefts) == 0 and max(lefts) == 60 and len(lefts) > 20
    half = {cover_crop(40, 100, 40, 40, rng=rng, jitter=0.5).left for _ in range(300)}
    assert min(half) == 15 and max(half) == 45  # centre 30, moved by up to half of the 30 px each side
    assert {cover_crop(40, 100, 40, 40, rng=rng, jitter=0.0).left for _ in range(10)} == {30}


def test_crop_window_outside_the_scaled_image_is_rejected():
    with pytest.raises(ValueError, match="outside"):
        CropResize(10, 10, 20, 20, top=5, left=0, out_h=16, out_w=16)
    with pytest.raises(ValueError, match="positive"):
        cover_crop(0, 10, 4, 4)


# ------------------------------------------------------------------- the K update on real pixels, end to end

# Source clip 64x80 into buckets that downscale (48x64, 40x40), only crop (64x48) and upscale (96x96).
BUCKETS = [Bucket(48, 64, 8, 1), Bucket(64, 48, 8, 1), Bucket(40, 40, 8, 1), Bucket(96, 96, 8, 1)]
SRC_H, SRC_W, SRC_FRAMES, STRIDE = 64, 80, 32, 2


@pytest.fixture(scope="module")
def shuffled_marker_clip():
    """A marker clip with its frames (and their cameras and bodies) permuted, so neighbouring frames differ a
    lot and a one-frame misalignment between pixels and labels shows as pixels of error."""
    rng = np.random.default_rng(6)  # a seed whose two people stay apart in most frames
    clip = make_clip(rng, SRC_H, SRC_W, SRC_FRAMES, 2, 30.0, texture=False)
    perm = rng.permutation(SRC_FRAMES)
    sm, cam = clip["smpl"], clip["cam"]
    smpl = SMPLSequence(sm.betas, sm.global_orient[:, perm], sm.body_pose[:, perm], sm.transl[:, perm])
    sample = encode_sample("shuffled", clip["video"][perm], smpl, CameraSequence(cam.K[perm], cam.w2c[perm]),
                           {"fps": 30.0, "gender": "neutral"})
    return parse_sample(sample)


def disc_centroid(frame: np.ndarray, person: int, tol: float = 60.0) -> tuple[float, float]:
    """(u, v) centroid of the pixels of `person`'s colour."""
    d = np.linalg.norm(frame.astype(np.float32) - COLORS[person % len(COLORS)].astype(np.float32), axis=-1)
    ys, xs = np.nonzero(d < tol)
    return (float(xs.mean()), float(ys.mean())) if xs.size else (np.nan, np.nan)


def bright_centroid(frame: np.ndarray) -> tuple[float, float]:
    """(u, v) centroid of the pixels brighter than halfway between the grey background and the green disc, in
    luma only: green is the one marker colour with luma contrast, and luma is not chroma-subsampled."""
    luma = np.array([0.299, 0.587, 0.114])
    threshold = (90 + COLORS[1] @ luma) / 2  # make_clip's untextured background is grey 90
    ys, xs = np.nonzero(frame.astype(np.float64) @ luma > threshold)
    return float(xs.mean()), float(ys.mean())


def clean_discs(uvz: np.ndarray, radius: np.ndarray, height: int, width: int, margin: float = 2.0):
    """(T, P) bool: discs wholly inside the frame and apart from all others (not cropped, not occluded)."""
    u, v = uvz[..., 0], uvz[..., 1]
    inside = (u - radius - margin > -0.5) & (u + radius + margin < width - 0.5)
    inside &= (v - radius - margin > -0.5) & (v + radius + margin < height - 0.5)
    dist = np.hypot(u[:, :, None] - u[:, None, :], v[:, :, None] - v[:, None, :])
    touching = dist < radius[:, :, None] + radius[:, None, :] + margin
    touching[:, np.arange(uvz.shape[1]), np.arange(uvz.shape[1])] = False
    return inside & ~touching.any(-1)


@pytest.mark.parametrize("bucket", BUCKETS, ids=lambda b: b.name)
def test_discs_land_on_projected_smpl_translation(shuffled_marker_clip, bucket):
    """Through decode_example (window at stride 2, cover crop, resize), each disc's centroid in the output
    frames sits on project(transl, K, w2c) of the same output frame."""
    s = shuffled_marker_clip
    ex = decode_example(s, bucket, ClipOptions(frame_stride=STRIDE), None)
    start = (SRC_FRAMES - (bucket.num_frames - 1) * STRIDE - 1) // 2
    np.testing.assert_array_equal(ex.frame_index, start + STRIDE * np.arange(bucket.num_frames))

    transl = torch.from_numpy(ex.transl).transpose(0, 1)  # (T, P, 3)
    uvz = project(transl, torch.from_numpy(ex.K), torch.from_numpy(ex.w2c)).numpy()  # (T, P, 3)
    scale = float(ex.K[0, 0, 0] / s.cam.K[0, 0, 0])  # scaled / source pixels
    fx = s.cam.K[ex.frame_index, 0, 0][:, None]
    radius = np.maximum(3.0, 0.25 * fx / uvz[..., 2]) * scale  # as make_clip draws them
    clean = clean_discs(uvz, radius, bucket.height, bucket.width)
    assert clean.sum() >= 8 and clean[:, 1].sum() >= 4, "too few unobstructed discs to check"

    # Every disc by colour: colour is chroma-subsampled at source resolution, so good to about a source pixel.
    T, P = clean.shape
    found = np.array([[disc_centroid(ex.video[t], p) for p in range(P)] for t in range(T)])
    err = np.hypot(*(found - uvz[..., :2]).transpose(2, 0, 1))[clean]
    assert err.max() < max(1.0, scale), err
    # The green disc by luma: exact to a fraction of an output pixel.
    frames = np.flatnonzero(clean[:, 1])
    green = np.array([bright_centroid(ex.video[t]) for t in frames])
    green_err = np.hypot(*(green - uvz[frames, 1, :2]).T)
    assert green_err.max() < 0.4, green_err
    # The neighbouring output frame's labels miss the same discs by far: frames and labels are aligned.
    shifted_err = np.hypot(*(green - np.roll(uvz, 1, axis=0)[frames, 1, :2]).T)
    assert np.median(shifted_err) > 4 * green_err.max(), shifted_err
