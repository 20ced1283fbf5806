"""Take the inputs of `isa4d sample` out of a shard: one motion file per person, a reference image with its camera
and pose, the clip's cameras and its background plate, so a sample can be driven with a real clip's motion.

    python -m data_prep.sample_inputs --shards 'data/toy/val-*.tar' --index 0 --out data/toy/sample

writes, for sample `--index` of the shards (in order):
    person<p>.npz   the contract's smpl.npz layout for person p alone, plus `fps` (what `load_motion` reads)
    ref.png         the clip's first frame: the people in their first pose, seen by the first camera
    ref.npz         K and w2c of that frame and every person's first pose (the contract's ref.npz layout)
    cam.npz         the clip's cameras with `height` and `width` of its frames (`camera_path` reads it)
    bg.mp4          the clean background plate, when the sample has one
    inputs.json     what was written, from which sample
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
from pathlib import Path

import numpy as np
from PIL import Image

from isa4d.data import video as videolib
from isa4d.data.contract import npz_bytes, parse_sample
from isa4d.data.shards import expand_urls, iter_samples


def _raise(url: str, exn: Exception) -> None:
    raise exn


def write_sample_inputs(shards: str, index: int, out: str | Path) -> dict:
    out = Path(out)
    raw = next(itertools.islice(iter_samples(expand_urls(shards), _raise), index, None), None)
    if raw is None:
        raise IndexError(f"{shards} holds no sample at index {index}")
    s = parse_sample(raw)
    out.mkdir(parents=True, exist_ok=True)
    smpl, F = s.smpl, s.smpl.num_frames
    people = []
    for p in range(smpl.num_people):
        path = out / f"person{p}.npz"
        path.write_bytes(npz_bytes(betas=smpl.betas[p:p + 1], global_orient=smpl.global_orient[p:p + 1],
                                   body_pose=smpl.body_pose[p:p + 1], transl=smpl.transl[p:p + 1],
                                   fps=np.float64(s.fps)))
        people.append(path.name)
    first = videolib.decode_frames(s.video, [0])[0]  # (H, W, 3)
    buf = io.BytesIO()
    Image.fromarray(first).save(buf, format="PNG")
    (out / "ref.png").write_bytes(buf.getvalue())
    (out / "ref.npz").write_bytes(npz_bytes(K=s.cam.K[0], w2c=s.cam.w2c[0], betas=smpl.betas,
                                            global_orient=smpl.global_orient[:, :1], body_pose=smpl.body_pose[:, :1],
                                            transl=smpl.transl[:, :1]))
    (out / "cam.npz").write_bytes(npz_bytes(K=s.cam.K, w2c=s.cam.w2c, height=np.int64(s.info.height),
                                            width=np.int64(s.info.width)))
    if s.bg is not None:
        (out / "bg.mp4").write_bytes(s.bg)
    record = {"shards": shards, "index": index, "key": s.key, "frames": F, "fps": s.fps, "people": people,
              "size": [s.info.height, s.info.width], "background": s.bg is not None, "gender": s.gender}
    (out / "inputs.json").write_text(json.dumps(record, indent=1))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="shard URLs or a brace/glob pattern")
    parser.add_argument("--index", type=int, default=0, help="which sample, counted in shard order")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    record = write_sample_inputs(args.shards, args.index, args.out)
    print(f"sample inputs of {record['key']} ({record['frames']} frames, {len(record['people'])} people) in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
