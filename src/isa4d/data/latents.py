"""Cached-latent samples: one clip's frozen-VAE posterior moments in place of its frames (docs/data_format.md).

Stage 2 trains on the latents of the frozen stage-1 VAE. By default the DiT module encodes every batch on the fly;
with shards written by data_prep/cache_latents.py it reads the latents instead and the encoder never runs in
training. A cached sample is one clip already cut to one bucket (H x W x T): the contract's `smpl.npz` and
`cam.npz` for those T frames (K for the H x W crop), `ref.png` at H x W with its camera and bodies in `ref.npz`, a
`json` with the cache record under "latents", and `latents.npz` with the moments of the clip, its reference and its
background plate. The `latents.npz` key marks the kind: `parse_any` dispatches on it.

The moments (mean and logvar stacked on channels) are the encoder's output, before `normalize_latents`, so a
training step draws a fresh posterior sample each time it sees the clip and normalises with its own VAE's
statistics, exactly as when it encodes on the fly. `vae_fingerprint` names the encoder that made them, and
DiTModule refuses latents of another.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image
from torch import nn

from isa4d.data.batch import ClipExample, LatentExample
from isa4d.data.buckets import Bucket
from isa4d.data.examples import open_reference
from isa4d.data.contract import (
    ParsedSample, SampleError, load_npz, npz_bytes, parse_cameras, parse_meta, parse_reference, parse_sample,
    parse_smpl,
)

LATENT_KEYS = ("latents.npz", "smpl.npz", "cam.npz", "json", "ref.png", "ref.npz")
LATENT_DTYPES = ("float16", "float32")


def vae_fingerprint(vae: nn.Module) -> str:
    """A stable name of what a VAE's cached moments depend on: its constructor arguments (`vae.config`) and its
    encoder's weights and buffers, hashed as float32 bytes on the CPU (the same on any device).

    The decoder and the latent statistics are left out on purpose: cached moments are the encoder's output, and the
    DiT normalises them with its own VAE's statistics when it reads them, so a new decoder or re-estimated
    statistics keep a cache valid.
    """
    digest = hashlib.blake2b(digest_size=8)
    digest.update(json.dumps(getattr(vae, "config", {}), sort_keys=True).encode())
    for name, tensor in sorted(vae.encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "vae-" + digest.hexdigest()


@dataclass
class LatentSample:
    """A cached-latent sample after parsing: the clip it holds, ready to collate."""

    key: str
    url: str
    example: ClipExample  # latents set, video None
    meta: dict[str, Any]  # the json; meta["latents"] is the cache record

    @property
    def size(self) -> tuple[int, int, int]:
        """(T, H, W) of the cached clip."""
        return self.example.size

    def fits(self, bucket: Bucket) -> bool:
        """A cache serves only its own size: no crop, resize or window is left to choose."""
        return self.size == (bucket.num_frames, bucket.height, bucket.width)

    def to_example(self, bucket: Bucket) -> ClipExample:
        if not self.fits(bucket):
            T, H, W = self.size
            raise SampleError("no_bucket", f"cached latents of {H}x{W}x{T} clips cannot fill bucket {bucket.name}; "
                                           f"cache again at that size (data_prep/cache_latents.py)", self.key)
        return self.example


def parse_any(sample: Mapping[str, Any]) -> ParsedSample | LatentSample:
    """Parse a raw WebDataset sample of either kind: cached latents when it has `latents.npz`, else a video sample."""
    return parse_latent_sample(sample) if "latents.npz" in sample else parse_sample(sample)


# --------------------------------------------------------------------------------------------------- parsing


def _record_int(record: Mapping[str, Any], name: str, key: str) -> int:
    if name not in record:
        raise SampleError("missing_key", f"json 'latents' has no '{name}' (has {sorted(record)})", key)
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SampleError("bad_value", f"json 'latents.{name}' must be a positive integer, got {value!r}", key)
    return value


def _moments(arrays: Mapping[str, np.ndarray], name: str, ndim: int, key: str) -> np.ndarray:
    """latents.npz[name]: float16 or float32 moments with `ndim` axes, an even number of channels, finite."""
    if name not in arrays:
        raise SampleError("missing_key", f"latents.npz has no '{name}' (has {sorted(arrays)})", key)
    a = arrays[name]
    if a.dtype.name not in LATENT_DTYPES:
        raise SampleError("bad_shape", f"latents.npz['{name}'] has dtype {a.dtype}, expected one of {LATENT_DTYPES}",
                          key)
    if a.ndim != ndim or a.shape[0] % 2 or 0 in a.shape:
        want = "(2C, h, w)" if ndim == 3 else "(2C, T', h, w)"
        raise SampleError("bad_shape", f"latents.npz['{name}'] has shape {a.shape}, expected {want} with mean and "
                                       f"logvar stacked on channels", key)
    if not np.isfinite(a).all():
        raise SampleError("nonfinite", f"latents.npz['{name}'] holds NaN or inf", key)
    return a


def _reference_image(png: bytes, height: int, width: int, key: str) -> np.ndarray:
    image = np.asarray(open_reference(png, key))
    if image.shape[:2] != (height, width):
        raise SampleError("bad_shape", f"ref.png is {image.shape[0]}x{image.shape[1]}, the cached clip "
                                       f"{height}x{width}", key)
    return np.ascontiguousarray(image)


def parse_latent_sample(sample: Mapping[str, Any]) -> LatentSample:
    """Parse and check one raw cached-latent sample (a dict of bytes). Raises SampleError."""
    key, url = str(sample.get("__key__", "?")), str(sample.get("__url__", "?"))
    missing = [k for k in LATENT_KEYS if k not in sample]
    if missing:
        raise SampleError("missing_key", f"cached-latent sample lacks {missing} (has "
                                         f"{sorted(k for k in sample if not k.startswith('__'))})", key)
    meta = parse_meta(sample["json"], key)
    record = meta.get("latents")
    if not isinstance(record, dict):
        raise SampleError("missing_key", "json has no 'latents' record (a cached-latent sample's size and VAE)", key)
    T, H, W = (_record_int(record, n, key) for n in ("num_frames", "height", "width"))
    for name, kind in (("vae", str), ("ref_has_camera", bool), ("frame_index", list)):
        if name not in record:
            raise SampleError("missing_key", f"json 'latents' has no '{name}' (has {sorted(record)})", key)
        if not isinstance(record[name], kind):
            raise SampleError("bad_value", f"json 'latents.{name}' must be a {kind.__name__}, got {record[name]!r}",
                              key)
    frame_index = np.asarray(record["frame_index"])
    if frame_index.shape != (T,) or not np.issubdtype(frame_index.dtype, np.integer):
        raise SampleError("bad_value", f"json 'latents.frame_index' must be {T} integers", key)

    smpl = parse_smpl(sample["smpl.npz"], key, num_frames=T)
    cam = parse_cameras(sample["cam.npz"], key, T)
    ref = parse_reference(sample["ref.png"], sample["ref.npz"], key, smpl.num_people)
    if ref.smpl is None:
        raise SampleError("missing_key", "ref.npz has no bodies (global_orient, body_pose, transl)", key)
    image = _reference_image(sample["ref.png"], H, W, key)

    arrays = load_npz(sample["latents.npz"], "latents.npz", key)
    video, ref_moments = _moments(arrays, "video", 4, key), _moments(arrays, "ref", 3, key)
    bg = _moments(arrays, "bg", 4, key) if "bg" in arrays else None
    C2, Tl, h, w = video.shape
    if ref_moments.shape != (C2, h, w) or (bg is not None and bg.shape != video.shape):
        raise SampleError("bad_shape", f"latents.npz: ref {ref_moments.shape} and bg "
                                       f"{None if bg is None else bg.shape} do not match video {video.shape}", key)
    if H % h or W % w or H // h != W // w or (T == 1) != (Tl == 1) or (Tl > 1 and (T - 1) % (Tl - 1)):
        raise SampleError("bad_shape", f"latents.npz['video'] {video.shape} cannot code {T} frames of {H}x{W}", key)

    latents = LatentExample(video, ref_moments, T, H, W, record["vae"], bg)
    example = ClipExample(
        key=key, video=None, K=cam.K, w2c=cam.w2c, betas=smpl.betas, global_orient=smpl.global_orient,
        body_pose=smpl.body_pose, transl=smpl.transl, ref=image, ref_K=ref.K, ref_w2c=ref.w2c,
        ref_global_orient=ref.smpl.global_orient, ref_body_pose=ref.smpl.body_pose, ref_transl=ref.smpl.transl,
        ref_has_camera=record["ref_has_camera"], frame_index=frame_index.astype(np.int64), fps=float(meta["fps"]),
        gender=str(meta["gender"]), latents=latents,
    )
    return LatentSample(key, url, example, meta)


# --------------------------------------------------------------------------------------------------- writing


def encode_latent_sample(key: str, example: ClipExample, meta: Mapping[str, Any],
                         record: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A cached-latent sample for `webdataset.ShardWriter.write` from a clip whose `latents` are set.

    `meta`: the source sample's json, kept (its fps becomes the clip's, source fps / stride); `record`: provenance
    added to the cache record (source key, pass, ...).
    """
    if "." in key:
        raise ValueError(f"sample key {key!r} must not contain '.' (WebDataset splits extensions at the first dot)")
    z = example.latents
    if z is None:
        raise ValueError(f"{key}: the example has no latents to cache")
    T, H, W = example.size
    png = io.BytesIO()
    Image.fromarray(example.ref).save(png, format="PNG")
    cache = {"num_frames": T, "height": H, "width": W, "vae": z.fingerprint,
             "ref_has_camera": bool(example.ref_has_camera), "frame_index": [int(i) for i in example.frame_index],
             **(record or {})}
    arrays = {"video": z.video, "ref": z.ref, **({"bg": z.bg} if z.bg is not None else {})}
    return {
        "__key__": key,
        "latents.npz": npz_bytes(**arrays),
        "smpl.npz": npz_bytes(betas=example.betas, global_orient=example.global_orient, body_pose=example.body_pose,
                              transl=example.transl),
        "cam.npz": npz_bytes(K=example.K, w2c=example.w2c),
        "ref.png": png.getvalue(),
        "ref.npz": npz_bytes(K=example.ref_K, w2c=example.ref_w2c, betas=example.betas,
                             global_orient=example.ref_global_orient, body_pose=example.ref_body_pose,
                             transl=example.ref_transl),
        "json": json.dumps({**meta, "fps": float(example.fps), "gender": example.gender, "latents": cache}).encode(),
    }
