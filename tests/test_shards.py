"""Tests for isa4d.data.shards: URL expansion and opening, reading past faults, rank/worker splits."""

from __future__ import annotations

import itertools
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import webdataset as wds

from isa4d.data.buckets import Bucket
from isa4d.data.dataset import ClipDataset
from isa4d.data.examples import ClipOptions
from isa4d.data.shards import expand_urls, iter_samples, resampled_urls, shuffled, split_for_rank, split_for_worker


def write_tiny_shards(root: Path, num_shards: int, per_shard: int) -> tuple[list[str], list[str]]:
    """Shards of small text samples (no video): (paths, keys in shard order)."""
    root.mkdir(parents=True, exist_ok=True)
    paths, keys = [], []
    for s in range(num_shards):
        path = root / f"tiny-{s:03d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                keys.append(f"s{s:03d}_{i:03d}")
                sink.write({"__key__": keys[-1], "txt": keys[-1].encode(), "cls": str(i).encode()})
        paths.append(str(path))
    return paths, keys


class Errors(list):
    def __call__(self, url, exn):
        self.append((url, exn))


def read_keys(urls, errors=None) -> list[str]:
    return [s["__key__"] for s in iter_samples(urls, errors if errors is not None else Errors())]


# ---------------------------------------------------------------------------------------------- URL handling


def test_expand_urls_brace_patterns_globs_and_lists(tmp_path):
    assert expand_urls("d/train-{000..002}.tar") == ["d/train-000.tar", "d/train-001.tar", "d/train-002.tar"]
    assert expand_urls(["a-{0,1}.tar", "s3://b/c.tar"]) == ["a-0.tar", "a-1.tar", "s3://b/c.tar"]
    paths, _ = write_tiny_shards(tmp_path, 3, 1)
    assert expand_urls(str(tmp_path / "tiny-*.tar")) == paths
    with pytest.raises(ValueError, match="no shard URLs"):
        expand_urls([])
    missing = str(tmp_path / "nothing-*.tar")  # one pattern of several matching nothing is named, not dropped
    with pytest.raises(ValueError, match=r"^no shard URLs in '.*nothing-\*\.tar': the pattern matches no file$"):
        expand_urls([str(tmp_path / "tiny-*.tar"), missing])


def test_every_url_form_reads_the_same_samples(marker_shards):
    """Local path, brace pattern, file://, pipe:cat and an fsspec memory:// URL give byte-identical samples,
    and ClipDataset decodes identical clips from each."""
    first = marker_shards[0]
    pattern = first.replace("000000.tar", "{000000..000001}.tar")
    assert expand_urls(pattern) == marker_shards
    memory = fsspec.filesystem("memory")
    memory.pipe("/isa4d-test/markers-000000.tar", Path(first).read_bytes())
    try:
        forms = {"path": [first], "file": ["file://" + first], "pipe": [f"pipe:cat {first}"],
                 "memory": ["memory://isa4d-test/markers-000000.tar"]}
        raw = {}
        for name, urls in forms.items():
            errors = Errors()
            raw[name] = list(iter_samples(urls, errors))
            assert not errors and len(raw[name]) == 4
        for name in forms:
            for a, b in zip(raw["path"], raw[name]):
                assert b["__url__"] == forms[name][0] and {**a, "__url__": ""} == {**b, "__url__": ""}
        decoded = {}
        for name, urls in forms.items():
            ds = ClipDataset(urls, [Bucket(40, 56, 6, 2)], train=False, options=ClipOptions(frame_stride=2))
            decoded[name] = list(ds)
        for name in forms:
            for a, b in zip(decoded["path"], decoded[name], strict=True):
                assert a.key == b.key and torch.equal(a.video, b.video) and torch.equal(a.K, b.K)
        assert [k for b in decoded["path"] for k in b.key] == [s["__key__"] for s in raw["path"]]
        assert len(list(ClipDataset(pattern, [Bucket(40, 56, 6, 8)], train=False))[0]) == 8
    finally:
        memory.rm("/isa4d-test", recursive=True)


# ------------------------------------------------------------------------------------------ reading faults


def test_missing_shards_are_reported_and_skipped(tmp_path):
    paths, keys = write_tiny_shards(tmp_path, 2, 3)
    errors = Errors()
    none = tmp_path / "none.tar"
    missing = [str(none), f"pipe:cat {none}", "memory://isa4d-test/none.tar"]
    got = read_keys([missing[0], paths[0], missing[1], paths[1], missing[2]], errors)
    assert got == keys
    assert [u for u, _ in errors] == missing  # each reported once, the pipe's failed exit status included


def test_truncated_shard_keeps_complete_samples_and_drops_the_partial_one(tmp_path):
    paths, keys = write_tiny_shards(tmp_path, 1, 4)
    with tarfile.open(paths[0]) as tf:
        member = tf.getmember("s000_002.txt")  # the second file of the third sample
    cut = tmp_path / "cut.tar"
    cut.write_bytes(Path(paths[0]).read_bytes()[: member.offset_data + 2])
    errors = Errors()
    assert read_keys([str(cut), paths[0]], errors) == keys[:2] + keys
    assert [u for u, _ in errors] == [str(cut)]


def test_empty_and_garbage_shards_are_faults(tmp_path):
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    errors = Errors()
    assert read_keys([str(empty), str(garbage)], errors) == []
    assert [u for u, _ in errors] == [str(empty), str(garbage)]
    assert "no samples" in str(errors[0][1])


def test_abandoned_pipe_stream_is_not_a_fault(tmp_path):
    paths, _ = write_tiny_shards(tmp_path, 1, 200)
    errors = Errors()
    stream = iter_samples([f"pipe:cat {paths[0]}"], errors)
    next(stream)
    stream.close()
    assert errors == []


# ------------------------------------------------------------------------------------ rank and worker splits


@pytest.mark.parametrize("num_shards, world_size, num_workers",
                         [(7, 2, 3), (6, 2, 3), (1, 2, 3), (3, 2, 2), (2, 1, 1)])
def test_split_for_worker_is_complete_and_disjoint(tmp_path, num_shards, world_size, num_workers):
    paths, keys = write_tiny_shards(tmp_path, num_shards, 5)
    parts, shard_counts = {}, []
    for rank, worker in itertools.product(range(world_size), range(num_workers)):
        urls, keep = split_for_worker(paths, rank, world_size, worker, num_workers)
        shard_counts.append(len(urls))
        parts[rank, worker] = [k for i, k in enumerate(read_keys(urls)) if keep(i)]
    for a, b in itertools.combinations(parts, 2):
        assert not set(parts[a]) & set(parts[b]), (a, b)
    assert sorted(k for p in parts.values() for k in p) == sorted(keys)
    sizes = [len(p) for p in parts.values()]
    if num_shards >= world_size * num_workers:  # whole shards dealt out
        assert max(shard_counts) - min(shard_counts) <= 1
    else:  # every worker reads every shard and keeps its share of samples
        assert set(shard_counts) == {num_shards} and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("num_shards, world_size", [(5, 2), (4, 4), (1, 2), (2, 3), (3, 1)])
def test_split_for_rank_is_complete_and_disjoint(tmp_path, num_shards, world_size):
    paths, keys = write_tiny_shards(tmp_path, num_shards, 7)
    parts = []
    for rank in range(world_size):
        urls, select = split_for_rank(paths, rank, world_size)
        parts.append([s["__key__"] for s in iter_samples(urls, Errors(), select)])
    for a, b in itertools.combinations(parts, 2):
        assert not set(a) & set(b)
    assert sorted(k for p in parts for k in p) == sorted(keys)
    sizes = [len(p) for p in parts]
    if num_shards < world_size:  # every rank reads every shard and keeps its share of samples
        assert max(sizes) - min(sizes) <= num_shards


def test_a_shard_with_none_of_a_readers_samples_counts_as_empty(tmp_path):
    paths, _ = write_tiny_shards(tmp_path, 1, 2)
    errors = Errors()
    urls, select = split_for_rank(paths, 2, 3)  # 3 ranks, 2 samples: rank 2 has none
    assert list(iter_samples(urls, errors, select)) == []
    assert len(errors) == 1 and "none of the shard's 2 samples" in str(errors[0][1])


def test_resampled_urls_draw_with_replacement_from_a_seeded_rng():
    urls = [f"u{i}" for i in range(5)]
    a = list(itertools.islice(resampled_urls(urls, np.random.default_rng(1)), 200))
    b = list(itertools.islice(resampled_urls(urls, np.random.default_rng(1)), 200))
    c = list(itertools.islice(resampled_urls(urls, np.random.default_rng(2)), 200))
    assert a == b and a != c and set(a) == set(urls)


def test_shuffled_is_a_seeded_permutation_that_mixes():
    items = list(range(100))
    a = list(shuffled(iter(items), 16, np.random.default_rng(0)))
    b = list(shuffled(iter(items), 16, np.random.default_rng(0)))
    assert sorted(a) == items and a == b and a != items
    assert np.mean(np.abs(np.array(a) - items)) > 4  # items travel, not just swap with neighbours
    assert sorted(shuffled(iter(items[:5]), 16, np.random.default_rng(0))) == items[:5]  # fewer than bufsize
