"""Body models: SMPL loading (real files or the procedural toy body) and a batched wrapper."""

from isa4d.body.smpl import (
    GENDERS,
    JOINT_NAMES,
    JOINT_TO_PART,
    NUM_JOINTS,
    PARENTS,
    PART_NAMES,
    BodyModel,
    load_body_model,
    load_model_data,
    model_file,
    part_ids,
    part_ids_from_weights,
)

__all__ = [
    "GENDERS", "JOINT_NAMES", "JOINT_TO_PART", "NUM_JOINTS", "PARENTS", "PART_NAMES", "BodyModel",
    "load_body_model", "load_model_data", "model_file", "part_ids", "part_ids_from_weights",
]
