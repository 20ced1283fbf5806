"""Where an ISA-DiT training step spends its time, how its cost grows with clip length, and which attention kernel
wins for each of its attention shapes (GPU).

    python bench/bench_dit_parts.py --preset base --size 256 --frames 33 --batch 2 --people 3 \
        --parts --backends --lengths 17 33 49 81 121 --length-size 512 --length-people 1 [--profile] [--rotary] [--json F]

--parts     forward + backward of each part of one block at the preset's shapes (bf16 autocast, fp32 weights):
            spatial, temporal, 3D temporal, ISA, camera and reference attention, video and 3D MLPs, and the rest
            (norms, adaLN modulation, residual gates: the whole block minus the parts); ms and share of the block.
            With --compile each part (and the block) is compiled alone first.
--backends  forward + backward of scaled_dot_product_attention alone for each attention shape of the block, per
            kernel (flash, cuDNN, memory-efficient), so each shape can use the one that wins; for short key
            sequences also `short_attention` compiled (broadcast products and sums Inductor may fuse).
--lengths   time per latent frame of a training step (fwd+bwd+AdamW, batch 1, full activation checkpointing per
            block for both models so the longest clips fit) of the ISA-DiT and of a plain DiT of the same width
            and depth with full spatio-temporal self-attention over all T·N video tokens (3-axis rotary, adaLN-zero,
            the same MLP), at each clip length; the model FLOPs of both (torch.utils.flop_counter, meta device).
--rotary    the 3D temporal attention's QK-norm + rotary kernels compiled, forward + backward: the model's form
            against another form of the same rotation (`rotary_flip`), the norm alone and a copy of q and k.
--profile   kernel time of 3 eager ISA-DiT steps by family (bench_dit's: attention backend, GEMM, Inductor, the
            rest), the time the GPU was busy, and the top kernels.
--sample    sampling throughput: --sample-steps Euler steps of the network (one evaluation per step, bf16
            autocast, no guidance) on a clip of --sample-frames x --sample-size², then the base VAE's decode
            (random weights, 16-frame chunks); frames per second of video out.
Medians over repeats after warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import torch
from bench_dit import conditions, network_args, shape_parser
from bench_dit import kernel_profile as profile_step  # the kernel families and GPU busy time of bench_dit --profile
from einops import rearrange
from torch import nn


def timed(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fwd_bwd(module_fn, inputs: list[torch.Tensor], compile: bool = False):
    """A callable running module_fn(*inputs) forward and backward under bf16 autocast (module_fn compiled first
    with `compile`)."""
    if compile:
        module_fn = torch.compile(module_fn)

    def run():
        for x in inputs:
            x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = module_fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.float().sum() for o in outs if o is not None).backward()
    return run


# ------------------------------------------------------------------------------------------------------ parts

class BlockDims(NamedTuple):
    """The preset's block width and the token counts of one step at the bench's clip shape."""

    cfg: dict  # the preset's network arguments
    D: int  # hidden size
    H: int  # heads
    Dh: int  # head size
    B: int  # clips
    T: int  # latent frames
    gh: int  # video tokens per latent frame along each side (square clips)
    N: int  # video tokens per latent frame
    M: int  # 3D tokens per latent frame (people x points)
    C: int  # ISPE sinusoid channels


def block_dims(a: argparse.Namespace) -> BlockDims:
    cfg = network_args(a.preset)
    D, H = cfg["hidden_size"], cfg["num_heads"]
    gh = a.size // 8 // cfg.get("patch_size", 2)
    return BlockDims(cfg, D, H, D // H, a.batch, 1 + (a.frames - 1) // 4, gh, gh * gh,
                     a.people * cfg.get("num_points", 1024), 6 * cfg.get("ispe_freqs", 8))


def block_parts(a: argparse.Namespace, device: torch.device) -> dict[str, float]:
    from isa4d.models.dit.attention import grid_positions, rope_frequencies
    from isa4d.models.dit.blocks import BlockInputs, ISADiTBlock

    cfg, D, H, Dh, B, T, gh, N, M, C = block_dims(a)
    block = ISADiTBlock(D, H, cfg.get("mlp_ratio", 4.0), ispe_freqs=C // 6).to(device)
    r = lambda *s: torch.randn(*s, device=device, requires_grad=True)  # noqa: E731
    inputs = BlockInputs(
        spatial_rope=rope_frequencies(grid_positions(gh, gh, device=device), (Dh // 2, Dh // 2)),
        temporal_rope=rope_frequencies(grid_positions(T, device=device), (Dh,)),
        z_code=torch.randn(N, C, device=device), y_code=torch.randn(B, T, M, C, device=device),
        y_mask=torch.rand(B, T, M, device=device) > 0.1, camera=r(B, T, N, D), ref=r(B, N, D))
    z, y, c = r(B, T, N, D), r(B, T, M, D), r(B, D)
    zf, yf = r(B * T, N, D), r(B * T, M, D)
    zt, yt = r(B * N, T, D), r(B * M, T, D)
    zr = r(B, T * N, D)
    cc = a.compile
    parts = {
        "spatial attention": fwd_bwd(lambda x: block.spatial_attn(x, inputs.spatial_rope), [zf], cc),
        "temporal attention": fwd_bwd(lambda x: block.temporal_attn(x, inputs.temporal_rope), [zt], cc),
        "3D temporal attention": fwd_bwd(lambda x: block.point_temporal_attn(x, inputs.temporal_rope), [yt], cc),
        "ISA (both directions)": fwd_bwd(lambda u, v: block.isa(u, v, inputs.z_code,
                                                                  rearrange(inputs.y_code, "b t m c -> (b t) m c"),
                                                                  rearrange(inputs.y_mask, "b t m -> (b t) m")),
                                         [zf, yf], cc),
        "camera attention": fwd_bwd(lambda x, k: block.camera_attn(x, k), [zf, r(B * T, N, D)], cc),
        "reference attention": fwd_bwd(lambda x, k: block.ref_attn(x, k), [zr, inputs.ref], cc),
        "video MLP": fwd_bwd(block.video_mlp, [z], cc),
        "3D MLP": fwd_bwd(block.point_mlp, [y], cc),
    }
    out = {name: timed(fn, a.repeats) * 1e3 for name, fn in parts.items()}
    zb, yb = (t.detach().bfloat16().requires_grad_() for t in (z, y))  # both streams enter blocks in bf16
    out["block"] = timed(fwd_bwd(lambda u, v, w: block(u, v, w, inputs), [zb, yb, c], cc), a.repeats) * 1e3
    out["rest (norms, modulation, gates)"] = out["block"] - sum(v for k, v in out.items() if k != "block")
    return out


# ---------------------------------------------------------------------------------------------------- rotary

def rotary_flip(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """`apply_rope`'s rotation of pairs (2i, 2i+1) written as x·cos + swap(x)·(-sin, sin), the swap a flip of each
    pair: the same math as the model's compiled form (unbind the pairs, stack the two products), another kernel."""
    rot = 2 * angles.shape[-1]
    pairs = x[..., :rot].float().unflatten(-1, (-1, 2))  # (..., L, Dr/2, 2)
    sign = torch.tensor([-1.0, 1.0], device=x.device)
    out = pairs * angles.cos()[..., None] + pairs.flip(-1) * (sign * angles.sin()[..., None])
    return torch.cat([out.flatten(-2).to(x.dtype), x[..., rot:]], dim=-1)


def rotary_table(a: argparse.Namespace, device: torch.device) -> list[dict]:
    """The 3D temporal attention's QK-norm + rotary, compiled, forward + backward from its qkv projection's output
    (bf16) at the preset's shape: the model's form, `rotary_flip`, the norm alone, and a copy of q and k (the
    memory-traffic floor of any form); the same gradients into every variant."""
    from isa4d.models.dit.attention import apply_rope, grid_positions, rope_frequencies

    d = block_dims(a)
    D, H, T, Dh = d.D, d.H, d.T, d.Dh
    S = d.B * d.M  # one sequence per body point
    angles = rope_frequencies(grid_positions(T, device=device), (Dh,))[:, None]  # (T, 1, Dh/2)
    norms = [nn.RMSNorm(Dh, eps=1e-6).to(device) for _ in range(2)]
    qkv = torch.randn(S, T, 3 * D, device=device, dtype=torch.bfloat16, requires_grad=True)
    grads = [torch.randn(S, T, H, Dh, device=device, dtype=torch.bfloat16) for _ in range(3)]

    def variant(rotate, norm: bool = True):
        def fn(qkv):
            q, k, v = rearrange(qkv, "s t (three h d) -> three s t h d", three=3, h=H)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if not norm:
                    return q * 1.0, k * 1.0, v
                q, k = norms[0](q).to(v.dtype), norms[1](k).to(v.dtype)
                return (rotate(q, angles), rotate(k, angles), v) if rotate else (q, k, v)
        return torch.compile(fn)

    rows = []
    for name, fn in [("model (apply_rope)", variant(apply_rope)), ("flip (rotary_flip)", variant(rotary_flip)),
                     ("QK-norm only", variant(None)), ("copy of q, k", variant(None, norm=False))]:
        def step(fn=fn):
            qkv.grad = None
            torch.autograd.backward(fn(qkv), grads)
        rows.append({"variant": name, "ms": timed(step, a.repeats, warmup=3) * 1e3})
    return [{**r, "dims": f"{S} x {T} x {H} x {Dh}"} for r in rows]


# --------------------------------------------------------------------------------------------------- backends

def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√Dh)·v for (B, H, L, Dh) as broadcast products and sums in fp32, not a matmul chain, so
    Inductor neither calls a batched GEMM nor matches it back to SDPA: the candidate for a handful of keys."""
    scores = (q.float()[..., :, None, :] * k.float()[..., None, :, :]).sum(-1) * q.shape[-1] ** -0.5
    return (scores.softmax(-1)[..., None] * v.float()[..., None, :, :]).sum(-2).to(v.dtype)


def time_or_why(row: dict, key: str, fn, repeats: int) -> None:
    """row[key] = fn's median time in ms, or None with row[key_why] when the kernel does not take this shape/mask."""
    try:
        row[key] = timed(fn, repeats) * 1e3
    except RuntimeError as e:
        row[key] = None
        row[f"{key}_why"] = str(e).splitlines()[0][:80]


def backend_table(a: argparse.Namespace, device: torch.device) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from isa4d.models.dit.attention import SHORT_SEQUENCE, block_diagonal_mask, pack_group

    _, D, H, Dh, B, T, _, N, M, _ = block_dims(a)
    shapes = {  # name: (batch, q length, k length, masked)
        "spatial": (B * T, N, N, False), "temporal": (B * N, T, T, False), "3D temporal": (B * M, T, T, False),
        "ISA video<-3D (masked)": (B * T, N, M + 1, True), "ISA 3D<-video": (B * T, M, N, False),
        "camera": (B * T, N, N, False), "reference": (B, T * N, N, False)}
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def packed(b: int, L: int) -> dict:
        """Short unmasked self-attention as `SelfAttention` packs it: g = pack_group(b, L, target) sequences per
        row of g·L tokens under the block-diagonal mask, per target and kernel (cuDNN, memory-efficient), fwd+bwd
        with the reshapes and the mask; `unpacked_efficient` is the unpacked baseline in the same layout (heads
        transposed out of a contiguous (b, L, H, Dh) projection, where the columns before start from contiguous
        (b, H, L, Dh))."""
        qkv = [torch.randn(b, L, H, Dh, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
        heads = [t.transpose(1, 2) for t in qkv]  # (b, H, L, Dh) views, as SelfAttention hands them to SDPA
        out = {}

        def measure(key: str, run) -> None:
            def step():
                for t in qkv:
                    t.grad = None
                run()
            time_or_why(out, key, step, a.repeats)

        def run_unpacked():
            with sdpa_kernel(backends["efficient"]):
                o = sdpa(*heads)  # (b, H, L, Dh)
            o.transpose(1, 2).reshape(b, L, H * Dh).sum().backward()
        measure("unpacked_efficient", run_unpacked)
        for target in (64, 128, 256):
            g = out[f"packed{target}_g"] = pack_group(b, L, target)
            for label in ("cudnn", "efficient"):
                if g == 1:
                    out[f"packed{target}_{label}"] = None
                    continue

                def run(g=g, backend=backends[label]):
                    # (b, H, L, Dh) -> (b/g, H, g·L, Dh): SelfAttention.forward's reshape of the (b, L, H, Dh) layout
                    q, k, v = (t.transpose(1, 2).reshape(b // g, g * L, H, Dh).transpose(1, 2) for t in heads)
                    with sdpa_kernel(backend):
                        o = sdpa(q, k, v, attn_mask=block_diagonal_mask(g, L, device))  # (b/g, H, g·L, Dh)
                    o.transpose(1, 2).reshape(b, L, H * Dh).sum().backward()
                measure(f"packed{target}_{label}", run)
        return out

    rows = []
    for name, (b, lq, lk, masked) in shapes.items():
        q = torch.randn(b, H, lq, Dh, device=device, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, H, lk, Dh, device=device, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, H, lk, Dh, device=device, dtype=torch.bfloat16, requires_grad=True)
        mask = (torch.rand(b, 1, 1, lk, device=device) > 0.1) if masked else None
        row = {"shape": name, "dims": f"{b}x{H}x{lq}x{lk}x{Dh}"}
        for label, backend in backends.items():
            def run(backend=backend):
                q.grad = k.grad = v.grad = None
                with sdpa_kernel(backend):
                    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                out.sum().backward()
            time_or_why(row, label, run, a.repeats)
        if lk <= SHORT_SEQUENCE and not masked:
            math = torch.compile(short_attention)

            def run_math():
                q.grad = k.grad = v.grad = None
                math(q, k, v).sum().backward()
            row["math"] = timed(run_math, a.repeats) * 1e3
            row.update(packed(b, lq))
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- clip length

class FullAttentionBlock(nn.Module):
    """A plain DiT block: adaLN-zero, full self-attention over all of a clip's video tokens, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        from isa4d.models.dit.attention import FeedForward, SelfAttention

        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn, self.mlp = SelfAttention(dim, num_heads), FeedForward(dim, mlp_ratio)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        s1, g1, b1, s2, g2, b2 = self.adaLN(c)[:, None].chunk(6, dim=-1)
        x = x + b1 * self.attn(self.norm1(x) * (1 + g1) + s1, rope)
        return x + b2 * self.mlp(self.norm2(x) * (1 + g2) + s2)


class FullAttentionDiT(nn.Module):
    """The baseline of the length sweep: ISA-DiT's width, depth, heads and patching, full attention, no 3D tokens."""

    def __init__(self, latent_channels: int, hidden_size: int, depth: int, num_heads: int, patch_size: int,
                 mlp_ratio: float, **_):
        super().__init__()
        self.p, self.head_dim = patch_size, hidden_size // num_heads
        self.embed = nn.Linear(2 * latent_channels * patch_size ** 2, hidden_size)  # latent + background
        self.t_embed = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.blocks = nn.ModuleList([FullAttentionBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.out = nn.Linear(hidden_size, latent_channels * patch_size ** 2)
        self.checkpoint = True  # full activation checkpointing per block (off to count model FLOPs)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        from isa4d.models.dit.attention import grid_positions, rope_frequencies

        B, C, T, h, w = x.shape
        tokens = rearrange(torch.cat([x, torch.zeros_like(x)], 1), "b c t (h p) (w q) -> b (t h w) (c p q)",
                           p=self.p, q=self.p)
        z = self.embed(tokens)
        freqs = torch.exp(-torch.arange(128, device=x.device) * 9.21 / 128)
        c = self.t_embed(torch.cat([torch.sin(t[:, None] * 1000 * freqs), torch.cos(t[:, None] * 1000 * freqs)], 1))
        d = self.head_dim
        rope = rope_frequencies(grid_positions(T, h // self.p, w // self.p, device=x.device), (d // 4, 3 * d // 8,
                                                                                               3 * d // 8))
        for block in self.blocks:
            z = checkpoint(block, z, c, rope, use_reentrant=False) if self.checkpoint else block(z, c, rope)
        return rearrange(self.out(z), "b (t h w) (c p q) -> b c t (h p) (w q)", t=T, h=h // self.p, p=self.p,
                         q=self.p)


def length_sweep(a: argparse.Namespace, device: torch.device) -> list[dict]:
    from isa4d.diffusion.flow import FlowMatching
    from isa4d.models.dit import ISADiT
    from isa4d.parallel.fsdp import checkpoint_and_compile
    from isa4d.training.throughput import loss_flops

    cfg = network_args(a.preset)
    rows = []
    for frames in a.lengths:
        T, h = 1 + (frames - 1) // 4, a.length_size // 8
        row = {"frames": frames, "latent_frames": T}
        for kind in ("isa", "full"):
            for where in ("meta", "cuda"):
                dev = torch.device("meta") if where == "meta" else device
                with dev:
                    net = ISADiT(**cfg) if kind == "isa" else FullAttentionDiT(**cfg)
                if where == "meta":  # model FLOPs: without the recomputation
                    net.checkpoint = False
                elif kind == "isa":
                    checkpoint_and_compile(list(net.blocks), "full", False)
                x0 = torch.randn(1, cfg["latent_channels"], T, h, h, device=dev)
                cond = {"cond": conditions(1, a.length_people, T, net.num_points, h, h, cfg["latent_channels"],
                                           net.frames_per_latent, dev)} if kind == "isa" else {}
                flow = FlowMatching()
                if where == "meta":
                    row[f"{kind}_tflop"] = loss_flops(lambda: flow.loss(net, x0, cond)[0]) / 1e12
                    continue
                opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)

                def step():
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        loss = flow.loss(net, x0, cond)[0]
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                try:
                    t = timed(step, a.repeats)
                    row[f"{kind}_ms"], row[f"{kind}_ms_per_latent_frame"] = t * 1e3, t * 1e3 / T
                    row[f"{kind}_tflops"] = row[f"{kind}_tflop"] / t
                except torch.OutOfMemoryError:
                    row[f"{kind}_ms"] = None
                del net, opt
                torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------- profile

def kernel_profile(a: argparse.Namespace, device: torch.device) -> dict:
    from isa4d.diffusion.flow import FlowMatching
    from isa4d.models.dit import ISADiT

    cfg = network_args(a.preset)
    net = ISADiT(**cfg).to(device)
    T, h = 1 + (a.frames - 1) // 4, a.size // 8
    x0 = torch.randn(a.batch, cfg["latent_channels"], T, h, h, device=device)
    cond = {"cond": conditions(a.batch, a.people, T, net.num_points, h, h, cfg["latent_channels"],
                               net.frames_per_latent, device)}
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = FlowMatching().loss(net, x0, cond)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    kinds, busy, top = profile_step(step, 3, 25)
    return {"ms_per_step_by_kind": kinds, "gpu_busy_ms_per_step": busy, "top": top}


def sampling(a: argparse.Namespace, device: torch.device) -> dict:
    import yaml

    from isa4d.diffusion.schedules import sampling_timesteps
    from isa4d.inference.generate import sample_latent
    from isa4d.models.dit import ISADiT
    from isa4d.models.vae import CausalVideoVAE

    cfg = network_args(a.preset)
    net = ISADiT(**cfg).to(device).eval()
    vae_args = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/vae/base.yaml").read_text())
    vae = CausalVideoVAE(**vae_args["model"]["init_args"]["vae"]["init_args"]).to(device, torch.bfloat16).eval()
    T, h = 1 + (a.sample_frames - 1) // 4, a.sample_size // 8
    cond = conditions(1, a.length_people, T, net.num_points, h, h, cfg["latent_channels"], net.frames_per_latent,
                      device)
    noise = torch.randn(1, cfg["latent_channels"], T, h, h, device=device)
    steps = sampling_timesteps(a.sample_steps, 1.0, device=device)
    out = {}

    @torch.no_grad()
    def denoise():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out["latent"] = sample_latent(net, cond, noise, steps, {})

    @torch.no_grad()
    def decode():
        vae.decode(out["latent"].to(torch.bfloat16), chunk_frames=16)

    t_net, t_vae = timed(denoise, max(1, a.repeats // 2), warmup=1), timed(decode, a.repeats, warmup=1)
    return {"size": a.sample_size, "frames": a.sample_frames, "steps": a.sample_steps, "denoise_s": t_net,
            "decode_s": t_vae, "frames_per_s": a.sample_frames / (t_net + t_vae)}


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """A markdown table, as docs/benchmarks.md takes it."""
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    ap = shape_parser(__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--parts", action="store_true")
    ap.add_argument("--backends", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--rotary", action="store_true")
    ap.add_argument("--lengths", type=int, nargs="*", default=[])
    ap.add_argument("--length-size", type=int, default=512)
    ap.add_argument("--length-people", type=int, default=1)
    ap.add_argument("--sample", action="store_true")
    ap.add_argument("--sample-size", type=int, default=512)
    ap.add_argument("--sample-frames", type=int, default=33)
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--compile", action="store_true", help="--parts: compile each part first")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_dit_parts.py times GPU kernels: no CUDA device here")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(a)}
    if a.parts:
        result["parts_ms"] = block_parts(a, device)
        block = result["parts_ms"]["block"]
        # compiled alone, parts pay for layout copies and boundaries the compiled block fuses away, so they can sum
        # to more than the block: then the share of their sum is the meaningful one
        parts = sum(v for k, v in result["parts_ms"].items() if k != "block" and not k.startswith("rest"))
        print_table(["part", "fwd+bwd (ms)", "share of block", "share of the parts' sum"],
                    [[k, f"{v:.2f}", f"{100 * v / block:.1f}%", f"{100 * v / parts:.1f}%"]
                     for k, v in result["parts_ms"].items()])
    if a.backends:
        result["backends"] = backend_table(a, device)
        cell = lambda r, k: "n/a" if r.get(k) is None else f"{r[k]:.3f}"  # noqa: E731
        print_table(["attention", "B x H x Lq x Lk x Dh", "flash", "cuDNN", "mem-efficient",
                     "compiled math (ms, fwd+bwd)"],
                    [[r["shape"], r["dims"], *(cell(r, k) for k in ("flash", "cudnn", "efficient", "math"))]
                     for r in result["backends"]])
        targets = (64, 128, 256)  # the short unmasked rows, packed g sequences per row as SelfAttention does
        print_table(["attention, packed (ms, fwd+bwd)", "g at " + " / ".join(map(str, targets)),
                     "unpacked mem-efficient",
                     *(f"packed {t} {k}" for t in targets for k in ("cuDNN", "mem-efficient"))],
                    [[r["shape"], " / ".join(str(r[f"packed{t}_g"]) for t in targets), cell(r, "unpacked_efficient"),
                      *(cell(r, f"packed{t}_{k}") for t in targets for k in ("cudnn", "efficient"))]
                     for r in result["backends"] if "unpacked_efficient" in r])
    if a.rotary:
        result["rotary"] = rotary_table(a, device)
        print_table(["3D temporal QK-norm + rotary, compiled", "S x T x H x Dh", "fwd+bwd (ms)"],
                    [[r["variant"], r["dims"], f"{r['ms']:.3f}"] for r in result["rotary"]])
    if a.profile:
        result["profile"] = kernel_profile(a, device)
        print(json.dumps({k: v for k, v in result["profile"].items() if k != "top"}))
        for name, ms, n in result["profile"]["top"]:
            print(f"{ms:8.2f} ms {n:6d}x {name}")
    if a.lengths:
        result["lengths"] = length_sweep(a, device)
        f = lambda r, k: "OOM" if r.get(k) is None else f"{r[k]:.1f}"  # noqa: E731
        print_table(["frames", "latent frames", "ISA-DiT ms", "per latent frame", "TFLOP", "full-attention DiT ms",
                     "per latent frame", "TFLOP"],
                    [[str(r["frames"]), str(r["latent_frames"]), f(r, "isa_ms"), f(r, "isa_ms_per_latent_frame"),
                      f"{r['isa_tflop']:.1f}", f(r, "full_ms"), f(r, "full_ms_per_latent_frame"),
                      f"{r['full_tflop']:.1f}"] for r in result["lengths"]])
    if a.sample:
        result["sampling"] = r = sampling(a, device)
        print(f"sampling {r['frames']}x{r['size']}², {r['steps']} steps: denoise {r['denoise_s']:.2f} s, decode "
              f"{r['decode_s']:.2f} s, {r['frames_per_s']:.2f} frames/s")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
