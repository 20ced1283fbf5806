"""Exponential moving average of the weights, as a callback (STYLE.md rule 6).

The shadow θ̄ ← d·θ̄ + (1 − d)·θ is kept in fp32 beside the trainable parameters and updated after optimizer
steps. The decay warms up as in TensorFlow's `ExponentialMovingAverage(num_updates=n)` and latent diffusion's
`LitEma`: d_n = min(decay, (1 + n) / (10 + n)), n the number of updates already made, so the first update
keeps only 10 % of the random initialisation and the average forgets its start quickly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from torch import nn

from isa4d.parallel import reshard, shard_like


class EMA(L.Callback):
    """EMA of the trainable parameters of the LightningModule, or of its attribute `submodule` (e.g. "vae").

    An update happens after each optimizer step that brings `trainer.global_step` to a multiple of
    `every_n_steps` (or past one, where a step advances global_step by more than one) at or after
    `start_step`; before `start_step` the shadow just copies the weights. The hook is `on_train_batch_end`,
    acting only when global_step advanced since the last one seen, so manual optimisation and gradient
    accumulation need nothing special. In manual optimisation Lightning counts every step of a wrapped
    optimizer in global_step: a module stepping two of them per batch advances it by 2 and gets one update
    per batch.

    With `validate_with_ema`, validation runs on the EMA weights, swapped in at `on_validation_start` and out
    at `on_validation_end`; Lightning runs ModelCheckpoint's hooks after every other callback's, so
    checkpoints always hold the training weights. The shadow, the update count and the last step seen go
    into the checkpoint's callback state, so a resumed run continues the same average. Under FSDP the shadow
    holds DTensors sharded like the parameters; isa4d.parallel.FSDP2Strategy saves them sharded in the DCP
    checkpoint and reshards them on load, and a full-tensor shadow (from a single-file checkpoint) is sharded
    at the start of training.
    """

    def __init__(self, decay: float = 0.9999, every_n_steps: int = 1, start_step: int = 0,
                 submodule: str | None = None, validate_with_ema: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {decay}")
        if every_n_steps < 1 or start_step < 0:
            raise ValueError(f"every_n_steps must be >= 1 and start_step >= 0, "
                             f"got {every_n_steps}, {start_step}")
        self.decay, self.every_n_steps, self.start_step = decay, every_n_steps, start_step
        self.submodule, self.validate_with_ema = submodule, validate_with_ema
        self.shadow: dict[str, torch.Tensor] | None = None
        self.num_updates = 0
        self.last_step = -1  # global_step at the last update or copy; -1: none yet
        self._backup: dict[str, torch.Tensor] | None = None

    @property
    def state_key(self) -> str:
        # Two EMAs (say of the VAE and of a discriminator) must not share one slot in the checkpoint.
        return self._generate_state_key(decay=self.decay, submodule=self.submodule)

    # ------------------------------------------------------------------------------------------------ weights

    def _target(self, pl_module: nn.Module) -> nn.Module:
        return pl_module if self.submodule is None else getattr(pl_module, self.submodule)

    def _params(self, pl_module: nn.Module) -> dict[str, torch.Tensor]:
        """The parameters the shadow follows: the trainable ones at the start, then those it holds by name."""
        named = dict(reshard(self._target(pl_module)).named_parameters())  # FSDP: the sharded parameters
        if self.shadow is None:
            return {k: p for k, p in named.items() if p.requires_grad}
        missing = [k for k in self.shadow if k not in named]
        if missing:
            raise KeyError(f"EMA shadow has parameters the module lacks: {missing[:5]}")
        return {k: named[k] for k in self.shadow}

    def decay_at(self, num_updates: int) -> float:
        """Decay of the update after `num_updates` earlier ones (warm-up, see the module docstring)."""
        return min(self.decay, (1 + num_updates) / (10 + num_updates))

    @torch.no_grad()
    def _copy_weights(self, pl_module: nn.Module) -> None:
        if self.shadow is None:
            self.shadow = {k: p.detach().clone().float() for k, p in self._params(pl_module).items()}
            return
        for k, p in self._params(pl_module).items():
            self.shadow[k].copy_(p.detach())

    @torch.no_grad()
    def _update(self, pl_module: nn.Module) -> None:
        weight = 1.0 - self.decay_at(self.num_updates)
        for k, p in self._params(pl_module).items():
            self.shadow[k].lerp_(p.detach().float(), weight)  # θ̄ + (1 − d)(θ − θ̄)
        self.num_updates += 1

    @torch.no_grad()
    def _swap_in(self, pl_module: nn.Module) -> None:
        params = self._params(pl_module)
        self._backup = {k: p.detach().clone() for k, p in params.items()}
        for k, p in params.items():
            p.copy_(self.shadow[k])

    @torch.no_grad()
    def _swap_out(self, pl_module: nn.Module) -> None:
        for k, p in self._params(pl_module).items():
            p.copy_(self._backup[k])
        self._backup = None

    @contextmanager
    def swapped(self, pl_module: nn.Module) -> Iterator[nn.Module]:
        """`with ema.swapped(module):` runs the block on the EMA weights, then restores the training ones."""
        if self.shadow is None:
            raise RuntimeError("the EMA has no shadow yet: train, or load a checkpoint's callback state")
        self._swap_in(pl_module)
        try:
            yield pl_module
        finally:
            self._swap_out(pl_module)

    # -------------------------------------------------------------------------------------------------- hooks

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not in on_fit_start: strategies that restore after setup (FSDP) load callback state after it.
        if self.shadow is None:
            self._copy_weights(pl_module)
            self.last_step = trainer.global_step
            return
        for k, p in self._params(pl_module).items():
            if self.shadow[k].shape != p.shape:
                raise ValueError(f"EMA shadow {k} has shape {tuple(self.shadow[k].shape)}, "
                                 f"the module {tuple(p.shape)}")
            self.shadow[k] = shard_like(self.shadow[k], p).to(device=p.device, dtype=torch.float32)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step, last = trainer.global_step, self.last_step
        if step <= last:
            return  # no optimizer step this batch (gradient accumulation, a skipped step)
        self.last_step = step
        if step < self.start_step:
            self._copy_weights(pl_module)
        elif step // self.every_n_steps > last // self.every_n_steps:
            self._update(pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.validate_with_ema and self.shadow is not None:
            self._swap_in(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._backup is not None:
            self._swap_out(pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        if self._backup is not None:  # never leave the EMA weights in place of the training ones
            self._swap_out(pl_module)

    # --------------------------------------------------------------------------------------------- checkpoint

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": self.shadow, "num_updates": self.num_updates, "last_step": self.last_step,
                "submodule": self.submodule}  # `isa4d export --ema` maps the shadow's names with it

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.shadow = state_dict["shadow"]
        self.num_updates, self.last_step = state_dict["num_updates"], state_dict["last_step"]
