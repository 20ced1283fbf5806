"""Cache the frozen stage-1 VAE's latents of contract shards, so stage 2 trains without running the encoder
(how: docs/data_prep.md §5; the sample format: docs/data_format.md, cached-latent shards).

    python -m data_prep.cache_latents --vae runs/vae_tiny/checkpoints/last.ckpt --urls 'data/toy/train-*.tar' \
        --out 'data/toy_latents/train-%06d.tar' --height 64 --width 64 --frames 17 --passes 4

The shards are read with the loader's own machinery (isa4d.data.dataset: parsing, skip accounting, worker split,
windows and crops with K updated). Each pass writes one cached sample of every clip that fits the one bucket
H x W x T: pass 0 at the centred window and crop (as validation cuts clips), every further pass at a random window,
crop and stride drawn from (seed, pass, key). The VAE encodes the clip, its reference image and its background plate
(when there is one) under no_grad, with bf16 autocast on CUDA; the samples keep the posterior moments, un-normalised,
so training draws a fresh latent per step as it does on the fly. The output folder's `latents.json` records each
cache written there: bucket, VAE path and fingerprint, counts, skips, dtype, passes.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import time
import zlib
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from einops import rearrange
from torch.utils.data import DataLoader

from isa4d.data.batch import Batch, LatentExample, collate
from isa4d.data.buckets import Bucket
from isa4d.data.contract import SampleError
from isa4d.data.datamodule import LoaderHealth
from isa4d.data.dataset import ClipDataset, SkipCounter, worker_init_fn
from isa4d.data.examples import ClipOptions
from isa4d.data.latents import LatentSample, encode_latent_sample, vae_fingerprint
from isa4d.data.shards import expand_urls
from isa4d.models.vae import CausalVideoVAE, load_vae
from isa4d.progress import Progress, count_tar_samples


class CachePass(ClipDataset):
    """One ordered pass over the source clips, cut for the cache's bucket, in lists of up to `batch_size`
    (example, source key, source url, source json); each worker ends with its skip counts (a dict)."""

    def __init__(self, urls: str | list[str], bucket: Bucket, options: ClipOptions, seed: int, pass_index: int):
        super().__init__(urls, [bucket], train=False, options=options, seed=seed, max_skip_fraction=1.0)
        self.pass_index = pass_index

    def _rng(self, key: str) -> np.random.Generator | None:
        """None (centred, fixed) in pass 0; else this pass's own draw for the clip, whatever the order or workers."""
        if self.pass_index == 0:
            return None
        return np.random.default_rng([self.seed, self.pass_index, zlib.crc32(key.encode())])

    def __iter__(self) -> Iterator[list[tuple] | dict[str, Any]]:
        worker, num_workers = self._worker()
        counter = SkipCounter(1.0, 1 << 30, 1 << 30)  # offline: skip and count, never stop
        bucket, chunk = self.schedule.buckets[0], []
        for s in self._parsed(counter, worker, num_workers, None):
            if isinstance(s, LatentSample):
                raise ValueError(f"{s.url} holds cached latents ({s.key}): cache_latents reads contract video shards")
            if not self._fits(s, bucket):
                counter.skip("no_bucket", f"{s.key}: video {s.info.height}x{s.info.width}x{s.info.num_frames} does "
                                          f"not fit {bucket.name} (shard {s.url})")
                continue
            try:
                chunk.append((self._example(s, bucket, self._rng(s.key)), s.key, s.url, s.meta))
            except SampleError as e:
                counter.skip(e.reason, str(e) + f" (shard {s.url})")
            if len(chunk) == bucket.batch_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk
        yield counter.state(worker)


@torch.no_grad()
def encode_moments(vae: CausalVideoVAE, batch: Batch) -> dict[str, torch.Tensor]:
    """Posterior moments (mean and logvar on channels) of a normalised batch's video (B, 2C, T', h, w), reference
    (B, 2C, h, w) and background plates (when the batch has any), float32 on the CPU."""
    device = batch.K.device
    inputs = {"video": rearrange(batch.video, "b t c h w -> b c t h w"), "ref": batch.ref[:, :, None]}
    if batch.bg is not None:
        inputs["bg"] = rearrange(batch.bg, "b t c h w -> b c t h w")
    out = {}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for name, x in inputs.items():
            posterior = vae.encode(x)
            out[name] = torch.cat([posterior.mean, posterior.logvar], dim=1).float().cpu()
    out["ref"] = out["ref"][:, :, 0]
    return out


def _existing_shards(pattern: str) -> list[str]:
    return sorted(glob.glob(re.sub(r"%0?\d*d", "*", pattern)))


def cache_latents(vae_path: str | Path, urls: str | list[str], out: str, bucket: Bucket, *, ema: bool = False,
                  passes: int = 1, seed: int = 0, options: ClipOptions = ClipOptions(), device: str = "cpu",
                  dtype: str = "float16", maxcount: int = 500, workers: int = 0, overwrite: bool = False) -> dict:
    """Write the cache (module doc) to the shards of `out`, a pattern such as 'DIR/train-%06d.tar' whose batches
    of `bucket.batch_size` clips are encoded at once; returns its summary, also stored in DIR/latents.json."""
    if passes < 1 or maxcount < 1 or dtype not in ("float16", "float32"):
        raise ValueError(f"need passes >= 1, maxcount >= 1 and dtype float16 or float32; got {passes}, {maxcount}, "
                         f"{dtype}")
    if re.search(r"%0?\d*d", out) is None:
        raise ValueError(f"--out {out!r} needs a shard number pattern, e.g. 'DIR/train-%06d.tar'")
    stale = _existing_shards(out)
    if stale and not overwrite:
        raise FileExistsError(f"{len(stale)} shard(s) match --out {out!r} (e.g. {stale[0]}); pass --overwrite to "
                              f"replace them, or pick another folder or prefix")
    start = time.time()
    vae = load_vae(vae_path, ema=ema)
    try:  # sizes the VAE codes, checked before any work
        vae.num_latent_frames(bucket.num_frames)
    except ValueError as e:
        raise ValueError(f"--frames {bucket.num_frames}: {e}") from None
    if bucket.height % vae.spatial_factor or bucket.width % vae.spatial_factor:
        raise ValueError(f"--height/--width {bucket.height}x{bucket.width} must be multiples of the VAE's "
                         f"{vae.spatial_factor}")
    fingerprint = vae_fingerprint(vae)
    for path in stale:
        os.remove(path)
    vae.to(device)
    folder = Path(out).parent
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[str] = []
    per_pass, with_bg, health = [], 0, Counter()
    per_source = count_tar_samples(expand_urls(urls))  # the progress total: every clip once per pass
    bar = Progress(per_source * passes if per_source else None, "cache latents", "clips")
    with bar, wds.ShardWriter(out, maxcount=maxcount, verbose=0, post=shards.append) as sink:
        for p in range(passes):
            loader = DataLoader(CachePass(urls, bucket, options, seed, p), batch_size=None, num_workers=workers,
                                worker_init_fn=worker_init_fn)
            pass_health, written = LoaderHealth(), 0
            for item in loader:
                if isinstance(item, dict):
                    pass_health.update(item)
                    continue
                examples, keys, sources, metas = zip(*item)
                moments = encode_moments(vae, collate(examples).to(device).normalize())
                moments = {k: v.numpy().astype(dtype) for k, v in moments.items()}
                for i, (e, key, source, meta) in enumerate(zip(examples, keys, sources, metas)):
                    T, H, W = e.size
                    bg = moments["bg"][i] if e.bg is not None else None
                    latents = LatentExample(moments["video"][i], moments["ref"][i], T, H, W, fingerprint, bg)
                    cached = replace(e, key=f"{key}_p{p}", video=None, bg=None, mask=None, latents=latents)
                    sink.write(encode_latent_sample(cached.key, cached, meta,
                                                    {"source_key": key, "source_url": source, "pass": p}))
                    with_bg += bg is not None
                written += len(examples)
                bar.update(len(examples), f"pass {p + 1}/{passes}")
            per_pass.append(written)
            counts = pass_health.summary()
            health.update({k.removeprefix("data/"): int(v) for k, v in counts.items() if k != "data/skipped_fraction"})
            print(f"pass {p}: {written} clips cached, {int(counts['data/skipped'])} skipped")
    if sum(per_pass) == 0:
        for path in shards:
            os.remove(path)
        raise ValueError(f"no clip of {urls} could be cached at {bucket.name} (loader: {dict(health)}); check the "
                         f"bucket against the data (isa4d data inspect)")
    summary = {
        "shards": [os.path.basename(s) for s in shards], "samples": sum(per_pass), "samples_per_pass": per_pass,
        "with_background": with_bg, "bucket": {"height": bucket.height, "width": bucket.width,
                                               "num_frames": bucket.num_frames},
        "vae": {"path": str(vae_path), "ema": ema, "fingerprint": fingerprint, "latent_channels": vae.latent_channels},
        "dtype": dtype, "passes": passes, "seed": seed, "clip_options": asdict(options), "source_urls": urls,
        "loader": dict(health), "seconds": round(time.time() - start, 1),
    }
    record = folder / "latents.json"
    caches = json.loads(record.read_text()).get("caches", {}) if record.exists() else {}
    caches[os.path.basename(out)] = summary
    tmp = record.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"caches": caches}, indent=1))
    os.replace(tmp, record)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", required=True,
                    help="the stage-1 checkpoint DiT training will use (.ckpt, sharded folder, .safetensors)")
    ap.add_argument("--ema", action="store_true",
                    help="the checkpoint's EMA weights (as vae_ema: true in the DiT config)")
    ap.add_argument("--urls", required=True, nargs="+", help="contract shards: paths, brace or glob patterns, URLs")
    ap.add_argument("--out", required=True, help="output shard pattern, e.g. 'data/toy_latents/train-%%06d.tar'")
    ap.add_argument("--height", type=int, required=True)
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--frames", type=int, required=True, help="frames per clip (1 + 4k for the 4x temporal VAE)")
    ap.add_argument("--passes", type=int, default=1, help="samples per clip: pass 0 centred, the others random")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random passes")
    ap.add_argument("--frame-stride", type=int, default=1, help="as data.frame_stride")
    ap.add_argument("--stride-jitter", type=int, default=0, help="as data.stride_jitter (random passes)")
    ap.add_argument("--crop-jitter", type=float, default=0.0, help="as data.crop_jitter (random passes)")
    ap.add_argument("--aspect-tolerance", type=float, default=0.25, help="as data.aspect_tolerance")
    ap.add_argument("--max-upscale", type=float, default=2.0, help="as data.max_upscale")
    ap.add_argument("--batch-size", type=int, default=8, help="clips encoded at once")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="storage dtype of the moments")
    ap.add_argument("--maxcount", type=int, default=500, help="samples per shard")
    ap.add_argument("--workers", type=int, default=2, help="loader worker processes that decode clips")
    ap.add_argument("--overwrite", action="store_true", help="replace shards that match --out")
    a = ap.parse_args(argv)
    options = ClipOptions(a.frame_stride, a.stride_jitter, a.crop_jitter, a.aspect_tolerance, a.max_upscale)
    summary = cache_latents(a.vae, a.urls, a.out, Bucket(a.height, a.width, a.frames, a.batch_size), ema=a.ema,
                            passes=a.passes, seed=a.seed, options=options, device=a.device, dtype=a.dtype,
                            maxcount=a.maxcount, workers=a.workers, overwrite=a.overwrite)
    print(f"cached {summary['samples']} clips of {a.height}x{a.width}x{a.frames} ({summary['with_background']} with a "
          f"background) into {len(summary['shards'])} shard(s) beside {Path(a.out).parent / 'latents.json'}; "
          f"VAE {summary['vae']['fingerprint']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
