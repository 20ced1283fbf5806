"""Surviving faults: non-finite losses and preemption.

`NonFiniteGuard` skips an optimizer step whose loss (or, under automatic optimisation, any gradient) is not
finite, counts the skips (`train/nonfinite_skips`, and the streak) and after `max_consecutive` in a row stops
the run with NonFiniteLossError; the weights never saw the bad step, so the last checkpoint is a good one.
Manual optimisation cooperates with one line before its backward:

    if not finite_or_skip(self, loss):
        return

All ranks agree on the decision (one all-reduce), so a NaN on one rank never leaves the others waiting in
FSDP's collectives.

`Preemption` saves and stops on SIGUSR1 (SLURM sends it ahead of a time limit or preemption with
`#SBATCH --signal=USR1@120`): the handler only sets a flag; at the next batch end all ranks agree, save the
`last` checkpoint (atomically, through isa4d.training.checkpoint), requeue the job under SLURM if asked, and
exit cleanly. Saving inside the signal handler itself, as Lightning's SLURM connector does, would start
collectives at a different point on each rank.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from typing import Any

import lightning as L
import torch

log = logging.getLogger("isa4d.faults")


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run is diverging (learning rate, data, precision)."""


def _all_finite(trainer: L.Trainer | None, value: torch.Tensor) -> bool:
    finite = torch.isfinite(value.detach()).all().float()
    if trainer is not None and trainer.world_size > 1:
        finite = trainer.strategy.reduce(finite, reduce_op="min")
    return bool(finite.item() > 0)


class NonFiniteGuard(L.Callback):
    """Skip steps with a non-finite loss; raise NonFiniteLossError after `max_consecutive` in a row."""

    def __init__(self, max_consecutive: int = 10):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0

    def check(self, trainer: L.Trainer | None, pl_module: L.LightningModule | None, value: torch.Tensor) -> bool:
        """True when `value` is finite on every rank; otherwise count a skip (and raise past the limit)."""
        if _all_finite(trainer, value):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total += 1
        step = trainer.global_step if trainer is not None else -1
        log.warning("non-finite loss at step %d: step skipped (%d in a row, %d in all) [train/nonfinite_skips]",
                    step, self.consecutive, self.total)
        if pl_module is not None and trainer is not None:
            pl_module.log("train/nonfinite_skips", float(self.total), rank_zero_only=True)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} non-finite losses in a row (last at step {step}, {self.total} skipped in "
                f"all; NonFiniteGuard.max_consecutive={self.max_consecutive}): the run diverged. The weights "
                f"never took a non-finite step, so the last checkpoint is good; lower the learning rate or check "
                f"the data before resuming from it.")
        return False

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        """Automatic optimisation: drop the gradients of a step with a non-finite one, so the step changes
        nothing (optimisers skip parameters without gradients)."""
        if not pl_module.automatic_optimization:
            return
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        norms = torch.stack([torch.linalg.vector_norm(_local(g).float()) for g in grads])
        if not self.check(trainer, pl_module, norms):
            optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consecutive, self.total = state_dict["consecutive"], state_dict["total"]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def finite_or_skip(pl_module: L.LightningModule, loss: torch.Tensor) -> bool:
    """For manual optimisation: False (skip this step) when `loss` is not finite on some rank. Counts and limits
    through the trainer's NonFiniteGuard callback, or a default one when none is configured."""
    trainer = pl_module._trainer
    guard = next((c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)), None) if trainer else None
    if guard is None:
        guard = pl_module.__dict__.setdefault("_default_nonfinite_guard", NonFiniteGuard())
    return guard.check(trainer, pl_module, loss)


class Preemption(L.Callback):
    """Save `last` and stop cleanly on `signals` (default SIGUSR1); requeue the SLURM job when `requeue`."""

    def __init__(self, signals: list[str] | None = None, requeue: bool = True):
        self.signals = [getattr(signal, s) if isinstance(s, str) else signal.Signals(s)
                        for s in (signals or ["SIGUSR1"])]
        self.requeue = requeue
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = signum  # only a flag: the save happens at the next batch end, on every rank together

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # before Lightning's signal connector, which then leaves SIGUSR1 to us (it keeps any existing handler)
        if stage == "fit":
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handler)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous.clear()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        from isa4d.training.checkpoint import save_last

        path = save_last(trainer)
        log.warning("signal received: saved %s at step %d and stopping", path, trainer.global_step)
        if self.requeue and trainer.is_global_zero and os.environ.get("SLURM_JOB_ID"):
            job = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ["SLURM_JOB_ID"]
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            log.warning("scontrol requeue %s: %s", job, "ok" if result.returncode == 0 else result.stderr.strip())
        trainer.should_stop = True
        self.received = None
