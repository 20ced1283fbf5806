"""Discriminators for the VAE's adversarial losses: a 2D PatchGAN per frame and a 3D PatchGAN over space-time.

GroupNorm, not BatchNorm: batch statistics misbehave with the small per-GPU batches of video training and under
FSDP. The 3D discriminator judges motion (temporal artefacts) that no per-frame critic can see (paper §4).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn


def _groups(c: int) -> int:
    return min(32, c // 4) if c >= 8 else 1


class PatchDiscriminator2D(nn.Module):
    """(B, C, T, H, W) -> per-frame patch logits (B*T, 1, h, w); frames are judged independently."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        if num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, num_layers + 1):
            out = channels * min(2 ** i, 8)
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(c, out, 4, stride, 1), nn.GroupNorm(_groups(out), out), nn.LeakyReLU(0.2)]
            c = out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.net(rearrange(video, "b c t h w -> (b t) c h w"))

    def fsdp_units(self) -> list[nn.Module]:
        """Wrap units for isa4d.parallel: each conv layer; norms and the rest stay with the root."""
        return [m for m in self.net if isinstance(m, (nn.Conv2d, nn.Conv3d))]


class PatchDiscriminator3D(nn.Module):
    """(B, C, T, H, W) -> space-time patch logits (B, 1, t, h, w). Strides 2 in space every layer, in time on the
    first `temporal_downsample` layers, so short clips (T >= 5) stay valid."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3, temporal_downsample: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv3d(in_channels, channels, (3, 4, 4), (1, 2, 2), (1, 1, 1)), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, num_layers + 1):
            out = channels * min(2 ** i, 8)
            st = 2 if i <= temporal_downsample else 1
            ss = 2 if i < num_layers else 1
            layers += [nn.Conv3d(c, out, (3, 4, 4), (st, ss, ss), (1, 1, 1)), nn.GroupNorm(_groups(out), out), nn.LeakyReLU(0.2)]
            c = out
        layers.append(nn.Conv3d(c, 1, (3, 4, 4), 1, (1, 1, 1)))
        self.net = nn.Sequential(*layers)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.net(video)

    def fsdp_units(self) -> list[nn.Module]:
        """Wrap units for isa4d.parallel: each conv layer; norms and the rest stay with the root."""
        return [m for m in self.net if isinstance(m, (nn.Conv2d, nn.Conv3d))]
