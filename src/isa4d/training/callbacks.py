"""Callbacks that are not part of any one model."""

from __future__ import annotations

from collections import Counter
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from isa4d.data.contract import REASONS


class LoaderHealthLogger(L.Callback):
    """The loader's health: logged as `data/seen`, `data/skipped`, `data/skipped/<reason>` (every reason of the
    contract, zeros included, so every rank logs the same keys), `data/skipped_fraction` and `data/shard_errors`,
    summed over ranks, every `log_every_n_steps`; and one summary line at the end of fit, summed over ranks, with
    the skips of training and validation by reason. The loader itself logs only the first few skips of each
    reason per worker (isa4d.data.dataset.SkipCounter), so this line is where the counts are read.

    The counters are those the loader workers put on their batches (`Batch.stats`, cumulative per worker), kept
    apart for training and for each validation pass; a resumed run counts from its own start.
    """

    def __init__(self) -> None:
        super().__init__()
        self._train: dict[int, dict[str, Any]] = {}  # worker -> its latest cumulative stats
        self._val_pass: dict[int, dict[str, Any]] = {}  # the same, for the validation pass under way
        self._val_done = LoaderHealthLogger.Totals()  # finished validation passes

    class Totals:
        """Loader counters summed over workers: samples seen, skipped by reason, shard errors."""

        def __init__(self, seen: int = 0, skipped: Counter | None = None, shard_errors: int = 0):
            self.seen, self.skipped, self.shard_errors = seen, Counter(skipped or {}), shard_errors

        @classmethod
        def of(cls, workers) -> "LoaderHealthLogger.Totals":
            out = cls()
            for w in workers:
                out.seen += int(w.get("seen", 0))
                out.skipped.update(w.get("skipped", {}))
                out.shard_errors += int(w.get("shard_errors", 0))
            return out

        def __add__(self, other: "LoaderHealthLogger.Totals") -> "LoaderHealthLogger.Totals":
            return type(self)(self.seen + other.seen, self.skipped + other.skipped,
                              self.shard_errors + other.shard_errors)

        @property
        def total_skipped(self) -> int:
            return sum(self.skipped.values())

        def vector(self) -> list[float]:
            return [float(self.seen), float(self.shard_errors), *(float(self.skipped[r]) for r in REASONS)]

        @classmethod
        def from_vector(cls, v: list[float]) -> "LoaderHealthLogger.Totals":
            return cls(round(v[0]), Counter({r: round(x) for r, x in zip(REASONS, v[2:]) if round(x)}), round(v[1]))

        def describe(self, name: str) -> str:
            reasons = ", ".join(f"{r} {n}" for r, n in self.skipped.most_common())
            share = f" ({self.total_skipped / max(self.seen, 1):.1%}: {reasons})" if reasons else ""
            return f"{name} seen {self.seen}, skipped {self.total_skipped}{share}, shard errors {self.shard_errors}"

    @staticmethod
    def line(train: "LoaderHealthLogger.Totals", val: "LoaderHealthLogger.Totals") -> str:
        """`data health: training seen 1200, skipped 12 (1.0%: undecodable 9, no_bucket 3), shard errors 1;
        validation seen 64, skipped 0, shard errors 0`."""
        return f"data health: {train.describe('training')}; {val.describe('validation')}"

    @staticmethod
    def _record(store: dict[int, dict[str, Any]], batch: Any) -> None:
        stats = getattr(batch, "stats", None)
        if isinstance(stats, dict) and "worker" in stats and not stats.get("padding"):
            store[stats["worker"]] = stats

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._train:
            return
        t = self.Totals.of(self._train.values())
        summary = {f"data/skipped/{r}": float(t.skipped[r]) for r in REASONS}
        summary.update({"data/skipped": float(t.total_skipped), "data/seen": float(t.seen),
                        "data/shard_errors": float(t.shard_errors)})
        sync = trainer.world_size > 1
        pl_module.log_dict(summary, reduce_fx="sum", sync_dist=sync, on_step=True, on_epoch=False)
        pl_module.log("data/skipped_fraction", t.total_skipped / max(t.seen, 1), sync_dist=sync, on_step=True,
                      on_epoch=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._record(self._train, batch)
        if (trainer.global_step % max(trainer.log_every_n_steps, 1)) == 0:
            self._log(trainer, pl_module)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._record(self._val_pass, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_done = self._val_done + self.Totals.of(self._val_pass.values())
        self._val_pass = {}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        train = self.Totals.of(self._train.values())
        val = self._val_done + self.Totals.of(self._val_pass.values())
        if trainer.world_size > 1:  # every rank takes part; rank 0 prints
            vec = torch.tensor(train.vector() + val.vector(), dtype=torch.float64, device=pl_module.device)
            vec = trainer.strategy.reduce(vec, reduce_op="sum").tolist()
            train, val = self.Totals.from_vector(vec[: len(vec) // 2]), self.Totals.from_vector(vec[len(vec) // 2 :])
        if trainer.is_global_zero:
            rank_zero_info(self.line(train, val))


class ConfigHparams(L.Callback):
    """Logs the run's resolved configuration (the `config.yaml` LightningCLI saves in the log folder) as the loggers'
    hyperparameters, so TensorBoard's `hparams.yaml` holds it: the modules are built from the config by
    LightningCLI and call no `save_hyperparameters`, which left that file empty."""

    def __init__(self, filename: str = "config.yaml"):
        self.filename = filename

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import os

        import yaml

        log_dir = trainer.log_dir  # a broadcast from rank 0: every rank asks
        if not trainer.is_global_zero or log_dir is None:
            return
        path = os.path.join(log_dir, self.filename)
        if not os.path.isfile(path):
            return
        with open(path) as f:
            config = yaml.safe_load(f) or {}
        for logger in trainer.loggers:
            logger.log_hyperparams(config)
