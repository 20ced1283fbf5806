"""All parallelism of isa4d (STYLE.md rule 7): FSDP2 with checkpointing and compile per unit, the strategy that
checkpoints it. Model code only declares its wrap units (`fsdp_units`, `fsdp_forward_methods`)."""

from isa4d.parallel.fsdp import (
    ParallelConfig,
    checkpoint_and_compile,
    configure_parallel,
    data_parallel_mesh,
    keep_frozen,
    parallelize,
    reshard,
    shard_like,
    wrap_units,
)
from isa4d.parallel.strategy import FSDP2Strategy

__all__ = [
    "FSDP2Strategy",
    "ParallelConfig",
    "checkpoint_and_compile",
    "configure_parallel",
    "data_parallel_mesh",
    "keep_frozen",
    "parallelize",
    "reshard",
    "shard_like",
    "wrap_units",
]
