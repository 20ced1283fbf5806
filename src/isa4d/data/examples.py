"""Turning one parsed sample into one decoded clip for a bucket: window, crop/resize with K, reference view.

The stages are small functions composed in `decode_example`; the only video work is decoding the window's frames
(and one reference frame) at the scaled size.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from isa4d.data import video as videolib
from isa4d.data.batch import ClipExample
from isa4d.data.buckets import Bucket
from isa4d.data.clip import choose_stride, reference_frame, sample_window
from isa4d.data.contract import ParsedSample, SampleError
from isa4d.geometry.camera import CropResize, cover_crop


@dataclass(frozen=True)
class ClipOptions:
    """How clips are cut from videos.

    frame_stride: take every n-th source frame. stride_jitter: with a training rng, the stride varies by up to this
    much per clip (speed augmentation). crop_jitter: fraction of the crop slack the crop may move off-centre.
    aspect_tolerance / max_upscale: which buckets a video may fill (see buckets.fits).
    """

    frame_stride: int = 1
    stride_jitter: int = 0
    crop_jitter: float = 0.0
    aspect_tolerance: float = 0.25
    max_upscale: float = 2.0

    def __post_init__(self) -> None:
        if self.frame_stride < 1 or self.stride_jitter < 0 or not 0 <= self.crop_jitter <= 1:
            raise ValueError(f"invalid clip options {self}")

    @property
    def min_stride(self) -> int:
        return max(1, self.frame_stride - self.stride_jitter)


def decode_cropped(data: bytes, indices: np.ndarray, crop: CropResize, key: str, name: str,
                   pix_fmt: str = "rgb24") -> np.ndarray:
    """Frames `indices` of an encoded video, scaled to cover and cropped by `crop`: (N, H, W, C) uint8."""
    try:
        frames = videolib.decode_frames(data, indices.tolist(), size=(crop.scaled_h, crop.scaled_w), pix_fmt=pix_fmt)
    except videolib.VideoError as e:
        raise SampleError("undecodable", f"{name}: {e}", key) from e
    return frames[:, crop.top : crop.top + crop.out_h, crop.left : crop.left + crop.out_w]


def open_reference(png: bytes, key: str) -> Image.Image:
    """A sample's `ref.png` as an RGB image, or SampleError("malformed")."""
    try:
        return Image.open(io.BytesIO(png)).convert("RGB")
    except Exception as e:
        raise SampleError("malformed", f"ref.png is not a readable image ({e})", key) from e


def reference_image(png: bytes, bucket: Bucket, key: str) -> tuple[np.ndarray, CropResize]:
    img = open_reference(png, key)
    crop = cover_crop(img.height, img.width, bucket.height, bucket.width)
    img = img.resize((crop.scaled_w, crop.scaled_h), Image.Resampling.BILINEAR, reducing_gap=None)
    arr = np.asarray(img)[crop.top : crop.top + crop.out_h, crop.left : crop.left + crop.out_w]
    return np.ascontiguousarray(arr), crop


def decode_example(s: ParsedSample, bucket: Bucket, opts: ClipOptions, rng: np.random.Generator | None) -> ClipExample:
    """Decode the clip `bucket` asks for from `s`. With `rng` (training) window, stride and crop are random;
    without (validation) they are centred and fixed."""
    total, T = s.info.num_frames, bucket.num_frames
    stride = choose_stride(total, T, opts.frame_stride, opts.stride_jitter, rng)
    idx = sample_window(total, T, stride, rng, s.key)
    crop = cover_crop(s.info.height, s.info.width, bucket.height, bucket.width, rng=rng, jitter=opts.crop_jitter)
    video = decode_cropped(s.video, idx, crop, s.key, "mp4")
    K = crop.apply_to_K(s.cam.K[idx].astype(np.float64)).astype(np.float32)
    smpl = s.smpl.take(idx)
    bg = decode_cropped(s.bg, idx, crop, s.key, "bg.mp4") if s.bg is not None else None
    mask = decode_cropped(s.mask, idx, crop, s.key, "mask.mp4", pix_fmt="gray") if s.mask is not None else None

    if s.ref is not None:  # an explicit reference image, with its camera and bodies when ref.npz came along
        ref, ref_crop = reference_image(s.ref.image, bucket, s.key)
        has_camera = s.ref.K is not None and s.ref.smpl is not None
        ref_K = ref_crop.apply_to_K(s.ref.K.astype(np.float64)).astype(np.float32) if has_camera else np.eye(3, dtype=np.float32)
        ref_w2c = s.ref.w2c if has_camera else np.eye(4, dtype=np.float32)
        ref_smpl = s.ref.smpl if has_camera else s.smpl.take(np.zeros(1, dtype=np.int64))
    else:  # a frame of the clip far from the window, seen through the same crop
        r = reference_frame(total, idx, rng)
        ref = decode_cropped(s.video, np.array([r]), crop, s.key, "mp4 (reference frame)")[0]
        has_camera = True
        ref_K = crop.apply_to_K(s.cam.K[r].astype(np.float64)).astype(np.float32)
        ref_w2c = s.cam.w2c[r]
        ref_smpl = s.smpl.take(np.array([r]))

    return ClipExample(
        key=s.key,
        video=np.ascontiguousarray(video),
        K=K,
        w2c=s.cam.w2c[idx],
        betas=smpl.betas,
        global_orient=smpl.global_orient,
        body_pose=smpl.body_pose,
        transl=smpl.transl,
        ref=np.ascontiguousarray(ref),
        ref_K=ref_K,
        ref_w2c=ref_w2c,
        ref_global_orient=ref_smpl.global_orient,
        ref_body_pose=ref_smpl.body_pose,
        ref_transl=ref_smpl.transl,
        ref_has_camera=has_camera,
        frame_index=idx,
        fps=s.fps / stride,
        gender=s.gender,
        bg=None if bg is None else np.ascontiguousarray(bg),
        mask=None if mask is None else np.ascontiguousarray(mask),
    )
