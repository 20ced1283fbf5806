"""Token embedders of ISA-DiT: timestep, latent patches, 3D body points, Plücker rays, reference, and the
condition dropout that classifier-free guidance trains with.

Patchify / unpatchify are pure functions so the round trip can be tested. Condition dropout lives here, in one
module with a `force_drop` hook (DiT's `LabelEmbedder` pattern), so guidance can switch conditions off exactly
as training did.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from isa4d.geometry.ndc import sinusoidal_embedding
from isa4d.models.dit.conditions import DiTConditions

CONDITIONS = DiTConditions.dropout_groups()  # ("ref", "pose", "camera", "background"), from the fields' metadata


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, T, (H/p)(W/p), C·p·p), row-major over the patch grid."""
    if x.shape[-2] % patch or x.shape[-1] % patch:
        raise ValueError(f"latent grid {tuple(x.shape[-2:])} is not divisible by the patch size {patch}")
    return rearrange(x, "b c t (h p) (w q) -> b t (h w) (c p q)", p=patch, q=patch)


def unpatchify(tokens: torch.Tensor, patch: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Inverse of `patchify`: (B, T, h·w, C·p·p) -> (B, C, T, h·p, w·p)."""
    return rearrange(tokens, "b t (h w) (c p q) -> b c t (h p) (w q)", h=grid_h, w=grid_w, p=patch, q=patch)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0, scale: float = 1000.0) -> torch.Tensor:
    """DiT's sinusoidal code of t (B,) in [0, 1] (scaled by 1000, so the usual 10^4 period range applies) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = scale * t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb  # (B, dim)


class TimestepEmbedder(nn.Module):
    """t (B,) -> (B, D): sinusoidal code then a two-layer MLP (DiT)."""

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


class PatchEmbed(nn.Module):
    """Latent-like maps (B, C, T, H, W) -> tokens (B, T, (H/p)(W/p), D): patchify then a linear map."""

    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(in_channels * patch * patch, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(patchify(x, self.patch))


class MapEmbedder(nn.Module):
    """Per-frame 2D maps (B, T, C_map, H, W) at video resolution -> additive video-token features (B, T, N, D).

    ControlNet-lite (the paper's 2D-map baseline): the maps of the video frames of each latent frame, stacked on
    channels like the Plücker rays, are patchified with the video tokens' footprint in pixels (`pixel_patch` =
    the VAE's spatial factor x the DiT's patch), embedded, and added through a zero-initialised projection, so a
    network that gains this path starts exactly as the one without it. A dropped sample adds nothing.
    """

    def __init__(self, in_channels: int, dim: int, pixel_patch: int):
        super().__init__()
        self.embed = PatchEmbed(in_channels, dim, pixel_patch)
        self.act = nn.SiLU()
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)  # zero-init: the maps start with no effect (ControlNet's zero convolution)
        nn.init.zeros_(self.proj.bias)

    def forward(self, maps: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(self.act(self.embed(rearrange(maps, "b t c h w -> b c t h w"))))  # (B, T, N, D)
        return torch.where(drop[:, None, None, None], torch.zeros_like(tokens), tokens)


class PointEmbedder(nn.Module):
    """3D tokens' content (paper §2.1: Y = MLP(PE(G))) plus learned person and body-point embeddings.

    `world` (B, P, T, F, V, 3) holds, for each latent frame, the world coordinates of the V surface points in the
    F video frames it covers; the F positions are coded together, so a token carries the point's short-range
    motion inside its latent frame (docs/model.md). Coordinates are divided by `world_extent` (metres) first, so
    the lowest frequency spans the scene. The per-person embedding (PAPER.md §2.1 [INF]) tells apart people whose
    tokens are concatenated; the per-point embedding (a choice, `point_embedding`) names the body point, which the
    raw coordinates only imply.
    """

    def __init__(self, dim: int, frames_per_latent: int, num_points: int, max_people: int, num_freqs: int = 8,
                 world_extent: float = 4.0, point_embedding: bool = True):
        super().__init__()
        if world_extent <= 0:
            raise ValueError(f"world_extent must be positive, got {world_extent}")
        self.num_freqs, self.world_extent, self.max_people = num_freqs, world_extent, max_people
        code_dim = frames_per_latent * 3 * (2 * num_freqs + 1)
        self.mlp = nn.Sequential(nn.Linear(code_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.person = nn.Embedding(max_people, dim)
        self.point = nn.Embedding(num_points, dim) if point_embedding else None
        nn.init.normal_(self.person.weight, std=0.02)
        if self.point is not None:
            nn.init.normal_(self.point.weight, std=0.02)

    def forward(self, world: torch.Tensor) -> torch.Tensor:
        B, P, T, F, V, _ = world.shape
        if P > self.max_people:
            raise ValueError(f"{P} people in the batch but the network was built for max_people={self.max_people}")
        x = rearrange(world / self.world_extent, "b p t f v c -> b p t v (f c)")
        code = sinusoidal_embedding(x, self.num_freqs, include_input=True, base_scale=math.pi / 2)
        tokens = self.mlp(code.to(self.mlp[0].weight.dtype))  # (B, P, T, V, D)
        # the embeddings in the MLP's output dtype: under autocast the fp32 tables would promote the 3D stream
        tokens = tokens + self.person.weight[:P, None, None, :].to(tokens.dtype)
        if self.point is not None:
            if V != self.point.num_embeddings:
                raise ValueError(f"{V} body points but the network was built for num_points={self.point.num_embeddings}")
            tokens = tokens + self.point.weight.to(tokens.dtype)
        return tokens  # (B, P, T, V, D)


class ConditionDropout(nn.Module):
    """Which conditions each sample drops: independent Bernoulli(p) per condition in training, none in eval.

    `forward(batch_size, force_drop)` -> {name: (B,) bool}. `force_drop` maps a condition to a bool or a (B,)
    mask that is OR-ed in, in any mode: the guidance sampler uses it to get the unconditional predictions the
    model was trained to make.
    """

    def __init__(self, probabilities: dict[str, float] | None = None):
        super().__init__()
        probabilities = dict(probabilities or {})
        unknown = set(probabilities) - set(CONDITIONS)
        if unknown:
            raise ValueError(f"unknown conditions {sorted(unknown)}; known: {CONDITIONS}")
        for name, p in probabilities.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"dropout probability of {name!r} must be in [0, 1], got {p}")
        self.probabilities = {name: float(probabilities.get(name, 0.0)) for name in CONDITIONS}

    def forward(self, batch_size: int, device: torch.device, force_drop: dict | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        force_drop = dict(force_drop or {})
        unknown = set(force_drop) - set(CONDITIONS)
        if unknown:
            raise ValueError(f"force_drop names unknown conditions {sorted(unknown)}; known: {CONDITIONS}")
        out = {}
        for name in CONDITIONS:
            drop = torch.zeros(batch_size, dtype=torch.bool, device=device)
            p = self.probabilities[name]
            if self.training and p > 0:
                drop = torch.rand(batch_size, generator=generator, device=device) < p
            forced = force_drop.get(name)
            if forced is not None:
                drop = drop | torch.as_tensor(forced, dtype=torch.bool, device=device).expand(batch_size)
            out[name] = drop
        return out
