"""VAE training-step and coding throughput on one GPU (or CPU): frames/s and peak memory per preset and clip size.

    python bench/bench_vae.py --preset base --size 256 --frames 17 --batch 1 [--record]
    python bench/bench_vae.py --preset base --flops --compare-wan      # FLOPs per frame of coding, on the CPU

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


def code_rates(encode, decode, x: torch.Tensor, device: torch.device, repeats: int) -> tuple[float, float, float]:
    """(encode frames/s, decode frames/s, peak GiB) for callables encode(x) -> z and decode(z)."""
    z = encode(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t_enc = timed(lambda: encode(x), device, repeats)
    t_dec = timed(lambda: decode(z), device, repeats)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    n = x.shape[2]
    return n / t_enc, n / t_dec, peak


def coding_flops(a: argparse.Namespace) -> list[str]:
    """FLOPs per frame of encode and decode (torch.utils.flop_counter: every convolution, matmul and attention),
    counted on the CPU on a --flops-frames x --flops-size² clip (convolutions scale with pixels, so the ratio holds
    at any size), for the preset and, with --compare-wan, for diffusers' AutoencoderKLWan."""
    from torch.utils.flop_counter import FlopCounterMode

    by_module: dict[str, float] = {}

    def count(fn) -> float:
        with torch.no_grad(), FlopCounterMode(display=False, depth=4) as counter:
            fn()
        by_module.update({k: sum(v.values()) for k, v in counter.get_flop_counts().items()})
        return counter.get_total_flops()

    T, S = a.flops_frames, a.flops_size
    x = torch.rand(1, 3, T, S, S) * 2 - 1
    z = torch.randn(1, 16, 1 + (T - 1) // 4, S // 8, S // 8)
    models = {f"isa4d {a.preset}": (build(a.preset).eval(), lambda m: m.encode(x).mode(), lambda m: m.decode(z))}
    if a.compare_wan:
        from diffusers import AutoencoderKLWan

        models["Wan2.1"] = (AutoencoderKLWan(z_dim=16).eval(), lambda m: m.encode(x).latent_dist.mode(),
                            lambda m: m.decode(z).sample)
    out = [f"- FLOPs per frame at {S}x{S} ({T} frames; x{(a.size / S) ** 2:g} at {a.size}x{a.size}), counted on the CPU:"]
    for name, (model, enc, dec) in models.items():
        encoder = sum(p.numel() for p in model.encoder.parameters()) / 1e6
        decoder = sum(p.numel() for p in model.decoder.parameters()) / 1e6
        by_module.clear()
        e_flops = count(lambda: enc(model))
        d_flops = count(lambda: dec(model))  # by_module now holds the decoder's modules
        out.append(f"  - {name}: encode {e_flops / T / 1e9:.1f} GFLOP, decode {d_flops / T / 1e9:.1f} GFLOP (encoder "
                   f"{encoder:.1f}M, decoder {decoder:.1f}M parameters)")
        heavy = [(k, v) for k, v in by_module.items() if k.count(".") == 3 and v >= 0.1 * d_flops]
        out += [f"    - decoder module {k}: {v / T / 1e9:.1f} GFLOP" for k, v in heavy]
    return out


def compare_wan(a: argparse.Namespace, device: torch.device, dtype: torch.dtype, _: float) -> list[str]:
    """Same run, same clip: isa4d's VAE against diffusers' AutoencoderKLWan (random weights, 4x8x8, 16 channels),
    at each size in --wan-sizes. Both in bf16 autocast, batch 1, `--long-frames` frames; isa4d chunks by --chunk."""
    from diffusers import AutoencoderKLWan

    wan = AutoencoderKLWan(z_dim=16).to(device).eval()  # Wan2.1's defaults: base_dim 96, dim_mult (1, 2, 4, 4)
    ours = build(a.preset).to(device).eval()
    out = [f"- vs diffusers AutoencoderKLWan ({sum(p.numel() for p in wan.parameters()) / 1e6:.1f}M parameters), "
           f"{a.long_frames} frames, batch 1:"]
    for size in a.wan_sizes:
        x = torch.rand(1, 3, a.long_frames, size, size, device=device) * 2 - 1
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            e1, d1, m1 = code_rates(lambda v: ours.encode(v, chunk_frames=a.chunk).mode(),
                                    lambda z: ours.decode(z, chunk_frames=a.chunk), x, device, 2)
            e2, d2, m2 = code_rates(lambda v: wan.encode(v).latent_dist.mode(), lambda z: wan.decode(z).sample, x, device, 2)
        out.append(f"  - {size}²: isa4d encode {e1:.1f} / decode {d1:.1f} frames/s, peak {m1:.2f} GiB; "
                   f"Wan encode {e2:.1f} / decode {d2:.1f} frames/s, peak {m2:.2f} GiB; "
                   f"ratio encode {e1 / e2:.2f}x, decode {d1 / d2:.2f}x")
        del x
        torch.cuda.empty_cache() if device.type == "cuda" else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--long-frames", type=int, default=121, help="clip length for the chunked encode/decode timing")
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compare-wan", action="store_true", help="also time diffusers' AutoencoderKLWan (needs diffusers)")
    ap.add_argument("--wan-sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--flops", action="store_true", help="only count coding FLOPs per frame (CPU), with --compare-wan "
                    "for Wan's too, and exit")
    ap.add_argument("--flops-size", type=int, default=64)
    ap.add_argument("--flops-frames", type=int, default=5)
    ap.add_argument("--record", action="store_true", help="append the result to docs/benchmarks.md")
    a = ap.parse_args()
    if a.flops:
        print("\n".join(coding_flops(a)))
        return
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
    if a.compare_wan:
        lines_wan = compare_wan(a, device, dtype, mem_code)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    lines = [
        f"- train step (fwd+bwd+AdamW, {a.batch}x{a.frames}x{a.size}x{a.size}, {str(dtype).split('.')[-1]}): "
        f"**{t_step * 1e3:.1f} ms**, {a.batch * a.frames / t_step:.1f} frames/s, peak {mem_train:.2f} GiB",
        f"- encode {a.long_frames}x{a.size}x{a.size} in chunks of {a.chunk}: **{a.long_frames / t_enc:.1f} frames/s**; "
        f"decode: **{a.long_frames / t_dec:.1f} frames/s**; peak {mem_code:.2f} GiB",
    ]
    if a.compare_wan:
        lines += lines_wan
    print(f"VAE preset {a.preset} ({params:.1f}M parameters) on {name}")
    print("\n".join(lines))
    if a.record:
        cmd = "python bench/bench_vae.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(a).items() if k not in ("record", "compare_wan")) + (" --compare-wan" if a.compare_wan else "") + " --record"
        entry = "\n".join([
            f"\n### VAE `{a.preset}` ({params:.1f}M parameters), {name} ({datetime.date.today().isoformat()})",
            f"- torch {torch.__version__}; command: `{cmd}`", *lines, ""])
        with open(ROOT / "docs" / "benchmarks.md", "a") as f:
            f.write(entry)


if __name__ == "__main__":
    main()
