"""Generate the toy 4D human world: train / val shards, a contact sheet and README.json.

    python -m data_prep.toy_world --out data/toy --preset default [--seed 0] [--workers 2] [--body-dir DIR]

The toy body is written to ``--body-dir`` (default ``OUT/body``) first if it is missing. The contact sheet
reads samples back from the written shards and draws their SMPL joints projected with the samples' own
``K`` and ``w2c`` on the decoded frames, so misalignment between pixels and labels is visible at a glance.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw

from data_prep.make_toy_body import write_toy_body
from data_prep.toy_world.world import PRESETS, preset_dict, write_split
from isa4d.body.smpl import PARENTS, BodyModel, model_file
from isa4d.data.contract import parse_sample
from isa4d.data.video import decode_all
from isa4d.geometry.camera import project

PERSON_COLOURS = ((255, 60, 60), (60, 230, 80), (70, 120, 255))


def ensure_body(body_dir: Path) -> Path:
    """The toy SMPL body under `body_dir`, written there if absent."""
    try:
        model_file(body_dir, "neutral")
    except FileNotFoundError:
        write_toy_body(body_dir)
    return body_dir


def _read(shard: Path, limit: int) -> list:
    out = []
    for raw in wds.WebDataset(str(shard), shardshuffle=False):
        out.append(parse_sample(raw))
        if len(out) == limit:
            break
    return out


@torch.no_grad()
def contact_sheet(shards: list[Path], body_dir: Path, path: Path, clips: int = 6, frames: int = 4) -> None:
    """Rows of clips, columns of frames; joints and bones of every person drawn on top, colour per person."""
    body = BodyModel(body_dir, "neutral")
    samples = [s for shard in shards for s in _read(shard, clips)][:clips]
    rows = []
    for s in samples:
        video = decode_all(s.video)  # (F, H, W, 3)
        scale = 2 if video.shape[1] <= 160 else 1
        smpl = s.smpl
        _, joints = body(*(torch.as_tensor(a) for a in (smpl.betas, smpl.global_orient, smpl.body_pose, smpl.transl)))
        K, w2c = torch.as_tensor(s.cam.K)[None], torch.as_tensor(s.cam.w2c)[None]
        uvz = project(joints, K, w2c).numpy()  # (P, F, 24, 3)
        tiles = []
        for t in np.linspace(0, len(video) - 1, frames).round().astype(int):
            img = Image.fromarray(video[t]).resize((video.shape[2] * scale, video.shape[1] * scale), Image.NEAREST)
            draw = ImageDraw.Draw(img)
            for p in range(uvz.shape[0]):
                uv = (uvz[p, t, :, :2] + 0.5) * scale - 0.5  # the exact map of pixel coordinates under scaling
                colour = PERSON_COLOURS[p % len(PERSON_COLOURS)]
                for j, parent in enumerate(PARENTS):
                    if parent >= 0:
                        draw.line([tuple(uv[j]), tuple(uv[parent])], fill=colour, width=1)
                for u, v in uv:
                    draw.ellipse([u - 1, v - 1, u + 1, v + 1], fill=colour)
            tiles.append(np.asarray(img))
        rows.append(np.concatenate(tiles, 1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    Image.fromarray(np.concatenate(rows, 0)).save(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes rendering clips")
    ap.add_argument("--body-dir", type=Path, default=None, help="toy body folder (default OUT/body)")
    args = ap.parse_args(argv)
    t0 = time.time()
    preset = PRESETS[args.preset]
    args.out.mkdir(parents=True, exist_ok=True)
    body_dir = ensure_body(args.body_dir or args.out / "body")
    stats = {split: write_split(args.out, split, preset, args.seed, body_dir, args.workers)
             for split in ("train", "val")}
    shards = [args.out / name for split in ("val", "train") for name in stats[split]["shards"]]
    contact_sheet(shards, body_dir, args.out / "contact_sheet.png")
    nbytes = sum(p.stat().st_size for p in shards)
    readme = {
        "preset": args.preset, "seed": args.seed, "config": preset_dict(preset), "splits": stats,
        "identities": {"train": [0, preset.train_identities - 1],
                       "val": [preset.train_identities, preset.train_identities + preset.val_identities - 1]},
        "bytes": nbytes, "seconds": round(time.time() - t0, 1), "workers": args.workers,
        "command": f"python -m data_prep.toy_world --out {args.out} --preset {args.preset} --seed {args.seed}",
    }
    (args.out / "README.json").write_text(json.dumps(readme, indent=1) + "\n")
    clips = sum(s["clips"] for s in stats.values())
    print(f"wrote {clips} clips ({stats['train']['clips']} train, {stats['val']['clips']} val) in {len(shards)} "
          f"shards, {nbytes / 1e6:.1f} MB, to {args.out} in {time.time() - t0:.1f}s")
    print(f"contact sheet: {args.out / 'contact_sheet.png'}")
    print(f"reproduce: {readme['command']}")
    if args.preset == "tiny":
        print("test asset: python -m data_prep.toy_world --out tests/assets/toy_world --preset tiny --seed 0 "
              "--body-dir data/body")


if __name__ == "__main__":
    main()
