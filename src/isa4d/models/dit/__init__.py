"""ISA-DiT: the stage-2 diffusion transformer with interspatial attention (paper §2-3)."""

from isa4d.models.dit.conditions import DiTConditions, PoseConditioner
from isa4d.models.dit.embeddings import CONDITIONS
from isa4d.models.dit.transformer import ISADiT

__all__ = ["CONDITIONS", "DiTConditions", "ISADiT", "PoseConditioner"]
