"""The streaming clip dataset: shards -> parsed samples -> bucketed, decoded, collated batches.

Batches are formed inside the loader workers (the DataLoader runs with batch_size=None), because a batch's shape
is its bucket's. Training streams are resampled and endless, each rank from its own disjoint part of the data
(shards dealt round-robin, or each shard's samples by index when there are fewer shards than ranks); validation is one
ordered, deterministic pass split across ranks.

Resumable training stream. The batch of training step s depends only on (seed, rank, s) and the number of loader
workers W, never on where the stream started: worker w of a stream starting at step k serves the steps
s = k + w + jW, all in lane s mod W; a lane's shard stream restarts every `segment_steps` steps, seeded by
(seed, rank, W, lane, segment), and the random crops and windows of step s come from a generator seeded by
(seed, rank, s). A stream that starts inside a segment (a resume) replays that segment's sample selection up to
its first step without decoding (at most `segment_steps` / W batches per worker), so k steps + resume + the rest
see exactly the batches of an uninterrupted run. (A clip that fails to decode inside the replayed part would
shift the selection; such clips are rare and counted.)

Cached-latent samples (isa4d.data.latents) flow through the same streams: each sample is parsed by its kind, a
cached one fits only the bucket of its exact size and needs no decoding (`_example`).
"""

from __future__ import annotations

import logging
from collections import Counter
import itertools
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from isa4d.data.batch import Batch, ClipExample, collate
from isa4d.data.buckets import Bucket, BucketSchedule, fits
from isa4d.data.contract import ParsedSample, SampleError
from isa4d.data.examples import ClipOptions, decode_example
from isa4d.data.latents import LatentSample, parse_any
from isa4d.data.shards import expand_urls, iter_samples, resampled_urls, shuffled, split_for_rank, split_for_worker

log = logging.getLogger("isa4d.data")


class DataQualityError(RuntimeError):
    """Too large a fraction of the input was skipped: the data (or its URLs) are likely wrong, so stop."""


class SkipCounter:
    """Counts samples seen and skipped by reason; raises DataQualityError past `max_fraction`.

    Only the first `warn_first` skips of each reason (and shard errors) are logged as warnings, the next one with
    a note that further ones are only counted, the rest at DEBUG: a large corpus with a steady trickle of bad
    clips would otherwise print a line per clip. The counts ride on every batch (`state`), and the training
    callback LoaderHealthLogger prints them once at the end of fit.
    """

    def __init__(self, max_fraction: float, min_samples: int, max_shard_errors_in_row: int = 20, warn_first: int = 3):
        self.max_fraction, self.min_samples = max_fraction, min_samples
        self.seen, self.skipped, self.shard_errors = 0, Counter(), 0
        self.errors_in_row, self.max_errors_in_row = 0, max_shard_errors_in_row
        self.warn_first = warn_first
        self.last: str = ""

    def _warn(self, count: int, what: str, msg: str, *args: Any) -> None:
        if count <= self.warn_first:
            log.warning(msg, *args)
        elif count == self.warn_first + 1:
            log.warning(msg + " (more %s in this loader worker are counted, not logged: see the data-health "
                        "summary at the end of fit)", *args, what)
        else:
            log.debug(msg, *args)

    def skip(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        self.last = message
        self._warn(self.skipped[reason], f"'{reason}' skips", "skipping sample %s [data/skipped/%s]", message, reason)
        total = sum(self.skipped.values())
        if self.seen >= self.min_samples and total > self.max_fraction * self.seen:
            raise DataQualityError(
                f"{total} of {self.seen} samples skipped ({total / self.seen:.1%} > max_skip_fraction="
                f"{self.max_fraction:.1%}); by reason {dict(self.skipped)}; last: {message}"
            )

    def shard_error(self, url: str, exn: Exception) -> None:
        self.shard_errors += 1
        self.errors_in_row += 1
        self._warn(self.shard_errors, "shard errors", "shard %s failed: %s: %s [data/shard_errors]", url,
                   type(exn).__name__, exn)
        if self.errors_in_row > self.max_errors_in_row:
            raise DataQualityError(f"{self.errors_in_row} shards in a row failed to read; last {url}: {type(exn).__name__}: {exn}")

    def state(self, worker: int) -> dict[str, Any]:
        return {"worker": worker, "seen": self.seen, "skipped": dict(self.skipped), "shard_errors": self.shard_errors}


class ClipDataset(IterableDataset):
    """Bucketed clip batches from contract shards.

    `rank`/`world_size` are set by the datamodule. `start_step` is the step the stream begins at (the data
    position of a resumed run): the bucket schedule and, for resampled streams, the batches themselves depend
    on the step alone (module doc). `segment_steps`: how often the resampled stream restarts. `pad_eval`: an
    evaluation stream goes on after its pass with padding batches (`_padding_batches`), for distributed runs.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        buckets: Sequence[Bucket],
        *,
        train: bool,
        options: ClipOptions = ClipOptions(),
        seed: int = 0,
        resampled: bool = True,
        shuffle_buffer: int = 32,
        pool_size: int = 64,
        max_skip_fraction: float = 0.1,
        min_samples_for_skip_check: int = 50,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        segment_steps: int = 500,
        pad_eval: bool = False,
    ):
        super().__init__()
        if segment_steps < 1:
            raise ValueError(f"segment_steps must be >= 1, got {segment_steps}")
        self.urls = expand_urls(urls)
        self.schedule = BucketSchedule(buckets, seed)
        self.train, self.options, self.seed, self.resampled = train, options, seed, resampled and train
        self.shuffle_buffer, self.pool_size = shuffle_buffer, pool_size
        self.max_skip_fraction, self.min_samples = max_skip_fraction, min_samples_for_skip_check
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self.segment_steps, self.pad_eval = segment_steps, pad_eval and not train
        self.epoch = 0

    # ------------------------------------------------------------------------------------------- the raw stream

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def _parsed(self, counter: SkipCounter, worker: int, num_workers: int,
                rng: np.random.Generator | None) -> Iterator[ParsedSample | LatentSample]:
        if self.resampled:  # each rank resamples from its own part of the data (split_for_rank)
            urls, select = split_for_rank(list(self.urls), self.rank, self.world_size)
            samples = iter_samples(resampled_urls(urls, rng), counter.shard_error, select)
            samples = shuffled(samples, self.shuffle_buffer, rng) if self.shuffle_buffer > 1 else samples
            keep = lambda i: True  # noqa: E731
        else:
            urls = list(self.urls)
            if self.train:  # an epoch-ordered pass: the same permutation on every rank, then split
                np.random.default_rng([self.seed, self.epoch]).shuffle(urls)
            urls, keep = split_for_worker(urls, self.rank, self.world_size, worker, num_workers)
            samples = iter_samples(urls, counter.shard_error)
        for i, raw in enumerate(samples):
            if not keep(i):
                continue
            counter.seen += 1
            counter.errors_in_row = 0
            try:
                yield parse_any(raw)
            except SampleError as e:
                counter.skip(e.reason, str(e) + f" (shard {raw.get('__url__', '?')})")

    def __iter__(self) -> Iterator[Batch]:
        worker, num_workers = self._worker()
        gid = self.rank * num_workers + worker
        counter = SkipCounter(self.max_skip_fraction, self.min_samples, max(20, 2 * len(self.urls)))
        first = self.start_step + worker  # this worker serves first, first + W, first + 2W, ...
        if self.train and self.resampled:
            yield from self._resumable_batches(counter, gid, worker, num_workers, first)
            return
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, self.start_step])
        parsed = self._parsed(counter, worker, num_workers, rng)
        if self.train:  # an ordered epoch: its position is not restored (Lightning restarts the epoch)
            yield from self._train_batches(parsed, counter, gid, itertools.count(first, num_workers), first)
        else:
            yield from self._eval_batches(parsed, counter, gid)
            if self.pad_eval:
                yield from self._padding_batches(counter, gid, worker, num_workers)

    def _padding_batches(self, counter: SkipCounter, gid: int, worker: int, num_workers: int) -> Iterator[Batch]:
        """After a distributed evaluation pass: the worker's share again, then again, each batch marked
        `stats["padding"]` (from the whole set if the share is empty), so every rank can run the same number of
        batches (the trainer's integer limit_*_batches), which FSDP's collectives need. Modules run padding
        batches like any other and leave them out of their metrics."""
        scratch = SkipCounter(1.0, 1 << 30, 1 << 30)  # the repeats' skips are not counted again
        share = lambda: self._parsed(scratch, worker, num_workers, None)  # noqa: E731
        whole = lambda: (parse_any(raw) for raw in iter_samples(self.urls, scratch.shard_error))  # noqa: E731
        source = share
        while True:
            produced = False
            for batch in self._eval_batches(source(), scratch, gid, counter.state(gid)):
                produced = True
                batch.stats["padding"] = True
                yield batch
            if not produced:
                if source is whole:
                    raise DataQualityError(f"no evaluation batch could be formed from {len(self.urls)} shard(s) "
                                           f"({self.urls[:3]}...): nothing to pad a distributed evaluation with")
                source = whole

    def _resumable_batches(self, counter: SkipCounter, gid: int, worker: int, num_workers: int,
                           first: int) -> Iterator[Batch]:
        """Lane (first mod W), segment by segment, from step `first` on (module doc)."""
        lane, size = first % num_workers, self.segment_steps
        segment = first // size
        while True:
            rng = np.random.default_rng([self.seed, self.rank, num_workers, lane, segment])
            begin = segment * size + (lane - segment * size) % num_workers  # the lane's first step in the segment
            steps = range(begin, (segment + 1) * size, num_workers)
            yield from self._train_batches(self._parsed(counter, worker, num_workers, rng), counter, gid, steps, first)
            segment += 1

    # ------------------------------------------------------------------------------------------------ batching

    def _fits(self, s: ParsedSample | LatentSample, bucket: Bucket) -> bool:
        if isinstance(s, LatentSample):
            return s.fits(bucket)
        o = self.options
        return fits(bucket, s.info.height, s.info.width, s.info.num_frames, min_stride=o.min_stride,
                    aspect_tolerance=o.aspect_tolerance, max_upscale=o.max_upscale)

    def _example(self, s: ParsedSample | LatentSample, bucket: Bucket, rng: np.random.Generator | None) -> ClipExample:
        """The clip of `s` for `bucket`: decoded from a video sample, as stored from a cached-latent one."""
        if isinstance(s, LatentSample):
            return s.to_example(bucket)
        return decode_example(s, bucket, self.options, rng)

    def _train_batches(self, parsed: Iterator[ParsedSample | LatentSample], counter: SkipCounter, gid: int,
                       steps: Iterable[int], first: int) -> Iterator[Batch]:
        """The batches of `steps` (a worker's: the DataLoader takes workers in turn), each filled from the bucket
        the schedule names for its step; steps before `first` only select their samples (a resume's replay)."""
        pool: list[ParsedSample | LatentSample] = []
        evicted = 0
        for step in steps:
            bucket = self.schedule[step]
            replay = step < first
            rng = np.random.default_rng([self.seed, 0xDEC0DE, self.rank, step])  # crops, windows of this step
            examples, scanned = [], 0
            while len(examples) < bucket.batch_size:
                s = next((x for x in pool if self._fits(x, bucket)), None)
                if s is not None:
                    pool.remove(s)
                    if replay:
                        examples.append(None)
                        continue
                    try:
                        examples.append(self._example(s, bucket, rng))
                    except SampleError as e:
                        counter.skip(e.reason, str(e) + f" (shard {s.url})")
                    continue
                s = next(parsed, None)
                if s is None:
                    return  # a finite (non-resampled) pass ended; the partial batch is dropped in training
                scanned += 1
                if not any(self._fits(s, b) for b in self.schedule.buckets):
                    (T, H, W), kind = s.size, "cached latents" if isinstance(s, LatentSample) else "video"
                    counter.skip("no_bucket", f"{s.key}: {kind} {H}x{W}x{T} fits no bucket (shard {s.url})")
                    continue
                pool.append(s)
                if len(pool) > self.pool_size:
                    pool.pop(0)
                    evicted += 1
                if scanned > 20 * self.pool_size:
                    raise DataQualityError(
                        f"bucket {bucket.name} found no fitting clip among {scanned} samples; check the buckets "
                        f"against the data (isa4d data inspect) or lower its weight"
                    )
            if not replay:
                yield collate(examples, {**counter.state(gid), "evicted": evicted, "bucket": bucket.name, "step": step})

    def _eval_batches(self, parsed: Iterator[ParsedSample | LatentSample], counter: SkipCounter, gid: int,
                      state: dict[str, Any] | None = None) -> Iterator[Batch]:
        """One ordered pass at the first bucket's size, centred windows and crops, every clip regardless of aspect
        (cached latents only at their own size). `state`: the loader-health state the batches carry (default:
        `counter`'s)."""
        bucket = self.schedule.buckets[0]
        examples = []
        for s in parsed:
            try:
                examples.append(self._example(s, bucket, None))
            except SampleError as e:
                counter.skip(e.reason, str(e) + f" (shard {s.url})")
                continue
            if len(examples) == bucket.batch_size:
                yield collate(examples, {**(state or counter.state(gid)), "bucket": bucket.name})
                examples = []
        if examples:
            yield collate(examples, {**(state or counter.state(gid)), "bucket": bucket.name})


def worker_init_fn(worker_id: int) -> None:
    """Keep each loader worker to one thread: decode runs in parallel across workers, not inside them."""
    torch.set_num_threads(1)
