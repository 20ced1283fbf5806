"""Auxiliary 2D image decoder of the image-decoding regulariser (paper §4).

The video latent's channels are split into sub-latents, one per video frame that a latent frame covers; this
decoder turns each sub-latent alone into its frame. Forcing every sub-latent to carry one frame spreads the
temporal information over the channels and removes the "last-frame bias" of a KL-only video VAE. It is a
training-time head only: `CausalVideoVAE.decode` never uses it.

A small SD-style decoder: conv_in, a mid ResnetBlock, then one ResnetBlock + nearest x2 upsampling per level.
Level widths come from `channels` = (finest, ..., coarsest); levels beyond its length reuse the coarsest
width, so (64, 128) with 3 upsamplings runs at 128 on 1/8, 1/4 and 1/2 resolution and at 64 on full
resolution.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from isa4d.models.vae.blocks import group_norm_fp32_stats


class _GroupNorm(nn.GroupNorm):
    """GroupNorm with fp32 statistics, no fp32 copy of the activation (blocks.group_norm_fp32_stats)."""

    def forward(self, x: Tensor) -> Tensor:  # x: (n, c, h, w)
        return group_norm_fp32_stats(x, self)


def _norm(channels: int, groups: int) -> _GroupNorm:
    if channels % groups:
        raise ValueError(f"norm_groups={groups} must divide every image-decoder width, not {channels}")
    return _GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, norm_groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, norm_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels
                             else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:  # x: (b, c, h, w)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h  # (b, c', h, w)


class Upsample2D(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # x: (b, c, h, w)
        return self.conv(F.interpolate(x.contiguous(), scale_factor=2.0, mode="nearest"))  # (b, c, 2h, 2w)


class ImageDecoder(nn.Module):
    """(n, in_channels, h, w) sub-latents -> (n, out_channels, h s, w s) images, s = 2**num_upsamples."""

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 3,
        channels: tuple[int, ...] = (64, 128),
        num_upsamples: int = 3,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        if not channels or min(channels) <= 0:
            raise ValueError(f"image decoder channels must be a non-empty tuple of positive widths, "
                             f"got {channels}")
        if num_upsamples < 0:
            raise ValueError(f"num_upsamples must be >= 0, got {num_upsamples}")
        # Width of level l (0 = full resolution): the coarsest given width past the tuple's end.
        widths = [channels[min(level, len(channels) - 1)] for level in range(num_upsamples + 1)]
        self.conv_in = nn.Conv2d(in_channels, widths[-1], 3, padding=1)
        self.mid = ResnetBlock2D(widths[-1], widths[-1], norm_groups)
        self.up = nn.ModuleList()
        for level in reversed(range(num_upsamples + 1)):  # coarse to fine
            stage = nn.Module()
            stage.block = ResnetBlock2D(widths[min(level + 1, num_upsamples)], widths[level], norm_groups)
            stage.upsample = Upsample2D(widths[level]) if level > 0 else nn.Identity()
            self.up.append(stage)
        self.norm_out = _norm(widths[0], norm_groups)
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:  # z: (n, c_sub, h, w)
        h = self.mid(self.conv_in(z))  # (n, w_coarse, h, w)
        for stage in self.up:
            h = stage.upsample(stage.block(h))  # (n, w_level, 2h, 2w) until the finest level
        return self.conv_out(F.silu(self.norm_out(h)))  # (n, 3, H, W)
