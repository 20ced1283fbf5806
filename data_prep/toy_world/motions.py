"""Procedural SMPL motions: walking, turning, waving, squatting, jumping and dancing.

Every motion is built as per-joint Euler angles (radians, in the joint's parent-aligned rest frame: x to the
subject's left, y up, z forward), clipped to the limits in ``LIMITS`` and converted to SMPL axis-angle. The
rest body is a T-pose, so the relaxed pose lowers the arms. Left-side angles are written once and mirrored to
the right (a reflection through x = 0 keeps rotations about x and negates those about y and z). Motions carry
the pelvis path on the floor (``root_xz``) and a height above standing (``lift``); :func:`ground` turns them
into SMPL ``transl`` so the lowest vertex of every frame touches the floor (y = 0) plus the lift.
Deterministic: everything comes from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from isa4d.body.smpl import JOINT_NAMES

MOTIONS = ("walk", "turn", "wave", "squat", "jump", "dance")
J = {n: i for i, n in enumerate(JOINT_NAMES)}
NUM_BODY_JOINTS = 23  # body_pose covers joints 1..23

# (x, y, z) limits in degrees for the left side and the centre line; the right side is mirrored.
_LEFT_LIMITS = {
    "left_hip": ((-100, 35), (-35, 35), (-20, 40)),
    "left_knee": ((0, 140), (-5, 5), (-5, 5)),
    "left_ankle": ((-35, 40), (-15, 15), (-15, 15)),
    "left_foot": ((-20, 20), (-5, 5), (-5, 5)),
    "spine1": ((-20, 30), (-25, 25), (-20, 20)),
    "spine2": ((-20, 30), (-25, 25), (-20, 20)),
    "spine3": ((-20, 30), (-25, 25), (-20, 20)),
    "neck": ((-30, 35), (-40, 40), (-25, 25)),
    "head": ((-25, 25), (-35, 35), (-20, 20)),
    "left_collar": ((-10, 10), (-15, 15), (-15, 25)),
    "left_shoulder": ((-120, 60), (-60, 40), (-85, 80)),
    "left_elbow": ((-45, 45), (-145, 5), (-10, 80)),
    "left_wrist": ((-45, 45), (-40, 40), (-40, 40)),
    "left_hand": ((-15, 15), (-15, 15), (-15, 15)),
}
# Euler order (scipy intrinsic) per joint: the largest range must not be the middle axis (|middle| < 90 deg)
_ORDER = {"left_elbow": "YZX", "right_elbow": "YZX"}


def _limits() -> np.ndarray:
    lim = np.zeros((len(JOINT_NAMES), 3, 2))
    for name, ranges in _LEFT_LIMITS.items():
        lim[J[name]] = np.deg2rad(ranges)
        if name.startswith("left_"):
            (x0, x1), (y0, y1), (z0, z1) = ranges
            lim[J[name.replace("left_", "right_")]] = np.deg2rad([(x0, x1), (-y1, -y0), (-z1, -z0)])
    return lim


LIMITS = _limits()  # (24, 3, [min, max]) radians, joint 0 (global orient) unused
ORDERS = tuple(_ORDER.get(n, "XYZ") for n in JOINT_NAMES)


@dataclass
class Motion:
    """One person's motion over F frames, before grounding."""

    name: str
    global_orient: np.ndarray  # (F, 3) axis-angle
    body_pose: np.ndarray  # (F, 69) axis-angle
    root_xz: np.ndarray  # (F, 2) world pelvis position on the floor plane
    lift: np.ndarray  # (F,) metres above standing contact (jumps)


# ----------------------------------------------------------------------------- Euler helpers
def _set(eul: np.ndarray, part: str, axis: int, deg, right_deg=None) -> None:
    """Add `deg` (left convention) to joint `part` about `axis`; for a limb (`part` without side) to both sides."""
    if part in J:
        eul[:, J[part], axis] += np.deg2rad(deg)
        return
    sign = 1.0 if axis == 0 else -1.0
    eul[:, J[f"left_{part}"], axis] += np.deg2rad(deg)
    eul[:, J[f"right_{part}"], axis] += sign * np.deg2rad(deg if right_deg is None else right_deg)


def euler_to_body_pose(eul: np.ndarray) -> np.ndarray:
    """(F, 24, 3) Euler angles, clipped to ``LIMITS`` -> (F, 69) axis-angle body pose."""
    eul = np.clip(eul, LIMITS[None, :, :, 0], LIMITS[None, :, :, 1])
    aa = np.zeros((eul.shape[0], NUM_BODY_JOINTS, 3))
    for j in range(1, len(JOINT_NAMES)):
        order = ORDERS[j]
        angles = eul[:, j, ["XYZ".index(a) for a in order]]
        aa[:, j - 1] = Rotation.from_euler(order, angles).as_rotvec()
    return aa.reshape(len(eul), -1)


def body_pose_to_euler(body_pose: np.ndarray) -> np.ndarray:
    """(F, 69) axis-angle -> (F, 24, 3) Euler angles in each joint's order, reported as (x, y, z)."""
    aa = body_pose.reshape(len(body_pose), NUM_BODY_JOINTS, 3)
    eul = np.zeros((len(body_pose), len(JOINT_NAMES), 3))
    for j in range(1, len(JOINT_NAMES)):
        order = ORDERS[j]
        e = Rotation.from_rotvec(aa[:, j - 1]).as_euler(order)
        eul[:, j, ["XYZ".index(a) for a in order]] = e
    return eul


def root_orient(yaw: np.ndarray, pitch=0.0, roll=0.0) -> np.ndarray:
    """(F, 3) axis-angle of R = Ry(yaw) Rx(pitch) Rz(roll); yaw 0 faces +z."""
    ang = np.stack(np.broadcast_arrays(yaw, pitch, roll), axis=-1)
    return Rotation.from_euler("YXZ", ang).as_rotvec()


def relaxed(num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """(F, 24, 3) standing pose: arms down at the sides, elbows and knees slightly bent."""
    eul = np.zeros((num_frames, len(JOINT_NAMES), 3))
    _set(eul, "shoulder", 2, -rng.uniform(62, 75), -rng.uniform(62, 75))
    _set(eul, "elbow", 1, -rng.uniform(5, 20))
    _set(eul, "knee", 0, rng.uniform(0, 6))
    return eul


def _path(heading: np.ndarray, speed: float, dt: float, start: np.ndarray) -> np.ndarray:
    """(F, 2) xz positions from per-frame heading and a constant speed."""
    step = speed * dt * np.stack([np.sin(heading), np.cos(heading)], -1)
    return start + np.concatenate([np.zeros((1, 2)), np.cumsum(step[:-1], 0)])


# ----------------------------------------------------------------------------- motions
def _gait(eul: np.ndarray, phase: np.ndarray, amp: float) -> None:
    """Leg and arm swing of a walking cycle; `amp` in [0, 1] scales the stride."""
    s, c = np.sin(phase), np.cos(phase)
    _set(eul, "left_hip", 0, -28 * amp * s)
    _set(eul, "right_hip", 0, 28 * amp * s)
    _set(eul, "left_knee", 0, 5 + 50 * amp * np.maximum(c, 0) ** 2)
    _set(eul, "right_knee", 0, 5 + 50 * amp * np.maximum(-c, 0) ** 2)
    _set(eul, "left_ankle", 0, 8 * amp * s)
    _set(eul, "right_ankle", 0, -8 * amp * s)
    _set(eul, "left_shoulder", 0, 25 * amp * s)
    _set(eul, "right_shoulder", 0, -25 * amp * s)
    _set(eul, "elbow", 1, -10 * amp * (1 + s), -10 * amp * (1 - s))
    _set(eul, "spine2", 1, 6 * amp * s)


def walk(rng, num_frames: int, fps: float, start: np.ndarray, heading0: float, turn_rate: float = 0.0,
         speed: float | None = None, name: str = "walk") -> Motion:
    t = np.arange(num_frames) / fps
    speed = rng.uniform(0.7, 1.3) if speed is None else speed
    cadence = max(speed, 0.5) / rng.uniform(1.2, 1.5)  # strides per second, one stride = two steps
    phase = rng.uniform(0, 2 * np.pi) + 2 * np.pi * cadence * t
    eul = relaxed(num_frames, rng)
    _gait(eul, phase, min(1.0, 0.35 + 0.5 * speed))
    _set(eul, "spine1", 0, rng.uniform(0, 8))
    heading = heading0 + turn_rate * t
    yaw = heading + np.deg2rad(4) * np.sin(phase)
    path = _path(heading, speed, 1 / fps, start)
    return Motion(name, root_orient(yaw), euler_to_body_pose(eul), path, np.zeros(num_frames))


def turn(rng, num_frames: int, fps: float, start: np.ndarray, heading0: float) -> Motion:
    rate = np.deg2rad(rng.uniform(60, 120)) * rng.choice([-1, 1])
    return walk(rng, num_frames, fps, start, heading0, turn_rate=rate, speed=rng.uniform(0.0, 0.7), name="turn")


def wave(rng, num_frames: int, fps: float, start: np.ndarray, heading0: float) -> Motion:
    t = np.arange(num_frames) / fps
    eul = relaxed(num_frames, rng)
    side = rng.choice(["left", "right"])
    sign = 1.0 if side == "left" else -1.0
    j = J[f"{side}_shoulder"]
    eul[:, j, 2] = sign * np.deg2rad(rng.uniform(35, 65))  # upper arm raised above horizontal
    eul[:, j, 0] = np.deg2rad(-rng.uniform(0, 30))
    osc = np.sin(2 * np.pi * rng.uniform(1.5, 2.5) * t + rng.uniform(0, 2 * np.pi))
    eul[:, J[f"{side}_elbow"], 2] = sign * np.deg2rad(50 + rng.uniform(15, 28) * osc)  # forearm waves
    eul[:, J[f"{side}_elbow"], 1] = 0.0
    _set(eul, "neck", 1, rng.uniform(-20, 20))
    sway = np.deg2rad(3) * np.sin(2 * np.pi * 0.4 * t + rng.uniform(0, 2 * np.pi))
    _set(eul, "spine1", 2, np.rad2deg(sway))
    return Motion("wave", root_orient(np.full(num_frames, heading0)), euler_to_body_pose(eul),
                  np.repeat(start[None], num_frames, 0), np.zeros(num_frames))


def _crouch(eul: np.ndarray, depth: np.ndarray) -> None:
    """Squat shape scaled by `depth` in [0, 1]: thighs forward, shins back, feet flat, torso and arms forward."""
    _set(eul, "hip", 0, -100 * depth)
    _set(eul, "knee", 0, 120 * depth)
    _set(eul, "ankle", 0, -20 * depth)
    for s in ("spine1", "spine2", "spine3"):
        _set(eul, s, 0, 9 * depth)
    _set(eul, "shoulder", 0, -70 * depth)
    _set(eul, "neck", 0, -15 * depth)


def squat(rng, num_frames: int, fps: float, start: np.ndarray, heading0: float) -> Motion:
    t = np.arange(num_frames) / fps
    cycle = 2 * np.pi * rng.uniform(0.35, 0.7) * t + rng.uniform(0, 2 * np.pi)
    depth = rng.uniform(0.5, 0.95) * 0.5 * (1 - np.cos(cycle))
    eul = relaxed(num_frames, rng)
    _crouch(eul, depth)
    return Motion("squat", root_orient(np.full(num_frames, heading0)), euler_to_body_pose(eul),
                  np.repeat(start[None], num_frames, 0), np.zeros(num_frames))


def jump(rng, num_frames: int, fps: float, start: np.ndarray, heading0: float) -> Motion:
    """Crouch (0-0.3 of a cycle), flight (0.3-0.7, parabolic lift), landing crouch (0.7-1)."""
    t = np.arange(num_frames) / fps
    u = (t / rng.uniform(1.3, 1.6) + rng.uniform(0, 1)) % 1.0
    flight = (u > 0.3) & (u < 0.7)
    w = np.clip((u - 0.3) / 0.4, 0, 1)
    crouch = np.where(u <= 0.3, np.sin(np.pi * u / 0.3), 0) + np.where(u >= 0.7, np.sin(np.pi * (u - 0.7) / 0.3), 0)
    lift = np.where(flight, rng.uniform(0.15, 0.35) * 4 * w * (1 - w), 0.0)
    eul = relaxed(num_frames, rng)
    _crouch(eul, 0.45 * crouch)
    up = np.where(flight, np.sin(np.pi * w), 0.0)
    _set(eul, "shoulder", 0, 35 * crouch - 60 * up)
    _set(eul, "knee", 0, 25 * up)
    hop = rng.uniform(0, 0.3)  # forward distance per jump
    cycle = np.cumsum(np.diff(w, prepend=w[0]).clip(0))  # flights completed so far
    fwd = hop * cycle[:, None] * np.array([np.sin(heading0), np.cos(heading0)])
    return Motion("jump", root_orient(np.full(num_frames, heading0)), euler_to_body_pose(eul), start + fwd, lift)


def _smooth_noise(rng, t: np.ndarray, shape: tuple, freq=(0.15, 0.6), terms: int = 3) -> np.ndarray:
    """(F, *shape) sum of random sinusoids, each channel normalised to [-1, 1]."""
    out = np.zeros((len(t),) + shape)
    for _ in range(terms):
        f = rng.uniform(*freq, size=shape)
        ph = rng.uniform(0, 2 * np.pi, size=shape)
        out += rng.uniform(0.3, 1.0, size=shape) * np.sin(2 * np.pi * f * t[(...,) + (None,) * len(shape)] + ph)
    return out / np.abs(out).max(axis=0, keepdims=True).clip(1e-6)


# fraction of each joint's half range that dancing may use (legs kept modest so the feet stay planted)
_DANCE_AMP = {n: 0.5 for n in JOINT_NAMES}
_DANCE_AMP.update({n: 0.2 for n in JOINT_NAMES if n.endswith(("hip", "knee", "ankle", "foot"))})
_DANCE_AMP.update({n: 0.8 for n in JOINT_NAMES if n.endswith(("shoulder", "elbow"))})


def dance(rng, num_frames: int, fps: float, start: np.ndarray, heading0: float) -> Motion:
    """Smooth random motion of every joint within its limits, with a swaying root."""
    t = np.arange(num_frames) / fps
    eul = relaxed(num_frames, rng)
    amp = np.array([_DANCE_AMP[n] for n in JOINT_NAMES])[None, :, None]
    half = 0.5 * (LIMITS[..., 1] - LIMITS[..., 0])[None]
    eul += amp * half * _smooth_noise(rng, t, (len(JOINT_NAMES), 3))
    _set(eul, "knee", 0, 15 * (1 + _smooth_noise(rng, t, ())))
    root = _smooth_noise(rng, t, (5,), freq=(0.2, 0.8))
    yaw = heading0 + np.deg2rad(rng.uniform(15, 45)) * root[:, 0]
    go = root_orient(yaw, np.deg2rad(5) * root[:, 1], np.deg2rad(5) * root[:, 2])
    xz = start + rng.uniform(0.05, 0.25) * root[:, 3:5]
    return Motion("dance", go, euler_to_body_pose(eul), xz, np.zeros(num_frames))


GENERATORS = {"walk": walk, "turn": turn, "wave": wave, "squat": squat, "jump": jump, "dance": dance}


def make_motion(name: str, rng: np.random.Generator, num_frames: int, fps: float, start=(0.0, 0.0),
                heading: float = 0.0) -> Motion:
    """A motion by name; `start` is the pelvis xz at frame 0, `heading` the facing angle about y (0 = +z)."""
    if name not in GENERATORS:
        raise ValueError(f"unknown motion {name!r}; choose from {MOTIONS}")
    return GENERATORS[name](rng, num_frames, float(fps), np.asarray(start, dtype=np.float64), float(heading))


# ----------------------------------------------------------------------------- grounding
@torch.no_grad()
def ground(body_model, betas: np.ndarray, motions: list[Motion]) -> np.ndarray:
    """SMPL ``transl`` (P, F, 3): pelvis over ``root_xz``, the lowest vertex of each frame at y = ``lift``.

    SMPL rotates the body about the shaped pelvis joint and then adds ``transl``, so the posed pelvis lies at
    ``J0(betas) + transl``. Grounding per frame (not once at rest) keeps feet on the floor through squats.
    """
    go = torch.as_tensor(np.stack([m.global_orient for m in motions]), dtype=torch.float32)
    bp = torch.as_tensor(np.stack([m.body_pose for m in motions]), dtype=torch.float32)
    verts, joints = body_model(torch.as_tensor(betas, dtype=torch.float32), go, bp)  # (P, F, V, 3), (P, F, 24, 3)
    floor = verts[..., 1].amin(-1).numpy().astype(np.float64)  # (P, F)
    pelvis = joints[:, :, 0].numpy().astype(np.float64)  # (P, F, 3), the same every frame
    transl = np.zeros(floor.shape + (3,))
    transl[..., 0] = np.stack([m.root_xz[:, 0] for m in motions]) - pelvis[..., 0]
    transl[..., 2] = np.stack([m.root_xz[:, 1] for m in motions]) - pelvis[..., 2]
    transl[..., 1] = np.stack([m.lift for m in motions]) - floor
    return transl
