"""Camera paths for `isa4d sample`: static, orbit, dolly, or a contract `cam.npz`, from a short user string.

Every path is a contract `CameraSequence` (docs/data_format.md): K (F, 3, 3) in pixels of the H x W video
and w2c (F, 4, 4), OpenCV axes (x right, y down, z forward), float32 as the loader gives them. Generated
paths look at a `target` from a sphere around it: azimuth 0 is the +z side, where a rest-pose body faces
(docs/body.md), so the default camera sees the person from the front; azimuth grows towards +x
(counter-clockwise seen from above); elevation > 0 is above the target. Intrinsics come from a vertical field
of view; the default distance frames a 1 m sphere as the toy world frames its people (docs/toy_world.md).
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Callable

import numpy as np

from isa4d.data.contract import CameraSequence, SampleError, parse_cameras
from isa4d.geometry.camera import cover_crop, intrinsics_from_fov, look_at

DEFAULT_FOV = 50.0  # vertical degrees: the middle of the toy world's 40-60
DEFAULT_ELEVATION = 10.0  # degrees above the target
FRAMING_RADIUS = 1.0  # metres: a sphere that holds one standing person
FRAMING_MARGIN = 1.1


class CameraPathError(ValueError):
    """A camera path that cannot be built: bad parameters, an unknown spec, or a cam.npz that does not fit."""


def framing_distance(fov: float, height: int, width: int, radius: float = FRAMING_RADIUS,
                     margin: float = FRAMING_MARGIN) -> float:
    """Distance at which a sphere of `radius` fills the narrower image side, times `margin`."""
    half = math.atan(math.tan(math.radians(fov) / 2) * min(1.0, width / height))  # narrower half-angle
    return radius / math.sin(half) * margin


def _check(num_frames: int, height: int, width: int, fov: float, elevation: float,
           distances: np.ndarray) -> None:
    if num_frames < 1 or height < 1 or width < 1:
        raise CameraPathError(f"need num_frames, height and width >= 1, got {num_frames}, {height}, {width}")
    if not 0 < fov < 180:
        raise CameraPathError(f"fov must be in (0, 180) degrees, got {fov}")
    if not -90 < elevation < 90:
        raise CameraPathError(f"elevation must be in (-90, 90) degrees (looking straight down or up has no "
                              f"'up'), got {elevation}")
    if not (np.isfinite(distances).all() and (distances > 0).all()):
        raise CameraPathError(f"camera distances must be positive, got {np.unique(distances)[:4].tolist()}")


def _sphere_path(num_frames: int, height: int, width: int, target, azimuth: np.ndarray, elevation: float,
                 distance: np.ndarray, fov: float) -> CameraSequence:
    """Cameras at azimuth (F,) and `elevation` degrees, distance (F,) metres from `target`, looking at it."""
    _check(num_frames, height, width, fov, elevation, distance)
    target = np.asarray(target, dtype=np.float64).reshape(3)
    az, el = np.radians(azimuth), math.radians(elevation)
    direction = np.stack([math.cos(el) * np.sin(az), np.full_like(az, math.sin(el)),
                          math.cos(el) * np.cos(az)], 1)  # (F, 3) from the target to the camera
    eyes = target + distance[:, None] * direction  # (F, 3)
    w2c = np.stack([look_at(e, target) for e in eyes])  # (F, 4, 4)
    K = np.repeat(intrinsics_from_fov(fov, height, width)[None], num_frames, 0)  # (F, 3, 3)
    return CameraSequence(K.astype(np.float32), w2c.astype(np.float32))


def static(num_frames: int, height: int, width: int, target, *, radius: float | None = None,
           elevation: float = DEFAULT_ELEVATION, azimuth: float = 0.0,
           fov: float = DEFAULT_FOV) -> CameraSequence:
    """One fixed camera `radius` metres from `target` (default: framing_distance), in front at azimuth 0."""
    r = framing_distance(fov, height, width) if radius is None else radius
    return _sphere_path(num_frames, height, width, target, np.full(num_frames, float(azimuth)), elevation,
                        np.full(num_frames, float(r)), fov)


def orbit(num_frames: int, height: int, width: int, target, *, degrees: float = 360.0,
          radius: float | None = None, elevation: float = DEFAULT_ELEVATION, azimuth: float = 0.0,
          fov: float = DEFAULT_FOV) -> CameraSequence:
    """A circle around `target`: frame k at azimuth + degrees * k / num_frames.

    The sweep is a rate (`degrees` per clip), so the frame after the last would be at azimuth + degrees: the
    360-degree orbit (the default) never repeats its first view and loops seamlessly.
    """
    r = framing_distance(fov, height, width) if radius is None else radius
    az = azimuth + degrees * np.arange(num_frames) / num_frames  # (F,)
    return _sphere_path(num_frames, height, width, target, az, elevation, np.full(num_frames, float(r)), fov)


def dolly(num_frames: int, height: int, width: int, target, *, start: float | None = None,
          end: float | None = None, elevation: float = DEFAULT_ELEVATION, azimuth: float = 0.0,
          fov: float = DEFAULT_FOV) -> CameraSequence:
    """A camera moving along its view axis, from `start` to `end` metres from `target` (both ends included).

    Defaults: 1.3x to 0.8x framing_distance (a push-in, like the toy world's dollies).
    """
    d = framing_distance(fov, height, width)
    start, end = 1.3 * d if start is None else start, 0.8 * d if end is None else end
    s = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
    return _sphere_path(num_frames, height, width, target, np.full(num_frames, float(azimuth)), elevation,
                        start + (end - start) * s, fov)


def from_npz(path: str | Path, num_frames: int, height: int, width: int, trim: bool = False) -> CameraSequence:
    """A contract cam.npz (K (F, 3, 3), w2c (F, 4, 4)) with exactly `num_frames` frames, for an H x W video
    (`trim`: or more, of which the first `num_frames` are used).

    The contract's K is in pixels of its video but cam.npz does not store that video's size. Files may add
    `height` and `width`; where they differ from H x W, K is mapped as the loader maps it (scale to cover,
    centre crop: `cover_crop`), exactly. Without them K must already be for H x W: a principal point outside
    the image is taken as a sign it is not, and is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such camera file")
    data = path.read_bytes()
    try:
        with np.load(path, allow_pickle=False) as z:
            w2c = z["w2c"] if "w2c" in z.files else None
            size = tuple(int(np.asarray(z[k]).reshape(-1)[0]) for k in ("height", "width") if k in z.files)
    except Exception as e:  # zipfile and value errors all mean the same to the user
        raise CameraPathError(f"{path}: not a readable npz ({type(e).__name__}: {e})") from e
    stored = w2c.shape[0] if w2c is not None and w2c.ndim == 3 else num_frames
    if stored != num_frames and not (trim and stored > num_frames):
        raise CameraPathError(f"{path}: 'w2c' has {stored} frames, the video has {num_frames}; "
                              "sample that many frames or trim the file")
    try:
        cams = parse_cameras(data, str(path), stored).take(np.arange(num_frames))
    except SampleError as e:
        raise CameraPathError(str(e)) from e
    if len(size) == 1:
        raise CameraPathError(f"{path}: give both 'height' and 'width' of the image K is for, or neither")
    K = cams.K.astype(np.float64)
    if size and size != (height, width):
        K = cover_crop(size[0], size[1], height, width).apply_to_K(K)
    elif not size:
        cx, cy = K[:, 0, 2], K[:, 1, 2]
        if ((cx < -0.5) | (cx > width - 0.5) | (cy < -0.5) | (cy > height - 0.5)).any():
            raise CameraPathError(
                f"{path}: 'K' has its principal point at ({cx[0]:.1f}, {cy[0]:.1f}), outside the "
                f"{height}x{width} video: K is probably for another image size; store that size as 'height' "
                "and 'width' in the file")
    return CameraSequence(K.astype(np.float32), cams.w2c)


# --------------------------------------------------------------------------------------------------- specs

PATHS: dict[str, Callable[..., CameraSequence]] = {"static": static, "orbit": orbit, "dolly": dolly}


def spec_keys(name: str) -> tuple[str, ...]:
    """The `key=value` options of a named path: its keyword-only parameters (the signature is the schema)."""
    params = inspect.signature(PATHS[name]).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def parse_spec(spec: str) -> tuple[str, dict[str, float]]:
    """'orbit:degrees=360,radius=3' -> ('orbit', {'degrees': 360.0, 'radius': 3.0}), or CameraPathError."""
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in PATHS:
        raise CameraPathError(f"unknown camera path {spec!r}: use one of {', '.join(PATHS)} (e.g. "
                              "'orbit:degrees=360,radius=3,elevation=10') or a path ending .npz")
    keys, options = spec_keys(name), {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or key not in keys:
            why = f"'{item}' is not key=value" if not eq else f"unknown option '{key}'"
            raise CameraPathError(f"camera path {spec!r}: {why}; {name} takes {', '.join(keys)}")
        if key in options:
            raise CameraPathError(f"camera path {spec!r}: '{key}' is given twice")
        try:
            options[key] = float(value)
        except ValueError:
            raise CameraPathError(f"camera path {spec!r}: '{key}' must be a number, got {value!r}") from None
    return name, options


def camera_path(spec: str, num_frames: int, height: int, width: int, target, *,
                fov: float = DEFAULT_FOV, trim_npz: bool = False) -> CameraSequence:
    """The camera path a user string names: 'static', 'orbit', 'orbit:degrees=360,radius=3,elevation=10',
    'dolly:start=4,end=2', or a cam.npz path. `target` (3,) is where generated paths look (for example
    motion.look_target); `fov` (vertical degrees) applies unless the spec sets its own; `trim_npz`: a cam.npz may
    hold more frames than the video (the first ones are used)."""
    if spec.strip().lower().endswith(".npz"):
        return from_npz(spec.strip(), num_frames, height, width, trim=trim_npz)
    name, options = parse_spec(spec)
    return PATHS[name](num_frames, height, width, target, **{"fov": fov, **options})
