"""LightningDataModule over contract shards (docs/data_format.md)."""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any, Sequence

import lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

from isa4d.data.batch import Batch
from isa4d.data.buckets import Bucket
from isa4d.data.dataset import ClipDataset, worker_init_fn
from isa4d.data.examples import ClipOptions
from isa4d.data.shards import expand_urls

log = logging.getLogger("isa4d.data")


class LoaderHealth:
    """Aggregates the per-worker cumulative counters that ride on every batch (`Batch.stats`)."""

    def __init__(self) -> None:
        self.workers: dict[int, dict[str, Any]] = {}

    def update(self, stats: dict[str, Any]) -> None:
        if "worker" in stats:
            self.workers[stats["worker"]] = stats

    def summary(self) -> dict[str, float]:
        seen = sum(w["seen"] for w in self.workers.values())
        skipped: Counter = Counter()
        for w in self.workers.values():
            skipped.update(w["skipped"])
        out = {f"data/skipped/{r}": float(n) for r, n in skipped.items()}
        out["data/skipped"] = float(sum(skipped.values()))
        out["data/seen"] = float(seen)
        out["data/skipped_fraction"] = out["data/skipped"] / max(seen, 1)
        out["data/shard_errors"] = float(sum(w.get("shard_errors", 0) for w in self.workers.values()))
        return out


class ShardDataModule(L.LightningDataModule):
    """Training and validation clips from WebDataset shards.

    Args:
        train_urls / val_urls: shard URLs or brace patterns (local paths, `pipe:CMD`, fsspec URLs such as s3://).
        buckets: training buckets (height, width, num_frames, batch_size, weight); the first one is the validation size
            unless `val_bucket` is given.
        frame_stride, stride_jitter, crop_jitter, aspect_tolerance, max_upscale: see ClipOptions.
        resampled: endless training stream drawing shards with replacement (else ordered epochs).
        max_skip_fraction: stop with an error once more than this fraction of samples was skipped as bad.
        segment_steps: the resampled stream restarts every this many steps (bounds the replay of a resume).

    The data position is part of the checkpoint (`state_dict`): the step of the next training batch, counted in
    batches consumed (a step skipped for a non-finite loss consumed its batch too). A resumed run restarts the
    stream there, so with the same seed, world size and number of workers it sees exactly the batches of a run
    that never stopped (isa4d.data.dataset). Without a stored position (older checkpoints) it restarts at
    `trainer.global_step`.
    """

    def __init__(
        self,
        train_urls: str | list[str] | None = None,
        val_urls: str | list[str] | None = None,
        buckets: Sequence[Bucket] = (Bucket(64, 64, 9, 2),),
        val_bucket: Bucket | None = None,
        frame_stride: int = 1,
        stride_jitter: int = 0,
        crop_jitter: float = 0.0,
        aspect_tolerance: float = 0.25,
        max_upscale: float = 2.0,
        resampled: bool = True,
        shuffle_buffer: int = 32,
        pool_size: int = 64,
        num_workers: int = 2,
        prefetch_factor: int = 2,
        pin_memory: bool = True,
        max_skip_fraction: float = 0.1,
        min_samples_for_skip_check: int = 50,
        seed: int = 0,
        segment_steps: int = 500,
    ):
        super().__init__()
        if train_urls is None and val_urls is None:
            raise ValueError("ShardDataModule needs train_urls, val_urls or both")
        self.train_urls, self.val_urls = train_urls, val_urls
        self.buckets, self.val_bucket = list(buckets), val_bucket
        self.options = ClipOptions(frame_stride, stride_jitter, crop_jitter, aspect_tolerance, max_upscale)
        self.resampled, self.shuffle_buffer, self.pool_size = resampled, shuffle_buffer, pool_size
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self.max_skip_fraction, self.min_samples, self.seed = max_skip_fraction, min_samples_for_skip_check, seed
        self.segment_steps = segment_steps
        self.health = LoaderHealth()
        self.start_step = 0
        self.next_step: int | None = None  # the data position: step of the next training batch
        self._resumed: dict[str, Any] | None = None

    def setup(self, stage: str) -> None:
        """Fail at the start, naming the config key, when shard patterns match nothing or local shards are missing."""
        for key, urls in (("train_urls", self.train_urls if stage == "fit" else None), ("val_urls", self.val_urls)):
            if urls is None:
                continue
            try:
                expanded = expand_urls(urls)
            except ValueError as e:
                raise FileNotFoundError(f"data.{key}: {e}") from None
            missing = [u for u in expanded if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
            if missing:
                raise FileNotFoundError(f"data.{key}: {len(missing)} of {len(expanded)} shards do not exist, e.g. "
                                        f"{missing[:3]}")

    def _distributed(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _dataset(self, urls: Any, buckets: Sequence[Bucket], train: bool, pad_eval: bool = False) -> ClipDataset:
        rank, world = self._distributed()
        return ClipDataset(
            urls, buckets, train=train, options=self.options, seed=self.seed, resampled=self.resampled,
            shuffle_buffer=self.shuffle_buffer, pool_size=self.pool_size, max_skip_fraction=self.max_skip_fraction,
            min_samples_for_skip_check=self.min_samples, rank=rank, world_size=world, start_step=self.start_step,
            segment_steps=self.segment_steps, pad_eval=pad_eval,
        )

    def _loader(self, ds: ClipDataset) -> DataLoader:
        return DataLoader(
            ds, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            persistent_workers=False, worker_init_fn=worker_init_fn,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_urls is None:
            raise ValueError("fit needs data.train_urls")
        trainer = self.trainer
        if self.next_step is None:
            self.next_step = trainer.global_step if trainer is not None else 0
        self.start_step = self.next_step
        return self._loader(self._dataset(self.train_urls, self.buckets, train=True))

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("limit_val_batches")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader("limit_test_batches")

    def _eval_loader(self, limit_key: str) -> DataLoader | list:
        """The validation (or test) pass. On several processes each rank evaluates its own share; with an integer
        `trainer.<limit_key>` every rank then runs exactly that many batches, padding a short share with marked
        repeats (FSDP's collectives need ranks in lockstep), and without one (the whole set) FSDP refuses, since
        shares differ in length."""
        if self.val_urls is None:
            return []
        _, world = self._distributed()
        limit = getattr(self.trainer, limit_key, None) if self.trainer is not None else None
        whole = not isinstance(limit, int) or isinstance(limit, bool)
        if world > 1 and whole and isinstance(self.trainer.strategy, ModelParallelStrategy):
            raise ValueError(f"trainer.{limit_key}: a whole-set evaluation ({limit!r}) cannot run on {world} FSDP "
                             f"processes, whose shares of the clips differ in length; give a number of batches "
                             f"per process (an integer, e.g. --trainer.{limit_key}=50)")
        return self._loader(self._dataset(self.val_urls, [self.val_bucket or self.buckets[0]], train=False,
                                          pad_eval=world > 1 and not whole))

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        self.health.update(batch.stats)
        trainer = self.trainer
        if "step" in batch.stats and trainer is not None and trainer.training:
            self.next_step = batch.stats["step"] + 1
        return batch.normalize()

    def state_dict(self) -> dict[str, Any]:
        rank, world = self._distributed()
        return {"next_step": self.next_step, "seed": self.seed, "world_size": world,
                "num_workers": self.num_workers, "segment_steps": self.segment_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.next_step = state_dict.get("next_step")
        _, world = self._distributed()
        now = {"seed": self.seed, "world_size": world, "num_workers": self.num_workers,
               "segment_steps": self.segment_steps}
        changed = {k: (state_dict.get(k), v) for k, v in now.items() if state_dict.get(k, v) != v}
        if changed and (self.trainer is None or self.trainer.is_global_zero):
            log.warning("resuming the data stream at step %s with changed %s (checkpoint, now): the batches "
                        "will differ from those of an uninterrupted run", self.next_step, changed)
