"""VAE training-step and coding throughput on one GPU (or CPU): frames/s and peak memory per preset and clip size.

    python bench/bench_vae.py --preset base --size 256 --frames 17 --batch 1 [--record]

Times forward+backward of the reconstruction objective (L1 + KL + image-decoding regulariser, no GAN, no LPIPS) and
chunked encode / decode of a long clip, in bf16 autocast on CUDA. Medians over timed repeats after warm-up.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def build(preset: str):
    from isa4d.models.vae import CausalVideoVAE

    cfg = yaml.safe_load((ROOT / "configs" / "vae" / f"{preset}.yaml").read_text())
    return CausalVideoVAE(**cfg["model"]["init_args"]["vae"]["init_args"])


def timed(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--long-frames", type=int, default=121, help="clip length for the chunked encode/decode timing")
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--record", action="store_true", help="append the result to docs/benchmarks.md")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = build(a.preset).to(device)
    params = sum(p.numel() for p in vae.parameters()) / 1e6
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    x = torch.rand(a.batch, 3, a.frames, a.size, a.size, device=device) * 2 - 1

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            recon, post = vae(x)
            loss = (recon.float() - x).abs().mean() + 1e-6 * post.kl_mean().mean()
            if vae.image_regularizer:
                frames, idx = vae.decode_subframes(post.sample())
                loss = loss + (frames.float() - x[:, :, idx]).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_step = timed(step, device, a.repeats)
    mem_train = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")

    long = torch.rand(1, 3, a.long_frames, a.size, a.size, device=device) * 2 - 1
    vae.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        z = vae.encode(long, chunk_frames=a.chunk).mode()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t_enc = timed(lambda: vae.encode(long, chunk_frames=a.chunk), device, max(2, a.repeats // 2))
        t_dec = timed(lambda: vae.decode(z, chunk_frames=a.chunk), device, max(2, a.repeats // 2))
    mem_code = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    lines = [
        f"- train step (fwd+bwd+AdamW, {a.batch}x{a.frames}x{a.size}x{a.size}, {str(dtype).split('.')[-1]}): "
        f"**{t_step * 1e3:.1f} ms**, {a.batch * a.frames / t_step:.1f} frames/s, peak {mem_train:.2f} GiB",
        f"- encode {a.long_frames}x{a.size}x{a.size} in chunks of {a.chunk}: **{a.long_frames / t_enc:.1f} frames/s**; "
        f"decode: **{a.long_frames / t_dec:.1f} frames/s**; peak {mem_code:.2f} GiB",
    ]
    print(f"VAE preset {a.preset} ({params:.1f}M parameters) on {name}")
    print("\n".join(lines))
    if a.record:
        cmd = "python bench/bench_vae.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "record") + " --record"
        entry = "\n".join([
            f"\n### VAE `{a.preset}` ({params:.1f}M parameters), {name} ({datetime.date.today().isoformat()})",
            f"- torch {torch.__version__}; command: `{cmd}`", *lines, ""])
        with open(ROOT / "docs" / "benchmarks.md", "a") as f:
            f.write(entry)


if __name__ == "__main__":
    main()
