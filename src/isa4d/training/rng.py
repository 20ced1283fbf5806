"""The training steps' random state, isolated from everything between them and saved in checkpoints.

Training draws random numbers (posterior samples, augmentation, dropout, timesteps) from the global torch,
numpy and python generators. Between two training steps other code draws from them too: validation, the
creation of a loader iterator (DataLoader seeds its workers from torch's generator), a sanity check. A resumed
run does that work at other moments than the run that never stopped, so restoring the generators at load time
is not enough for an exact resume. `TrainingRNG` keeps the state the training steps see apart: it snapshots
the generators at the end of each training batch and puts them back at the start of the next, and checkpoints
the snapshot of every rank. At the start of a multi-process run every rank is reseeded from (the seed of
`seed_everything`, rank), so ranks draw different noise and augmentations instead of the same. On resume with
the same world size each rank continues its own stream; with another world size each rank is reseeded from
(seed, global_step, rank) with a warning (an exact resume is undefined there anyway).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning as L
import numpy as np
import torch

log = logging.getLogger("isa4d.rng")


def collect() -> dict[str, Any]:
    """The global generators' states, in types safe for `torch.load(weights_only=True)`."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_gauss":
             random.getstate()[2], "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def reseed(*entropy: int) -> None:
    """Seed torch, numpy and python from a hash of `entropy`."""
    s = np.random.SeedSequence([int(e) for e in entropy]).generate_state(2)
    torch.manual_seed(int(s[0]))
    np.random.seed(int(s[1]))
    random.seed(int(s[0]))


class TrainingRNG(L.Callback):
    """Isolate and checkpoint the random state of training steps (module doc)."""

    def __init__(self) -> None:
        self._snapshot: dict[str, Any] | None = None
        self._loaded: list[dict[str, Any]] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse a mid-run resume on ordered epochs: their clip order does not follow from the step, so the
        resumed run would start the epoch over (repeating its first clips) instead of continuing it."""
        datamodule = getattr(trainer, "datamodule", None)
        if trainer.ckpt_path is not None and trainer.global_step > 0 and getattr(datamodule, "resampled", True) is False:
            raise ValueError(
                f"cannot resume {trainer.ckpt_path} (step {trainer.global_step}) exactly with data.resampled=false: "
                f"ordered epochs restart on resume and would repeat the clips already trained on; train with "
                f"--data.init_args.resampled=true (the default: resumes at the step's batch) or start a new run")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._loaded is not None:
            self._resume(trainer)
        elif self._snapshot is None and trainer.world_size > 1:  # a fresh multi-process run
            reseed(torch.initial_seed(), trainer.global_rank)
        if self._snapshot is not None:
            restore(self._snapshot)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._snapshot = collect()

    def _resume(self, trainer: L.Trainer) -> None:
        states, self._loaded = self._loaded, None
        if len(states) == trainer.world_size:
            self._snapshot = states[trainer.global_rank]
            return
        if trainer.is_global_zero:
            log.warning("checkpoint RNG states are for %d ranks, this run has %d: reseeding each rank from "
                        "(seed, step, rank)", len(states), trainer.world_size)
        reseed(torch.initial_seed(), trainer.global_step, trainer.global_rank)
        self._snapshot = collect()

    def state_dict(self) -> dict[str, Any]:
        local = self._snapshot or collect()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, local)  # called on every rank while saving
        else:
            states = [local]
        return {"per_rank": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict["per_rank"]
