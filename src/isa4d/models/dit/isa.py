"""Interspatial attention (ISA) and its positional code, ISPE (paper §2.2-2.3).

Per latent frame, video tokens and that frame's 3D body tokens attend to each other, each direction with its own
projections (MM-DiT-like two streams, two cross-attentions; PAPER.md §2.3 leaves joint vs separate softmax open,
docs/model.md says why separate):

    z' = Attn(Q(z + PE(s_ndc)), K/V(Y + PE(g_ndc)))      video reads body   ("implicit rendering")
    Y' = Attn(Q(Y + PE(g_ndc)), K/V(z + PE(s_ndc)))      body reads video   ("implicit reconstruction")

PE is ISPE: a sinusoidal code of camera-NDC coordinates (3D points by perspective divide with depth kept,
video tokens on z = 0; `isa4d.geometry.ndc`) through one linear map shared by both streams, so a video token and a
body point at the same image position get the same code and their dot products depend on NDC differences.
Switching ISPE off is the paper's key ablation (Table 4: PSNR 28.34 -> 25.21).

Padded people and points behind the camera are masked out of the video-reads-body keys. One learned null key
("no body here") is always present, so a frame with no visible body, or with the pose condition dropped for
guidance, still has a well-defined softmax.
"""

from __future__ import annotations

import torch
from torch import nn

from isa4d.geometry.ndc import sinusoidal_embedding
from isa4d.models.dit.attention import CrossAttention


def ispe_code(ndc: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """NDC (..., 3) -> the sinusoids ISPE maps, (..., 6·num_freqs), in fp32 (bf16 would blur the high
    frequencies). The same for every block, so `ISADiT` computes it once per forward."""
    return sinusoidal_embedding(ndc.float(), num_freqs)


class ISPE(nn.Module):
    """Sinusoidal NDC code (`ispe_code`, period 2 at the lowest of `num_freqs`) -> positional code (..., D) by a
    linear map. One instance serves both token kinds of an ISA layer."""

    def __init__(self, dim: int, num_freqs: int = 8):
        super().__init__()
        self.num_freqs = num_freqs
        self.proj = nn.Linear(3 * 2 * num_freqs, dim)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.proj(code.to(self.proj.weight.dtype))


class InterspatialAttention(nn.Module):
    """Symmetric per-frame cross-attention between video tokens and 3D tokens, with ISPE.

    `forward(z, y, z_code, y_code, y_mask)` with z (F, N, D) video tokens and y (F, M, D) body tokens of F frames
    (normalised and modulated by the caller), their NDC codes (`ispe_code`) z_code (N, C) or (F, N, C) and
    y_code (F, M, C), y_mask (F, M) bool
    (True = a real, visible point). Returns (dz (F, N, D), dy (F, M, D) or None); the caller adds them as
    residuals. Both directions read the inputs as given, so neither sees the other's update.
    """

    def __init__(self, dim: int, num_heads: int, use_ispe: bool = True, ispe_freqs: int = 8, qk_norm: bool = True,
                 update_points: bool = True):
        super().__init__()
        self.use_ispe, self.update_points = use_ispe, update_points
        self.ispe = ISPE(dim, ispe_freqs) if use_ispe else None
        self.video_reads_body = CrossAttention(dim, num_heads, qk_norm)
        self.body_reads_video = CrossAttention(dim, num_heads, qk_norm) if update_points else None
        self.null = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.null, std=0.02)

    def forward(self, z: torch.Tensor, y: torch.Tensor, z_code: torch.Tensor, y_code: torch.Tensor,
                y_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        F_ = z.shape[0]
        if self.ispe is not None:
            z = z + self.ispe(z_code)  # (F, N, D): the code broadcasts over frames when z_code is (N, C)
            y = y + self.ispe(y_code)  # (F, M, D)
        keys = torch.cat([y, self.null.to(y.dtype).expand(F_, 1, -1)], dim=1)  # (F, M + 1, D)
        keep = torch.cat([y_mask, y_mask.new_ones(F_, 1)], dim=1)  # (F, M + 1)
        dz = self.video_reads_body(z, keys, keep)  # (F, N, D)
        dy = self.body_reads_video(y, z) if self.body_reads_video is not None else None  # (F, M, D)
        return dz, dy
