"""Loader health: skips are logged a few times per reason and counted always; LoaderHealthLogger prints one
data-health line at the end of fit with training and validation counts by reason."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch

from isa4d.data.dataset import SkipCounter
from isa4d.training.callbacks import LoaderHealthLogger


def test_skip_warnings_are_bounded_and_counts_are_not(caplog):
    counter = SkipCounter(max_fraction=1.0, min_samples=1 << 30, warn_first=3)
    counter.seen = 1000
    with caplog.at_level(logging.WARNING, logger="isa4d.data"):
        for i in range(200):
            counter.skip("undecodable", f"clip{i}: mp4: corrupt frame 3")
        counter.skip("no_bucket", "clipX: fits no bucket")
        for i in range(50):
            counter.shard_error(f"s-{i}.tar", EOFError("cut"))
            counter.errors_in_row = 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert counter.skipped == {"undecodable": 200, "no_bucket": 1} and counter.shard_errors == 50
    assert len(warnings) == (3 + 1) + 1 + (3 + 1)
    assert sum("counted, not logged" in w for w in warnings) == 2
    assert all(f"clip{i}:" in " ".join(warnings) for i in range(4)) and "clip4:" not in " ".join(warnings)


def _batch(worker: int, seen: int, skipped: dict, shard_errors: int = 0, padding: bool = False):
    stats = {"worker": worker, "seen": seen, "skipped": skipped, "shard_errors": shard_errors}
    return SimpleNamespace(stats={**stats, "padding": True} if padding else stats)


def test_end_of_fit_line_sums_workers_and_validation_passes(caplog):
    """Counters are cumulative per worker: the latest batch of each worker counts, once; each validation pass
    restarts its counters, so passes add up; padding repeats are left out."""
    cb = LoaderHealthLogger()
    trainer = SimpleNamespace(world_size=1, is_global_zero=True, global_step=1, log_every_n_steps=10**9)
    for b in (_batch(0, 10, {"undecodable": 1}), _batch(1, 12, {}), _batch(0, 30, {"undecodable": 2, "no_bucket": 1}),
              _batch(1, 25, {"no_bucket": 1}, shard_errors=1)):
        cb.on_train_batch_end(trainer, None, None, b, 0)
    for _ in range(2):  # two validation passes of 8 samples, one malformed each
        cb.on_validation_batch_end(trainer, None, None, _batch(0, 8, {"malformed": 1}), 0)
        cb.on_validation_batch_end(trainer, None, None, _batch(0, 99, {"malformed": 50}, padding=True), 1)
        cb.on_validation_epoch_end(trainer, None)
    with caplog.at_level(logging.INFO):
        cb.on_fit_end(trainer, None)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data health")]
    assert lines == ["data health: training seen 55, skipped 4 (7.3%: undecodable 2, no_bucket 2), shard errors 1; "
                     "validation seen 16, skipped 2 (12.5%: malformed 2), shard errors 0"]


def test_end_of_fit_line_is_summed_over_ranks(caplog):
    """With several ranks every rank reduces its vector (the strategy's sum) and only rank 0 prints."""
    world_size = 2
    cb = LoaderHealthLogger()
    cb.on_train_batch_end(SimpleNamespace(global_step=1, log_every_n_steps=10**9), None, None,
                          _batch(0, 10, {"too_short": 1}), 0)
    reduced = []
    strategy = SimpleNamespace(reduce=lambda v, reduce_op: reduced.append(reduce_op) or v * world_size)
    module = SimpleNamespace(device=torch.device("cpu"))
    with caplog.at_level(logging.INFO):
        for rank in range(world_size):
            cb.on_fit_end(SimpleNamespace(world_size=world_size, is_global_zero=rank == 0, strategy=strategy), module)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data health")]
    assert reduced == ["sum"] * world_size
    assert lines == ["data health: training seen 20, skipped 2 (10.0%: too_short 2), shard errors 0; "
                     "validation seen 0, skipped 0, shard errors 0"]
