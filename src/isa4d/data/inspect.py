"""`isa4d data inspect URLS`: check shards against the contract and summarise them (video shards and cached-latent
shards alike, isa4d.data.latents).

Exit status 0 when every sample is valid, 1 when any sample or shard is not, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from isa4d.data import video as videolib
from isa4d.data.contract import OPTIONAL_KEYS, ParsedSample, SampleError
from isa4d.data.latents import LatentSample, parse_any
from isa4d.data.shards import expand_urls, iter_samples
from isa4d.progress import Progress, count_tar_samples


@dataclass
class Report:
    shards: int = 0
    samples: int = 0
    valid: int = 0
    problems: list[tuple[str, str, str, str]] = field(default_factory=list)  # (url, key, reason, message)
    sizes: Counter = field(default_factory=Counter)
    fps: Counter = field(default_factory=Counter)
    people: Counter = field(default_factory=Counter)
    codecs: Counter = field(default_factory=Counter)
    optional: Counter = field(default_factory=Counter)
    frames: list[int] = field(default_factory=list)
    cached_vaes: Counter = field(default_factory=Counter)  # cached-latent samples by VAE fingerprint

    def add(self, s: ParsedSample | LatentSample) -> None:
        self.valid += 1
        if isinstance(s, LatentSample):
            e = s.example
            T, H, W = s.size
            self.sizes[f"{H}x{W}"] += 1
            self.fps[f"{e.fps:g}"] += 1
            self.people[e.betas.shape[0]] += 1
            self.codecs[f"cached latents ({e.latents.video.dtype})"] += 1
            self.frames.append(T)
            self.optional.update(["latents bg"] if e.latents.bg is not None else [])
            self.cached_vaes[e.latents.fingerprint] += 1
            return
        self.sizes[f"{s.info.height}x{s.info.width}"] += 1
        self.fps[f"{s.fps:g}"] += 1
        self.people[s.smpl.num_people] += 1
        self.codecs[s.info.codec] += 1
        self.frames.append(s.info.num_frames)
        present = {"bg.mp4": s.bg is not None, "mask.mp4": s.mask is not None, "ref.png": s.ref is not None,
                   "ref.npz": s.ref is not None and s.ref.K is not None}
        self.optional.update(k for k in OPTIONAL_KEYS if present[k])

    def as_dict(self) -> dict:
        f = np.array(self.frames) if self.frames else np.zeros(1)
        return {
            "shards": self.shards, "samples": self.samples, "valid": self.valid, "invalid": self.samples - self.valid,
            "shard_errors": sum(1 for p in self.problems if p[2] == "shard_error"),
            "resolutions": dict(self.sizes.most_common()), "fps": dict(self.fps.most_common()),
            "people_per_clip": {str(k): v for k, v in sorted(self.people.items())}, "codecs": dict(self.codecs),
            "frames": {"min": int(f.min()), "median": float(np.median(f)), "max": int(f.max())},
            "optional_keys": dict(self.optional), "cached_latents_by_vae": dict(self.cached_vaes),
            "problems": [{"url": u, "key": k, "reason": r, "message": m} for u, k, r, m in self.problems],
        }


def _deep_check(s: ParsedSample) -> None:
    """Decode every frame of every video of the sample, so stream corruption past the header is found too."""
    for name, data in (("mp4", s.video), ("bg.mp4", s.bg), ("mask.mp4", s.mask)):
        if data is None:
            continue
        try:
            n = len(videolib.decode_all(data, pix_fmt="gray"))
        except videolib.VideoError as e:
            raise SampleError("undecodable", f"{name}: {e}", s.key) from e
        if n != s.smpl.num_frames:
            raise SampleError("frame_mismatch", f"{name} decodes to {n} frames, smpl.npz has {s.smpl.num_frames}", s.key)


def inspect(urls: list[str], decode: bool = False, progress: Callable[[int], None] | None = None) -> Report:
    """`progress(n)`: called as samples are read (the command's progress line)."""
    report = Report()
    failed: set[str] = set()

    def shard_error(url: str, exn: Exception) -> None:
        failed.add(url)
        report.problems.append((url, "-", "shard_error", f"{type(exn).__name__}: {exn}"))

    expanded = expand_urls(urls)
    report.shards = len(expanded)
    for raw in iter_samples(expanded, shard_error):
        report.samples += 1
        if progress is not None:
            progress(1)
        try:
            s = parse_any(raw)
            if decode and isinstance(s, ParsedSample):
                _deep_check(s)
        except SampleError as e:
            report.problems.append((str(raw.get("__url__")), e.key, e.reason, str(e)))
            continue
        report.add(s)
    return report


def print_report(r: Report, out=sys.stdout) -> None:
    d = r.as_dict()
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"shards: {d['shards']}  samples: {d['samples']}  valid: {d['valid']}  invalid: {d['invalid']}  shard errors: {d['shard_errors']}")
    if r.valid:
        p(f"frames per clip: min {d['frames']['min']}, median {d['frames']['median']:g}, max {d['frames']['max']}")
        p("resolutions (HxW): " + ", ".join(f"{k} ({v})" for k, v in d["resolutions"].items()))
        p("fps: " + ", ".join(f"{k} ({v})" for k, v in d["fps"].items()))
        p("people per clip: " + ", ".join(f"{k} ({v})" for k, v in d["people_per_clip"].items()))
        p("codecs: " + ", ".join(f"{k} ({v})" for k, v in d["codecs"].items()))
        p("optional keys: " + (", ".join(f"{k} ({v})" for k, v in d["optional_keys"].items()) or "none"))
        if r.cached_vaes:
            p("cached latents by VAE: " + ", ".join(f"{k} ({v})" for k, v in r.cached_vaes.items()))
    if r.problems:
        p(f"problems ({len(r.problems)}):")
        for u, k, reason, m in r.problems:
            p(f"  [{reason}] {u} :: {m}")
    by_reason = Counter(x[2] for x in r.problems)
    if by_reason:
        p("by reason: " + ", ".join(f"{k} ({v})" for k, v in by_reason.most_common()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="isa4d data inspect", description="Validate WebDataset shards against the isa4d contract.")
    ap.add_argument("urls", nargs="+", help="shard paths, brace patterns (data/train-{000000..000009}.tar), pipe: or fsspec URLs")
    ap.add_argument("--decode", action="store_true", help="decode every frame of every video (slow, finds mid-stream corruption)")
    ap.add_argument("--json", dest="json_out", help="also write the report as JSON to this path")
    a = ap.parse_args(argv)
    with Progress(count_tar_samples(expand_urls(a.urls)), "inspect", "samples") as bar:
        report = inspect(a.urls, decode=a.decode, progress=bar.update)
    print_report(report)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(report.as_dict(), f, indent=2)
    return 0 if report.problems == [] and report.samples > 0 else 1
