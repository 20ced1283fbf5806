"""A small LightningModule for driving the real CLI and data plane in tests, before any model stage is involved.

It checks the batch contract on every step and learns each clip's mean colour per frame from the reference image's
mean colour, so a fit is a real optimisation whose loss can be seen to fall.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from torch import nn

from isa4d.data.batch import Batch


class BatchProbe(L.LightningModule):
    def __init__(self, num_frames: int = 9, lr: float = 0.05, record_dir: str | None = None):
        super().__init__()
        self.num_frames, self.lr, self.record_dir = num_frames, lr, record_dir
        self.train_shapes: list[tuple[int, str, list[int]]] = []
        self.head = nn.Linear(3, 3)
        self.seen_keys: list[str] = []
        self.train_keys: list[str] = []
        self.losses: list[float] = []

    def _loss(self, batch: Batch) -> torch.Tensor:
        assert batch.normalized and batch.video.dtype == torch.float32
        assert -1.0 <= batch.video.min() and batch.video.max() <= 1.0
        target = batch.video.mean(dim=(1, 3, 4))  # (B, 3)
        return nn.functional.mse_loss(self.head(batch.ref.mean(dim=(2, 3))), target)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.losses.append(loss.item())
        self.train_shapes.append((self.global_step, batch.stats.get("bucket", "?"), list(batch.video.shape)))
        self.train_keys.extend(batch.key)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        assert batch.video.shape[1] == self.num_frames, (batch.video.shape, self.num_frames)  # the validation bucket
        self.seen_keys.extend(batch.key)
        self.log("val/loss", self._loss(batch), batch_size=len(batch))

    def on_fit_end(self) -> None:
        if self.record_dir:  # one file per rank, for the multi-process tests
            path = Path(self.record_dir) / f"rank{self.global_rank}.json"
            path.write_text(json.dumps({"train": self.train_shapes, "train_keys": self.train_keys,
                                        "val_keys": self.seen_keys}))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)
