"""Tests for the batch contract (isa4d.data.batch): fields, shapes and dtypes, padding, normalisation,
devices, collation, and the reference view (a far frame of the clip, or ref.png with its own camera)."""

from __future__ import annotations

import io
from dataclasses import fields

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.synthetic_shards import COLORS, make_clip
from isa4d.data.batch import Batch, SMPLBatch, collate
from isa4d.data.buckets import Bucket
from isa4d.data.contract import encode_sample, parse_sample
from isa4d.data.dataset import ClipDataset
from isa4d.data.examples import ClipOptions, decode_example
from isa4d.data.video import decode_all
from isa4d.geometry.camera import cover_crop, project

BUCKET = Bucket(48, 64, 6, 3)
STRIDE = 2


@pytest.fixture(scope="module")
def batches(marker_shards) -> list[Batch]:
    """The 8 marker clips in one ordered pass: batches of 3, 3, 2."""
    return list(ClipDataset(marker_shards, [BUCKET], train=False, options=ClipOptions(frame_stride=STRIDE)))


def tensors(batch: Batch) -> dict[str, torch.Tensor]:
    out = {}
    for f in fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, SMPLBatch):
            out.update({f"{f.name}.{g.name}": getattr(v, g.name) for g in fields(v)})
        elif isinstance(v, torch.Tensor):
            out[f.name] = v
    return out


def test_batch_fields_shapes_and_dtypes(batches, marker_samples):
    assert [len(b) for b in batches] == [3, 3, 2]
    assert [k for b in batches for k in b.key] == list(marker_samples)
    H, W, T = BUCKET.height, BUCKET.width, BUCKET.num_frames
    for b in batches:
        B, P = len(b), b.person_mask.shape[1]
        u8, f32, i64, bool_ = torch.uint8, torch.float32, torch.int64, torch.bool
        expected = {
            "video": ((B, T, 3, H, W), u8), "K": ((B, T, 3, 3), f32), "w2c": ((B, T, 4, 4), f32),
            "smpl.betas": ((B, P, 10), f32), "smpl.global_orient": ((B, P, T, 3), f32),
            "smpl.body_pose": ((B, P, T, 69), f32), "smpl.transl": ((B, P, T, 3), f32),
            "person_mask": ((B, P), bool_),
            "ref": ((B, 3, H, W), u8), "ref_K": ((B, 3, 3), f32), "ref_w2c": ((B, 4, 4), f32),
            "ref_smpl.betas": ((B, P, 10), f32), "ref_smpl.global_orient": ((B, P, 1, 3), f32),
            "ref_smpl.body_pose": ((B, P, 1, 69), f32), "ref_smpl.transl": ((B, P, 1, 3), f32),
            "ref_has_camera": ((B,), bool_), "frame_index": ((B, T), i64), "fps": ((B,), f32),
            "bg": ((B, T, 3, H, W), u8), "has_bg": ((B,), bool_),
            "mask": ((B, T, 1, H, W), u8), "has_mask": ((B,), bool_),
        }
        got = {name: (tuple(t.shape), t.dtype) for name, t in tensors(b).items()}
        assert got == expected
        assert len(b.key) == len(b.gender) == B and b.num_frames == T and not b.normalized
        assert b.has_bg.all() and b.has_mask.all() and b.ref_has_camera.all()
        assert b.stats["bucket"] == BUCKET.name and b.stats["skipped"] == {} and b.stats["seen"] >= B


def test_batch_values_follow_their_source_clips(batches, marker_samples):
    for b in batches:
        for i, key in enumerate(b.key):
            s = marker_samples[key]
            idx = b.frame_index[i].numpy()
            total, span = s.info.num_frames, (BUCKET.num_frames - 1) * STRIDE + 1
            np.testing.assert_array_equal(idx, (total - span) // 2 + STRIDE * np.arange(BUCKET.num_frames))
            assert b.fps[i].item() == pytest.approx(s.fps / STRIDE)
            assert b.gender[i] == s.gender
            P = s.smpl.num_people
            assert b.person_mask[i].tolist() == [True] * P + [False] * (b.person_mask.shape[1] - P)
            np.testing.assert_array_equal(b.w2c[i].numpy(), s.cam.w2c[idx])
            np.testing.assert_array_equal(b.smpl.transl[i, :P].numpy(), s.smpl.transl[:, idx])
            np.testing.assert_array_equal(b.smpl.body_pose[i, :P].numpy(), s.smpl.body_pose[:, idx])
            np.testing.assert_array_equal(b.smpl.betas[i, :P].numpy(), s.smpl.betas)
            for t in (b.smpl.betas, b.smpl.global_orient, b.smpl.body_pose, b.smpl.transl, b.ref_smpl.transl):
                assert not t[i, P:].any()  # padding people are zeros
    assert any(b.person_mask.sum(1).unique().numel() > 1 for b in batches), "no batch mixes person counts"


def test_bg_and_mask_are_cut_like_the_video(batches):
    """Where the mask is off, the frame is the background plate; where it is on, it is a marker disc."""
    b = batches[0]
    video, bg, mask = b.video.float(), b.bg.float(), b.mask[:, :, 0]
    off, on = mask < 30, mask > 225
    assert on.sum() > 100 and off.sum() > 1000
    diff = (video - bg).abs().mean(2)  # (B, T, H, W)
    assert diff[off].median() < 6 and diff[on].median() > 40
    colours = torch.tensor(COLORS, dtype=torch.float32)
    nearest = ((video.permute(0, 1, 3, 4, 2)[on][:, None] - colours).norm(dim=-1)).min(1).values
    assert nearest.median() < 30


def test_normalize_is_idempotent_and_leaves_the_uint8_batch(batches):
    b = batches[0]
    n = b.normalize()
    assert n.normalized and n.normalize() is n
    assert b.video.dtype == torch.uint8 and not b.normalized
    for name in ("video", "ref", "bg"):
        x = getattr(n, name)
        assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
        torch.testing.assert_close(x, getattr(b, name).float() / 127.5 - 1)
    assert set(n.mask.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(n.mask, (b.mask >= 128).float())
    assert n.key == b.key and torch.equal(n.K, b.K)


def test_to_moves_every_tensor(batches):
    b = batches[-1]
    m = b.to("meta")
    assert all(t.device.type == "meta" for t in tensors(m).values())
    assert set(tensors(m)) == set(tensors(b)) and m.key == b.key and m.stats == b.stats and len(m) == len(b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pin_memory_pins_every_tensor(batches):
    pinned = batches[0].pin_memory()
    assert all(t.is_pinned() for t in tensors(pinned).values())
    on_gpu = pinned.to("cuda", non_blocking=True).normalize()
    assert on_gpu.video.is_cuda and on_gpu.video.dtype == torch.float32


def test_collate_pads_optional_streams_and_rejects_mixed_shapes(marker_samples, small_clips):
    with_bg = next(s for s in marker_samples.values() if (s.info.height, s.info.width) == (64, 96))
    c = small_clips[0]
    plain_sample = encode_sample("plain", c["mp4"], c["smpl"], c["cam"], {"fps": 25.0, "gender": "male"})
    without = parse_sample(plain_sample)
    a, b = (decode_example(s, BUCKET, ClipOptions(), None) for s in (with_bg, without))
    batch = collate([a, b])
    assert batch.has_bg.tolist() == [True, False] and batch.has_mask.tolist() == [True, False]
    assert (batch.bg[1] == 128).all() and not batch.mask[1].any()
    assert batch.gender == [with_bg.gender, "male"] and batch.fps.tolist() == [with_bg.fps, 25.0]
    plain = collate([b, b])
    assert plain.bg is None and plain.has_bg is None and plain.mask is None and plain.has_mask is None
    assert plain.normalize().bg is None
    other = decode_example(without, Bucket(40, 40, 6, 1), ClipOptions(), None)
    with pytest.raises(ValueError, match="share"):
        collate([a, other])
    with pytest.raises(ValueError, match="empty"):
        collate([])


# ------------------------------------------------------------------------------------------ reference view


def test_reference_is_the_far_frame_through_the_same_crop(marker_samples):
    bucket = Bucket(40, 40, 6, 1)  # square from every marker aspect: a real crop
    for s in list(marker_samples.values())[:4]:
        ex = decode_example(s, bucket, ClipOptions(frame_stride=STRIDE), None)
        total, window = s.info.num_frames, ex.frame_index
        far = max(range(total), key=lambda f: max(window[0] - f, f - window[-1]))
        crop = cover_crop(s.info.height, s.info.width, bucket.height, bucket.width)
        frames = decode_all(s.video, size=(crop.scaled_h, crop.scaled_w))
        frames = frames[:, crop.top : crop.top + crop.out_h, crop.left : crop.left + crop.out_w]
        frames = frames.astype(np.float32)
        mse = ((frames - ex.ref.astype(np.float32)) ** 2).mean(axis=(1, 2, 3))
        assert mse.argmin() == far and mse[far] < 1.0, (s.key, far, mse.argmin())
        assert ex.ref_has_camera
        np.testing.assert_array_equal(ex.ref_w2c, s.cam.w2c[far])
        np.testing.assert_array_equal(ex.ref_transl[:, 0], s.smpl.transl[:, far])
        np.testing.assert_array_equal(ex.ref_K, ex.K[0])  # marker K is constant: same crop, same K


@pytest.fixture(scope="module")
def second_view():
    """A clip (64x80) and, from another camera, a 80x64 marker frame as ref.png with its camera and bodies."""
    rng = np.random.default_rng(3)  # a seed whose two discs stay apart in the reference frame
    clip = make_clip(rng, 64, 80, 24, 2, 25.0, texture=False)
    view = make_clip(rng, 80, 64, 2, 2, 25.0, texture=False)
    buf = io.BytesIO()
    Image.fromarray(view["video"][0]).save(buf, format="PNG")
    ref_npz = dict(K=view["cam"].K[0], w2c=view["cam"].w2c[0], betas=view["smpl"].betas,
                   global_orient=view["smpl"].global_orient[:, :1], body_pose=view["smpl"].body_pose[:, :1],
                   transl=view["smpl"].transl[:, :1])
    return clip, view, buf.getvalue(), ref_npz


@pytest.mark.parametrize("bucket", [Bucket(40, 40, 4, 1), Bucket(48, 64, 4, 1), Bucket(120, 96, 4, 1)],
                         ids=lambda b: b.name)
def test_explicit_reference_uses_its_own_camera(second_view, bucket):
    clip, view, png, ref_npz = second_view
    meta = {"fps": 25.0, "gender": "neutral"}
    s = encode_sample("ref", clip["video"], clip["smpl"], clip["cam"], meta, ref_png=png, ref_npz=ref_npz)
    s = parse_sample(s)
    ex = decode_example(s, bucket, ClipOptions(), None)
    assert ex.ref_has_camera and ex.ref.shape == (bucket.height, bucket.width, 3)
    np.testing.assert_array_equal(ex.ref_w2c, view["cam"].w2c[0])
    np.testing.assert_array_equal(ex.ref_transl, view["smpl"].transl[:, :1])
    ref_K, ref_w2c = torch.from_numpy(ex.ref_K), torch.from_numpy(ex.ref_w2c)
    uv = project(torch.from_numpy(ex.ref_transl[:, 0]), ref_K, ref_w2c).numpy()
    for p in range(2):
        d = np.linalg.norm(ex.ref.astype(np.float32) - COLORS[p].astype(np.float32), axis=-1)
        ys, xs = np.nonzero(d < 60)
        assert np.hypot(xs.mean() - uv[p, 0], ys.mean() - uv[p, 1]) < 0.5

    png_only = parse_sample(encode_sample("png", clip["video"], clip["smpl"], clip["cam"], meta, ref_png=png))
    ex = decode_example(png_only, bucket, ClipOptions(), None)
    assert not ex.ref_has_camera and ex.ref.shape == (bucket.height, bucket.width, 3)
    np.testing.assert_array_equal(ex.ref_K, np.eye(3))
