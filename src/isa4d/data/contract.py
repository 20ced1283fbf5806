"""The shard contract: what one WebDataset sample holds, how it is parsed, and how it is checked.

One sample is one clip seen by one camera (docs/data_format.md). Parsing here is cheap (npz, json and the video
header); frames are decoded later, only for the window a batch needs. Every defect raises `SampleError` with a
short machine-readable reason (counted as `data/skipped/<reason>`) and a message naming the key and the cause.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from isa4d.data import video as videolib
from isa4d.geometry.camera import is_rigid

REQUIRED_KEYS = ("mp4", "smpl.npz", "cam.npz", "json")
OPTIONAL_KEYS = ("bg.mp4", "mask.mp4", "ref.png", "ref.npz")
GENDERS = ("neutral", "male", "female")
NUM_BETAS = 10
NUM_BODY_POSE = 69  # 23 joints x axis-angle

# Magnitude bounds (docs/data_format.md, "Bounds"). Finite is not enough: one body_pose of 1e30 passes a NaN check
# and turns a training step non-finite. Each bound is far outside real data and far inside float32's range.
MAX_ROTATION = 4 * np.pi  # axis-angle norm, radians: a rotation needs at most pi; unwrapped tracks drift past it
MAX_BETA = 50.0  # |beta_k|: SMPL's shape space is in standard deviations of its training bodies
MAX_TRANSLATION = 1e5  # metres, |transl| and |w2c translation|: PHALP's depth of a 10-pixel person in 4K is ~13 km
MIN_FOCAL, MAX_FOCAL = 1.0, 1e6  # pixels: PHALP's focal on a 4K frame is 75000
MAX_PRINCIPAL_POINT = 1e5  # pixels, |cx|, |cy|: crops move it, never this far

# Reasons a sample is skipped; the loader counts each under data/skipped/<reason>.
REASONS = (
    "missing_key", "malformed", "bad_shape", "nonfinite", "frame_mismatch", "undecodable", "too_short",
    "bad_camera", "bad_value", "no_bucket",
)


class SampleError(ValueError):
    """A sample that violates the contract. `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str, key: str = "?"):
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{key}: {message}")
        self.reason, self.key = reason, key


@dataclass
class SMPLSequence:
    """SMPL parameters of P people over F frames (axis-angle, world frame, metres)."""

    betas: np.ndarray  # (P, 10)
    global_orient: np.ndarray  # (P, F, 3)
    body_pose: np.ndarray  # (P, F, 69)
    transl: np.ndarray  # (P, F, 3)

    @property
    def num_people(self) -> int:
        return self.betas.shape[0]

    @property
    def num_frames(self) -> int:
        return self.transl.shape[1]

    def take(self, frames: np.ndarray) -> "SMPLSequence":
        """The same people at the given frame indices."""
        return SMPLSequence(self.betas, self.global_orient[:, frames], self.body_pose[:, frames], self.transl[:, frames])


@dataclass
class CameraSequence:
    K: np.ndarray  # (F, 3, 3) pixels of the stored video
    w2c: np.ndarray  # (F, 4, 4) world-to-camera, OpenCV axes

    def take(self, frames: np.ndarray) -> "CameraSequence":
        return CameraSequence(self.K[frames], self.w2c[frames])


@dataclass
class ReferenceView:
    """An explicit reference image (`ref.png`) and, when `ref.npz` is given, its camera and bodies."""

    image: bytes
    K: np.ndarray | None = None  # (3, 3) pixels of the reference image
    w2c: np.ndarray | None = None  # (4, 4)
    smpl: SMPLSequence | None = None  # F = 1


@dataclass
class ParsedSample:
    """A contract sample after the cheap checks: metadata parsed, video header probed, bytes kept for decoding."""

    key: str
    url: str
    video: bytes
    info: videolib.VideoInfo
    smpl: SMPLSequence
    cam: CameraSequence
    meta: dict[str, Any]
    bg: bytes | None = None
    mask: bytes | None = None
    ref: ReferenceView | None = None
    extra: dict[str, bytes] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int, int]:
        """(frames, height, width) of the video."""
        return self.info.num_frames, self.info.height, self.info.width

    @property
    def fps(self) -> float:
        return float(self.meta["fps"])

    @property
    def gender(self) -> str:
        return str(self.meta["gender"])


# --------------------------------------------------------------------------------------------------- parsing


def load_npz(data: bytes, name: str, key: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # zipfile, pickle and value errors all mean the same to the user
        raise SampleError("malformed", f"{name} is not a readable npz ({type(e).__name__}: {e})", key) from e


def _array(arrays: Mapping[str, np.ndarray], name: str, field_name: str, shape: tuple, key: str) -> np.ndarray:
    """Fetch arrays[field_name], check its shape against `shape` (None = any), finite, as float32."""
    if field_name not in arrays:
        raise SampleError("missing_key", f"{name} has no '{field_name}' (has {sorted(arrays)})", key)
    a = arrays[field_name]
    if not np.issubdtype(a.dtype, np.number):
        raise SampleError("bad_shape", f"{name}['{field_name}'] has dtype {a.dtype}, expected a number type", key)
    if a.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, a.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise SampleError("bad_shape", f"{name}['{field_name}'] has shape {a.shape}, expected {want}", key)
    if not np.isfinite(a).all():
        raise SampleError("nonfinite", f"{name}['{field_name}'] holds NaN or inf", key)
    return a.astype(np.float32)


def _check_bound(values: np.ndarray, bound: float, name: str, field_name: str, quantity: str, unit: str, key: str,
                 reason: str = "bad_value", where: str = "person {0}, frame {1}", lower: float | None = None) -> None:
    """SampleError naming the sample, the array and the first entry whose `values` exceed `bound` (or fall below
    `lower`); `where` formats that entry's index."""
    bad = values > bound if lower is None else (values > bound) | (values < lower)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        limits = f"at most {bound:.4g} {unit}" if lower is None else f"{lower:.4g} to {bound:.4g} {unit}"
        raise SampleError(reason, f"{name}['{field_name}']: {quantity} {float(values[first]):.3g} {unit} at "
                          f"{where.format(*first)}, outside the contract's bound ({limits}; docs/data_format.md)", key)


def _norm(x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x.astype(np.float64), axis=-1)  # float64: the norm of 1e30 in float32 overflows


def _check_smpl_bounds(betas: np.ndarray, go: np.ndarray, bp: np.ndarray, transl: np.ndarray, name: str, key: str) -> None:
    _check_bound(np.abs(betas).max(axis=-1), MAX_BETA, name, "betas", "shape coefficient", "(std)", key,
                 where="person {0}")
    _check_bound(_norm(go), MAX_ROTATION, name, "global_orient", "axis-angle norm", "rad", key)
    _check_bound(_norm(bp.reshape(*bp.shape[:-1], -1, 3)), MAX_ROTATION, name, "body_pose", "axis-angle norm", "rad",
                 key, where="person {0}, frame {1}, joint {2}")
    _check_bound(_norm(transl), MAX_TRANSLATION, name, "transl", "translation", "m", key)


def parse_smpl(data: bytes, key: str, name: str = "smpl.npz", num_frames: int | None = None) -> SMPLSequence:
    z = load_npz(data, name, key)
    betas = _array(z, name, "betas", (None, None), key)
    P = betas.shape[0]
    if P < 1:
        raise SampleError("bad_shape", f"{name} holds no people (betas {betas.shape})", key)
    if betas.shape[1] < NUM_BETAS:  # more shape coefficients are fine (SMPL+H/X fits); fewer are zero-padded
        betas = np.pad(betas, ((0, 0), (0, NUM_BETAS - betas.shape[1])))
    transl = _array(z, name, "transl", (P, num_frames, 3), key)
    F = transl.shape[1]
    go = _array(z, name, "global_orient", (P, F, 3), key)
    bp = _array(z, name, "body_pose", (P, F, NUM_BODY_POSE), key)
    betas = betas[:, :NUM_BETAS]
    _check_smpl_bounds(betas, go, bp, transl, name, key)
    return SMPLSequence(betas, go, bp, transl)


def parse_cameras(data: bytes, key: str, num_frames: int) -> CameraSequence:
    z = load_npz(data, "cam.npz", key)
    K = _array(z, "cam.npz", "K", (None, 3, 3), key)
    w2c = _array(z, "cam.npz", "w2c", (None, 4, 4), key)
    for name, a in (("K", K), ("w2c", w2c)):
        if a.shape[0] != num_frames:
            raise SampleError("frame_mismatch", f"cam.npz['{name}'] has {a.shape[0]} frames, smpl.npz has {num_frames}", key)
    check_intrinsics(K, key, "cam.npz['K']")
    bad = np.flatnonzero(~is_rigid(w2c.astype(np.float64)))
    if bad.size:
        raise SampleError("bad_camera", f"cam.npz['w2c'] is not a rigid transform at frame(s) {bad[:5].tolist()}", key)
    check_extrinsics(w2c, key, "cam.npz")
    return CameraSequence(K, w2c)


def check_intrinsics(K: np.ndarray, key: str, name: str) -> None:
    fx, fy, skew = K[..., 0, 0], K[..., 1, 1], K[..., 0, 1]
    last = np.abs(K[..., 2, :] - np.array([0, 0, 1])).max(axis=-1)
    lower = np.abs(K[..., 1, 0])
    if (fx <= 0).any() or (fy <= 0).any() or (last > 1e-6).any() or (lower > 1e-6).any() or (np.abs(skew) > 1e-3 * fx).any():
        raise SampleError("bad_camera", f"{name} is not a pinhole intrinsic matrix [[fx,0,cx],[0,fy,cy],[0,0,1]] with fx, fy > 0", key)
    file, field_name = name.split("[")[0], name.split("'")[1]
    where = "frame {0}" if K.ndim == 3 else "{0}"
    K = K.reshape(-1, 3, 3).astype(np.float64)
    _check_bound(np.stack([K[:, 0, 0], K[:, 1, 1]], -1), MAX_FOCAL, file, field_name, "focal length", "px", key,
                 "bad_camera", where, MIN_FOCAL)
    _check_bound(np.abs(K[:, :2, 2]), MAX_PRINCIPAL_POINT, file, field_name, "principal point coordinate", "px", key,
                 "bad_camera", where)


def check_extrinsics(w2c: np.ndarray, key: str, file: str) -> None:
    _check_bound(_norm(w2c.reshape(-1, 4, 4)[:, :3, 3]), MAX_TRANSLATION, file, "w2c", "camera translation", "m", key,
                 "bad_camera", "frame {0}" if w2c.ndim == 3 else "{0}")


def parse_meta(data: bytes, key: str) -> dict[str, Any]:
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SampleError("malformed", f"json is not valid JSON ({e})", key) from e
    if not isinstance(meta, dict):
        raise SampleError("malformed", f"json must be an object, got {type(meta).__name__}", key)
    for name in ("fps", "gender"):
        if name not in meta:
            raise SampleError("missing_key", f"json has no '{name}'", key)
    fps = meta["fps"]
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not np.isfinite(fps) or fps <= 0:
        raise SampleError("bad_value", f"json 'fps' must be a positive number, got {fps!r}", key)
    if meta["gender"] not in GENDERS:
        raise SampleError("bad_value", f"json 'gender' must be one of {GENDERS}, got {meta['gender']!r}", key)
    return meta


def _probe(data: bytes, name: str, key: str) -> videolib.VideoInfo:
    try:
        return videolib.probe(data)
    except videolib.VideoError as e:
        raise SampleError("undecodable", f"{name}: {e}", key) from e


def parse_sample(sample: Mapping[str, Any]) -> ParsedSample:
    """Parse and check one raw WebDataset sample (a dict of bytes). Raises SampleError."""
    key = str(sample.get("__key__", "?"))
    url = str(sample.get("__url__", "?"))
    missing = [k for k in REQUIRED_KEYS if k not in sample]
    if missing:
        raise SampleError("missing_key", f"missing {missing} (has {sorted(k for k in sample if not k.startswith('__'))})", key)
    meta = parse_meta(sample["json"], key)
    smpl = parse_smpl(sample["smpl.npz"], key)
    F = smpl.num_frames
    cam = parse_cameras(sample["cam.npz"], key, F)
    info = _probe(sample["mp4"], "mp4", key)
    if info.num_frames != F:
        raise SampleError("frame_mismatch", f"mp4 has {info.num_frames} frames, smpl.npz has {F}", key)
    for name in ("bg.mp4", "mask.mp4"):
        if name in sample:
            other = _probe(sample[name], name, key)
            if (other.num_frames, other.height, other.width) != (info.num_frames, info.height, info.width):
                raise SampleError(
                    "frame_mismatch",
                    f"{name} is {other.num_frames}x{other.height}x{other.width}, mp4 is "
                    f"{info.num_frames}x{info.height}x{info.width} (frames x height x width must match)",
                    key,
                )
    ref = None
    if "ref.png" in sample:
        ref = ReferenceView(sample["ref.png"])
        if "ref.npz" in sample:
            ref = parse_reference(sample["ref.png"], sample["ref.npz"], key, smpl.num_people)
    extra = {k: v for k, v in sample.items() if not k.startswith("__") and k not in REQUIRED_KEYS + OPTIONAL_KEYS}
    return ParsedSample(key, url, sample["mp4"], info, smpl, cam, meta, sample.get("bg.mp4"), sample.get("mask.mp4"), ref, extra)


def parse_reference(image: bytes, data: bytes, key: str, num_people: int) -> ReferenceView:
    z = load_npz(data, "ref.npz", key)
    K = _array(z, "ref.npz", "K", (3, 3), key)
    w2c = _array(z, "ref.npz", "w2c", (4, 4), key)
    check_intrinsics(K, key, "ref.npz['K']")
    if not is_rigid(w2c.astype(np.float64)):
        raise SampleError("bad_camera", "ref.npz['w2c'] is not a rigid transform", key)
    check_extrinsics(w2c, key, "ref.npz")
    smpl = None
    if "transl" in z:
        smpl = parse_smpl(data, key, "ref.npz", num_frames=1)
        if smpl.num_people != num_people:
            raise SampleError("bad_shape", f"ref.npz has {smpl.num_people} people, smpl.npz has {num_people}", key)
    return ReferenceView(image, K, w2c, smpl)


# --------------------------------------------------------------------------------------------------- writing


def npz_bytes(compressed: bool = False, **arrays: np.ndarray) -> bytes:
    """An npz file in memory, for a sample key (compressed for sparse maps such as part IDs)."""
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def encode_sample(
    key: str,
    video: bytes | np.ndarray,
    smpl: SMPLSequence,
    cam: CameraSequence,
    meta: Mapping[str, Any],
    *,
    bg: bytes | np.ndarray | None = None,
    mask: bytes | np.ndarray | None = None,
    ref_png: bytes | None = None,
    ref_npz: Mapping[str, np.ndarray] | None = None,
    codec: str = "libx264",
    crf: int = 18,
) -> dict[str, Any]:
    """Build a contract sample for `webdataset.ShardWriter.write`. Arrays of frames (T, H, W, 3) are encoded to mp4.

    Converters and the toy world all write through here, so every shard follows one contract.
    """
    if "." in key:
        raise ValueError(f"sample key {key!r} must not contain '.' (WebDataset splits extensions at the first dot)")

    def mp4(x: bytes | np.ndarray) -> bytes:
        return x if isinstance(x, bytes) else videolib.encode_video(np.asarray(x), float(meta["fps"]), codec=codec, crf=crf)

    sample: dict[str, Any] = {
        "__key__": key,
        "mp4": mp4(video),
        "smpl.npz": npz_bytes(betas=smpl.betas, global_orient=smpl.global_orient, body_pose=smpl.body_pose, transl=smpl.transl),
        "cam.npz": npz_bytes(K=cam.K, w2c=cam.w2c),
        "json": json.dumps(dict(meta)).encode(),
    }
    if bg is not None:
        sample["bg.mp4"] = mp4(bg)
    if mask is not None:
        sample["mask.mp4"] = mp4(mask)
    if ref_png is not None:
        sample["ref.png"] = ref_png
    if ref_npz is not None:
        sample["ref.npz"] = npz_bytes(**ref_npz)
    return sample
