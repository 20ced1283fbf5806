"""The ISA-DiT block (paper §3.1) and the final layer, with adaLN-zero timestep modulation (Peebles & Xie 2023).

One block, in the order of the paper's pipeline figure:
  1. video tokens: spatial self-attention within each latent frame (2D rotary positions), then temporal
     self-attention per token location across latent frames (1D rotary);
  2. 3D tokens: temporal self-attention per body point across latent frames (1D rotary);
  3. interspatial attention per frame, both directions, each stream then through its own MLP;
  4. camera cross-attention (per frame, to that frame's Plücker tokens), then reference cross-attention (to the
     reference image tokens).
Every sub-layer is pre-norm (LayerNorm without affine) with a shift and scale from the timestep and a gated
residual; the gates come from a zero-initialised linear map, so a new block is exactly the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from isa4d.models.dit.attention import CrossAttention, FeedForward, SelfAttention
from isa4d.models.dit.isa import InterspatialAttention

VIDEO_SUBLAYERS = ("spatial", "temporal", "isa", "mlp", "camera", "ref")
POINT_SUBLAYERS = ("temporal", "isa", "mlp")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, ..., L, D) with shift, scale (B, D): DiT's x·(1 + scale) + shift, broadcast over the middle axes."""
    view = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
    return x * (1 + scale.view(view)) + shift.view(view)


def gated(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    view = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
    return x * gate.view(view)


@dataclass
class BlockInputs:
    """Per-forward tensors every block reads (built once by `ISADiT`)."""

    spatial_rope: torch.Tensor  # (N, head_dim / 2) rotary angles of the token grid
    temporal_rope: torch.Tensor  # (T, head_dim / 2) rotary angles of the latent frames
    z_code: torch.Tensor  # (N, C) ISPE sinusoids of the video tokens' NDC (z = 0), fp32
    y_code: torch.Tensor | None  # (B, T, M, C) ISPE sinusoids of the 3D tokens' NDC, fp32 (None: no 3D stream)
    y_mask: torch.Tensor | None  # (B, T, M) bool, real and visible 3D tokens (and pose not dropped)
    camera: torch.Tensor | None  # (B, T, N, D) Plücker tokens
    ref: torch.Tensor | None  # (B, R, D) reference tokens


class ISADiTBlock(nn.Module):
    """z (B, T, N, D) video tokens, y (B, T, M, D) 3D tokens, c (B, D) timestep code -> (z, y)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True,
                 use_ispe: bool = True, ispe_freqs: int = 8, camera: bool = True, ref: bool = True,
                 update_points: bool = True, points: bool = True):
        super().__init__()
        self.points, self.update_points = points, update_points and points
        present = {"camera": camera, "ref": ref, "isa": points}
        self.video_sublayers = tuple(s for s in VIDEO_SUBLAYERS if present.get(s, True))
        self.point_sublayers = () if not points else POINT_SUBLAYERS if update_points else ("temporal",)
        norm = lambda: nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)  # noqa: E731
        self.norms = nn.ModuleDict({f"video_{s}": norm() for s in self.video_sublayers})
        self.norms.update({f"point_{s}": norm() for s in self.point_sublayers})
        self.spatial_attn = SelfAttention(dim, num_heads, qk_norm)
        self.temporal_attn = SelfAttention(dim, num_heads, qk_norm)
        self.point_temporal_attn = SelfAttention(dim, num_heads, qk_norm) if points else None
        self.isa = InterspatialAttention(dim, num_heads, use_ispe, ispe_freqs, qk_norm, update_points) \
            if points else None
        self.video_mlp = FeedForward(dim, mlp_ratio)
        self.point_mlp = FeedForward(dim, mlp_ratio) if self.update_points else None
        self.camera_attn = CrossAttention(dim, num_heads, qk_norm) if camera else None
        self.camera_norm = nn.LayerNorm(dim, eps=1e-6) if camera else None
        self.ref_attn = CrossAttention(dim, num_heads, qk_norm) if ref else None
        self.ref_norm = nn.LayerNorm(dim, eps=1e-6) if ref else None
        self.num_modulations = 3 * (len(self.video_sublayers) + len(self.point_sublayers))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.num_modulations * dim))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)  # zero gates: the block starts as the identity
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def _modulations(self, c: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        chunks = self.adaLN_modulation(c).chunk(self.num_modulations, dim=-1)  # each (B, D)
        names = [f"video_{s}" for s in self.video_sublayers] + [f"point_{s}" for s in self.point_sublayers]
        return {name: chunks[3 * i: 3 * i + 3] for i, name in enumerate(names)}  # (shift, scale, gate)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None, c: torch.Tensor,
                inputs: BlockInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """y None: a block without the 3D stream (ISA off: the 2D-map and no-pose ablations)."""
        B, T, N, D = z.shape
        mod = self._modulations(c)
        pre = lambda name, x: modulate(self.norms[name](x), *mod[name][:2])  # noqa: E731

        # 1. video: spatial attention per frame, then temporal attention per location
        h = rearrange(pre("video_spatial", z), "b t n d -> (b t) n d")
        h = self.spatial_attn(h, inputs.spatial_rope)
        z = z + gated(rearrange(h, "(b t) n d -> b t n d", b=B), mod["video_spatial"][2])  # (B, T, N, D)
        h = rearrange(pre("video_temporal", z), "b t n d -> (b n) t d")
        h = self.temporal_attn(h, inputs.temporal_rope)
        z = z + gated(rearrange(h, "(b n) t d -> b t n d", b=B), mod["video_temporal"][2])  # (B, T, N, D)

        if self.points:
            z, y = self._points(z, y, inputs, mod, pre)
        else:
            z = z + gated(self.video_mlp(pre("video_mlp", z)), mod["video_mlp"][2])
        z = self._conditions(z, inputs, mod, pre)
        return z, y  # (B, T, N, D), (B, T, M, D)

    def _points(self, z, y, inputs, mod, pre):
        """Sections 2 and 3: the 3D tokens' temporal attention, interspatial attention and both streams' MLPs."""
        B = z.shape[0]
        # 2. 3D tokens: temporal attention per body point
        h = rearrange(pre("point_temporal", y), "b t m d -> (b m) t d")
        h = self.point_temporal_attn(h, inputs.temporal_rope)
        y = y + gated(rearrange(h, "(b m) t d -> b t m d", b=B), mod["point_temporal"][2])  # (B, T, M, D)

        # 3. interspatial attention per frame, both directions from the same inputs, then each stream's MLP
        hz = rearrange(pre("video_isa", z), "b t n d -> (b t) n d")
        hy = rearrange(pre("point_isa", y), "b t m d -> (b t) m d") if self.update_points else \
            rearrange(self.norms["point_temporal"](y), "b t m d -> (b t) m d")
        dz, dy = self.isa(hz, hy, inputs.z_code, rearrange(inputs.y_code, "b t m c -> (b t) m c"),
                          rearrange(inputs.y_mask, "b t m -> (b t) m"))
        z = z + gated(rearrange(dz, "(b t) n d -> b t n d", b=B), mod["video_isa"][2])  # (B, T, N, D)
        z = z + gated(self.video_mlp(pre("video_mlp", z)), mod["video_mlp"][2])
        if self.update_points:
            y = y + gated(rearrange(dy, "(b t) m d -> b t m d", b=B), mod["point_isa"][2])  # (B, T, M, D)
            y = y + gated(self.point_mlp(pre("point_mlp", y)), mod["point_mlp"][2])
        return z, y

    def _conditions(self, z, inputs, mod, pre):
        """Section 4: the cross-attention sub-layers of the conditions with their own tokens."""
        B, T = z.shape[:2]
        # 4. camera cross-attention per frame, then reference cross-attention
        if self.camera_attn is not None:
            h = rearrange(pre("video_camera", z), "b t n d -> (b t) n d")
            cam = rearrange(self.camera_norm(inputs.camera), "b t n d -> (b t) n d")
            h = self.camera_attn(h, cam)
            z = z + gated(rearrange(h, "(b t) n d -> b t n d", b=B), mod["video_camera"][2])
        if self.ref_attn is not None:
            h = rearrange(pre("video_ref", z), "b t n d -> b (t n) d")
            h = self.ref_attn(h, self.ref_norm(inputs.ref))  # all frames of a clip read the same reference
            z = z + gated(rearrange(h, "b (t n) d -> b t n d", t=T), mod["video_ref"][2])
        return z


class FinalLayer(nn.Module):
    """adaLN then a zero-initialised linear map to patch values: a fresh network predicts v = 0."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)
        for layer in (self.adaLN_modulation[-1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(z), shift, scale))
