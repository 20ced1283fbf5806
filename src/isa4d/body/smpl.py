"""SMPL body model: loading (real SMPL files or the procedural toy body) and a batched wrapper.

Model files follow smplx's layout: ``<model_dir>/smpl/SMPL_{NEUTRAL,MALE,FEMALE}.pkl`` holding plain
numpy / scipy.sparse arrays (no chumpy). ``python -m data_prep.make_toy_body --out DIR`` writes a
license-free stand-in with the same layout; real SMPL files drop in unchanged (docs/body.md).
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
from pathlib import Path

import numpy as np
import smplx
import torch
from einops import pack, unpack
from smplx.utils import Struct

JOINT_NAMES = (
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2",
    "left_ankle", "right_ankle", "spine3", "left_foot", "right_foot", "neck", "left_collar",
    "right_collar", "head", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hand", "right_hand",
)
PARENTS = (-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21)
NUM_JOINTS = len(JOINT_NAMES)
GENDERS = ("neutral", "male", "female")

PART_NAMES = (
    "head", "torso", "left_upper_arm", "left_lower_arm", "left_hand", "right_upper_arm",
    "right_lower_arm", "right_hand", "left_upper_leg", "left_lower_leg", "left_foot",
    "right_upper_leg", "right_lower_leg", "right_foot",
)
# a vertex belongs to the part of its dominant skinning joint
JOINT_TO_PART = {
    "pelvis": "torso", "spine1": "torso", "spine2": "torso", "spine3": "torso",
    "left_collar": "torso", "right_collar": "torso", "neck": "head", "head": "head",
    "left_hip": "left_upper_leg", "left_knee": "left_lower_leg", "left_ankle": "left_foot",
    "left_foot": "left_foot", "left_shoulder": "left_upper_arm", "left_elbow": "left_lower_arm",
    "left_wrist": "left_hand", "left_hand": "left_hand",
}
JOINT_TO_PART.update({k.replace("left", "right"): v.replace("left", "right")
                      for k, v in JOINT_TO_PART.items() if k.startswith("left")})
JOINT_PART_IDS = np.array([PART_NAMES.index(JOINT_TO_PART[n]) for n in JOINT_NAMES], dtype=np.int64)
PARTS_JSON = "toy_body_parts.json"


def model_file(model_dir, gender: str = "neutral") -> Path:
    """Path of ``SMPL_{GENDER}.pkl`` under ``model_dir/smpl/`` (or directly in ``model_dir``)."""
    gender = gender.lower()
    if gender not in GENDERS:
        raise ValueError(f"gender must be one of {GENDERS}, got {gender!r}")
    name = f"SMPL_{gender.upper()}.pkl"
    root = Path(model_dir)
    for cand in (root / "smpl" / name, root / name):
        if cand.is_file():
            return cand
    raise FileNotFoundError(
        f"SMPL model not found: {root / 'smpl' / name}; point `body_model_dir` at a folder holding "
        f"smpl/SMPL_{{NEUTRAL,MALE,FEMALE}}.pkl (see docs/body.md), or run `make toy-body` "
        f"(python -m data_prep.make_toy_body --out {root})")


def _chumpy_error(path: Path) -> RuntimeError:
    return RuntimeError(
        f"{path} is a chumpy pickle (the format of the original SMPL download). Convert it once to "
        "plain numpy arrays, e.g. with smplx's tools/clean_ch.py in a scratch environment that has "
        "chumpy (see docs/body.md); isa4d never imports chumpy.")


def load_model_data(model_dir, gender: str = "neutral") -> dict:
    """The raw model dict (numpy arrays) of ``SMPL_{GENDER}.pkl``; rejects chumpy pickles."""
    path = model_file(model_dir, gender)
    try:
        with open(path, "rb") as fh:
            data = pickle.load(fh, encoding="latin1")
    except ModuleNotFoundError as err:
        if "chumpy" in str(err):
            raise _chumpy_error(path) from err
        raise
    if not isinstance(data, dict):
        raise RuntimeError(f"{path} does not hold an SMPL model dict")
    if any(type(v).__module__.split(".")[0] == "chumpy" for v in data.values()):
        raise _chumpy_error(path)
    required = {"v_template", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table", "f"}
    missing = required - set(data)
    if missing:
        raise RuntimeError(f"{path} is missing SMPL keys {sorted(missing)}")
    return data


def load_body_model(model_dir, gender: str = "neutral", batch_size: int = 1, **kwargs) -> smplx.SMPL:
    """``smplx.SMPL`` for ``model_dir/smpl/SMPL_{GENDER}.pkl``.

    Uses the file's own ``vertex_ids`` (extra keypoints; the toy body stores them) unless given in
    ``kwargs``; other ``kwargs`` go to ``smplx.create`` (e.g. ``create_betas=False``).
    """
    data = load_model_data(model_dir, gender)
    vertex_ids = kwargs.pop("vertex_ids", None) or data.get("vertex_ids")
    if vertex_ids is not None:
        kwargs["vertex_ids"] = {k: int(v) for k, v in vertex_ids.items()}
    with contextlib.redirect_stdout(io.StringIO()):  # smplx prints a warning for 10-beta models
        return smplx.create(str(model_file(model_dir, gender)), model_type="smpl", gender=gender.lower(),
                            batch_size=batch_size, data_struct=Struct(**data), **kwargs)


def part_ids_from_weights(weights) -> np.ndarray:
    """(V,) part id (index into ``PART_NAMES``) of each vertex's dominant skinning joint."""
    return JOINT_PART_IDS[np.argmax(np.asarray(weights), axis=1)]


def part_ids(model_dir, gender: str = "neutral") -> np.ndarray:
    """(V,) body-part id per vertex, indexing ``PART_NAMES``.

    Toy body: the stored ``part_ids`` (with ids mapped by name through ``toy_body_parts.json`` when
    present). Real SMPL (no part data): argmax of the skinning weights through ``JOINT_TO_PART``.
    """
    data = load_model_data(model_dir, gender)
    if "part_ids" not in data:
        return part_ids_from_weights(data["weights"])
    ids = np.asarray(data["part_ids"], dtype=np.int64)
    names_file = model_file(model_dir, gender).parent / PARTS_JSON
    if names_file.is_file():
        names = json.loads(names_file.read_text())
        lut = np.full(max(names.values()) + 1, -1, dtype=np.int64)
        for name, i in names.items():
            lut[i] = PART_NAMES.index(name)
        ids = lut[ids]
    return ids


class BodyModel(torch.nn.Module):
    """Batched SMPL with arbitrary leading dims and a time axis.

    ``forward(betas (..., 10) or (..., T, 10), global_orient (..., T, 3), body_pose (..., T, 69),
    transl (..., T, 3) or None) -> (vertices (..., T, V, 3), joints (..., T, 24, 3))``.
    The model holds no parameters, and its buffers (SMPL data, faces, part ids) are non-persistent,
    so checkpoints never embed (licensed) body model data.
    """

    def __init__(self, model_dir, gender: str = "neutral", dtype=torch.float32):
        super().__init__()
        self.smpl = load_body_model(model_dir, gender, create_betas=False, create_global_orient=False,
                                    create_body_pose=False, create_transl=False, dtype=dtype)
        for mod in self.smpl.modules():
            mod._non_persistent_buffers_set.update(mod._buffers.keys())
        self.register_buffer("faces", self.smpl.faces_tensor.clone(), persistent=False)
        self.register_buffer("part_ids", torch.as_tensor(part_ids(model_dir, gender)), persistent=False)
        self.gender = gender.lower()

    @property
    def num_betas(self) -> int:
        return self.smpl.num_betas

    @property
    def num_verts(self) -> int:
        return self.smpl.v_template.shape[0]

    def forward(self, betas, global_orient, body_pose, transl=None):
        dtype = self.smpl.v_template.dtype
        frames = global_orient.shape[:-1]  # (..., T)
        if betas.dim() == global_orient.dim() - 1:  # per sequence -> per frame
            betas = betas.unsqueeze(-2)
        betas = betas.to(dtype).expand(*frames, betas.shape[-1])
        if transl is None:
            transl = global_orient.new_zeros(*frames, 3)
        go, ps = pack([global_orient.to(dtype)], "* c")
        bp, tr, be = (pack([x], "* c")[0] for x in (body_pose.to(dtype), transl.to(dtype), betas))
        out = self.smpl(betas=be, global_orient=go, body_pose=bp, transl=tr)
        (verts,) = unpack(out.vertices, ps, "* v c")
        (joints,) = unpack(out.joints[:, :NUM_JOINTS], ps, "* j c")
        return verts, joints
