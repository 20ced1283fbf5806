"""SMPL motions for `isa4d sample`: load one person's motion file in isa4d's world, lay several people out.

Two layouts are read (docs/inference.md, "Motion files"): the contract's `smpl.npz` (docs/data_format.md) and
AMASS-style npz (`poses`, `trans`, `betas`, `mocap_framerate`). isa4d's world is metres, y up, with the body
facing +z in its rest pose (docs/body.md); AMASS is z up, so its motions are rotated into it.

Rotating a motion about the world origin is more than rotating `global_orient` and `transl`: SMPL turns the
body about the shaped rest pelvis J0(betas), then adds `transl`, so a posed point is
x = R_g (x_rest - J0) + J0 + transl. Applying R gives R R_g (x_rest - J0) + J0 + [R (transl + J0) - J0]: the
root orientation becomes R R_g and the translation R (transl + J0) - J0. J0 depends on betas and on the body
model's gender, so conversion needs the body model the sampler will pose the bodies with.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from einops import rearrange
from scipy.spatial.transform import Rotation

from isa4d.body.smpl import GENDERS, BodyModel, model_file
from isa4d.data.contract import NUM_BETAS, SampleError, SMPLSequence, parse_smpl

# AMASS-style `poses` widths: global orient + body joints (+ hand / face joints that isa4d's SMPL lacks).
POSE_LAYOUTS = {
    66: "SMPL without hand joints: global orient + 21 body joints",
    72: "SMPL: global orient + 23 body joints",
    156: "SMPL-H: global orient + 21 body joints + 2 x 15 hand joints",
    165: "SMPL-X: global orient + 21 body joints + jaw + 2 eyes + 2 x 15 hand joints",
}
CONTRACT_KEYS = ("betas", "global_orient", "body_pose", "transl")
AMASS_KEYS = ("poses", "trans", "betas")
FPS_KEYS = ("mocap_framerate", "mocap_frame_rate", "fps")
# R_x(-90 deg): z up -> y up, (x, y, z) -> (x, z, -y).
Z_UP_TO_Y_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
# Beyond these a file is almost surely in other units; `check_units=False` skips the check.
MAX_TRANSLATION_M = 100.0
MAX_ANGLE_RAD = 4 * math.pi

Arrays = dict[str, np.ndarray | None]  # an npz's arrays; None for pickled object arrays (never unpickled)


class MotionError(ValueError):
    """A motion file that cannot be used; the message names the file, the key and the reason."""

    def __init__(self, path: str | Path, key: str | None, reason: str):
        super().__init__(f"{path} {reason}" if key is None else f"{path}: '{key}' {reason}")
        self.path, self.key, self.reason = str(path), key, reason


@dataclass
class Motion:
    """SMPL parameters of P people in isa4d's world (float32), their frame rate and the body's gender."""

    smpl: SMPLSequence
    fps: float
    gender: str = "neutral"

    @property
    def num_frames(self) -> int:
        return self.smpl.num_frames


# ----------------------------------------------------------------------------------------------- body model


@functools.lru_cache(maxsize=4)
def _body_model(model_dir: str, gender: str) -> BodyModel:
    """One float64 BodyModel per (folder, gender): motions are converted in float64, cast once at the end."""
    return BodyModel(model_dir, gender, dtype=torch.float64)


def _tensors(*arrays: np.ndarray) -> list[torch.Tensor]:
    return [torch.as_tensor(np.asarray(a, dtype=np.float64)) for a in arrays]


def rest_pelvis(betas: np.ndarray, body_model_dir: str | Path, gender: str = "neutral") -> np.ndarray:
    """J0: the rest-pose pelvis joint (P, 3) of betas (P, 10), about which SMPL turns `global_orient`."""
    P = len(betas)
    b, go, bp = _tensors(betas, np.zeros((P, 1, 3)), np.zeros((P, 1, 69)))
    with torch.no_grad():
        _, joints = _body_model(str(body_model_dir), gender)(b, go, bp)  # (P, 1, 24, 3)
    return joints[:, 0, 0].numpy()


def posed_vertices(smpl: SMPLSequence, body_model_dir: str | Path, gender: str = "neutral",
                   frames: np.ndarray | None = None) -> np.ndarray:
    """Vertices (P, F', V, 3) of the bodies at `frames` (default: all), float64."""
    s = smpl if frames is None else smpl.take(frames)
    with torch.no_grad():
        verts, _ = _body_model(str(body_model_dir), gender)(
            *_tensors(s.betas, s.global_orient, s.body_pose, s.transl))  # (P, F', V, 3)
    return verts.numpy()


def look_target(smpl: SMPLSequence, body_model_dir: str | Path, gender: str = "neutral") -> np.ndarray:
    """(3,) the pelvis averaged over people and frames: where camera paths look.

    The posed pelvis is exactly J0(betas) + transl (the root turns about J0), so nothing is posed.
    """
    pelvis = smpl.transl + rest_pelvis(smpl.betas, body_model_dir, gender)[:, None]  # (P, F, 3)
    return pelvis.reshape(-1, 3).mean(0)


# -------------------------------------------------------------------------------------------- pure transforms


def rotate_world(smpl: SMPLSequence, rotation: np.ndarray, pelvis: np.ndarray) -> SMPLSequence:
    """The motion in a world rotated by `rotation` (3, 3) about its origin; `pelvis` is J0 (P, 3).

    Posed vertices map exactly to rotation @ vertices (see the module docstring for the translation).
    """
    R = np.asarray(rotation, dtype=np.float64)
    Rg = Rotation.from_rotvec(smpl.global_orient.reshape(-1, 3).astype(np.float64))
    go = (Rotation.from_matrix(R) * Rg).as_rotvec().reshape(smpl.global_orient.shape)  # (P, F, 3)
    j0 = np.asarray(pelvis, dtype=np.float64)[:, None]  # (P, 1, 3)
    transl = (smpl.transl + j0) @ R.T - j0  # (P, F, 3)
    return SMPLSequence(smpl.betas, go, smpl.body_pose, transl)


def heading(global_orient: np.ndarray) -> np.ndarray:
    """Angle (...,) about +y from +z to the body's facing direction R_g @ +z on the ground, radians."""
    forward = Rotation.from_rotvec(global_orient.reshape(-1, 3)).apply([0.0, 0.0, 1.0])  # (N, 3)
    forward = forward.reshape(global_orient.shape)
    return np.arctan2(forward[..., 0], forward[..., 2])


def resample(smpl: SMPLSequence, source_fps: float, fps: float) -> SMPLSequence:
    """The motion at `fps` from frame 0 to the last source frame: joints slerped, `transl` lerped.

    Output frame k lies at source position k * source_fps / fps. Frames that land on a source frame are
    copied unchanged, so 30 -> 15 fps keeps every second frame exactly.
    """
    F = smpl.num_frames
    n = int(math.floor((F - 1) * fps / source_fps + 1e-9)) + 1
    pos = np.arange(n) * (source_fps / fps)  # (n,) source positions
    i0 = np.minimum(np.floor(pos + 1e-9).astype(np.int64), max(F - 2, 0))
    i1 = np.minimum(i0 + 1, F - 1)
    a = np.clip(pos - i0, 0.0, 1.0)  # (n,) weight of frame i1
    rot = np.concatenate([smpl.global_orient[:, :, None],
                          rearrange(smpl.body_pose, "p f (j c) -> p f j c", c=3)], axis=2)  # (P, F, 24, 3)
    r0, r1 = rot[:, i0].astype(np.float64), rot[:, i1].astype(np.float64)  # (P, n, 24, 3)
    q0 = Rotation.from_rotvec(r0.reshape(-1, 3))
    step = (q0.inv() * Rotation.from_rotvec(r1.reshape(-1, 3))).as_rotvec()  # shortest arc, (P n 24, 3)
    w = np.broadcast_to(a[None, :, None, None], r0.shape[:3] + (1,)).reshape(-1, 1)
    slerped = (q0 * Rotation.from_rotvec(w * step)).as_rotvec().reshape(r0.shape)
    out = np.where(a[None, :, None, None] < 1e-9, r0, slerped)  # (P, n, 24, 3)
    transl = smpl.transl[:, i0] * (1 - a)[None, :, None] + smpl.transl[:, i1] * a[None, :, None]  # (P, n, 3)
    return SMPLSequence(smpl.betas, out[:, :, 0], rearrange(out[:, :, 1:], "p f j c -> p f (j c)"), transl)


def trim(smpl: SMPLSequence, start: int = 0, num_frames: int | None = None) -> SMPLSequence:
    """Frames [start, start + num_frames) (to the end when num_frames is None); ValueError when too short."""
    F = smpl.num_frames
    stop = F if num_frames is None else start + num_frames
    if start < 0 or start >= F or (num_frames is not None and num_frames < 1) or stop > F:
        want = "to the end" if num_frames is None else f"{num_frames} frame(s)"
        raise ValueError(f"asked for {want} from frame {start}, the motion has {F} frame(s) (0..{F - 1})")
    return smpl.take(np.arange(start, stop))


def place_on_ground(smpl: SMPLSequence, body_model_dir: str | Path, gender: str = "neutral") -> SMPLSequence:
    """Shift each person vertically so their lowest vertex in frame 0 is at y = 0 (one frame is posed)."""
    lowest = posed_vertices(smpl, body_model_dir, gender, frames=np.array([0]))[:, 0, :, 1].min(-1)  # (P,)
    transl = smpl.transl.copy()
    transl[..., 1] -= lowest[:, None]
    return SMPLSequence(smpl.betas, smpl.global_orient, smpl.body_pose, transl)


# ---------------------------------------------------------------------------------------------------- reading


def _read_npz(path: Path) -> Arrays:
    """Every array of the file; None for pickled object arrays (AMASS SMPL-X files hold some)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such motion file")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: _array_or_none(z, k) for k in z.files}
    except Exception as e:  # zipfile and value errors all mean the same to the user
        raise MotionError(path, None, f"is not a readable npz ({type(e).__name__}: {e})") from e


def _array_or_none(z, key: str) -> np.ndarray | None:
    try:
        return z[key]
    except ValueError:  # "Object arrays cannot be loaded when allow_pickle=False"
        return None


def _number_array(z: Arrays, path: Path, key: str) -> np.ndarray:
    if key not in z:
        raise MotionError(path, key, f"is missing (the file has {sorted(z)})")
    a = z[key]
    if a is None:
        raise MotionError(path, key, "holds pickled Python objects, expected a numeric array")
    if not np.issubdtype(a.dtype, np.number):
        raise MotionError(path, key, f"has dtype {a.dtype}, expected numbers")
    if not np.isfinite(a).all():
        raise MotionError(path, key, "holds NaN or inf")
    return a.astype(np.float64)


def _read_amass(z: Arrays, path: Path) -> SMPLSequence:
    """AMASS `poses (F, 66|72|156|165)`, `trans (F, 3)`, `betas (>=10,)` -> SMPLSequence (P=1), hands dropped.

    SMPL's hand joints (22, 23) are set to zero: SMPL-H/X hands are fingers, which SMPL cannot express.
    """
    poses, trans = _number_array(z, path, "poses"), _number_array(z, path, "trans")
    betas = _number_array(z, path, "betas").reshape(-1)[:NUM_BETAS]
    if poses.ndim != 2 or poses.shape[1] not in POSE_LAYOUTS:
        layouts = "; ".join(f"{w} ({d})" for w, d in POSE_LAYOUTS.items())
        raise MotionError(path, "poses", f"has shape {poses.shape}, expected (frames, width) with width one "
                          f"of: {layouts}")
    if trans.ndim != 2 or trans.shape[1] != 3:
        raise MotionError(path, "trans", f"has shape {trans.shape}, expected (frames, 3)")
    if trans.shape[0] != poses.shape[0]:
        raise MotionError(path, "trans", f"has {trans.shape[0]} frames, 'poses' has {poses.shape[0]}")
    F = poses.shape[0]
    body = poses[:, 3:72] if poses.shape[1] == 72 else np.concatenate([poses[:, 3:66], np.zeros((F, 6))], 1)
    betas = np.pad(betas, (0, NUM_BETAS - len(betas)))
    return SMPLSequence(betas[None], poses[None, :, :3], body[None], trans[None])


def _read_contract(path: Path, person: int) -> SMPLSequence:
    """One person of a contract smpl.npz, checked by the loader's own parser."""
    try:
        smpl = parse_smpl(path.read_bytes(), key=str(path), name=path.name)
    except SampleError as e:  # its message is "<path>: <file>['<key>'] <reason>"
        reason = str(e).removeprefix(f"{path}: ")
        raise MotionError(path, None, f"is not a valid contract smpl.npz: {reason}") from e
    if not 0 <= person < smpl.num_people:
        raise MotionError(path, "betas", f"holds {smpl.num_people} people, asked for person {person}")
    one = slice(person, person + 1)
    return SMPLSequence(*(np.asarray(a[one], np.float64)
                          for a in (smpl.betas, smpl.global_orient, smpl.body_pose, smpl.transl)))


def _check_units(smpl: SMPLSequence, path: Path, amass: bool) -> None:
    """Catch files in millimetres / centimetres or degrees before they turn into a garbled video."""
    tkey, gkey, bkey = ("trans", "poses", "poses") if amass else ("transl", "global_orient", "body_pose")
    big = np.abs(smpl.transl).max()
    if big > MAX_TRANSLATION_M:
        raise MotionError(path, tkey, f"reaches {big:.0f}: that looks like millimetres or centimetres; isa4d "
                          "expects metres (divide by 1000 or 100), or pass check_units=False")
    angles = [np.linalg.norm(x.reshape(-1, 3), axis=-1).max(initial=0.0)
              for x in (smpl.global_orient, smpl.body_pose)]
    if max(angles) > MAX_ANGLE_RAD:
        raise MotionError(path, gkey if angles[0] > MAX_ANGLE_RAD else bkey,
                          f"has a rotation of {max(angles):.1f} rad (> 4 pi): degrees? isa4d expects "
                          "axis-angle in radians; or pass check_units=False")


def _source_fps(z: Arrays, path: Path, source_fps: float | None) -> float:
    key = "source_fps"
    if source_fps is None:
        key = next((k for k in FPS_KEYS if k in z), None)
        if key is None:
            raise MotionError(path, None, f"has no frame rate (none of {list(FPS_KEYS)}); pass source_fps")
        source_fps = float(_number_array(z, path, key).reshape(-1)[0])
    if not math.isfinite(source_fps) or source_fps <= 0:
        raise MotionError(path, key, f"is {source_fps}, expected a positive frame rate")
    return float(source_fps)


def _gender(z: Arrays, path: Path, gender: str | None, body_model_dir: str | Path | None) -> str:
    """The explicit gender, else the file's (neutral where the file has none or its model file is missing)."""
    if gender is not None:
        if gender.lower() not in GENDERS:
            raise ValueError(f"gender must be one of {GENDERS}, got {gender!r}")
        return gender.lower()
    if "gender" not in z:
        return "neutral"
    if z["gender"] is None or z["gender"].size != 1:
        raise MotionError(path, "gender", "must be one string (or pass gender=)")
    raw = z["gender"].reshape(-1)[0]
    found = (raw.decode() if isinstance(raw, bytes) else str(raw)).strip().lower()
    if found not in GENDERS:
        raise MotionError(path, "gender", f"is {found!r}, expected one of {GENDERS} (or pass gender=)")
    if body_model_dir is not None and found != "neutral":
        try:
            model_file(body_model_dir, found)
        except FileNotFoundError:  # as the DiT's body conditioning does (models/dit/conditions.py)
            warnings.warn(f"{path}: no SMPL_{found.upper()}.pkl in {body_model_dir}; using the neutral body",
                          stacklevel=3)
            return "neutral"
    return found


def _needs_body(body_model_dir: str | Path | None, path: Path, why: str) -> str | Path:
    if body_model_dir is None:
        raise ValueError(f"{path}: {why} needs the body model (pass body_model_dir)")
    return body_model_dir


def load_motion(
    path: str | Path,
    *,
    body_model_dir: str | Path | None = None,
    gender: str | None = None,
    person: int = 0,
    up_axis: Literal["y", "z"] | None = None,
    face_forward: bool = False,
    source_fps: float | None = None,
    fps: float | None = None,
    start: int = 0,
    num_frames: int | None = None,
    ground: bool = False,
    check_units: bool = True,
) -> Motion:
    """One person's motion from a contract `smpl.npz` or an AMASS-style npz, in isa4d's world (P = 1).

    In order: read and check; rotate to y up (`up_axis`: default "z" for AMASS files, "y" for contract
    files); turn about +y so frame 0 faces +z (`face_forward`); resample to `fps`; keep output frames
    [start, start + num_frames); put frame 0's lowest vertex on y = 0 (`ground`). Rotating and grounding need
    `body_model_dir` and use the body of `gender` (default: the file's `gender`, else neutral), which the
    sampler must pose the bodies with too. `person` picks one of a contract file's people; `source_fps`
    overrides (or supplies) the file's frame rate.
    """
    path = Path(path)
    z = _read_npz(path)
    amass = "poses" in z
    if amass:
        smpl = _read_amass(z, path)
    elif "body_pose" in z or "global_orient" in z:
        smpl = _read_contract(path, person)
    else:
        raise MotionError(path, None, f"is neither a contract smpl.npz ({list(CONTRACT_KEYS)}) nor an "
                          f"AMASS-style npz ({list(AMASS_KEYS)} and a frame rate); it has {sorted(z)}")
    if check_units:
        _check_units(smpl, path, amass)
    rate = _source_fps(z, path, source_fps)
    gender = _gender(z, path, gender, body_model_dir)
    up_axis = up_axis or ("z" if amass else "y")
    if up_axis not in ("y", "z"):
        raise ValueError(f"up_axis must be 'y' or 'z', got {up_axis!r}")
    if up_axis == "z":
        model_dir = _needs_body(body_model_dir, path, "rotating a z-up motion to y up")
        smpl = rotate_world(smpl, Z_UP_TO_Y_UP, rest_pelvis(smpl.betas, model_dir, gender))
    if face_forward:
        model_dir = _needs_body(body_model_dir, path, "face_forward")
        turn = Rotation.from_rotvec([0.0, -heading(smpl.global_orient[0, 0]), 0.0]).as_matrix()
        smpl = rotate_world(smpl, turn, rest_pelvis(smpl.betas, model_dir, gender))
    if fps is not None:
        if not math.isfinite(fps) or fps <= 0:
            raise ValueError(f"fps must be a positive frame rate, got {fps}")
        smpl = resample(smpl, rate, fps)
    out_fps = rate if fps is None else float(fps)
    try:
        smpl = trim(smpl, start, num_frames)
    except ValueError as e:
        key = "poses" if amass else "transl"
        raise MotionError(path, key, f"is too short at {out_fps:g} fps: {e}") from e
    if ground:
        smpl = place_on_ground(smpl, _needs_body(body_model_dir, path, "ground"), gender)
    return Motion(_float32(smpl), out_fps, gender)


def _float32(smpl: SMPLSequence) -> SMPLSequence:
    return SMPLSequence(*(np.ascontiguousarray(a, dtype=np.float32)
                          for a in (smpl.betas, smpl.global_orient, smpl.body_pose, smpl.transl)))


# ------------------------------------------------------------------------------------------ several people


def side_by_side(num_people: int, spacing: float = 1.0) -> np.ndarray:
    """(P, 3) offsets along x, `spacing` metres apart and centred on x = 0."""
    x = (np.arange(num_people) - (num_people - 1) / 2) * spacing
    return np.stack([x, np.zeros(num_people), np.zeros(num_people)], 1)


def combine_people(
    motions: Sequence[Motion],
    offsets: np.ndarray | Sequence[Sequence[float]] | None = None,
    spacing: float = 1.0,
    recenter: bool = True,
    on_length_mismatch: Literal["warn", "error"] = "warn",
) -> Motion:
    """Single-person motions -> one Motion with P people in one world.

    With `recenter`, each person's frame-0 translation is first moved to x = z = 0 (height kept), so motions
    captured in different places start together; then `offsets` (P, 3) metres are added to each person's
    translation. The default offsets stand people `spacing` apart along x, centred on 0 (`side_by_side`).
    recenter=False with zero offsets keeps people captured in one world where they were. Frame counts are
    trimmed to the shortest with a warning (a ValueError with on_length_mismatch="error").
    """
    if not motions:
        raise ValueError("combine_people needs at least one motion")
    people = [m.smpl.num_people for m in motions]
    if any(p != 1 for p in people):
        raise ValueError(f"combine_people takes single-person motions; got {people} people")
    rates = [m.fps for m in motions]
    if any(not math.isclose(r, rates[0], rel_tol=1e-6) for r in rates):
        raise ValueError(f"people have different frame rates {rates}: load them with the same fps=")
    genders = sorted({m.gender for m in motions})
    if len(genders) > 1:
        raise ValueError(f"people use different body models {genders}; a sample is posed with one gender: "
                         "load them with the same gender=")
    P, lengths = len(motions), [m.num_frames for m in motions]
    F = min(lengths)
    if len(set(lengths)) > 1:
        message = f"people have {lengths} frames; trimming all to the shortest ({F})"
        if on_length_mismatch == "error":
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
    offsets = side_by_side(P, spacing) if offsets is None else np.asarray(offsets, dtype=np.float64)
    if offsets.shape != (P, 3):
        raise ValueError(f"offsets must have shape ({P}, 3) (one x, y, z per person), got {offsets.shape}")
    transl = np.concatenate([m.smpl.transl[:, :F] for m in motions]).astype(np.float64)  # (P, F, 3)
    if recenter:
        transl[..., [0, 2]] -= transl[:, :1, [0, 2]]
    transl += offsets[:, None]
    smpl = SMPLSequence(
        np.concatenate([m.smpl.betas for m in motions]),
        np.concatenate([m.smpl.global_orient[:, :F] for m in motions]),
        np.concatenate([m.smpl.body_pose[:, :F] for m in motions]),
        transl,
    )
    return Motion(_float32(smpl), rates[0], genders[0])
