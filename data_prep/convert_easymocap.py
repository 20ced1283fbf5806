"""Calibrated multi-view captures in EasyMocap / ZJU-MoCap layout -> contract shards, one sample per camera per clip.

    python -m data_prep.convert_easymocap --root data/zju/CoreView_313 --out shards/ --body-model-dir data/body \
        [--cams 1 2 3] [--frames 0:300] [--fps 50] [--license ...]

Layout (docs/data_prep.md): `intri.yml` (names, K_<cam>, dist_<cam>) and `extri.yml` (R_<cam> as a Rodrigues
vector or 3x3 matrix, or Rot_<cam>; T_<cam>: world-to-camera, metres) in OpenCV FileStorage YAML; SMPL fits in
`smpl/<frame>.json` (EasyMocap: a list of {id, Rh, Th, poses, shapes} per frame) or `<frame>.npy` (ZJU-MoCap
new_params: one such dict); frames in `videos/<cam>.mp4` or `images/<cam>/<frame>.jpg`.

EasyMocap's body is  v = R(Rh) . SMPL(poses, shapes) + Th,  where SMPL(poses, shapes) has no translation and its
root rotation poses[:3] (usually zero) turns about the rest pelvis J0(beta). SMPL's own convention turns
global_orient about J0 and adds transl after: v = R(g) (v0 - J0) + J0 + transl. Equating the two:

    global_orient = log(R(Rh) R(poses[:3])),  body_pose = poses[3:72],
    transl = Th + R(Rh) J0(beta_t) - J0(mean beta)      (= Th + R(Rh) J0 - J0 for constant betas)

and the camera is K, w2c = [R | T] as calibrated (OpenCV's axes and pixel centres, like isa4d). Lens distortion
is removed from the frames (exact inverse map, bilinear) unless --keep-distortion, which records `dist` in the
sample's json and leaves K a pinhole approximation.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from scipy.ndimage import map_coordinates

from data_prep.converters_common import (INPUT_ERRORS, FrameSource, PelvisModel, RestrictedUnpickler, ShardSink,
                                         axis_angle_to_rotmat, check_lengths, log, rotmat_to_axis_angle, runs,
                                         sanitize_key, split_run)
from isa4d.data.contract import CameraSequence, SMPLSequence, encode_sample

SOURCE = "easymocap"

# ------------------------------------------------------------------------------------------- OpenCV FileStorage


class _OpenCVLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus OpenCV's `!!opencv-matrix` / `!!opencv-nd-matrix` tags."""


def _opencv_matrix(loader: yaml.SafeLoader, node: yaml.Node) -> np.ndarray:
    m = loader.construct_mapping(node, deep=True)
    dt = str(m.get("dt", "d"))
    channels = int(dt[:-1]) if dt[:-1].isdigit() else 1
    shape = [int(s) for s in m["sizes"]] if "sizes" in m else [int(m["rows"]), int(m["cols"])]
    data = np.asarray(m["data"], dtype=np.float64).reshape(-1)  # numbers OpenCV wrote without a '.' load as str
    shape += [channels] if channels > 1 else []
    if data.size != int(np.prod(shape)):
        raise ValueError(f"opencv-matrix of shape {shape} holds {data.size} numbers")
    return data.reshape(shape)


for _tag in ("opencv-matrix", "opencv-nd-matrix"):
    _OpenCVLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _opencv_matrix)


def parse_opencv_yaml(text: str) -> dict:
    """OpenCV FileStorage YAML (as cv2.FileStorage or EasyMocap write it) -> dict; matrices become float64 arrays."""
    text = re.sub(r"\A\s*%YAML[: ]?[0-9.]*[^\n]*\n", "", text)  # "%YAML:1.0" is not a directive PyYAML accepts
    data = yaml.load(text, Loader=_OpenCVLoader)
    return data if isinstance(data, dict) else {}


def read_opencv_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: calibration file not found (expected EasyMocap's intri.yml and extri.yml "
                                f"in {path.parent})")
    try:
        return parse_opencv_yaml(path.read_text())
    except (yaml.YAMLError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not an OpenCV FileStorage YAML file ({e})") from e


@dataclass
class Camera:
    K: np.ndarray  # (3, 3)
    dist: np.ndarray  # (n,) OpenCV order k1 k2 p1 p2 [k3 [k4 k5 k6]]
    R: np.ndarray  # (3, 3) world-to-camera
    T: np.ndarray  # (3,) metres

    @property
    def w2c(self) -> np.ndarray:
        w2c = np.eye(4)
        w2c[:3, :3], w2c[:3, 3] = self.R, self.T
        return w2c


def read_cameras(root: Path, names: list[str] | None = None, t_scale: float = 1.0) -> dict[str, Camera]:
    """Cameras of intri.yml / extri.yml, in file order (or the order of `names`)."""
    intri, extri = read_opencv_yaml(root / "intri.yml"), read_opencv_yaml(root / "extri.yml")
    listed = [str(n) for n in intri.get("names") or extri.get("names") or
              [k[2:] for k in intri if k.startswith("K_")]]
    for n in names or []:
        if n not in listed:
            raise ValueError(f"camera {n!r} is not in {root / 'intri.yml'} (cameras: {listed})")
    cams = {}
    for n in names or listed:
        K = _entry(intri, root / "intri.yml", f"K_{n}").reshape(3, 3)
        dist = np.asarray(intri.get(f"dist_{n}", intri.get(f"D_{n}", np.zeros(5))), dtype=np.float64).reshape(-1)
        R = _entry(extri, root / "extri.yml", f"R_{n}", f"Rot_{n}")  # EasyMocap reads R_ (a Rodrigues vector) first
        R = R.reshape(3, 3) if R.size == 9 else axis_angle_to_rotmat(R.reshape(3))
        T = _entry(extri, root / "extri.yml", f"T_{n}").reshape(3) * t_scale
        if np.linalg.norm(T) > 100:
            log(f"camera {n}: |T| = {np.linalg.norm(T):.0f}; if T is in millimetres, pass --t-scale 0.001")
        cams[n] = Camera(K, dist, R, T)
    return cams


def _entry(d: dict, path: Path, *keys: str) -> np.ndarray:
    for k in keys:
        if d.get(k) is not None:
            return np.asarray(d[k], dtype=np.float64)
    raise ValueError(f"{path} has no {' or '.join(keys)}")


# -------------------------------------------------------------------------------------------------- SMPL fits


@dataclass
class Person:
    global_orient: np.ndarray  # (3,) SMPL convention (about the pelvis)
    body_pose: np.ndarray  # (69,)
    betas: np.ndarray  # (10,)
    Rh: np.ndarray  # (3, 3) EasyMocap's rotation about the origin
    Th: np.ndarray  # (3,)


def _load_npy(path: Path):
    """A .npy file; object arrays (ZJU-MoCap's pickled dicts) go through the restricted unpickler."""
    with path.open("rb") as fh:
        version = np.lib.format.read_magic(fh)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(fh) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(fh))
        if not dtype.hasobject:
            return np.load(path, allow_pickle=False)
        return RestrictedUnpickler(fh, name=str(path), encoding="latin1").load()


def read_people(path: Path) -> dict[int, dict]:
    """One frame's fits: {person id: {Rh, Th, poses, shapes}} from an EasyMocap json or a ZJU-MoCap npy."""
    data = json.loads(path.read_text()) if path.suffix == ".json" else _load_npy(path)
    if isinstance(data, np.ndarray) and data.dtype.hasobject and data.size == 1:
        data = data.item()
    if isinstance(data, dict):
        data = data.get("annots", [data])
    return {int(p.get("id", i)): p for i, p in enumerate(data)}


def to_smpl(p: dict, path: Path) -> Person:
    """EasyMocap parameters -> SMPL's (transl is set later, once the mean betas are known)."""
    poses = np.asarray(p["poses"], dtype=np.float64).reshape(-1)
    if poses.size not in (69, 72):
        raise ValueError(f"{path}: 'poses' has {poses.size} values; only SMPL (72, or 69 without the root) "
                         "is supported")
    root = poses[:3] if poses.size == 72 else np.zeros(3)
    Rh = axis_angle_to_rotmat(np.asarray(p.get("Rh", np.zeros(3)), dtype=np.float64).reshape(3))
    go = rotmat_to_axis_angle(Rh @ axis_angle_to_rotmat(root))
    betas = np.zeros(10)
    shapes = np.asarray(p.get("shapes", betas), dtype=np.float64).reshape(-1)[:10]
    betas[: shapes.size] = shapes
    return Person(go, poses[-69:], betas, Rh, np.asarray(p.get("Th", np.zeros(3)), dtype=np.float64).reshape(3))


def read_fits(smpl_dir: Path, frames: list[int]) -> dict[int, dict[int, Person]]:
    """{frame: {person id: Person}} for the frames in `frames` that have a fit file."""
    if not smpl_dir.is_dir():
        raise FileNotFoundError(f"{smpl_dir}: SMPL fit folder not found (give it with --smpl-dir)")
    files = {int(p.stem): p for p in smpl_dir.iterdir() if p.suffix in (".json", ".npy") and p.stem.isdigit()}
    if not files:
        raise FileNotFoundError(f"{smpl_dir}: no <frame>.json or <frame>.npy SMPL fits")
    return {f: {pid: to_smpl(p, files[f]) for pid, p in read_people(files[f]).items()} for f in frames if f in files}


# ------------------------------------------------------------------------------------------------ undistortion


def distort_normalized(x: np.ndarray, y: np.ndarray, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's lens model on normalised coordinates: k1 k2 p1 p2 k3 k4 k5 k6 (missing ones are zero)."""
    k1, k2, p1, p2, k3, k4, k5, k6 = np.pad(dist[:8], (0, max(0, 8 - dist.size)))
    r2 = x * x + y * y
    radial = (1 + r2 * (k1 + r2 * (k2 + r2 * k3))) / (1 + r2 * (k4 + r2 * (k5 + r2 * k6)))
    return (x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x),
            y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y)


def undistort(frames: np.ndarray, K: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Resample (T, H, W, C) frames so they follow the pinhole K: each output pixel reads the distorted image at
    K . distort(K^-1 . pixel), a closed-form map (no iteration), interpolated bilinearly."""
    _, h, w, _ = frames.shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    y = (v - K[1, 2]) / K[1, 1]
    x = (u - K[0, 2] - K[0, 1] * y) / K[0, 0]
    xd, yd = distort_normalized(x, y, dist)
    coords = np.stack([K[1, 1] * yd + K[1, 2], K[0, 0] * xd + K[0, 1] * yd + K[0, 2]])  # (2, H, W) rows, cols
    out = np.empty_like(frames)
    for t in range(frames.shape[0]):
        for c in range(frames.shape[3]):
            out[t, :, :, c] = np.clip(map_coordinates(frames[t, :, :, c].astype(np.float32), coords, order=1,
                                                      mode="nearest"), 0, 255).round()
    return out


# ---------------------------------------------------------------------------------------------------- convert


def frame_source(root: Path, cam: str, fps: float | None, max_side: int | None) -> FrameSource:
    for path in (root / "videos" / f"{cam}.mp4", root / "images" / cam):
        if path.exists():
            return FrameSource(path, fps=fps, max_side=max_side)
    raise FileNotFoundError(f"no frames for camera {cam!r}: expected {root / 'videos' / (cam + '.mp4')} "
                            f"or {root / 'images' / cam}/")


def parse_frames(text: str | None) -> tuple[int, int | None, int]:
    """'a:b' or 'a:b:step' (Python slice of frame indices; b may be empty) -> (start, stop, step)."""
    if not text:
        return 0, None, 1
    parts = (text.split(":") + ["", ""])[:3]
    start, stop, step = (int(p) if p.strip() else d for p, d in zip(parts, (0, None, 1)))
    if start < 0 or step < 1 or (stop is not None and stop <= start):
        raise ValueError(f"--frames {text!r}: want start:stop[:step] with 0 <= start < stop and step >= 1")
    return start, stop, step


def convert(root: str | Path, out: str | Path, body_model_dir: str | Path, *, cams: list[str] | None = None,
            frames: str | None = None, smpl_dir: str | Path | None = None, fps: float | None = None,
            min_frames: int = 17, max_frames: int | None = 300, max_side: int | None = None, gender: str = "neutral",
            license: str = "unknown", subject: str | None = None, prefix: str | None = None, per_shard: int = 64,
            overwrite: bool = False, keep_distortion: bool = False, t_scale: float = 1.0) -> list[str]:
    """Convert one capture folder; returns the written shard paths."""
    root = Path(root)
    check_lengths(min_frames, max_frames)
    cameras = read_cameras(root, cams, t_scale)
    sources = {c: frame_source(root, c, fps, max_side) for c in cameras}
    start, stop, step = parse_frames(frames)
    last = max(s.num_frames for s in sources.values())
    selected = list(range(start, min(stop or last, last), step))
    fits = read_fits(Path(smpl_dir) if smpl_dir else root / "smpl", selected)
    labels = [tuple(sorted(fits[f])) if f in fits and all(s.has(f) for s in sources.values()) else () for f in selected]
    pelvis = PelvisModel(body_model_dir, gender)
    subject = sanitize_key(subject or root.name)
    out_fps = next(iter(sources.values())).fps / step
    with ShardSink(out, prefix or f"easymocap-{subject}", per_shard, overwrite) as sink:
        for a, b, pids in runs(labels):
            if b - a < min_frames:
                log(f"people {list(pids)}: frames {selected[a]}-{selected[b - 1]} ({b - a} frames) shorter than "
                    f"--min-frames {min_frames}: skipped")
                continue
            for c0, c1 in split_run(a, b, max_frames):
                idx = selected[c0:c1]
                smpl = clip_smpl([[fits[f][pid] for f in idx] for pid in pids], pelvis)
                for name, cam in cameras.items():
                    meta = {"fps": out_fps, "gender": gender, "subject": subject, "source": SOURCE, "license": license,
                            "camera": name, "person_ids": list(pids), "source_frames": [idx[0], idx[-1] + 1, step]}
                    key = f"{subject}_{sanitize_key(name)}_{idx[0]:06d}"
                    sink.write(clip_sample(key, idx, smpl, cam, sources[name], meta, keep_distortion))
    log(f"wrote {len(sink.keys)} samples ({len(cameras)} cameras) to {len(sink.paths)} shard(s) in {out}")
    return sink.paths


def clip_smpl(people: list[list[Person]], pelvis: PelvisModel) -> SMPLSequence:
    """(P, F) Person fits -> SMPLSequence with per-person mean betas and the pelvis-preserving transl."""
    go = np.array([[p.global_orient for p in row] for row in people])  # (P, F, 3)
    bp = np.array([[p.body_pose for p in row] for row in people])  # (P, F, 69)
    betas_t = np.array([[p.betas for p in row] for row in people])  # (P, F, 10)
    Rh = np.array([[p.Rh for p in row] for row in people])  # (P, F, 3, 3)
    Th = np.array([[p.Th for p in row] for row in people])  # (P, F, 3)
    betas = betas_t.mean(axis=1)  # (P, 10)
    transl = Th + np.einsum("pfij,pfj->pfi", Rh, pelvis(betas_t)) - pelvis(betas)[:, None]  # (P, F, 3)
    return SMPLSequence(*(x.astype(np.float32) for x in (betas, go, bp, transl)))


def clip_sample(key: str, idx: list[int], smpl: SMPLSequence, cam: Camera, source: FrameSource, meta: dict,
                keep_distortion: bool) -> dict:
    K = source.crop.apply_to_K(cam.K)
    video = source.read(idx)
    if np.abs(cam.dist).max(initial=0.0) > 1e-8:
        if keep_distortion:
            log(f"{key}: camera {meta['camera']} has lens distortion {cam.dist.tolist()}; kept (recorded as 'dist')")
            meta = dict(meta, dist=cam.dist.tolist())
        else:
            video = undistort(video, K, cam.dist)
    F = len(idx)
    camera = CameraSequence(np.repeat(K[None], F, 0).astype(np.float32),
                            np.repeat(cam.w2c[None], F, 0).astype(np.float32))
    return encode_sample(key, video, smpl, camera, meta)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True,
                    help="capture folder holding intri.yml, extri.yml, smpl/, and images/ or videos/")
    ap.add_argument("--out", required=True, help="output folder for the shards")
    ap.add_argument("--body-model-dir", required=True, help="SMPL model folder (smpl/SMPL_<GENDER>.pkl): "
                    "the pelvis J0(beta) enters the Rh/Th -> global_orient/transl conversion")
    ap.add_argument("--cams", nargs="+", help="cameras to convert (default: all in intri.yml)")
    ap.add_argument("--frames", help="start:stop[:step] frame indices (default: all)")
    ap.add_argument("--smpl-dir", help="folder of <frame>.json / <frame>.npy fits (default: ROOT/smpl)")
    ap.add_argument("--fps", type=float, help="frame rate (default: the videos'; required for image folders)")
    ap.add_argument("--min-frames", type=int, default=17, help="drop clips shorter than this")
    ap.add_argument("--max-frames", type=int, default=300,
                    help="cut longer clips into pieces of at most this (0: no limit)")
    ap.add_argument("--max-side", type=int, default=0, help="downscale so the long side is at most this (0: keep)")
    ap.add_argument("--gender", default="neutral", choices=["neutral", "male", "female"], help="body model of the fits")
    ap.add_argument("--license", default="unknown", help="license of the capture, recorded in each sample")
    ap.add_argument("--subject", help="name used in sample keys (default: the root folder's name)")
    ap.add_argument("--prefix", help="shard file prefix (default: easymocap-<subject>)")
    ap.add_argument("--per-shard", type=int, default=64, help="samples per shard")
    ap.add_argument("--overwrite", action="store_true", help="replace existing shards with the same prefix")
    ap.add_argument("--keep-distortion", action="store_true", help="do not undistort; record dist in the json")
    ap.add_argument("--t-scale", type=float, default=1.0, help="multiply T_<cam> by this (0.001 if it is in mm)")
    a = ap.parse_args(argv)
    try:
        paths = convert(a.root, a.out, a.body_model_dir, cams=a.cams, frames=a.frames, smpl_dir=a.smpl_dir, fps=a.fps,
                        min_frames=a.min_frames, max_frames=a.max_frames or None, max_side=a.max_side or None,
                        gender=a.gender, license=a.license, subject=a.subject, prefix=a.prefix, per_shard=a.per_shard,
                        overwrite=a.overwrite, keep_distortion=a.keep_distortion, t_scale=a.t_scale)
    except INPUT_ERRORS as e:
        log(f"error: {e}")
        return 2
    print("\n".join(paths))
    return 0 if paths else 1


if __name__ == "__main__":
    raise SystemExit(main())
