"""Seam measurement of `isa4d sample` on a trained DiT (docs/benchmarks.md): a motion many times the training length,
sampled in blended windows, in hard-cut windows (overlap 0) and whole; `seam_ratio` of each.

    python bench/seam_long_video.py DIT_CONFIG DIT_CKPT VAE SHARDS OUT SIZE WINDOW REPEATS
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

from data_prep.sample_inputs import write_sample_inputs
from isa4d.cli import run_cli
from isa4d.data.contract import npz_bytes
from isa4d.diffusion.windows import window_starts
from isa4d.inference.generate import generate, seam_ratio
from isa4d.inference.inputs import SampleInputs
from isa4d.inference.writer import encode_mp4

dit_cfg, ckpt, vae, shards, out, size, window, repeats = sys.argv[1:9]
size, window, repeats = int(size), int(window), int(repeats)
out = Path(out)
clip = out / "clip"
rec = write_sample_inputs(shards, 0, clip)
F = rec["frames"]
people = []
for name in rec["people"]:
    z = dict(np.load(clip / name))
    idx = np.concatenate([np.arange(F) if k % 2 == 0 else np.arange(F - 2, 0, -1) for k in range(repeats)])
    (out / name).write_bytes(npz_bytes(**{k: (v[:, idx] if v.ndim == 3 else v) for k, v in z.items()}))
    people.append(str(out / name))
cli = run_cli(["-c", dit_cfg, f"--model.init_args.vae_checkpoint={vae}", "--model.init_args.body_model_dir=data/body",
               "--data=isa4d.inference.inputs.SampleInputs", f"--data.init_args.motions=[{people[0]}]",
               f"--data.init_args.ref={clip}/ref.png", "--trainer.logger=false"], run=False, save_config=False)
module = cli.model
state = torch.load(ckpt, map_location="cpu", weights_only=False)
module.on_load_checkpoint(state)
module.load_state_dict(state["state_dict"])
device = "cuda" if torch.cuda.is_available() else "cpu"
module = module.to(device).eval()
req = SampleInputs(motions=people, ref=str(clip / "ref.png"), ref_camera=str(clip / "ref.npz"), keep_world=True,
                   camera="static:radius=4", body_model_dir="data/body", height=size, width=size).request()
b = req.batch.to(device).normalize()
T = module.vae.num_latent_frames(b.video.shape[1])
results = {"frames": b.video.shape[1], "latent_frames": T, "window": window}
for overlap in (0, 2, None):
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        video, _ = generate(module, b, seed=0, window=None if overlap is None else window, overlap=overlap or 0,
                            decode_chunk_frames=16)
    # the whole video at once is measured at the window edges of the overlap-2 run: the no-window reference
    starts = window_starts(T, window, 2 if overlap is None else overlap)
    results[f"overlap_{overlap}"] = {"windows": len(starts), **seam_ratio(video[0], starts, window)}
    (out / f"long_overlap{overlap}.mp4").write_bytes(encode_mp4(video[0], float(b.fps[0])))
print("SEAM", json.dumps(results))
(out / "seam.json").write_text(json.dumps(results, indent=1))
