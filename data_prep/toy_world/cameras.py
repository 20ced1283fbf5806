"""Camera paths for the toy world: static, orbit, dolly and handheld (jittered), OpenCV convention.

Intrinsics come from a vertical field of view (``intrinsics_from_fov``); extrinsics from ``look_at`` (world y up,
camera x right, y down, z forward). Each path frames the people's bounding sphere over the whole clip: the
distance is ``radius / sin(fov / 2)`` times a margin, so everyone stays in view unless a dolly moves in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from isa4d.geometry.camera import look_at
from data_prep.toy_world.scene import CAMERA_MAX_RADIUS
from isa4d.geometry.camera import intrinsics_from_fov

CAMERA_KINDS = ("static", "orbit", "dolly", "handheld")


@dataclass
class CameraPath:
    kind: str
    K: np.ndarray  # (F, 3, 3) pixels
    w2c: np.ndarray  # (F, 4, 4) world-to-camera
    fov_y: float  # degrees


def bounding_sphere(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre and radius of a sphere around (N, 3) points (box centre, farthest point)."""
    centre = 0.5 * (points.min(0) + points.max(0))
    return centre, float(np.linalg.norm(points - centre, axis=1).max())


def _jitter(rng, num_frames: int, fps: float, dims: int, amp: float) -> np.ndarray:
    """(F, dims) smooth shake: a few sinusoids of 0.5-4 Hz, peak amplitude about `amp`."""
    t = np.arange(num_frames)[:, None] / fps
    out = np.zeros((num_frames, dims))
    for f in (rng.uniform(0.5, 1.2), rng.uniform(1.5, 2.5), rng.uniform(3.0, 4.0)):
        out += rng.uniform(0.3, 1.0, dims) * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi, dims))
    return amp * out / 2.0


def _roll(w2c: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    out = w2c.copy()
    out[:3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ w2c[:3]
    return out


def make_camera(rng: np.random.Generator, kind: str, num_frames: int, fps: float, height: int, width: int,
                centre: np.ndarray, radius: float, azimuth: float | None = None) -> CameraPath:
    """A camera path of `kind` looking at the sphere (`centre`, `radius`) that holds the people; `azimuth`
    (radians about y, 0 = on the +z side) fixes the direction of the camera from the centre."""
    if kind not in CAMERA_KINDS:
        raise ValueError(f"unknown camera kind {kind!r}; choose from {CAMERA_KINDS}")
    fov = float(rng.uniform(40, 60))
    half = np.deg2rad(fov) / 2 * min(1.0, width / height)  # the narrower image side limits the framing
    dist = max(radius, 1.0) / np.sin(half) * rng.uniform(1.0, 1.15)
    az, el = rng.uniform(0, 2 * np.pi), np.deg2rad(rng.uniform(-5, 30))
    az = az if azimuth is None else azimuth
    target = np.asarray(centre, dtype=np.float64) + rng.uniform(-0.1, 0.1, 3) * radius
    s = np.linspace(0.0, 1.0, num_frames)
    azimuth = np.full(num_frames, az)
    distance = np.full(num_frames, dist)
    if kind == "orbit":
        azimuth = az + np.deg2rad(rng.uniform(20, 70)) * rng.choice([-1, 1]) * s
    elif kind == "dolly":
        k0, k1 = rng.uniform(1.15, 1.35), rng.uniform(0.75, 0.9)
        if rng.uniform() < 0.5:
            k0, k1 = k1, k0
        distance = dist * (k0 + (k1 - k0) * s)
    direction = np.stack([np.cos(el) * np.sin(azimuth), np.full(num_frames, np.sin(el)),
                          np.cos(el) * np.cos(azimuth)], 1)  # (F, 3) from the target to the camera
    # keep the camera inside the empty middle of the room
    horiz = np.linalg.norm(target[[0, 2]][None] + distance[:, None] * direction[:, [0, 2]], axis=1)
    distance = distance * np.minimum(1.0, CAMERA_MAX_RADIUS / np.maximum(horiz, 1e-9))
    eyes = target + distance[:, None] * direction
    targets = np.repeat(target[None], num_frames, 0)
    roll = np.zeros(num_frames)
    if kind == "handheld":
        eyes = eyes + _jitter(rng, num_frames, fps, 3, rng.uniform(0.02, 0.06))
        targets = targets + _jitter(rng, num_frames, fps, 3, rng.uniform(0.03, 0.08))
        roll = _jitter(rng, num_frames, fps, 1, np.deg2rad(rng.uniform(0.5, 2.0)))[:, 0]
    w2c = np.stack([_roll(look_at(e, g), r) for e, g, r in zip(eyes, targets, roll)])
    K = np.repeat(intrinsics_from_fov(fov, height, width)[None], num_frames, 0)
    return CameraPath(kind, K, w2c, fov)
