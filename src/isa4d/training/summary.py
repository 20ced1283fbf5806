"""What a run says on the console: one line when a stage starts, progress while it runs, one line when it ends.

`StageSummary` prints the start line (model and its size, data, device and precision, where checkpoints and logs
go) and the end line (steps or batches, time, the last and best validation metrics, the checkpoint written).
`ConsoleProgressBar` is Lightning's progress bar as isa4d.progress lines: redrawn on a terminal, a plain line every
`ISA4D_PROGRESS_SECONDS` seconds (default 30) in a log. The `isa4d` command adds both (isa4d.cli); the
LightningModules print nothing of this themselves.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.callbacks.progress import ProgressBar

from isa4d.progress import Progress, format_seconds

MAX_METRICS = 5  # metrics named on the end line, the quality measures first
FIRST = ("fvd", "rfvd", "psnr", "ssim", "lpips", "l1", "loss", "part_appearance", "pose_iou")


def _count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{suffix}"
    return str(n)


def _number(v: Any) -> str:
    v = float(v)
    return f"{v:.4g}" if math.isfinite(v) else str(v)


def _urls(urls: Any) -> str:
    if urls is None:
        return "-"
    return urls if isinstance(urls, str) else ", ".join(map(str, urls))


class StageSummary(Callback):
    """The start and end lines of fit, validate, test and predict (`name` shows as the stage: `sample` for predict
    with the sample writer)."""

    def __init__(self, name: str | None = None, stream=None):
        self.name = name
        self.stream = stream
        self._start = 0.0

    def _print(self, trainer: L.Trainer, text: str) -> None:
        if trainer.is_global_zero:
            print(text, file=self.stream or sys.stdout, flush=True)

    def _stage(self, trainer: L.Trainer) -> str:
        return self.name or trainer.state.fn.value

    def start_line(self, trainer: L.Trainer, module: L.LightningModule) -> str:
        params = list(module.parameters())
        total = sum(p.numel() for p in params)
        trained = sum(p.numel() for p in params if p.requires_grad)
        size = f"{_count(total)} parameters" + (f" ({_count(trained)} trained, {_count(total - trained)} frozen)"
                                                if trained != total else "")
        dm = trainer.datamodule
        stage = self._stage(trainer)
        if dm is not None and hasattr(dm, "val_urls"):
            data = (f"train {_urls(getattr(dm, 'train_urls', None))}, val {_urls(dm.val_urls)}" if stage == "fit"
                    else f"{_urls(dm.val_urls)}")
        else:
            data = type(dm).__name__ if dm is not None else "-"
        device = f"{trainer.accelerator.__class__.__name__.removesuffix('Accelerator').lower()} x{trainer.world_size}"
        parts = [f"isa4d {stage}: {type(module).__name__}, {size}", f"data {data}",
                 f"{device}, {trainer.precision}"]
        ckpt = trainer.checkpoint_callback
        if stage == "fit" and ckpt is not None and ckpt.dirpath:
            parts.append(f"checkpoints {ckpt.dirpath}")
        if trainer.logger is not None and trainer.log_dir:
            parts.append(f"logs {trainer.log_dir}")
        return " | ".join(parts)

    def end_line(self, trainer: L.Trainer) -> str:
        stage = self._stage(trainer)
        took = format_seconds(time.monotonic() - self._start)
        if stage == "fit":
            done = f"{trainer.global_step} steps in {took}"
        else:
            loop = {"validate": trainer.validate_loop, "test": trainer.test_loop}.get(stage, trainer.predict_loop)
            done = f"{loop.batch_progress.total.completed} batches in {took}"
        parts = [f"isa4d {stage} done: {done}"]
        metrics = {k: v for k, v in trainer.callback_metrics.items()
                   if k.startswith(("val/", "test/")) and getattr(v, "numel", lambda: 1)() == 1}
        if metrics:
            rank = {name: i for i, name in enumerate(FIRST)}
            shown = sorted(metrics, key=lambda k: (rank.get(k.split("/", 1)[1], len(FIRST)), k))[:MAX_METRICS]
            more = f" (+{len(metrics) - len(shown)} more)" if len(metrics) > len(shown) else ""
            parts.append(", ".join(f"{k} {_number(metrics[k])}" for k in shown) + more)
        checkpoints = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
        for c in checkpoints:
            if c.monitor not in (None, "step") and c.best_model_score is not None:
                parts.append(f"best {c.monitor} {_number(c.best_model_score)} ({c.best_model_path})")
        if stage == "fit":
            last = next((c.last_model_path or c.best_model_path for c in checkpoints
                         if c.last_model_path or c.best_model_path), None)
            parts.append(f"checkpoint {last}" if last else "no checkpoint written")
        return " | ".join(parts)

    def _begin(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._start = time.monotonic()
        self._print(trainer, self.start_line(trainer, module))

    def on_fit_start(self, trainer, pl_module) -> None:
        self._begin(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._print(trainer, self.end_line(trainer))

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn.value == "validate":
            self._begin(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn.value == "validate":
            self._print(trainer, self.end_line(trainer))

    def on_test_start(self, trainer, pl_module) -> None:
        self._begin(trainer, pl_module)

    def on_test_end(self, trainer, pl_module) -> None:
        self._print(trainer, self.end_line(trainer))

    def on_predict_start(self, trainer, pl_module) -> None:
        self._begin(trainer, pl_module)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._print(trainer, self.end_line(trainer))


class ConsoleProgressBar(ProgressBar):
    """Training steps (of `max_steps`) and evaluation batches as isa4d.progress lines, with the training loss."""

    def __init__(self, stream=None, every: float | None = None, terminal: bool | None = None):
        super().__init__()
        self._enabled = True
        self._options = {"stream": stream, "every": every, "terminal": terminal}
        self._train: Progress | None = None
        self._eval: Progress | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def _new(self, total: Any, desc: str, unit: str) -> Progress:
        total = int(total) if isinstance(total, (int, float)) and math.isfinite(total) and total > 0 else None
        return Progress(total, desc, unit, **self._options)

    def _postfix(self, trainer: L.Trainer) -> str:
        metrics = {k: v for k, v in self.get_metrics(trainer, trainer.lightning_module).items() if k != "v_num"}
        return ", ".join(f"{k.removeprefix('train/')} {_number(v) if not isinstance(v, str) else v}"
                         for k, v in metrics.items())

    # ------------------------------------------------------------------ training
    def on_train_start(self, trainer, pl_module) -> None:
        if self._enabled:
            total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else \
                trainer.estimated_stepping_batches
            self._train = self._new(total, "fit", "steps")
            self._train.set(trainer.global_step)  # a resumed run starts at its step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._train is not None:
            self._train.set(trainer.global_step, self._postfix(trainer))

    def on_train_end(self, trainer, pl_module) -> None:
        if self._train is not None:
            self._train.close()
            self._train = None

    # ------------------------------------------------------------------ evaluation
    def _eval_start(self, desc: str, total: Any) -> None:
        if self._enabled and not self.trainer.sanity_checking:
            if self._train is not None and self._train.terminal:
                self._train.stream.write("\n")  # keep the training line; the evaluation line goes below
            self._eval = self._new(total, desc, "batches")

    def _eval_step(self) -> None:
        if self._eval is not None:
            self._eval.update()

    def _eval_end(self) -> None:
        if self._eval is not None:
            self._eval.close()
            self._eval = None

    def on_validation_start(self, trainer, pl_module) -> None:
        self._eval_start("validate", sum(trainer.num_val_batches) if trainer.num_val_batches else None)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_step()

    def on_validation_end(self, trainer, pl_module) -> None:
        self._eval_end()

    def on_test_start(self, trainer, pl_module) -> None:
        self._eval_start("test", sum(trainer.num_test_batches) if trainer.num_test_batches else None)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_step()

    def on_test_end(self, trainer, pl_module) -> None:
        self._eval_end()

    def on_predict_start(self, trainer, pl_module) -> None:
        self._eval_start("predict", sum(trainer.num_predict_batches) if trainer.num_predict_batches else None)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_step()

    def on_predict_end(self, trainer, pl_module) -> None:
        self._eval_end()
