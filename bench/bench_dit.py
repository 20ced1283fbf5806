"""ISA-DiT training-step time and peak memory on one GPU, by parallelisation variant.

    python bench/bench_dit.py --preset base --size 256 --frames 33 --batch 2 --people 3 [--record]

Times forward + backward + AdamW of the flow-matching loss on random latents and conditions of the given clip size
(the VAE's 4x8x8 compression), for each variant:

    eager              the plain module, bf16 autocast, fp32 weights
    fsdp               isa4d.parallel.parallelize on a 1-GPU mesh: FSDP2, bf16 compute, fp32 master weights
    fsdp+compile       ... with torch.compile per block
    fsdp+selective     ... with selective activation checkpointing (keep matmul/attention outputs)
    fsdp+full+compile  ... with full activation checkpointing and compile

Medians over timed repeats after warm-up; video tokens/s counts the latent patches of the clip.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

import torch
import yaml
from bench_vae import timed  # bench/ is the script's folder, so it is on sys.path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("eager", "fsdp", "fsdp+compile", "fsdp+selective", "fsdp+full+compile")


def network_args(preset: str) -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "dit" / f"{preset}.yaml").read_text())
    return cfg["model"]["init_args"]["network"]["init_args"]


def conditions(B: int, P: int, T: int, V: int, h: int, w: int, C: int, F: int, device: torch.device):
    from isa4d.models.dit import DiTConditions

    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    return DiTConditions(
        points_world=r(B, P, T, F, V, 3), points_ndc=(torch.rand(B, P, T, V, 3, generator=g) * 2 - 1).to(device),
        points_valid=torch.ones(B, P, T, V, dtype=torch.bool, device=device),
        person_mask=torch.ones(B, P, dtype=torch.bool, device=device), plucker=r(B, T, 6 * F, h, w),
        ref_latent=r(B, C, h, w), ref_points_ndc=(torch.rand(B, P, V, 2, generator=g) * 2 - 1).to(device),
        ref_points_valid=torch.ones(B, P, V, dtype=torch.bool, device=device), background=r(B, C, T, h, w))


def run_variant(variant: str, a: argparse.Namespace, mesh, device: torch.device) -> dict:
    from isa4d.diffusion.flow import FlowMatching
    from isa4d.models.dit import ISADiT
    from isa4d.parallel import parallelize

    torch.manual_seed(0)
    net = ISADiT(**network_args(a.preset)).to(device)
    if variant != "eager":
        parallelize(net, device_mesh=mesh, compile="compile" in variant, mixed_precision="bf16",
                    activation_checkpointing="selective" if "selective" in variant else
                    "full" if "full" in variant else "none")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    flow = FlowMatching()
    T, h, w = 1 + (a.frames - 1) // 4, a.size // 8, a.size // 8
    x0 = torch.randn(a.batch, net.latent_channels, T, h, w, device=device)
    cond = conditions(a.batch, a.people, T, net.num_points, h, w, net.latent_channels, net.frames_per_latent, device)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=variant == "eager"):
            loss, _ = flow.loss(net, x0, {"cond": cond})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = timed(step, device, a.repeats)
    peak = torch.cuda.max_memory_allocated() / 2**30
    tokens = a.batch * T * (h // net.patch_size) * (w // net.patch_size)
    out = {"variant": variant, "ms": t * 1e3, "video_tokens_per_s": tokens / t, "peak_gib": peak,
           "params_m": net.num_parameters / 1e6 if variant == "eager" else None}
    del net, opt
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="base")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--frames", type=int, default=33)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--people", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--record", action="store_true", help="append the result to docs/benchmarks.md")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_dit.py times GPU training steps: no CUDA device here")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cuda", (1,))
    results = []
    for variant in a.variants:
        try:
            results.append(run_variant(variant, a, mesh, device))
        except torch.OutOfMemoryError:
            results.append({"variant": variant, "error": "out of memory"})
            torch.cuda.empty_cache()
        print(json.dumps(results[-1]), flush=True)
    torch.distributed.destroy_process_group()
    params = next((r["params_m"] for r in results if r.get("params_m")), None)
    name = torch.cuda.get_device_name()
    T = 1 + (a.frames - 1) // 4
    rows = ["| variant | step (ms) | video tokens/s | peak (GiB) |", "|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['variant']} | {r['error']} | | |" if "error" in r else
                    f"| {r['variant']} | {r['ms']:.1f} | {r['video_tokens_per_s']:.0f} | {r['peak_gib']:.2f} |")
    print("\n".join(rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "device": name, "torch": torch.__version__,
                                            "results": results}, indent=1))
    if a.record:
        cmd = (f"python bench/bench_dit.py --preset {a.preset} --size {a.size} --frames {a.frames} --batch {a.batch} "
               f"--people {a.people} --warmup {a.warmup} --repeats {a.repeats} --record")
        entry = "\n".join([
            f"\n### ISA-DiT `{a.preset}` ({params or float('nan'):.1f}M parameters) training step, {name} "
            f"({datetime.date.today().isoformat()})",
            f"- torch {torch.__version__}, {platform.python_version()}; clip {a.batch}x{a.frames}x{a.size}x{a.size} "
            f"(latent {T}x{a.size // 8}x{a.size // 8}), {a.people} people; AdamW (fused)",
            f"- command: `{cmd}`", "", *rows, ""])
        with open(ROOT / "docs" / "benchmarks.md", "a") as f:
            f.write(entry)


if __name__ == "__main__":
    main()
