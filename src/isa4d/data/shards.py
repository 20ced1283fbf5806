"""Shard URLs: expansion, opening (local, `pipe:`, fsspec URLs), splitting across ranks and workers."""

from __future__ import annotations

import glob
import logging
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import urlparse

import braceexpand
import numpy as np
import webdataset as wds
from webdataset.gopen import gopen

log = logging.getLogger("isa4d.data")


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Brace-expand URL patterns (`data/train-{000..099}.tar` -> 100 URLs); local patterns may also glob (`data/*.tar`)."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    out = []
    for u in (u for p in patterns for u in braceexpand.braceexpand(p)):
        local = "://" not in u and not u.startswith("pipe:")
        if local and glob.has_magic(u):
            found = sorted(glob.glob(u))
            if not found:  # one line naming the pattern, not a silently shorter list
                raise ValueError(f"no shard URLs in {u!r}: the pattern matches no file")
            out.extend(found)
        else:
            out.append(u)
    if not out:
        raise ValueError(f"no shard URLs in {urls!r}")
    return out


def open_url(url: str):
    """A readable binary stream for a shard URL.

    Local paths, `file://` and `pipe:CMD` go through webdataset's gopen; every other scheme (s3://, gs://, http://,
    memory://, ...) through fsspec, which needs the protocol's backend installed (s3fs for s3, aiohttp for http).
    """
    scheme = urlparse(url).scheme
    if url.startswith("pipe:") or scheme in ("", "file") or len(scheme) == 1:  # len 1: a Windows drive letter
        return gopen(url[7:] if url.startswith("file://") else url, "rb")
    import fsspec

    try:
        return fsspec.open(url, "rb").open()
    except ImportError as e:
        raise ImportError(f"{url}: fsspec needs the backend for '{scheme}://' ({e}); e.g. pip install s3fs for s3") from e


def iter_samples(urls: Sequence[str], on_shard_error: Callable[[str, Exception], None],
                 select: Callable[[int], bool] | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples (dicts of bytes with __key__ and __url__) from the shards in order.

    A shard that cannot be opened, is corrupt part-way or holds no samples is reported to `on_shard_error`
    and the stream goes on with the next one. Samples read completely before the fault are kept; the one being
    read when it struck is dropped, since it may lack files. An empty shard counts as a fault, so an endless
    resampled stream over empty shards ends at the caller's shard-error limit instead of spinning.
    `select(i)`: keep only the shard's i-th samples it accepts (a rank's share); a shard of which it keeps none
    counts as empty for this reader.
    """
    for url in urls:
        errors: list[Exception] = []

        def handler(exn: Exception, url: str = url, errors: list[Exception] = errors) -> bool:
            errors.append(exn)
            on_shard_error(url, exn)
            return False  # stop this shard, continue with the next

        try:
            stream = open_url(url)
        except Exception as e:
            on_shard_error(url, e)
            continue
        pending, count, kept, finished = None, 0, 0, False
        try:
            files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=handler)
            for sample in wds.tariterators.group_by_keys(files, handler=handler):
                if pending is not None:
                    yield pending
                pending, count = None, count + 1
                if select is None or select(count - 1):
                    pending, kept = sample, kept + 1
            finished = True
        except Exception as e:  # errors the handlers do not see (e.g. a tar header that fails to parse)
            errors.append(e)
            on_shard_error(url, e)
        finally:
            try:
                stream.close()  # a `pipe:` stream raises here when its command failed
            except Exception as e:
                if finished and not errors:
                    errors.append(e)
                    on_shard_error(url, e)
        if errors:
            continue
        if pending is not None:
            yield pending
        elif count == 0:
            on_shard_error(url, ValueError("shard holds no samples"))
        elif kept == 0:
            on_shard_error(url, ValueError(f"none of the shard's {count} samples is this reader's share (fewer "
                                           f"samples than readers?)"))


def split_for_worker(urls: list[str], rank: int, world_size: int, worker: int, num_workers: int) -> tuple[list[str], Callable[[int], bool]]:
    """Which shards and which samples of them one (rank, worker) reads in a finite, ordered pass.

    With at least as many shards as workers in the world, shards are dealt round-robin. With fewer, every worker reads
    every shard and keeps sample i when i % (world_size * num_workers) is its global worker index. Either way the
    parts are disjoint and together complete.
    """
    total, gid = world_size * num_workers, rank * num_workers + worker
    if len(urls) >= total:
        return urls[gid::total], lambda i: True
    return urls, lambda i: i % total == gid


def split_for_rank(urls: list[str], rank: int, world_size: int) -> tuple[list[str], Callable[[int], bool] | None]:
    """The part of the training data one rank resamples from, disjoint from every other rank's: (its shards, the
    `select` of `iter_samples` for the samples it keeps of each, None for all).

    With at least as many shards as ranks, shards are dealt round-robin (a rank reads only its own). With fewer,
    every rank reads every shard and keeps the samples whose index in the shard modulo the world size is its rank.
    Either way the parts are disjoint and together complete.
    """
    if world_size <= 1 or len(urls) >= world_size:
        return urls[rank::world_size], None
    return urls, lambda i: i % world_size == rank


def resampled_urls(urls: list[str], rng: np.random.Generator) -> Iterator[str]:
    """An endless stream of shards drawn with replacement (each rank and worker with its own rng)."""
    while True:
        yield urls[int(rng.integers(len(urls)))]


def shuffled(samples: Iterator[Any], bufsize: int, rng: np.random.Generator) -> Iterator[Any]:
    """Shuffle a stream through a buffer of `bufsize` items."""
    buf: list[Any] = []
    for s in samples:
        buf.append(s)
        if len(buf) >= bufsize:
            i = int(rng.integers(len(buf)))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf
