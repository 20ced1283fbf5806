"""VAE training-step and coding throughput on one GPU (or CPU): frames/s and peak memory per preset and clip size.

    python bench/bench_vae.py --preset base --size 256 --frames 17 --batch 1 [--record]
    python bench/bench_vae.py --preset base --flops --compare-wan      # FLOPs per frame of coding, on the CPU
    python bench/bench_vae.py --preset base --skip-train --compare-wan --compile --channels-last

Times forward+backward of the reconstruction objective (L1 + KL + image-decoding regulariser, no GAN, no LPIPS) and
chunked encode / decode of a long clip, in bf16 autocast on CUDA. Medians over timed repeats after warm-up.
`--compile` / `--channels-last` apply to isa4d's coding only (the train step and Wan stay eager, standard layout).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def build(preset: str, overrides: list[str] = ()):
    """The preset's VAE, with `KEY=VALUE` overrides of its constructor arguments (values parsed as YAML)."""
    from isa4d.models.vae import CausalVideoVAE

    cfg = yaml.safe_load((ROOT / "configs" / "vae" / f"{preset}.yaml").read_text())
    args = cfg["model"]["init_args"]["vae"]["init_args"]
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in inspect.signature(CausalVideoVAE).parameters:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY a CausalVideoVAE argument")
        args[key] = yaml.safe_load(value)
    return CausalVideoVAE(**args)


def prepare_coding(vae, a: argparse.Namespace) -> tuple[str, torch.memory_format]:
    """Apply --channels-last and --compile to vae (in eval mode) in place; returns the tag of its output rows and the
    memory format its inputs should have. Only encoder and decoder go channels_last_3d: the image decoder is 2D."""
    fmt = torch.channels_last_3d if a.channels_last else torch.contiguous_format
    if a.channels_last:
        vae.encoder.to(memory_format=fmt)
        vae.decoder.to(memory_format=fmt)
    if a.compile:
        vae.compile_blocks()
    tags = [t for t, on in (("compiled", a.compile), ("channels-last", a.channels_last)) if on]
    return (f" ({', '.join(tags)})" if tags else ""), fmt


def coders(vae, chunk: int, fmt: torch.memory_format):
    """encode(x) -> z and decode(z) callables of chunked coding; latents (small) are put in `fmt` inside decode."""
    return (lambda v: vae.encode(v, chunk_frames=chunk).mode(),
            lambda z: vae.decode(z.contiguous(memory_format=fmt), chunk_frames=chunk))


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


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def code_rates(encode, decode, x: torch.Tensor, device: torch.device,
               repeats: int) -> tuple[float, float, float, float]:
    """(encode frames/s, decode frames/s, encode peak GiB, decode peak GiB) for callables encode(x) -> z and
    decode(z). Each peak is the most memory allocated while that call ran, its input and the weights included."""
    z = encode(x)
    decode(z)  # warm-up of both (cuDNN algorithm choice, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t_enc = timed(lambda: encode(x), device, repeats)
    peak_enc = peak_gib(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_dec = timed(lambda: decode(z), device, repeats)
    n = x.shape[2]
    return n / t_enc, n / t_dec, peak_enc, peak_gib(device)


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
    models = {f"isa4d {a.preset}": (build(a.preset, a.set).eval(), lambda m: m.encode(x).mode(),
                                    lambda m: m.decode(z))}
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


def compare_wan(a: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Same run, same clip: isa4d's VAE against diffusers' AutoencoderKLWan (random weights, 4x8x8, 16 channels),
    at each size in --wan-sizes. Both in bf16 autocast, batch 1, `--long-frames` frames; isa4d chunks by each of
    --wan-chunks (default --chunk). Peaks are per call (encode, decode), weights and input included."""
    from diffusers import AutoencoderKLWan

    wan = AutoencoderKLWan(z_dim=16).to(device).eval()  # Wan2.1's defaults: base_dim 96, dim_mult (1, 2, 4, 4)
    ours = build(a.preset, a.set).to(device).eval()
    tag, fmt = prepare_coding(ours, a)
    out = [f"- vs diffusers AutoencoderKLWan ({sum(p.numel() for p in wan.parameters()) / 1e6:.1f}M parameters), "
           f"{a.long_frames} frames, batch 1:"]
    for size in a.wan_sizes:
        x = torch.rand(1, 3, a.long_frames, size, size, device=device) * 2 - 1
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            e2, d2, me2, md2 = code_rates(lambda v: wan.encode(v).latent_dist.mode(),
                                          lambda z: wan.decode(z).sample, x, device, max(2, a.repeats))
            out.append(f"  - {size}²: Wan encode {e2:.1f} / decode {d2:.1f} frames/s, peak {me2:.2f} / "
                       f"{md2:.2f} GiB")
            for chunk in a.wan_chunks or [a.chunk]:
                if a.compile:  # drop other sizes' and chunks' graphs: a block call tries its class's graphs in turn
                    torch._dynamo.reset()
                e1, d1, me1, md1 = code_rates(*coders(ours, chunk, fmt), x.contiguous(memory_format=fmt), device,
                                              max(2, a.repeats))
                out.append(f"    - isa4d{tag}, chunks of {chunk}: encode {e1:.1f} / decode {d1:.1f} frames/s, peak "
                           f"{me1:.2f} / {md1:.2f} GiB; vs Wan: encode {e1 / e2:.2f}x at {me1 / me2:.2f}x memory, "
                           f"decode {d1 / d2:.2f}x at {md1 / md2:.2f}x memory")
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
    ap.add_argument("--wan-chunks", type=int, nargs="*", default=[], help="isa4d chunk sizes against Wan "
                    "(default: --chunk)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override the preset's CausalVideoVAE arguments, e.g. upsampler=inflated base_channels=128")
    ap.add_argument("--skip-train", action="store_true", help="time coding only (and Wan with --compare-wan)")
    ap.add_argument("--flops", action="store_true", help="only count coding FLOPs per frame (CPU), with --compare-wan "
                    "for Wan's too, and exit")
    ap.add_argument("--flops-size", type=int, default=64)
    ap.add_argument("--flops-frames", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="isa4d coding with every Resnet block, attention and "
                    "down/upsampler compiled (torch.compile, static shapes; compiled in the warm-up)")
    ap.add_argument("--channels-last", action="store_true", help="isa4d coding in channels_last_3d (weights and "
                    "inputs)")
    ap.add_argument("--record", action="store_true", help="append the result to docs/benchmarks.md")
    a = ap.parse_args()
    if a.flops:
        print("\n".join(coding_flops(a)))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = build(a.preset, a.set).to(device)
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

    lines = []
    if not a.skip_train:
        for _ in range(2):
            step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t_step = timed(step, device, a.repeats)
        lines.append(f"- train step (fwd+bwd+AdamW, {a.batch}x{a.frames}x{a.size}x{a.size}, "
                     f"{str(dtype).split('.')[-1]}): **{t_step * 1e3:.1f} ms**, {a.batch * a.frames / t_step:.1f} "
                     f"frames/s, peak {peak_gib(device):.2f} GiB")
    del opt, x
    vae.eval()
    tag, fmt = prepare_coding(vae, a)
    long = (torch.rand(1, 3, a.long_frames, a.size, a.size, device=device) * 2 - 1).contiguous(memory_format=fmt)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        e, d, me, md = code_rates(*coders(vae, a.chunk, fmt), long, device, max(2, a.repeats // 2))
    lines.append(f"- {f'isa4d{tag}: ' if tag else ''}encode {a.long_frames}x{a.size}x{a.size} in chunks of "
                 f"{a.chunk}: **{e:.1f} frames/s**, peak {me:.2f} GiB; decode: **{d:.1f} frames/s**, peak {md:.2f} GiB")
    del vae, long
    if a.compare_wan:
        lines += compare_wan(a, device, dtype)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(f"VAE preset {a.preset} ({params:.1f}M parameters) on {name}")
    print("\n".join(lines))
    if a.record:
        cmd = "python bench/bench_vae.py " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])
        entry = "\n".join([
            f"\n### VAE `{a.preset}` ({params:.1f}M parameters), {name} ({datetime.date.today().isoformat()})",
            f"- torch {torch.__version__}; command: `{cmd}`", *lines, ""])
        with open(ROOT / "docs" / "benchmarks.md", "a") as f:
            f.write(entry)


if __name__ == "__main__":
    main()
