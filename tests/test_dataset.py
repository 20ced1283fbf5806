"""Tests for isa4d.data.dataset (ClipDataset) and isa4d.data.clip: bad samples are skipped and counted, rank
and worker splits are complete and disjoint, bucket shapes agree across ranks, and clip windows, strides and
reference frames are sampled as documented."""

from __future__ import annotations

import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from torch.utils.data import DataLoader

from isa4d.data.buckets import Bucket
from isa4d.data.clip import choose_stride, reference_frame, sample_window, span
from isa4d.data.contract import SampleError
from isa4d.data.dataset import ClipDataset, DataQualityError, worker_init_fn
from isa4d.data.examples import ClipOptions, decode_example

EVAL_BUCKET = Bucket(32, 48, 8, 3)
EVAL_OPTIONS = ClipOptions(frame_stride=2)  # a window spans 15 frames: the 10-frame clip is too short


def write_tar(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return str(path)


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory, good_samples, defective_samples):
    """Shard 0: good samples interleaved with one of each defect. Shard 1: two good samples, then a third cut
    off in the middle of its video. Returns (urls, good keys, {bad key: reason}, truncated shard url)."""
    root = tmp_path_factory.mktemp("mixed")
    good0, good1 = good_samples[:5], good_samples[5:]
    shard0 = []
    for i, (_, bad) in enumerate(defective_samples):
        if i % 2 == 0 and good0:
            shard0.append(good0.pop(0))
        shard0.append(bad)
    shard0 += good0
    cut_key = "good_cut"
    full = write_tar(root / "full.tar", good1 + [{**good_samples[0], "__key__": cut_key}])
    with tarfile.open(full) as tf:
        mp4 = next(m for m in tf.getmembers() if m.name == f"{cut_key}.mp4")
    truncated = root / "mixed-000001.tar"
    truncated.write_bytes(Path(full).read_bytes()[: mp4.offset_data + mp4.size // 2])
    urls = [write_tar(root / "mixed-000000.tar", shard0), str(truncated)]
    good = [s["__key__"] for s in good_samples]
    bad = {s["__key__"]: reason for reason, s in defective_samples}
    return urls, good, bad, str(truncated)


def test_bad_samples_are_skipped_counted_and_named(mixed_shards, caplog):
    urls, good, bad, truncated = mixed_shards
    ds = ClipDataset(urls, [EVAL_BUCKET], train=False, options=EVAL_OPTIONS, max_skip_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger="isa4d.data"):
        batches = list(ds)
    keys = [k for b in batches for k in b.key]
    assert keys == good  # every good sample arrives, in order, once
    stats = batches[-1].stats  # counters are cumulative; the last batch comes after the whole pass
    assert stats["skipped"] == dict(Counter(bad.values()))
    assert stats["seen"] == len(good) + len(bad) and stats["shard_errors"] == 1
    messages = [r.getMessage() for r in caplog.records if r.name == "isa4d.data"]
    for key, reason in bad.items():
        assert any(key in m and f"data/skipped/{reason}" in m for m in messages), key
    assert any(truncated in m and "data/shard_errors" in m for m in messages)
    assert len(messages) == len(bad) + 1


def test_too_many_skips_stop_the_run(mixed_shards):
    urls, _, bad, _ = mixed_shards
    ds = ClipDataset(urls, [EVAL_BUCKET], train=False, options=EVAL_OPTIONS, max_skip_fraction=0.05,
                     min_samples_for_skip_check=3)
    with pytest.raises(DataQualityError, match="max_skip_fraction") as e:
        list(ds)
    named = [r for r in set(bad.values()) if r in str(e.value)]
    assert "undecodable" in named and "missing_key" in named  # the first two defects in the shard


def test_unreadable_shard_is_counted_not_fatal(marker_shards, tmp_path):
    missing = [str(tmp_path / "missing.tar"), f"pipe:cat {tmp_path / 'missing.tar'}"]
    batches = list(ClipDataset(missing + marker_shards[:1], [EVAL_BUCKET], train=False, options=EVAL_OPTIONS))
    assert sum(len(b) for b in batches) == 4
    assert batches[-1].stats["shard_errors"] == 2 and batches[-1].stats["skipped"] == {}


@pytest.mark.timeout(30)
def test_endless_stream_of_failing_shards_stops(tmp_path):
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    for urls in ([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], [str(empty)]):
        ds = ClipDataset(urls, [EVAL_BUCKET], train=True, resampled=True)
        with pytest.raises(DataQualityError, match="shards in a row failed"):
            next(iter(ds))


def test_clips_that_fit_no_bucket_are_skipped_in_training(marker_shards, marker_samples):
    """Only the 64x96 clips fit a 48x72 bucket; the others are counted as no_bucket and the run goes on."""
    ds = ClipDataset(marker_shards, [Bucket(48, 72, 6, 2)], train=True, resampled=False,
                     max_skip_fraction=1.0)
    batches = list(ds)
    landscape = {k for k, s in marker_samples.items() if (s.info.height, s.info.width) == (64, 96)}
    assert {k for b in batches for k in b.key} == landscape and len(landscape) == 2
    assert batches[-1].stats["skipped"].get("no_bucket", 0) >= 1


# ------------------------------------------------------------------------------------- ranks and workers


def loader(ds: ClipDataset) -> DataLoader:
    return DataLoader(ds, batch_size=None, num_workers=2, worker_init_fn=worker_init_fn)


def test_eval_split_over_ranks_and_workers_is_complete_and_disjoint(marker_shards, marker_samples):
    """2 shards over world 2 x 2 workers: fewer shards than workers, so the split is by sample."""
    parts = []
    for rank in range(2):
        ds = ClipDataset(marker_shards, [Bucket(32, 32, 4, 2)], train=False, rank=rank, world_size=2)
        for b in loader(ds):
            parts.append((rank, b.stats["worker"], tuple(b.key)))
    by_worker = Counter()
    for rank, worker, keys in parts:
        by_worker[rank, worker] += len(keys)
        assert worker // 2 == rank  # stats name the global worker, rank * num_workers + worker
    keys = [k for *_, ks in parts for k in ks]
    assert sorted(keys) == sorted(marker_samples) and len(set(keys)) == len(keys)
    assert sorted(by_worker.values()) == [2, 2, 2, 2]


def test_distributed_eval_pads_a_short_share_with_marked_repeats(marker_shards, marker_samples):
    """3 ranks x 1 worker over 8 clips in batches of 3: shares of 3, 3 and 2 clips (1 batch each); after it each
    rank goes on with padding batches, so any number of batches can be taken in lockstep. A rank whose share is
    empty pads from the whole set."""
    real, padded = [], []
    for rank in range(3):
        ds = ClipDataset(marker_shards, [Bucket(32, 32, 4, 3)], train=False, rank=rank, world_size=3,
                         pad_eval=True)
        batches = take(iter(ds), 4)
        assert len(batches) == 4 and not batches[0].stats.get("padding")
        assert all(b.stats["padding"] for b in batches[1:])
        assert all(b.key == batches[0].key for b in batches[1:])  # the share, repeated
        real.extend(batches[0].key)
    assert sorted(real) == sorted(marker_samples)
    ds = ClipDataset(marker_shards, [Bucket(32, 32, 4, 3)], train=False, rank=9, world_size=10, pad_eval=True)
    batches = take(iter(ds), 2)  # 8 clips over 10 ranks: this rank's share is empty
    assert len(batches) == 2 and all(b.stats["padding"] for b in batches)
    unpadded = ClipDataset(marker_shards, [Bucket(32, 32, 4, 3)], train=False, rank=0, world_size=3)
    assert len(list(unpadded)) == 1


# One bucket per marker aspect, each with its own size, length and batch size.
BUCKETS = [Bucket(48, 72, 6, 2), Bucket(72, 48, 4, 1, weight=2.0), Bucket(40, 40, 5, 3)]


def bucket_sequence(batches) -> list[tuple]:
    return [(b.stats["step"], b.stats["bucket"], tuple(b.video.shape)) for b in batches]


def take(iterable, n):
    out = []
    for x in iterable:
        out.append(x)
        if len(out) == n:
            break
    return out


def test_bucket_schedule_agrees_across_ranks(marker_shards):
    runs = []
    for rank in range(2):
        ds = ClipDataset(marker_shards, BUCKETS, train=True, seed=3, rank=rank, world_size=2,
                         shuffle_buffer=4)
        runs.append(take(loader(ds), 8))
    seq0, seq1 = (bucket_sequence(r) for r in runs)
    assert seq0 == seq1
    assert [s for s, *_ in seq0] == list(range(8))
    names = {b.name: b for b in BUCKETS}
    for _, name, shape in seq0:
        b = names[name]
        assert shape == (b.batch_size, b.num_frames, 3, b.height, b.width)
    assert len({name for _, name, _ in seq0}) >= 2, "the schedule never changed bucket"
    assert [k for r in runs for b in r for k in b.key] != [], "no clips"
    assert [b.key for b in runs[0]] != [b.key for b in runs[1]], "ranks drew the same clips"


def test_start_step_shifts_the_schedule(marker_shards):
    def steps(start, n):
        ds = ClipDataset(marker_shards, BUCKETS, train=True, seed=3, start_step=start, shuffle_buffer=4)
        return bucket_sequence(take(ds, n))

    whole, resumed = steps(0, 9), steps(4, 5)
    assert resumed == whole[4:]


# ---------------------------------------------------------------------------------------------- clip sampling


def test_stride_jitter_stays_in_range_and_sets_fps(marker_samples):
    rng = np.random.default_rng(0)
    strides = [choose_stride(30, 5, 3, 2, rng) for _ in range(300)]
    assert set(strides) == {1, 2, 3, 4, 5}
    assert set(choose_stride(17, 5, 3, 2, rng) for _ in range(100)) == {1, 2, 3, 4}  # stride 5 spans 21 > 17
    assert choose_stride(30, 5, 3, 2, None) == 3 and choose_stride(3, 5, 3, 2, rng) == 3

    s = next(iter(marker_samples.values()))
    opts = ClipOptions(frame_stride=3, stride_jitter=2)
    seen = set()
    for _ in range(12):
        ex = decode_example(s, Bucket(32, 32, 4, 1), opts, rng)
        stride = np.diff(ex.frame_index)
        assert (stride == stride[0]).all() and 1 <= stride[0] <= 5
        assert ex.fps == pytest.approx(s.fps / stride[0])
        seen.add(int(stride[0]))
    assert len(seen) >= 3


def test_window_is_centred_without_rng_and_uniform_with_it():
    np.testing.assert_array_equal(sample_window(20, 4, 3, None), [5, 8, 11, 14])  # span 10, slack 10
    rng = np.random.default_rng(0)
    starts = Counter(int(sample_window(20, 4, 3, rng)[0]) for _ in range(2000))
    assert set(starts) == set(range(11)) and min(starts.values()) > 100
    np.testing.assert_array_equal(sample_window(10, 4, 3, rng), [0, 3, 6, 9])
    with pytest.raises(SampleError) as e:
        sample_window(9, 4, 3, None, "k")
    assert e.value.reason == "too_short" and "k" in str(e.value)
    assert span(4, 3) == 10


def test_reference_frame_is_far_from_the_window():
    window = np.arange(10, 20)
    assert reference_frame(40, window, None) == 39
    assert reference_frame(30, np.arange(15, 25), None) == 0
    rng = np.random.default_rng(0)
    picks = Counter(reference_frame(40, window, rng) for _ in range(500))
    # farthest is 20 frames away (frame 39); any frame at least 10 away may be picked
    assert set(picks) == {0} | set(range(29, 40))
    assert reference_frame(10, np.arange(10), rng) in range(10)  # the window covers the clip
