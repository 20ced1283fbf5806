"""Pieces shared by the data converters (docs/data_prep.md): rotations, safe pickle loading, frame sources,
segmenting tracks into clips, and a shard sink that writes contract samples.

Rotations follow SMPL's convention (axis-angle = rotation vector, R = exp([aa]x)). Pickles are read with a
restricted unpickler that also understands joblib's format (arrays written raw after a `NumpyArrayWrapper`), so
4D-Humans/PHALP outputs load without joblib and without running arbitrary code from the file.
"""

from __future__ import annotations

import builtins
import bz2
import codecs
import collections
import copyreg
import gzip
import importlib
import io
import lzma
import pickle
import re
import sys
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from isa4d.data import video as videolib
from isa4d.geometry.camera import CropResize

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# What a converter's CLI reports as a one-line error (exit status 2) instead of a traceback: bad paths, existing
# shards, malformed inputs (PickleFormatError, VideoError and the parsers' errors are ValueErrors).
INPUT_ERRORS = (FileNotFoundError, FileExistsError, ValueError)


def sanitize_key(text: str) -> str:
    """A WebDataset key fragment: letters, digits, '_' and '-' only (no dots, which split extensions)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", str(text)).strip("_") or "x"


# ----------------------------------------------------------------------------------------------------- rotations


def _skew(v: np.ndarray) -> np.ndarray:
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    o = np.zeros_like(x)
    return np.stack([np.stack([o, -z, y], -1), np.stack([z, o, -x], -1), np.stack([-y, x, o], -1)], -2)


def axis_angle_to_rotmat(aa: np.ndarray) -> np.ndarray:
    """Rodrigues: (..., 3) rotation vectors -> (..., 3, 3), float64, with the small-angle series near 0."""
    aa = np.asarray(aa, dtype=np.float64)
    theta = np.linalg.norm(aa, axis=-1)[..., None, None]
    small = theta < 1e-6
    t = np.where(small, 1.0, theta)
    a = np.where(small, 1.0 - theta**2 / 6.0, np.sin(t) / t)
    b = np.where(small, 0.5 - theta**2 / 24.0, (1.0 - np.cos(t)) / t**2)
    K = _skew(aa)
    return np.eye(3) + a * K + b * (K @ K)


def rotmat_to_quaternion(R: np.ndarray) -> np.ndarray:
    """(..., 3, 3) -> unit quaternions (..., 4) as (w, x, y, z) with w >= 0.

    Shepperd's method: each of the four candidate formulas divides by one of |w|, |x|, |y|, |z|; the one with the
    largest denominator is taken, so the result stays accurate at every angle, including near pi (w -> 0).
    """
    R = np.asarray(R, dtype=np.float64)
    m = {(i, j): R[..., i, j] for i in range(3) for j in range(3)}
    d = np.stack([1 + m[0, 0] + m[1, 1] + m[2, 2], 1 + m[0, 0] - m[1, 1] - m[2, 2],
                  1 - m[0, 0] + m[1, 1] - m[2, 2], 1 - m[0, 0] - m[1, 1] + m[2, 2]], -1)
    q_abs = np.sqrt(np.maximum(d, 0.0))  # 2 |w|, 2 |x|, 2 |y|, 2 |z|
    cand = np.stack([
        np.stack([q_abs[..., 0] ** 2, m[2, 1] - m[1, 2], m[0, 2] - m[2, 0], m[1, 0] - m[0, 1]], -1),
        np.stack([m[2, 1] - m[1, 2], q_abs[..., 1] ** 2, m[1, 0] + m[0, 1], m[0, 2] + m[2, 0]], -1),
        np.stack([m[0, 2] - m[2, 0], m[1, 0] + m[0, 1], q_abs[..., 2] ** 2, m[1, 2] + m[2, 1]], -1),
        np.stack([m[1, 0] - m[0, 1], m[2, 0] + m[0, 2], m[2, 1] + m[1, 2], q_abs[..., 3] ** 2], -1),
    ], -2) / (2.0 * np.maximum(q_abs, 0.1))[..., None]  # (..., 4 candidates, 4)
    best = np.argmax(q_abs, axis=-1)[..., None, None]
    q = np.take_along_axis(cand, np.broadcast_to(best, cand.shape[:-2] + (1, 4)), axis=-2)[..., 0, :]
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    return np.where(q[..., :1] < 0, -q, q)


def rotmat_to_axis_angle(R: np.ndarray) -> np.ndarray:
    """(..., 3, 3) rotation matrices -> (..., 3) rotation vectors with angle in [0, pi], float64.

    Through the quaternion: angle = 2 atan2(|v|, w), which is well conditioned at 0 and at pi, unlike
    arccos((tr R - 1) / 2). Slightly non-orthonormal input (network outputs in float32) is tolerated.
    """
    q = rotmat_to_quaternion(R)
    w, v = q[..., :1], q[..., 1:]
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    angle = 2.0 * np.arctan2(n, w)
    scale = np.where(n > 1e-12, angle / np.maximum(n, 1e-12), 2.0 / np.maximum(w, 1e-12))
    return v * scale


# --------------------------------------------------------------------------------------------- pickle loading


class PickleFormatError(ValueError):
    """A pickle that cannot be read safely or is not in the expected format."""


class _JoblibArray:
    """Stand-in for joblib.numpy_pickle.NumpyArrayWrapper; BUILD fills in shape, dtype, order (+ alignment)."""

    def read(self, unpickler: "RestrictedUnpickler") -> np.ndarray:
        dtype, shape = np.dtype(self.dtype), tuple(int(s) for s in self.shape)
        if dtype.hasobject:  # joblib pickles object arrays as a nested stream
            return unpickler.nested().load()
        raw = unpickler.raw_read
        if getattr(self, "numpy_array_alignment_bytes", None) is not None:  # joblib >= 1.2, uncompressed files
            raw(raw(1)[0])
        count = int(np.prod(shape, dtype=np.int64))
        data = raw(count * dtype.itemsize)
        if len(data) != count * dtype.itemsize:
            raise PickleFormatError(f"{unpickler.name}: truncated joblib array data")
        arr = np.frombuffer(data, dtype=dtype, count=count).copy()
        arr = arr.reshape(shape[::-1]).T if self.order == "F" else arr.reshape(shape)
        return arr.astype(dtype.newbyteorder("="), copy=False)


_SAFE_BUILTINS = frozenset({"dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes",
                            "bytearray", "bool", "slice", "range", "object"})
_NUMPY_MODULES = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                  "numpy._core.numeric")
_NUMPY_NAMES = frozenset({"_reconstruct", "scalar", "_frombuffer", "ndarray", "dtype"})


def _plain_data_class(module: str, name: str):
    """The callable a pickle of plain data may name (arrays, scalars, sparse matrices, tensors), else None."""
    if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
        return getattr(builtins, name)
    if module in ("copyreg", "copy_reg") and name == "_reconstructor":
        return copyreg._reconstructor
    if (module, name) == ("_codecs", "encode"):  # bytes in protocol-2 pickles written by Python 3
        return codecs.encode
    if module == "collections" and name in ("OrderedDict", "defaultdict"):
        return getattr(collections, name)
    if module in _NUMPY_MODULES and name in _NUMPY_NAMES:
        numpy_module = module.replace("numpy.core", "numpy._core") if hasattr(np, "_core") else module
        return getattr(importlib.import_module(numpy_module), name)
    if module == "numpy.dtypes" and isinstance(getattr(np.dtypes, name, None), type):
        return getattr(np.dtypes, name)
    if module.startswith("scipy.sparse"):  # old private paths (scipy.sparse.csc) -> the public classes
        import scipy.sparse

        cls = getattr(scipy.sparse, name, None)
        return cls if isinstance(cls, type) and issubclass(cls, scipy.sparse.spmatrix) else None
    if module.split(".")[0] == "torch":
        import torch

        if (module, name) == ("torch.storage", "_load_from_bytes"):  # torch's own restricted loader inside
            return lambda b: torch.load(io.BytesIO(b), weights_only=True)
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter"):
            return getattr(torch._utils, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
    return None


class RestrictedUnpickler(pickle._Unpickler):
    """Loads plain data (builtins, numpy arrays, scipy.sparse matrices, torch tensors) and nothing else.

    `stubs` maps a module prefix (e.g. "chumpy") to a class that stands in for every class of that module.
    Subclasses the pure-Python unpickler because joblib's arrays need a hook on BUILD, as joblib itself does.
    """

    def __init__(self, file, *, name: str = "pickle", stubs: Mapping[str, type] | None = None, encoding="ASCII"):
        super().__init__(file, encoding=encoding)
        self._file, self.name, self.stubs, self._encoding = file, name, dict(stubs or {}), encoding

    def raw_read(self, n: int) -> bytes:
        return self._file.read(n)

    def nested(self) -> "RestrictedUnpickler":
        return RestrictedUnpickler(self._file, name=self.name, stubs=self.stubs, encoding=self._encoding)

    def find_class(self, module: str, name: str):
        if (module, name) == ("joblib.numpy_pickle", "NumpyArrayWrapper"):
            return _JoblibArray
        for prefix, stub in self.stubs.items():
            if module == prefix or module.startswith(prefix + "."):
                return stub
        found = _plain_data_class(module, name)
        if found is None:
            raise PickleFormatError(f"{self.name}: refusing to unpickle {module}.{name}: only plain data is loaded")
        return found

    def load_build(self):
        pickle._Unpickler.load_build(self)
        if isinstance(self.stack[-1], _JoblibArray):
            self.stack[-1] = self.stack[-1].read(self)

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = load_build


def _decompressed(path: Path) -> io.BufferedIOBase:
    """The file, decompressed when joblib (or anything else) compressed it with zlib, gzip, bz2, xz or lzma."""
    with path.open("rb") as fh:
        head = fh.read(8)
    if head.startswith(b"\x78"):  # joblib's default (compress=3 in PHALP) is a bare zlib stream
        return io.BytesIO(zlib.decompress(path.read_bytes()))
    if head.startswith(b"\x1f\x8b"):
        return gzip.open(path, "rb")
    if head.startswith(b"BZ"):
        return bz2.open(path, "rb")
    if head.startswith(b"\xfd\x37\x7a\x58\x5a") or head.startswith(b"\x5d\x00"):
        return lzma.open(path, "rb")
    if head.startswith(b"ZF") or head.startswith(b"\x04\x22\x4d\x18"):
        raise PickleFormatError(f"{path}: legacy-zfile or lz4 joblib file; re-save it with "
                                f"python -c \"import joblib; joblib.dump(joblib.load('{path}'), 'out.pkl')\"")
    return path.open("rb")


def load_pickle(path, *, stubs: Mapping[str, type] | None = None, encoding: str = "ASCII"):
    """Load a pickle or joblib file (any compression joblib writes but lz4) with RestrictedUnpickler."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with _decompressed(path) as fh:
        try:
            return RestrictedUnpickler(fh, name=str(path), stubs=stubs, encoding=encoding).load()
        except (pickle.UnpicklingError, EOFError, zlib.error, OSError) as e:
            raise PickleFormatError(f"{path}: not a readable pickle/joblib file ({type(e).__name__}: {e})") from e


# -------------------------------------------------------------------------------------------------- segmenting


def runs(labels: Sequence) -> list[tuple[int, int, object]]:
    """Maximal runs [start, stop) of equal consecutive labels, skipping falsy labels (None, empty sets)."""
    out, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            if labels[start]:
                out.append((start, i, labels[start]))
            start = i
    return out


def split_run(start: int, stop: int, max_frames: int | None) -> list[tuple[int, int]]:
    """[start, stop) cut into ceil(n / max_frames) nearly equal consecutive pieces (one piece if no maximum)."""
    n = stop - start
    k = 1 if not max_frames else -(-n // max_frames)
    edges = [start + (n * i) // k for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


def check_lengths(min_frames: int, max_frames: int | None) -> None:
    if min_frames < 1:
        raise ValueError(f"--min-frames must be >= 1, got {min_frames}")
    if max_frames and max_frames < 2 * min_frames:
        raise ValueError(f"--max-frames ({max_frames}) must be 0 (no limit) or >= 2 x --min-frames ({min_frames}), "
                         "so every piece of a split clip keeps at least --min-frames frames")


# ------------------------------------------------------------------------------------------------ frame sources


class FrameSource:
    """Frames of a video file or an image folder, by 0-based index, optionally resized and cropped to even sizes.

    Image folders index their files by the integer in the file name when every name is an integer (000123.jpg is
    frame 123, EasyMocap's numbering), else, or with `by_position`, by sorted position among the `suffixes` files
    (PHALP's: it tracks `sorted(glob("*.jpg"))` and names the k-th frame it extracts `{k+1:06d}.jpg`). Videos
    index frames as players show them (isa4d.data.video: presentation order, rotation applied).
    """

    def __init__(self, path, *, fps: float | None = None, max_side: int | None = None, by_position: bool = False,
                 suffixes: tuple[str, ...] = IMAGE_SUFFIXES):
        self.path = Path(path)
        self.rotation = 0  # the video's display rotation (degrees counter-clockwise), applied when decoding
        if self.path.is_dir():
            files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in suffixes)
            if not files:
                raise FileNotFoundError(f"{self.path}: no {'/'.join(suffixes)} images in this folder")
            numbered = not by_position and all(p.stem.isdigit() for p in files)
            self.files = {int(p.stem) if numbered else i: p for i, p in enumerate(files)}
            with Image.open(files[0]) as im:
                width, height = im.size
            if fps is None:
                raise ValueError(f"{self.path} is an image folder: give the frame rate with --fps")
            self.data, self.num_frames = None, max(self.files) + 1
        elif self.path.is_file():
            self.data = self.path.read_bytes()
            info = videolib.probe(self.data)
            width, height, self.num_frames, fps = info.width, info.height, info.num_frames, fps or info.fps
            self.rotation = info.rotation
        else:
            raise FileNotFoundError(f"{self.path}: no such video file or image folder")
        self.height, self.width, self.fps = int(height), int(width), float(fps)
        self.crop = output_crop(self.height, self.width, max_side)

    def has(self, index: int) -> bool:
        return index in self.files if self.data is None else 0 <= index < self.num_frames

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """(N, H', W', 3) uint8 frames at the output size of `self.crop` (K maps through `self.crop.apply_to_K`)."""
        c = self.crop
        size = None if (c.scaled_h, c.scaled_w) == (c.src_h, c.src_w) else (c.scaled_h, c.scaled_w)
        if self.data is not None:
            frames = videolib.decode_frames(self.data, list(indices), size=size)
        else:
            frames = np.stack([self._image(self.files[i], size) for i in indices])
        return frames[:, c.top : c.top + c.out_h, c.left : c.left + c.out_w]

    def _image(self, path: Path, size: tuple[int, int] | None) -> np.ndarray:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (self.width, self.height):
                raise ValueError(f"{path} is {im.size[0]}x{im.size[1]}, the first image of the folder is "
                                 f"{self.width}x{self.height}")
            if size is not None:
                im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(im)


def output_crop(height: int, width: int, max_side: int | None = None) -> CropResize:
    """Downscale so the long side is at most `max_side` (if given), then drop an odd last row/column (yuv420p)."""
    s = min(1.0, max_side / max(height, width)) if max_side else 1.0
    sh, sw = max(2, round(height * s)), max(2, round(width * s))
    return CropResize(height, width, sh, sw, 0, 0, sh - sh % 2, sw - sw % 2)


# ------------------------------------------------------------------------------------------------------- shards


class ShardSink:
    """Contract samples -> `out/<prefix>-000000.tar`, ... with at most `per_shard` samples each (no empty shards)."""

    def __init__(self, out, prefix: str, per_shard: int = 64, overwrite: bool = False):
        self.out, self.prefix, self.per_shard = Path(out), sanitize_key(prefix), per_shard
        self.out.mkdir(parents=True, exist_ok=True)
        old = sorted(self.out.glob(f"{self.prefix}-*.tar"))
        if old and not overwrite:
            raise FileExistsError(f"{self.out} already holds {len(old)} shard(s) named {self.prefix}-*.tar "
                                  f"(e.g. {old[0].name}); pass --overwrite or choose another --out/--prefix")
        for p in old:
            p.unlink()
        self.paths: list[str] = []
        self.keys: set[str] = set()
        self._tar, self._count = None, 0

    def write(self, sample: dict) -> None:
        if sample["__key__"] in self.keys:
            raise ValueError(f"duplicate sample key {sample['__key__']!r}")
        if self._tar is None or self._count >= self.per_shard:
            self._finish()
            self.paths.append(str(self.out / f"{self.prefix}-{len(self.paths):06d}.tar"))
            self._tar, self._count = wds.TarWriter(self.paths[-1]), 0
        self._tar.write(sample)
        self.keys.add(sample["__key__"])
        self._count += 1

    def _finish(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def __enter__(self) -> "ShardSink":
        return self

    def __exit__(self, *exc) -> None:
        self._finish()


# ------------------------------------------------------------------------------------------------- body model


class PelvisModel:
    """J0(beta): SMPL's root joint in the rest pose, about which `global_orient` rotates.

    J0 = J_regressor[0] @ (v_template + shapedirs @ beta) is linear in beta, so eleven body-model evaluations
    (beta = 0 and each unit vector) give it exactly: J0(beta) = J0(0) + beta @ D.
    """

    def __init__(self, model_dir, gender: str = "neutral"):
        import torch

        from isa4d.body.smpl import BodyModel

        body = BodyModel(model_dir, gender, dtype=torch.float64)
        n = body.num_betas
        betas = torch.cat([torch.zeros(1, n, dtype=torch.float64), torch.eye(n, dtype=torch.float64)])
        with torch.no_grad():
            _, joints = body(betas, torch.zeros(n + 1, 1, 3), torch.zeros(n + 1, 1, 69))  # (n+1, 1, 24, 3)
        j0 = joints[:, 0, 0].numpy()
        self.origin, self.dirs = j0[0], j0[1:] - j0[0]  # (3,), (n, 3)

    def __call__(self, betas: np.ndarray) -> np.ndarray:
        """(..., >=10) betas -> (..., 3) rest-pose root joint, metres."""
        b = np.asarray(betas, dtype=np.float64)[..., : len(self.dirs)]
        return self.origin + b @ self.dirs[: b.shape[-1]]
