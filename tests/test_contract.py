"""Tests for isa4d.data.contract: encode_sample/parse_sample, one SampleError reason per defect."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from isa4d.data.contract import (
    REASONS, CameraSequence, SampleError, SMPLSequence, encode_sample, npz_bytes, parse_sample,
)
from isa4d.data.video import encode_video


@pytest.fixture(scope="module")
def clip(small_clips):
    return small_clips[1]  # 2 people, 48x64, 24 frames


def _sample(clip, key="s", *, smpl=None, cam=None, meta=None, **kw):
    meta = meta or {"fps": 25.0, "gender": "male", "source": "test"}
    return encode_sample(key, clip["mp4"], smpl or clip["smpl"], cam or clip["cam"], meta, **kw)


def _expect(sample, reason, match=None):
    with pytest.raises(SampleError, match=match) as e:
        parse_sample(sample)
    assert e.value.reason == reason, str(e.value)
    assert str(e.value).startswith(f"{sample['__key__']}: ")


def test_round_trip_keeps_arrays_meta_and_extras(clip):
    s = _sample(clip, "roundtrip", bg=clip["bg"], mask=clip["mask"])
    s["depth.npz"] = b"kept as an extra"
    s["__url__"] = "shard-000.tar"
    p = parse_sample(s)
    assert (p.key, p.url, p.fps, p.gender) == ("roundtrip", "shard-000.tar", 25.0, "male")
    assert p.meta["source"] == "test"
    assert (p.info.num_frames, p.info.height, p.info.width) == (24, 48, 64)
    for name in ("betas", "global_orient", "body_pose", "transl"):
        got = getattr(p.smpl, name)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, getattr(clip["smpl"], name))
    np.testing.assert_array_equal(p.cam.K, clip["cam"].K)
    np.testing.assert_array_equal(p.cam.w2c, clip["cam"].w2c)
    assert p.bg == s["bg.mp4"] and p.mask == s["mask.mp4"] and p.ref is None
    assert p.extra == {"depth.npz": b"kept as an extra"}
    assert p.smpl.num_people == 2 and p.smpl.take(np.array([3, 5])).transl.shape == (2, 2, 3)


def test_every_loader_defect_gives_its_reason(defective_samples):
    for reason, sample in defective_samples:
        if reason == "too_short":  # the clip is fine; only a window decides it is short (test_dataset)
            assert parse_sample(sample).info.num_frames == 10
            continue
        if sample["__key__"] == "bad_bitflip":  # the header is fine; decoding finds the damage (test_dataset)
            assert parse_sample(sample).info.num_frames == 24
            continue
        _expect(sample, reason)


def test_betas_are_padded_or_cut_to_ten(clip):
    smpl = clip["smpl"]
    for n in (4, 16):
        betas = np.arange(2 * n, dtype=np.float32).reshape(2, n)
        other = SMPLSequence(betas, smpl.global_orient, smpl.body_pose, smpl.transl)
        p = parse_sample(_sample(clip, smpl=other))
        assert p.smpl.betas.shape == (2, 10)
        m = min(n, 10)
        np.testing.assert_array_equal(p.smpl.betas[:, :m], betas[:, :m])
        assert not p.smpl.betas[:, m:].any()


def _smpl_npz(clip, **override) -> bytes:
    s = clip["smpl"]
    arrays = dict(betas=s.betas, global_orient=s.global_orient, body_pose=s.body_pose, transl=s.transl)
    arrays.update(override)
    return npz_bytes(**{k: v for k, v in arrays.items() if v is not None})


def _cam_npz(clip, K=None, w2c=None) -> bytes:
    return npz_bytes(K=clip["cam"].K if K is None else K, w2c=clip["cam"].w2c if w2c is None else w2c)


def _edited(a: np.ndarray, index, value=None, factor=None) -> np.ndarray:
    a = a.copy()
    a[index] = value if factor is None else a[index] * factor
    return a


def _meta(**kw) -> bytes:
    return json.dumps({"fps": 25.0, "gender": "neutral", **kw}).encode()


ALL = slice(None)
NO_PEOPLE = dict(betas=np.zeros((0, 10)), global_orient=np.zeros((0, 24, 3)), body_pose=np.zeros((0, 24, 69)),
                 transl=np.zeros((0, 24, 3)))
# name: (reason, message pattern, the clip -> {sample key: replacement bytes})
VIOLATIONS = {
    "json_array": ("malformed", "object", lambda c: {"json": b"[1, 2]"}),
    "json_without_fps": ("missing_key", "fps", lambda c: {"json": json.dumps({"gender": "male"}).encode()}),
    "fps_zero": ("bad_value", "fps", lambda c: {"json": _meta(fps=0)}),
    "fps_bool": ("bad_value", "fps", lambda c: {"json": _meta(fps=True)}),
    "fps_string": ("bad_value", "fps", lambda c: {"json": _meta(fps="25")}),
    "smpl_without_transl": ("missing_key", "transl", lambda c: {"smpl.npz": _smpl_npz(c, transl=None)}),
    "body_pose_63": ("bad_shape", "body_pose",
                     lambda c: {"smpl.npz": _smpl_npz(c, body_pose=c["smpl"].body_pose[..., :63])}),
    "betas_strings": ("bad_shape", "dtype", 
                      lambda c: {"smpl.npz": _smpl_npz(c, betas=np.full((2, 10), "x"))}),
    "no_people": ("bad_shape", "no people", lambda c: {"smpl.npz": _smpl_npz(c, **NO_PEOPLE)}),
    "camera_frames": ("frame_mismatch", "cam.npz",
                      lambda c: {"cam.npz": npz_bytes(K=c["cam"].K[:-1], w2c=c["cam"].w2c[:-1])}),
    "negative_fx": ("bad_camera", "pinhole",
                    lambda c: {"cam.npz": _cam_npz(c, K=_edited(c["cam"].K, (ALL, 0, 0), factor=-1))}),
    "skewed_K": ("bad_camera", "pinhole",
                 lambda c: {"cam.npz": _cam_npz(c, K=_edited(c["cam"].K, (2, 0, 1), 10.0))}),
    "reflected_w2c": ("bad_camera", "rigid",  # orthonormal, det -1
                      lambda c: {"cam.npz": _cam_npz(c, w2c=c["cam"].w2c * np.array([-1, 1, 1, 1]))}),
    "empty_mp4": ("undecodable", "mp4", lambda c: {"mp4": b""}),
    "short_mask": ("frame_mismatch", "mask.mp4", lambda c: {"mask.mp4": encode_video(c["mask"][:20], 25.0)}),
}


@pytest.mark.parametrize("name", VIOLATIONS)
def test_contract_violation(clip, name):
    reason, match, replace = VIOLATIONS[name]
    s = _sample(clip, key=name)
    s.update(replace(clip))
    _expect(s, reason, match)


def _refnpz_bytes(clip, people=2, **override):
    smpl, cam = clip["smpl"], clip["cam"]
    arrays = dict(K=cam.K[0], w2c=cam.w2c[0], betas=smpl.betas[:people],
                  global_orient=smpl.global_orient[:people, :1], body_pose=smpl.body_pose[:people, :1],
                  transl=smpl.transl[:people, :1])
    arrays.update(override)
    return {k: v for k, v in arrays.items() if v is not None}


def test_reference_view_is_parsed_and_checked(clip):
    png = b"\x89PNG not decoded by the parser"
    p = parse_sample(_sample(clip, ref_png=png, ref_npz=_refnpz_bytes(clip)))
    assert p.ref.image == png and p.ref.smpl.num_frames == 1 and p.ref.smpl.num_people == 2
    np.testing.assert_array_equal(p.ref.K, clip["cam"].K[0])
    assert parse_sample(_sample(clip, ref_png=png)).ref.K is None
    w2c = _edited(clip["cam"].w2c[0], (slice(0, 3), slice(0, 3)), factor=2)
    _expect(_sample(clip, ref_png=png, ref_npz=_refnpz_bytes(clip, w2c=w2c)), "bad_camera", "ref.npz")
    _expect(_sample(clip, ref_png=png, ref_npz=_refnpz_bytes(clip, people=1)), "bad_shape", "people")
    _expect(_sample(clip, ref_png=png, ref_npz=_refnpz_bytes(clip, K=None)), "missing_key", "ref.npz")


def test_keys_with_dots_and_unknown_reasons_are_refused(clip):
    with pytest.raises(ValueError, match="must not contain"):
        _sample(clip, key="a.b")
    with pytest.raises(ValueError, match="unknown skip reason"):
        SampleError("nope", "x")
    assert len(set(REASONS)) == len(REASONS)


def test_encode_sample_encodes_arrays_and_writes_optional_keys(small_clips):
    c = small_clips[0]
    cam = CameraSequence(c["cam"].K, c["cam"].w2c)
    s = encode_sample("arrays", c["video"], c["smpl"], cam, {"fps": 25.0, "gender": "neutral"},
                      bg=c["bg"], mask=c["mask"], ref_png=b"png", ref_npz={"K": c["cam"].K[0]})
    optional = {"bg.mp4", "mask.mp4", "ref.png", "ref.npz"}
    assert set(s) == {"__key__", "mp4", "smpl.npz", "cam.npz", "json"} | optional
    assert parse_sample({k: v for k, v in s.items() if not k.startswith("ref")}).info.num_frames == 24


def _axis_angle(norm: float) -> np.ndarray:
    return np.array([0.6, 0.0, 0.8], np.float32) * norm


@pytest.mark.parametrize("field_name,index,inside,outside,reason,match", [
    ("body_pose", (1, 5, slice(21, 24)), _axis_angle(3.9 * np.pi), _axis_angle(1e30), "bad_value",
     r"smpl\.npz\['body_pose'\]: axis-angle norm 1e\+30 rad at person 1, frame 5, joint 7"),
    ("global_orient", (0, 3), _axis_angle(3.9 * np.pi), _axis_angle(4.1 * np.pi), "bad_value",
     r"smpl\.npz\['global_orient'\]: axis-angle norm 12\.9 rad at person 0, frame 3"),
    ("transl", (0, 2), np.float32([0, 0, 9e4]), np.float32([0, 0, 2e5]), "bad_value",
     r"smpl\.npz\['transl'\]: translation 2e\+05 m at person 0, frame 2"),
    ("betas", (1, 4), 45.0, -60.0, "bad_value", r"smpl\.npz\['betas'\]: shape coefficient 60 \(std\) at person 1"),
    ("K", (7, 0, 0), 9e5, 2e6, "bad_camera", r"cam\.npz\['K'\]: focal length 2e\+06 px at frame 7"),
    ("K", (7, 1, 1), 1.5, 0.5, "bad_camera", r"cam\.npz\['K'\]: focal length 0\.5 px at frame 7"),
    ("K", (2, 0, 2), -9e4, 3e5, "bad_camera", r"cam\.npz\['K'\]: principal point coordinate 3e\+05 px at frame 2"),
    ("w2c", (6, 2, 3), 9e4, 1e30, "bad_camera", r"cam\.npz\['w2c'\]: camera translation 1e\+30 m at frame 6"),
])
def test_magnitudes_are_bounded(clip, field_name, index, inside, outside, reason, match):
    """Finite but absurd values (one body_pose of 1e30 turned training steps non-finite) are refused, naming the
    sample, the array and the entry; values just inside each bound pass."""
    smpl, cam = clip["smpl"], clip["cam"]
    arrays = {"betas": smpl.betas, "global_orient": smpl.global_orient, "body_pose": smpl.body_pose,
              "transl": smpl.transl, "K": cam.K, "w2c": cam.w2c}

    def sample(value, key):
        edited = {**arrays, field_name: _edited(arrays[field_name], index, value)}
        body = SMPLSequence(*(edited[k] for k in ("betas", "global_orient", "body_pose", "transl")))
        return _sample(clip, key, smpl=body, cam=CameraSequence(edited["K"], edited["w2c"]))

    parse_sample(sample(inside, "inside"))
    _expect(sample(outside, "outside"), reason, match)


def test_reference_camera_is_bounded(clip):
    smpl = clip["smpl"]
    ref = {"K": clip["cam"].K[0], "w2c": _edited(clip["cam"].w2c[0], (0, 3), 5e5), "betas": smpl.betas,
           "global_orient": smpl.global_orient[:, :1], "body_pose": smpl.body_pose[:, :1], "transl": smpl.transl[:, :1]}
    buf = io.BytesIO()
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(buf, format="PNG")
    _expect(_sample(clip, "refcam", ref_png=buf.getvalue(), ref_npz=ref), "bad_camera",
            r"ref\.npz\['w2c'\]: camera translation 5e\+05 m")
    body = {**ref, "w2c": clip["cam"].w2c[0], "body_pose": _edited(smpl.body_pose[:, :1], (0, 0, 0), 1e9)}
    _expect(_sample(clip, "refbody", ref_png=buf.getvalue(), ref_npz=body), "bad_value",
            r"ref\.npz\['body_pose'\]: axis-angle norm 1e\+09 rad at person 0, frame 0, joint 0")
