"""Callbacks that are not part of any one model."""

from __future__ import annotations

from typing import Any

import lightning as L


class LoaderHealthLogger(L.Callback):
    """Logs the loader's health (`data/seen`, `data/skipped`, `data/skipped/<reason>`, `data/skipped_fraction`,
    `data/shard_errors`) from the datamodule's LoaderHealth, summed over ranks, every `log_every_n_steps`."""

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        health = getattr(trainer.datamodule, "health", None)
        if health is None or not health.workers:
            return
        summary = health.summary()
        fraction = summary.pop("data/skipped_fraction")
        pl_module.log_dict(summary, reduce_fx="sum", sync_dist=trainer.world_size > 1, on_step=True, on_epoch=False)
        pl_module.log("data/skipped_fraction", fraction, sync_dist=trainer.world_size > 1, on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (trainer.global_step % max(trainer.log_every_n_steps, 1)) == 0:
            self._log(trainer, pl_module)


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
