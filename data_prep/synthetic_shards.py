"""Marker-world shards: contract-valid samples whose pixels are checkable against their cameras.

Each person is drawn as a coloured disc centred on the exact projection of its SMPL translation (the pelvis), over a
textured, moving background, seen by an orbiting camera. Tests use it to check the data plane end to end (frames,
SMPL and cameras stay aligned through windowing, cropping and resizing); `make bench-data` uses it for realistic
H.264 content. The procedural 4D human world (toy bodies, rendered) is `data_prep/toy_world.py`'s job.

    python -m data_prep.synthetic_shards --out data/markers --shards 2 --per-shard 8
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from isa4d.data.contract import CameraSequence, SMPLSequence, encode_sample
from isa4d.geometry.camera import intrinsics_from_fov, look_at, project

COLORS = np.array([[230, 40, 40], [40, 200, 60], [50, 80, 240]], dtype=np.uint8)


def make_clip(rng: np.random.Generator, height: int, width: int, frames: int, people: int, fps: float, *,
              texture: bool = True) -> dict:
    """Arrays of one marker clip: video, background plate, mask, SMPL, cameras."""
    K = np.repeat(intrinsics_from_fov(rng.uniform(40, 60), height, width)[None], frames, 0)
    angle = rng.uniform(0, 2 * np.pi) + np.linspace(0, rng.uniform(-0.6, 0.6), frames)
    radius, elev = rng.uniform(3.5, 5.0), 0.9 + rng.uniform(0.2, 0.6)
    eyes = np.stack([radius * np.sin(angle), np.full(frames, elev), radius * np.cos(angle)], 1)
    w2c = np.stack([look_at(e, np.array([0.0, 0.9, 0.0])) for e in eyes])
    start = rng.uniform(-0.8, 0.8, (people, 1, 3)) * np.array([1, 0, 1]) + np.array([0, 0.9, 0])
    vel = rng.uniform(-0.02, 0.02, (people, 1, 3)) * np.array([1, 0, 1])
    transl = start + vel * np.arange(frames)[None, :, None]
    smpl = SMPLSequence(
        betas=rng.normal(0, 1, (people, 10)).astype(np.float32),
        global_orient=rng.normal(0, 0.2, (people, frames, 3)).astype(np.float32),
        body_pose=rng.normal(0, 0.1, (people, frames, 69)).astype(np.float32),
        transl=transl.astype(np.float32),
    )
    tex_h, tex_w = height + 64, width + 64
    if texture:
        base = rng.integers(0, 255, (tex_h // 8 + 1, tex_w // 8 + 1, 3), dtype=np.uint8)
        tex = np.asarray(Image.fromarray(base).resize((tex_w, tex_h), Image.Resampling.BICUBIC))
    else:
        tex = np.full((tex_h, tex_w, 3), 90, np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    video = np.empty((frames, height, width, 3), np.uint8)
    bg = np.empty_like(video)
    mask = np.zeros((frames, height, width), np.uint8)
    for t in range(frames):
        off = int(32 + 24 * np.sin(t / 7))
        bg[t] = tex[off : off + height, off // 2 : off // 2 + width]
        frame = bg[t].copy()
        uvz = project(torch.from_numpy(transl[:, t]), torch.from_numpy(K[t]), torch.from_numpy(w2c[t])).numpy()  # (P, 3)
        for p in np.argsort(-uvz[:, 2]):  # far to near, so the nearer disc occludes
            u, v, z = uvz[p]
            r = max(3.0, 0.25 * K[t, 0, 0] / z)
            inside = (xx - u) ** 2 + (yy - v) ** 2 <= r * r
            frame[inside] = COLORS[p % len(COLORS)]
            mask[t][inside] = 255
        video[t] = frame
    return dict(video=video, bg=bg, mask=mask, smpl=smpl, cam=CameraSequence(K.astype(np.float32), w2c.astype(np.float32)), fps=fps)


def write_shards(out: str | os.PathLike, *, shards: int = 2, per_shard: int = 4, seed: int = 0,
                 sizes=((96, 128), (128, 96), (96, 96)), frames=(24, 40), people=(1, 3), fps_choices=(24.0, 25.0, 30.0),
                 extras: bool = True, ref_png: bool = False, codec: str = "libx264", prefix: str = "markers") -> list[str]:
    """Write `shards` tar files of `per_shard` marker clips; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for s in range(shards):
        path = out / f"{prefix}-{s:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                h, w = sizes[int(rng.integers(len(sizes)))]
                clip = make_clip(rng, h, w, int(rng.integers(frames[0], frames[1] + 1)), int(rng.integers(people[0], people[1] + 1)),
                                 float(rng.choice(fps_choices)))
                ref = None
                if ref_png:
                    buf = io.BytesIO()
                    Image.fromarray(clip["video"][0]).save(buf, format="PNG")
                    ref = buf.getvalue()
                sink.write(encode_sample(
                    f"{prefix}{s:03d}_{i:04d}", clip["video"], clip["smpl"], clip["cam"],
                    {"fps": clip["fps"], "gender": "neutral", "source": "isa4d marker world", "license": "CC0"},
                    bg=clip["bg"] if extras else None, mask=clip["mask"] if extras else None, ref_png=ref, codec=codec,
                ))
        paths.append(str(path))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--per-shard", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, nargs=2, action="append", metavar=("H", "W"), help="frame sizes to draw from")
    ap.add_argument("--frames", type=int, nargs=2, default=(24, 40), metavar=("MIN", "MAX"))
    ap.add_argument("--codec", default="libx264", choices=["libx264", "mpeg4"])
    ap.add_argument("--prefix", default="markers")
    a = ap.parse_args()
    paths = write_shards(a.out, shards=a.shards, per_shard=a.per_shard, seed=a.seed, frames=tuple(a.frames),
                         codec=a.codec, prefix=a.prefix, **({"sizes": [tuple(s) for s in a.size]} if a.size else {}))
    print("\n".join(paths))


if __name__ == "__main__":
    main()
