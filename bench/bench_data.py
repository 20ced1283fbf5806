"""Loader throughput: clips/s per worker for bucket-sized clips from H.264 shards.

    python bench/bench_data.py                          # writes marker shards, measures, appends docs/benchmarks.md
    python bench/bench_data.py --urls 'data/toy/train-*.tar' --size 64 64 --frames 17 --no-record

One process without workers gives the per-core rate (the loader decodes in its workers, one thread each);
a DataLoader with --workers processes gives the aggregate rate.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep.synthetic_shards import write_shards  # noqa: E402
from isa4d.data.buckets import Bucket  # noqa: E402
from isa4d.data.dataset import ClipDataset, worker_init_fn  # noqa: E402


def measure(ds: ClipDataset, workers: int, seconds: float) -> tuple[float, int]:
    loader = DataLoader(ds, batch_size=None, num_workers=workers, worker_init_fn=worker_init_fn if workers else None,
                        prefetch_factor=4 if workers else None)
    it = iter(loader)
    for _ in range(max(2, workers)):  # warm up: workers started, first shards opened
        next(it)
    clips, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        clips += len(next(it))
    return clips / (time.perf_counter() - t0), clips


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--urls", help="shards to read (default: write 256x256 h264 marker shards to a temp dir)")
    ap.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    ap.add_argument("--frames", type=int, default=33)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--extras", action="store_true", help="also write and decode bg.mp4 and mask.mp4 (3 videos per clip)")
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to docs/benchmarks.md")
    a = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if a.urls:
            urls = sorted(glob.glob(a.urls)) or [a.urls]
            source = a.urls
        else:
            h, w = a.size
            urls = write_shards(tmp, shards=4, per_shard=6, seed=0, sizes=((h, w),), frames=(90, 120), people=(1, 3), extras=a.extras)
            source = f"{len(urls)} marker shards, 24 clips of {h}x{w}, 90-120 frames, libx264 crf 18 gop 16" + (", with bg.mp4 and mask.mp4" if a.extras else "")
        bucket = Bucket(a.size[0], a.size[1], a.frames, a.batch_size)
        ds = ClipDataset(urls, [bucket], train=True, seed=0, shuffle_buffer=8)
        single, n1 = measure(ds, 0, a.seconds)
        multi, n2 = measure(ds, a.workers, a.seconds) if a.workers > 0 else (float("nan"), 0)
    cores = os.cpu_count()
    lines = [
        f"- clips/s, one process (per core): **{single:.1f}** ({n1} clips)",
        f"- clips/s, DataLoader with {a.workers} workers: **{multi:.1f}** ({n2} clips; {multi / max(a.workers, 1):.1f} per worker)",
    ]
    print("\n".join(lines))
    if a.no_record:
        return
    cmd = "python bench/bench_data.py " + " ".join(sys.argv[1:])
    entry = "\n".join([
        f"\n### Loader throughput, {a.size[0]}x{a.size[1]}x{a.frames} clips ({datetime.date.today().isoformat()})",
        f"- machine: {cpu_name()}, {cores} cores, no GPU; python {platform.python_version()}, torch {torch.__version__}",
        f"- data: {source}; window of {a.frames} frames at stride 1 plus one reference frame; batch {a.batch_size}",
        f"- command: `{cmd.strip()}` (`make bench-data`)",
        *lines,
        "",
    ])
    with open(ROOT / "docs" / "benchmarks.md", "a") as f:
        f.write(entry)
    print(f"appended to {ROOT / 'docs' / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
