"""Surviving faults: non-finite losses and preemption.

`NonFiniteGuard` skips an optimizer step whose loss (or, under automatic optimisation, any gradient) is not
finite, counts the skips (`train/nonfinite_skips`, and the streak) and after `max_consecutive` in a row stops
the run with NonFiniteLossError; the weights never saw the bad step, so the last checkpoint is a good one.
Manual optimisation cooperates with one line before its backward:

    if not finite_or_skip(self, loss):
        return

All ranks agree on the decision (one all-reduce), so a NaN on one rank never leaves the others waiting in
FSDP's collectives.

`Preemption` saves and stops on SIGTERM (what `scancel`, a preemption and a time limit send) and SIGUSR1 (sent
ahead of a time limit with `#SBATCH --signal=USR1@120`): the handler only sets a flag; at the next batch end all
ranks agree, save the `last` checkpoint (atomically, through isa4d.training.checkpoint), requeue the job under
SLURM if asked, and exit with status 75 (PREEMPTED_EXIT_CODE), never 0. Saving inside the signal handler itself,
as Lightning's SLURM connector does, would start collectives at a different point on each rank.
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
                f"never took a non-finite step, so the last checkpoint is good: resume from it with a lower learning "
                f"rate (--ckpt_path last --model.init_args.optimizer.init_args.lr=...; the config's rate replaces "
                f"the checkpoint's through LearningRateFromConfig) or check the data.")
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

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Refuse to write weights that are not finite (a step that overflowed them with finite gradients): the
        save fails on every rank before anything is published, so `last` keeps the previous, good weights."""
        state = checkpoint.get("state_dict", {})
        bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()
               and not torch.isfinite(_local(v)).all()]
        if not _all_finite(trainer, torch.tensor(float("nan") if bad else 0.0, device=pl_module.device)):
            raise NonFiniteLossError(
                f"the weights are not finite at step {trainer.global_step} ({len(bad)} tensors on this rank, e.g. "
                f"{bad[:3]}): checkpoint not written, the last one saved is the last good one; resume from it with "
                f"a lower learning rate (--model.init_args.optimizer.init_args.lr=...)")

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


class LearningRateFromConfig(L.Callback):
    """On resume, the learning rates of the config (the optimiser as `configure_optimizers` builds it) replace
    the checkpoint's, so `--ckpt_path last --model.init_args.optimizer.init_args.lr=X` continues at X (the advice
    of NonFiniteLossError). Lightning restores the optimiser's param groups, lr included, from the checkpoint.

    Each param group's base rate (`initial_lr` under a scheduler, else `lr`) is compared with the config's; where
    they differ the base rate becomes the config's, the current rate is rescaled by the same factor (keeping the
    schedule's position, e.g. warmup) and the schedulers' `base_lrs` follow. With the config's own rate nothing
    changes, so an exact resume stays exact."""

    def __init__(self) -> None:
        self._config: list[list[float]] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # optimisers are built, the checkpoint's training state is not yet loaded
        self._config = [[_base_lr(g) for g in opt.param_groups] for opt in trainer.optimizers]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        config, self._config = self._config, None
        if config is None or trainer.ckpt_path is None:
            return
        for i, (opt, rates) in enumerate(zip(trainer.optimizers, config)):
            for j, (group, new) in enumerate(zip(opt.param_groups, rates)):
                old = _base_lr(group)
                if old == new:
                    continue
                if trainer.is_global_zero:
                    log.warning("optimizer %d group %d: learning rate %g from the config replaces the checkpoint's %g",
                                i, j, new, old)
                group["lr"] = float(group["lr"]) * (new / old) if old else new
                if "initial_lr" in group:
                    group["initial_lr"] = new
                for config_ in trainer.lr_scheduler_configs:
                    if config_.scheduler.optimizer is opt and hasattr(config_.scheduler, "base_lrs"):
                        config_.scheduler.base_lrs[j] = new


def _base_lr(group: dict[str, Any]) -> float:
    return float(group.get("initial_lr", group["lr"]))


# sysexits.h EX_TEMPFAIL ("temporary failure; the user is invited to retry"): preempted, `last` saved, run again
PREEMPTED_EXIT_CODE = 75


class Preempted(SystemExit):
    """Raised on every rank after a signal's `last` checkpoint is saved: the process exits with PREEMPTED_EXIT_CODE,
    never 0, so a job script tells a preempted run from a finished one."""

    def __init__(self, message: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Preemption(L.Callback):
    """Save `last` and stop on `signals` (default SIGTERM and SIGUSR1), on every rank at the same step, then exit
    with PREEMPTED_EXIT_CODE; requeue the SLURM job first when `requeue`.

    The handler replaces Lightning's SIGTERM handler, which broadcasts inside the handler (ranks then wait on each
    other at different points: the 2-process hang) and ends the run with status 0 without saving. DataLoader
    workers started during the run ignore the signals (`_loader_workers_ignore`), so a signal sent to the whole
    process group does not kill them under the loader; the main process acts for them."""

    def __init__(self, signals: list[str] | None = None, requeue: bool = True):
        self.signals = [getattr(signal, s) if isinstance(s, str) else signal.Signals(s)
                        for s in (signals or ["SIGTERM", "SIGUSR1"])]
        self.requeue = requeue
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def _handler(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked process that kept the handler: the main process handles it
            return
        self.received = signum  # only a flag: the save happens at the next batch end, on every rank together

    def _install(self) -> None:
        self._pid = os.getpid()
        for s in self.signals:
            previous = signal.signal(s, self._handler)
            self._previous.setdefault(s, previous)
        _loader_workers_ignore(self.signals)

    def _restore(self, trainer: L.Trainer) -> None:
        # Lightning's connector restores the handlers it found (ours) after an exception: it must find the old ones
        originals = getattr(getattr(trainer, "_signal_connector", None), "_original_handlers", {})
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
            if s in originals:
                originals[s] = h
        self._previous.clear()
        _loader_workers_ignore(())

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._install()
        # Lightning registers its own SIGTERM handler after the setup hooks (composing it with ours): put ours
        # back right after it does, before the first step.
        connector = getattr(trainer, "_signal_connector", None)
        register = getattr(connector, "register_signal_handlers", None)
        if register is not None and not getattr(register, "_isa4d_preemption", False):
            def register_then_preemption() -> None:
                register()
                for cb in trainer.callbacks:
                    if isinstance(cb, Preemption) and cb._previous:
                        for s in cb.signals:
                            signal.signal(s, cb._handler)

            register_then_preemption._isa4d_preemption = True  # type: ignore[attr-defined]
            connector.register_signal_handlers = register_then_preemption

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore(trainer)  # Lightning skips the teardown hooks on an exception

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._stop_if_signalled(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_signalled(trainer)  # a signal during the last validation or save: still not a clean finish

    def _stop_if_signalled(self, trainer: L.Trainer) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        from isa4d.training.checkpoint import save_last

        name = signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
        path = save_last(trainer)
        log.warning("%s: saved %s at step %d; exiting with status %d (preempted: resume with --ckpt_path last)",
                    name, path, trainer.global_step, PREEMPTED_EXIT_CODE)
        if self.requeue and trainer.is_global_zero and os.environ.get("SLURM_JOB_ID"):
            job = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ["SLURM_JOB_ID"]
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            log.warning("scontrol requeue %s: %s", job, "ok" if result.returncode == 0 else result.stderr.strip())
        self.received = None
        trainer.strategy.barrier()
        raise Preempted(f"preempted by {name}: `last` saved at step {trainer.global_step} ({path})")


_worker_signal_setup: Any = None


def _loader_workers_ignore(signals: Any) -> None:
    """Make DataLoader workers started from now on ignore `signals` (none: undo). A worker sets its own fatal-signal
    handlers first thing (torch's `_set_worker_signal_handlers`, which makes a SIGTERM from anyone but the parent
    kill it, and the parent then fail with "DataLoader worker is killed by signal"); ours run right after it. The
    worker still exits when the main process goes (torch's parent watchdog)."""
    global _worker_signal_setup
    from torch.utils.data._utils import signal_handling

    if _worker_signal_setup is None:
        _worker_signal_setup = signal_handling._set_worker_signal_handlers
    original, ignored = _worker_signal_setup, tuple(signals)
    if not ignored:
        signal_handling._set_worker_signal_handlers = original
        return

    def set_worker_signal_handlers(*args: Any) -> None:
        original(*args)
        for s in ignored:
            signal.signal(s, signal.SIG_IGN)

    signal_handling._set_worker_signal_handlers = set_worker_signal_handlers
