"""Training throughput in TensorBoard: steps, samples and tokens per second, achieved TFLOP/s and MFU, and the
share of wall time the loop waited for data.

A module reports what one training step processed by setting `step_counts` in `training_step`, a dict with
`samples` and optionally `tokens` (the model's own unit: DiT latent patches, VAE frames) and `flops` (model FLOPs
of forward + backward, DiTModule counts them with torch.utils.flop_counter once per shape). The callback times the
loop by wall clock between batch ends, without synchronising the GPU (a queue of asynchronous work evens out over
the `log_every_n_steps` window), and splits off the time between the end of one step and the start of the next,
which is the wait for the next batch (loader and host-to-device copy); a gap with a checkpoint save or a validation
in it is left out of both. Values are per process (per GPU).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import lightning as L
import torch

# dense bf16 peak TFLOP/s by device name (for MFU); others: pass peak_tflops
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def loss_flops(loss: Callable[[], torch.Tensor]) -> float:
    """Model FLOPs of `loss()` and its backward: every matmul, convolution and attention it runs, as
    torch.utils.flop_counter counts them. On meta-device modules and inputs it costs no memory and no device time."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss().backward()
    return float(counter.get_total_flops())


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


class Throughput(L.Callback):
    """Logs `perf/steps_per_s`, `perf/samples_per_s`, `perf/tokens_per_s`, `perf/tflops`, `perf/mfu` and
    `perf/data_wait_fraction` every `log_every_n_steps` training steps. `peak_tflops`: the device's peak for MFU
    (default: from the device name for H100, H200, A100; no MFU elsewhere)."""

    def __init__(self, peak_tflops: float | None = None):
        self.peak_tflops = peak_tflops
        self._reset()
        self._last_end: float | None = None
        self._paused = False  # a checkpoint save or validation ran since the last step

    def _reset(self) -> None:
        self.steps, self.seconds, self.wait = 0, 0.0, 0.0
        self.totals = {"samples": 0.0, "tokens": 0.0, "flops": 0.0}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.peak_tflops is None:
            self.peak_tflops = device_peak_tflops(pl_module.device)
        self._last_end = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._paused = True  # the save runs between two steps: neither training nor waiting for data

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._paused = True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_end is not None and self._paused:
            self._last_end = now  # a checkpoint save or validation since the last step: not timed at all
        elif self._last_end is not None:
            self.wait += now - self._last_end
        self._paused = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_end is None:  # the first step (start-up, compilation) is not timed
            self._last_end = now
            return
        self.steps += 1
        self.seconds += now - self._last_end
        self._last_end = now
        counts = getattr(pl_module, "step_counts", None) or {}
        for key in self.totals:
            self.totals[key] += float(counts.get(key, 0.0))
        if trainer.global_step % max(trainer.log_every_n_steps, 1) or self.seconds <= 0:
            return
        metrics = {"perf/steps_per_s": self.steps / self.seconds,
                   "perf/samples_per_s": self.totals["samples"] / self.seconds,
                   "perf/data_wait_fraction": min(self.wait / self.seconds, 1.0)}
        if self.totals["tokens"]:
            metrics["perf/tokens_per_s"] = self.totals["tokens"] / self.seconds
        if self.totals["flops"] == self.totals["flops"] and self.totals["flops"] > 0:  # not NaN
            tflops = self.totals["flops"] / self.seconds / 1e12
            metrics["perf/tflops"] = tflops
            if self.peak_tflops:
                metrics["perf/mfu"] = tflops / self.peak_tflops
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)
        self._reset()
