"""How much the FVD protocol moves the number: the same real and generated clips scored under `tfgan` and
`stylegan_v` (isa4d.metrics.fvd), and each of their three differences alone.

    python bench/fvd_protocols.py --urls data/toy/val-000000.tar --clips 40 --noise 0.1

Real clips are the first half of the clips read (validation order, centred windows of `--frames`), generated
ones the second half with Gaussian noise of std `--noise` added (a stand-in for a model's samples: different
clips of the same world). `--upscale` first enlarges every frame by that factor, so that the 224x224 resize
shrinks (where the resize filters differ most) instead of enlarging. Needs the I3D weights (make setup).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from isa4d.data.buckets import Bucket  # noqa: E402
from isa4d.data.dataset import ClipDataset  # noqa: E402
from isa4d.metrics.fvd import FVD_FRAMES, clip_offsets, frechet_distance_features, preprocess_clips  # noqa: E402
from isa4d.metrics.i3d import InceptionI3d  # noqa: E402


def load_clips(urls: str, count: int, size: int, frames: int) -> torch.Tensor:
    """(count, frames, 3, size, size) in [-1, 1], the first `count` clips of an ordered pass."""
    ds = ClipDataset(urls, [Bucket(size, size, frames, 8)], train=False)
    out = []
    for batch in ds:
        out.append(batch.video.float() / 127.5 - 1)  # the loader's uint8 (B, T, 3, H, W)
        if sum(len(v) for v in out) >= count:
            break
    clips = torch.cat(out)[:count]
    if len(clips) < count:
        raise SystemExit(f"{urls}: only {len(clips)} clips, asked for {count}")
    return clips


@torch.no_grad()
def features(i3d: InceptionI3d, videos: torch.Tensor, resize: str, offsets: bool, seed: int = 0) -> torch.Tensor:
    starts = clip_offsets(videos, videos.shape[1] - FVD_FRAMES + 1, seed) if offsets else None
    return torch.cat([i3d(preprocess_clips(v, protocol=resize, starts=None if starts is None else starts[i:i + 4]))
                      for i, v in zip(range(0, len(videos), 4), videos.split(4))]).double()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--urls", default=str(ROOT / "data/toy/val-000000.tar"))
    ap.add_argument("--clips", type=int, default=40, help="clips read; half real, half generated")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--frames", type=int, default=17, help="clip length (> 16 gives stylegan_v's offsets room)")
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--upscale", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    clips = load_clips(a.urls, a.clips, a.size, a.frames)
    if a.upscale > 1:
        t = clips.shape[1]
        clips = F.interpolate(clips.flatten(0, 1), scale_factor=a.upscale, mode="bicubic").clamp(-1, 1)
        clips = clips.unflatten(0, (-1, t))
    half = len(clips) // 2
    real, fake = clips[:half], (clips[half:] + a.noise * torch.randn(clips[half:].shape,
                                                                     generator=torch.Generator().manual_seed(0)))
    i3d = InceptionI3d.from_pretrained()
    f = {(resize, off): features(i3d, real, resize, off) for resize in ("tfgan", "stylegan_v") for off in (False, True)}
    f_fake = {resize: features(i3d, fake.clamp(-1, 1), resize, False) for resize in ("tfgan", "stylegan_v")}
    rows = [
        ("tfgan (N-1 covariance, TF1 resize, frame 0)", f[("tfgan", False)], f_fake["tfgan"], 1),
        ("  covariance / N only", f[("tfgan", False)], f_fake["tfgan"], 0),
        ("  half-pixel bilinear resize only", f[("stylegan_v", False)], f_fake["stylegan_v"], 1),
        ("  random offsets into real clips only", f[("tfgan", True)], f_fake["tfgan"], 1),
        ("stylegan_v (all three)", f[("stylegan_v", True)], f_fake["stylegan_v"], 0),
    ]
    base = None
    print(f"{half} real / {len(fake)} generated clips, {a.frames}x{clips.shape[-1]}x{clips.shape[-1]}, {a.urls}")
    for name, r, g, ddof in rows:
        value = frechet_distance_features(r, g, ddof).item()
        base = value if base is None else base
        print(f"{name:48s} {value:10.1f}  {100 * (value / base - 1):+6.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
