"""Where an ISA-DiT training step spends its time on one GPU: data, VAE encodes and posing, forward, backward, AdamW,
then a torch.profiler table of one step (GPU time vs CPU time and kernel launches).

    python bench/profile_dit_step.py --urls 'data/toy/train-*.tar' --vae runs/vae_tiny/checkpoints/last.ckpt \
        --preset base --num-points 256 --size 128 --frames 17 --batch 4

Bucketed real clips (the loader and conditioning of `DiTModule`), bf16 autocast, 12 timed steps.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from isa4d.data.datamodule import ShardDataModule
from isa4d.data.dataset import Bucket
from isa4d.models.dit import ISADiT
from isa4d.training.dit_module import DiTModule

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--urls", required=True)
    ap.add_argument("--vae", required=True, help="stage-1 checkpoint (.ckpt, sharded folder or .safetensors)")
    ap.add_argument("--body-dir", default="data/body")
    ap.add_argument("--preset", default="base")
    ap.add_argument("--num-points", type=int, default=None)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_dit_step.py profiles GPU steps: no CUDA device here")
    dev = torch.device("cuda")
    dm = ShardDataModule(train_urls=a.urls, buckets=[Bucket(a.size, a.size, a.frames, a.batch)], num_workers=6)
    dm.setup("fit")
    batches = iter(dm.train_dataloader())
    args = yaml.safe_load((ROOT / "configs/dit" / f"{a.preset}.yaml").read_text())["model"]["init_args"]["network"]
    net = ISADiT(**{**args["init_args"], **({"num_points": a.num_points} if a.num_points else {})})
    module = DiTModule(net, vae_checkpoint=a.vae, body_model_dir=a.body_dir).to(dev).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def sync() -> float:
        torch.cuda.synchronize()
        return time.perf_counter()

    def step(batch) -> list[float]:
        t0 = sync()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            x0, cond, _ = module.encode(batch)
            t1 = sync()
            loss, _ = module.objective.loss(net, x0, {"cond": cond}, shift=module.shift_for(x0.shape))
            t2 = sync()
        loss.backward()
        t3 = sync()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = sync()
        return [t1 - t0, t2 - t1, t3 - t2, t4 - t3]

    for _ in range(a.steps):
        t0 = time.perf_counter()
        batch = next(batches).to(dev).normalize()
        load = time.perf_counter() - t0
        times = step(batch)
        print(f"load {load * 1e3:.0f} ms | encode/forward/backward/optimizer ms {[round(t * 1e3, 1) for t in times]} "
              f"| people {batch.person_mask.shape[1]}", flush=True)
    from torch.profiler import ProfilerActivity, profile

    batch = next(batches).to(dev).normalize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(batch)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
