"""Buckets by (height, width, frames), each with its own batch size.

Mixed aspect ratios and lengths train without padding or distortion: a clip goes only to buckets whose aspect ratio is
close to its own (it is scaled to cover the bucket, then cropped a little) and that it has frames for. Which bucket a
step uses is a pure function of (seed, step), so every rank draws the same shapes at the same step, and FSDP
collectives see the same work everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from isa4d.data.clip import span


@dataclass(frozen=True)
class Bucket:
    height: int
    width: int
    num_frames: int
    batch_size: int
    weight: float = 1.0

    def __post_init__(self) -> None:
        if min(self.height, self.width, self.num_frames, self.batch_size) < 1 or self.weight < 0:
            raise ValueError(f"bucket sizes must be positive and weight non-negative: {self}")

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}x{self.num_frames}"


def fits(bucket: Bucket, height: int, width: int, frames: int, *, min_stride: int = 1,
         aspect_tolerance: float = 0.25, max_upscale: float = 2.0) -> bool:
    """Whether a (height, width, frames) video can fill `bucket` with at most a small crop and a bounded upscale."""
    aspect = abs(math.log((width / height) / (bucket.width / bucket.height)))
    scale = max(bucket.height / height, bucket.width / width)
    return aspect <= math.log1p(aspect_tolerance) and scale <= max_upscale and span(bucket.num_frames, min_stride) <= frames


class BucketSchedule:
    """Chooses the bucket of each global step from (seed, step) alone, with probabilities proportional to weights."""

    def __init__(self, buckets: Sequence[Bucket], seed: int = 0):
        if not buckets:
            raise ValueError("at least one bucket is needed")
        w = np.array([b.weight for b in buckets], dtype=np.float64)
        if w.sum() <= 0:
            raise ValueError("bucket weights sum to zero")
        self.buckets, self.seed, self.p = list(buckets), seed, w / w.sum()

    def index(self, step: int) -> int:
        if len(self.buckets) == 1:
            return 0
        return int(np.random.default_rng([self.seed, 0xB0C, step]).choice(len(self.buckets), p=self.p))

    def __getitem__(self, step: int) -> Bucket:
        return self.buckets[self.index(step)]
