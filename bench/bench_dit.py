"""ISA-DiT training-step time, achieved TFLOP/s, MFU and peak memory, by parallelisation variant, on one or more GPUs.

    python bench/bench_dit.py --preset base --size 256 --frames 33 --batch 2 --people 3 [--record]
    torchrun --nproc_per_node 2 bench/bench_dit.py --variants fsdp ...    # FSDP2 over the GPUs; --batch per GPU

Times forward + backward + AdamW of the flow-matching loss on random latents and conditions of the given clip size
(the VAE's 4x8x8 compression), for each variant:

    eager              the plain module, bf16 autocast, fp32 weights
    compile            ... with torch.compile per block: what the single-GPU trainer runs (no FSDP)
    compile+cudagraphs ... compiled with mode="reduce-overhead": each block's kernels replayed as CUDA graphs
    fsdp               isa4d.parallel.parallelize on a 1-GPU mesh: FSDP2, bf16 compute, fp32 master weights
    fsdp+compile       ... with torch.compile per block
    fsdp+selective     ... with selective activation checkpointing (keep matmul/attention outputs)
    fsdp+full          ... with full activation checkpointing (each block recomputed in backward)
    fsdp+full+compile  ... with full activation checkpointing and compile

--compile-mode and --inductor KEY=VALUE tune the compiled variants (A/B of Inductor's settings, one configuration per
process: Dynamo caches per code object; max-autotune-no-cudagraphs did not finish compiling the base preset in 9
minutes on an H100, docs/benchmarks.md); --without PART times the step with a block part replaced by zeros;
--profile TOP breaks a step's kernel time down by family and reports how much of it the GPU was busy.
Medians over timed repeats after warm-up (the slowest rank's); video tokens/s counts the latent patches of the clip.
FLOPs are the model's real ones: every matmul, convolution and attention of one forward + backward, counted by
torch.utils.flop_counter on the meta device (no memory), so achieved TFLOP/s = FLOPs / step time and MFU is that
over the GPU's dense bf16 peak (--peak-tflops, 989 for the H100 and H200 SXM). Under torchrun each process drives
one GPU; FSDP2 shards over all of them and --batch is per GPU (weak scaling), so tokens/s per GPU at N GPUs over
that at 1 GPU is the per-GPU scaling efficiency.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch
import yaml
from bench_vae import timed  # bench/ is the script's folder, so it is on sys.path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("eager", "compile", "compile+cudagraphs", "fsdp", "fsdp+compile", "fsdp+selective", "fsdp+full",
            "fsdp+full+compile")


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


def step_flops(a: argparse.Namespace) -> float:
    """FLOPs of one forward + backward of the flow-matching loss at the bench's shapes (one GPU's batch)."""
    from isa4d.diffusion.flow import FlowMatching
    from isa4d.models.dit import ISADiT
    from isa4d.training.throughput import loss_flops

    meta = torch.device("meta")
    with meta:
        net = ISADiT(**network_args(a.preset))
    T, h, w = 1 + (a.frames - 1) // 4, a.size // 8, a.size // 8
    x0 = torch.randn(a.batch, net.latent_channels, T, h, w, device=meta)
    cond = conditions(a.batch, a.people, T, net.num_points, h, w, net.latent_channels, net.frames_per_latent, meta)
    return loss_flops(lambda: FlowMatching().loss(net, x0, {"cond": cond})[0])


ABLATABLE = {"isa": "isa", "3d-temporal": "point_temporal_attn"}  # --without name: the block's attribute


class Absent(torch.nn.Module):
    """Stands in for a block part removed by --without: returns zeros shaped like its first input (a pair for ISA),
    so the rest of the step runs unchanged; the time saved is the part's cost within the whole step."""

    def __init__(self, pair: bool) -> None:
        super().__init__()
        self.pair = pair

    def forward(self, x: torch.Tensor, *rest, **_):
        return (torch.zeros_like(x), torch.zeros_like(rest[0])) if self.pair else torch.zeros_like(x)


def kernel_kind(name: str) -> str:
    """A CUDA kernel's family, by its name: which attention backend, GEMM, Inductor-generated or anything else."""
    n = name.lower()
    if "sdpa" in n or ("cudnn" in n and ("fprop" in n or "bprop" in n) and "flash" in n):
        return "attention: cuDNN"
    if "fmha" in n or "cutlassf" in n or "cutlassb" in n:
        return "attention: memory-efficient"
    if "flash" in n:
        return "attention: flash"
    if "gemm" in n or "nvjet" in n or "xmma" in n or "cutlass" in n:
        return "GEMM"
    if n.startswith("triton"):
        return "Inductor (Triton)"
    if "nccl" in n:
        return "NCCL"
    return "other (ATen element-wise, copies, reductions)"


def busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: the time the GPU ran at least one kernel."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def kernel_profile(step, steps: int, top: int) -> tuple[dict, float, list]:
    """Per step, from torch.profiler over `steps` steps: CUDA kernel time by `kernel_kind`, the time the GPU was
    busy (kernels overlap across streams; the rest of the step it waited for the CPU), and the `top` kernels.
    Annotations (FSDP's and the optimizer's ranges on the GPU timeline) are not kernels and are left out."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    busy = busy_ms([(e.time_range.start / 1e3, e.time_range.end / 1e3) for e in events]) / steps
    per_name: dict[str, list] = {}
    for e in events:
        entry = per_name.setdefault(e.name, [0.0, 0])
        entry[0] += e.time_range.elapsed_us() / 1e3 / steps
        entry[1] += 1
    kinds: dict[str, float] = {}
    for name, (ms, _) in per_name.items():
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + ms
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
    return kinds, busy, [(name[:100], ms, n // steps) for name, (ms, n) in ranked]


def variant_label(variant: str, pack: int | None, without: str | None, tuning: str = "") -> str:
    return variant + (f" pack {pack}" if pack is not None else "") + (f" without {without}" if without else "") + \
        (f" [{tuning}]" if tuning and "compile" in variant else "")


def set_inductor(items: list[str]) -> str:
    """Apply --inductor KEY=VALUE settings (values parsed as YAML) to torch._inductor.config; returns their tag."""
    import torch._inductor.config as inductor

    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not hasattr(inductor, key):
            raise SystemExit(f"--inductor {item!r}: expected KEY=VALUE with KEY a torch._inductor.config setting")
        setattr(inductor, key, yaml.safe_load(value))
    return ", ".join(items)


def run_variant(variant: str, a: argparse.Namespace, mesh, device: torch.device, without: str | None = None,
                pack: int | None = None) -> dict:
    from isa4d.diffusion.flow import FlowMatching
    from isa4d.models.dit import ISADiT, attention
    from isa4d.parallel import ParallelConfig, parallelize
    from isa4d.parallel.fsdp import checkpoint_and_compile

    if pack is not None:  # packing of the short temporal attentions (attention.PACK_LENGTH; 0: off)
        attention.PACK_LENGTH = pack

    torch.manual_seed(0)
    torch._dynamo.utils.counters.clear()  # graph breaks are counted per variant
    net = ISADiT(**network_args(a.preset)).to(device)
    if without is not None:
        for block in net.blocks:
            setattr(block, ABLATABLE[without], Absent(pair=without == "isa"))
    cudagraphs = "cudagraphs" in variant
    # the trainer's options for parallel.cuda_graphs, else --compile-mode's
    options = ParallelConfig(compile=True, cuda_graphs=cudagraphs).compile_options or \
        ({"mode": a.compile_mode} if a.compile_mode else None)
    if variant.startswith("compile"):  # one GPU as the Lightning trainer runs it without FSDP: blocks compiled
        checkpoint_and_compile(net.fsdp_units(), compile=True, compile_options=options)
    elif variant != "eager":
        parallelize(net, device_mesh=mesh, compile="compile" in variant, mixed_precision="bf16",
                    activation_checkpointing="selective" if "selective" in variant else
                    "full" if "full" in variant else "none", compile_options=options)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    flow = FlowMatching()
    T, h, w = 1 + (a.frames - 1) // 4, a.size // 8, a.size // 8
    x0 = torch.randn(a.batch, net.latent_channels, T, h, w, device=device)
    cond = conditions(a.batch, a.people, T, net.num_points, h, w, net.latent_channels, net.frames_per_latent, device)

    def step() -> None:
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration: the graphs' output buffers may be reused
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=not variant.startswith("fsdp")):
            loss, _ = flow.loss(net, x0, {"cond": cond})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = timed(step, device, a.repeats)
    # CUDA graphs allocate their activations once, from a private pool, when recorded (in the warm-up): the
    # allocator's peak over the timed steps misses them, so those rows report the memory reserved instead
    peak = (torch.cuda.max_memory_reserved() if cudagraphs else torch.cuda.max_memory_allocated()) / 2**30
    label = variant_label(variant, pack, without, a.tuning)
    if a.profile and mesh.get_rank() == 0:
        kinds, busy, top = kernel_profile(step, 2, a.profile)
        total = sum(kinds.values())
        print(f"\nper step, {label}: {total:.1f} ms of kernels, GPU busy {busy:.1f} ms of the {t * 1e3:.1f} ms step "
              f"({100 * busy / (t * 1e3):.0f}%; profiled)")
        print("\n".join(f"  {kind}: {ms:.1f} ms ({100 * ms / total:.1f}%)"
                        for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1])))
        print("\n".join(f"  {ms:7.2f} ms x{n:<4d} [{kernel_kind(name)}] {name}" for name, ms, n in top), flush=True)
    if mesh.size() > 1:  # the slowest rank sets the pace; memory is reported for the fullest GPU
        stats = torch.tensor([t, peak], device=device)
        torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.MAX)
        t, peak = stats.tolist()
    tokens = a.batch * T * (h // net.patch_size) * (w // net.patch_size)
    tflops = a.flops / t / 1e12
    out = {"variant": label, "gpus": mesh.size(), "ms": t * 1e3,
           "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
           "video_tokens_per_s_per_gpu": tokens / t,
           "tflops_per_gpu": tflops, "mfu": tflops / a.peak_tflops, "peak_gib": peak,
           "params_m": net.num_parameters / 1e6}  # DTensor numel is the global size
    del net, opt
    torch.cuda.empty_cache()
    return out


def shape_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every DiT bench shares: preset and the clip shape per GPU."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--frames", type=int, default=33)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--people", type=int, default=3)
    return ap


def main() -> None:
    ap = shape_parser(__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak, for MFU")
    ap.add_argument("--pack-lengths", type=int, nargs="*", default=[],
                    help="time each variant at each of these packing targets of the short temporal attentions "
                         "(isa4d.models.dit.attention.PACK_LENGTH; 0: unpacked); default: the model's")
    ap.add_argument("--without", nargs="*", default=[], choices=list(ABLATABLE),
                    help="also time each variant with this block part replaced by zeros: its share of the whole "
                         "step is the time saved (MFU of those rows still counts the full model's FLOPs)")
    ap.add_argument("--compile-mode", default=None, choices=["default", "max-autotune-no-cudagraphs"],
                    help="torch.compile mode of the compiled variants (compile+cudagraphs is reduce-overhead)")
    ap.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                    help="torch._inductor.config settings for the compiled variants, e.g. "
                         "coordinate_descent_tuning=true")
    ap.add_argument("--profile", type=int, default=0, metavar="TOP",
                    help="after timing, profile 2 steps: CUDA kernel time per step by kind (attention backend, "
                         "GEMM, Inductor, other) and the TOP kernels")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--record", action="store_true", help="append the result to docs/benchmarks.md")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_dit.py times GPU training steps: no CUDA device here")
    for key, default in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517"), ("RANK", "0"), ("WORLD_SIZE", "1"),
                         ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, default)  # a plain `python` run is a world of one; torchrun sets them all
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    if world > 1 and {"eager", "compile", "compile+cudagraphs"} & set(a.variants):
        raise SystemExit("the eager and compile variants run one unsharded GPU; under torchrun pass --variants fsdp")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.distributed.init_process_group("nccl", device_id=device)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cuda", (world,))
    # variants, packing targets and --without parts each compile the same block code anew: room for all of them,
    # or Dynamo falls back to eager for the later ones without a word in the timing
    torch._dynamo.config.cache_size_limit = 64
    a.flops = step_flops(a)
    tags = [f"mode={a.compile_mode}"] if a.compile_mode else []
    if a.inductor:
        tags.append(set_inductor(a.inductor))
    a.tuning = ", ".join(tags)  # in the compiled rows' labels
    results = []
    for variant, pack in [(v, p) for v in a.variants for p in (a.pack_lengths or [None])]:
        for without in [None, *a.without]:
            try:
                results.append(run_variant(variant, a, mesh, device, without, pack))
            except torch.OutOfMemoryError:
                results.append({"variant": variant_label(variant, pack, without, a.tuning), "gpus": world,
                                "error": "out of memory"})
                torch.cuda.empty_cache()
            if rank == 0:
                print(json.dumps(results[-1]), flush=True)
    torch.distributed.destroy_process_group()
    if rank:
        return
    params = next((r["params_m"] for r in results if r.get("params_m")), None)
    name = torch.cuda.get_device_name()
    T = 1 + (a.frames - 1) // 4
    rows = ["| variant | GPUs | step (ms) | video tokens/s per GPU | TFLOP/s per GPU | MFU | peak (GiB; reserved "
            "with CUDA graphs) |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['variant']} | {world} | {r['error']} | | | | |" if "error" in r else
                    f"| {r['variant']} | {world} | {r['ms']:.1f} | {r['video_tokens_per_s_per_gpu']:.0f} | "
                    f"{r['tflops_per_gpu']:.1f} | {100 * r['mfu']:.1f}% | {r['peak_gib']:.2f} |")
    full = {r["variant"]: r["ms"] for r in results if "ms" in r}
    for r in results:
        base, _, part = r["variant"].partition(" without ")
        if part and "ms" in r and base in full:
            rows.append(f"\n{part} in {base}: {full[base] - r['ms']:.1f} ms of {full[base]:.1f} ms, "
                        f"{100 * (full[base] - r['ms']) / full[base]:.1f}% of the step")
    print(f"model FLOPs per step and GPU (fwd+bwd): {a.flops / 1e12:.2f} TFLOP")
    print("\n".join(rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "device": name, "torch": torch.__version__,
                                            "gpus": world, "results": results}, indent=1))
    if a.record:
        launcher = f"torchrun --nproc_per_node {world}" if world > 1 else "python"
        cmd = f"{launcher} bench/bench_dit.py " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])
        entry = "\n".join([
            f"\n### ISA-DiT `{a.preset}` ({params or float('nan'):.1f}M parameters) training step, {name} "
            f"({datetime.date.today().isoformat()})",
            f"- torch {torch.__version__}, {platform.python_version()}; clip {a.batch}x{a.frames}x{a.size}x{a.size} "
            f"(latent {T}x{a.size // 8}x{a.size // 8}) per GPU, {a.people} people; AdamW (fused); "
            f"{a.flops / 1e12:.2f} TFLOP per step and GPU (fwd+bwd)",
            f"- command: `{cmd}`", "", *rows, ""])
        with open(ROOT / "docs" / "benchmarks.md", "a") as f:
            f.write(entry)


if __name__ == "__main__":
    main()
