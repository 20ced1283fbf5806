"""Attention primitives of ISA-DiT: rotary positions, QK-normalised self- and cross-attention.

Every attention goes through `torch.nn.functional.scaled_dot_product_attention`, so no attention matrix is ever
materialised and PyTorch picks the flash / cuDNN / memory-efficient kernel. Queries and keys are RMS-normalised
per head before the dot product (QK-norm, Dehghani et al. 2023; used by SD3 and Flux), which keeps attention
logits bounded in bf16 as the model grows. Rotary embeddings (Su et al. 2021) follow Flux's multi-axis layout:
the head dimension is split into one slice per position axis.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def rope_frequencies(positions: torch.Tensor, axes_dims: tuple[int, ...], theta: float = 10_000.0) -> torch.Tensor:
    """Rotary angles for positions (L, A) over A axes -> (L, sum(axes_dims) / 2) angles.

    Axis a rotates its own slice of axes_dims[a] channels (an even number) with frequencies theta^(-2i/dim).
    """
    if positions.shape[-1] != len(axes_dims) or any(d % 2 for d in axes_dims):
        raise ValueError(f"need one even slice per position axis, got axes_dims={axes_dims} for "
                         f"positions of shape {tuple(positions.shape)}")
    angles = []
    for a, dim in enumerate(axes_dims):
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)  # (dim/2,)
        angles.append(positions[:, a, None].double() * freqs)  # (L, dim/2)
    return torch.cat(angles, dim=-1).float()  # (L, sum/2)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (..., L, Dh) by angles (L, Dr/2); channels past Dr are left as is.

    Eager: one complex multiply in fp32 (x as Dr/2 complex numbers times e^{i·angle}), three passes over x (to
    fp32, multiply, back) rather than the ten of a stack of real products. Compiled: the real products, which
    Inductor fuses into one kernel (it does not lower complex tensors)."""
    rot = 2 * angles.shape[-1]
    if torch.compiler.is_compiling():
        x0, x1 = x[..., :rot].float().unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = angles.cos(), angles.sin()
        out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).to(x.dtype)
    else:
        xr = torch.view_as_complex(x[..., :rot].float().unflatten(-1, (-1, 2)).contiguous())  # (..., L, Dr/2)
        out = torch.view_as_real(xr * torch.polar(torch.ones_like(angles), angles)).flatten(-2).to(x.dtype)
    return out if rot == x.shape[-1] else torch.cat([out, x[..., rot:]], dim=-1)


def grid_positions(*sizes: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Integer coordinates of a row-major grid of the given sizes, (prod(sizes), len(sizes))."""
    axes = [torch.arange(s, device=device, dtype=torch.float32) for s in sizes]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(sizes))


SHORT_SEQUENCE = 16  # keys up to this many: the memory-efficient kernel wins (temporal attention over latent frames)
PACK_LENGTH = 64  # short unmasked self-attentions are packed into sequences of up to this many tokens (0: never)
PACK_MIN_SEQUENCES = 2048  # ... when there are at least this many sequences (fewer: the unpacked kernel wins)


def pack_group(num_sequences: int, length: int, target: int) -> int:
    """How many consecutive sequences of `length` tokens to attend as one of g·length under a block-diagonal mask:
    the largest divisor g of num_sequences with g·length <= target, else 1 (also for target 0 or length past
    SHORT_SEQUENCE). SDPA tiles queries in blocks of 64-128, so 9 frames alone leave most of each tile idle.
    A divisor, so (B, L) -> (B/g, g·L) stays a free reshape: no padding sequences to copy in and slice back out."""
    if target <= 0 or length > SHORT_SEQUENCE:
        return 1
    for g in range(min(num_sequences, target // max(length, 1)), 1, -1):
        if num_sequences % g == 0:
            return g
    return 1


def block_diagonal_mask(groups: int, length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(1, 1, g·L, g·L) bool, True = attend: a token of a packed sequence sees only the L tokens of its own."""
    seq = torch.arange(groups * length, device=device) // length  # (g·L,) original sequence of each token
    return (seq[:, None] == seq[None, :])[None, None]


def _kernel_preference(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None,
                       packed: bool = False) -> list | None:
    """The SDPA kernels to try first for this shape on a GPU, from `bench/bench_dit_parts.py --backends` on an H100
    (docs/benchmarks.md): with a mask cuDNN (4x the memory-efficient kernel; flash takes no mask); for short
    sequences the memory-efficient kernel (flash is 3x slower there), also for the packed short sequences of
    `SelfAttention` under their block-diagonal mask (`packed`); otherwise PyTorch's own order.

    The same under torch.compile: Dynamo traces `sdpa_kernel` (priority included, torch >= 2.9) and the backend it
    picks is baked into the graph. Without it a compiled step ran PyTorch's default order, which on the H100
    (torch 2.11) put every attention on cuDNN, the short temporal ones included, where the memory-efficient kernel
    is faster (-3% per compiled step, docs/benchmarks.md)."""
    if q.device.type != "cuda":
        return None
    from torch.nn.attention import SDPBackend

    if packed:
        return [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    if mask is not None:
        return [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if k.shape[-2] <= SHORT_SEQUENCE:
        return [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                SDPBackend.MATH]
    return None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              packed: bool = False) -> torch.Tensor:
    """SDPA over (B, H, L, Dh) heads -> (B, L, H·Dh); `mask` (B, 1 or H, Lq, Lk) bool, True = attend; `packed`:
    the mask is SelfAttention's block-diagonal one over packed short sequences (picks the kernel)."""
    preference = _kernel_preference(q, k, mask, packed)
    if preference is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Lq, Dh)
    else:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(preference, set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return rearrange(out, "b h l d -> b l (h d)")


class _Heads(nn.Module):
    """What both attentions share: the head split, per-head QK-norm (RMSNorm or none) and the output map.
    `inputs` are the input projections, registered first (so parameter order and initialisation follow it)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, **inputs: nn.Module):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        for name, module in inputs.items():
            setattr(self, name, module)
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)


class SelfAttention(_Heads):
    """Multi-head self-attention with QK-norm and optional rotary positions; x (B, L, D) -> (B, L, D)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, pack_length: int | None = None):
        super().__init__(dim, num_heads, qk_norm, qkv=nn.Linear(dim, 3 * dim))
        # target of `pack_group`; None: the module's PACK_LENGTH for at least PACK_MIN_SEQUENCES sequences (read per
        # call), else no packing; a number packs at that target whatever the batch (tests, benches)
        self.pack_length = pack_length

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        # norm and rotate in the projection's own (B, L, H, Dh) layout, then hand SDPA (B, H, L, Dh) views
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b l h d", three=3, h=self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            angles = rope[:, None]  # (L, 1, Dr/2): broadcast over heads
            q, k = apply_rope(q, angles), apply_rope(k, angles)
        B, L = x.shape[:2]
        target = self.pack_length if self.pack_length is not None else PACK_LENGTH if B >= PACK_MIN_SEQUENCES else 0
        g = 1 if mask is not None else pack_group(B, L, target)
        if g == 1:
            return self.proj(attention(*(t.transpose(1, 2) for t in (q, k, v)), mask))  # (B, L, D)
        # short sequences, packed g at a time after rope (positions stay per sequence): (B, L) -> (B/g, g·L) merges
        # adjacent dims, a view of the projection (v) and of the contiguous norm/rope outputs (q, k)
        q, k, v = (t.reshape(B // g, g * L, *t.shape[2:]).transpose(1, 2) for t in (q, k, v))  # (B/g, H, g·L, Dh)
        out = attention(q, k, v, block_diagonal_mask(g, L, x.device), packed=True)  # (B/g, g·L, H·Dh)
        return self.proj(out.reshape(B, L, -1))  # (B, L, D)


class CrossAttention(_Heads):
    """Multi-head cross-attention with QK-norm: queries x (B, Lq, D) read context (B, Lk, D) -> (B, Lq, D).

    `mask` (B, Lk) bool marks the keys that may be attended; every query must have at least one.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True):
        super().__init__(dim, num_heads, qk_norm, q=nn.Linear(dim, dim), kv=nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q = rearrange(self.q(x), "b l (h d) -> b h l d", h=self.num_heads)
        k, v = rearrange(self.kv(context), "b l (two h d) -> two b h l d", two=2, h=self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, Lk)
        return self.proj(attention(q, k, v, attn_mask))  # (B, Lq, D)


class FeedForward(nn.Module):
    """The transformer MLP: Linear -> GELU(tanh) -> Linear, width mlp_ratio·D."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
