"""Building blocks of the causal video VAE: the SD3 VAE's blocks inflated to causal 3D (paper §4).

Every normalisation is per frame (statistics over channel groups and space, never over time) and the attention
is spatial, within each frame. Both are what make the network causal and chunked coding exact: a norm pooling
over time would let later frames change earlier outputs. Module names follow the SD VAE checkpoint keys
(norm1, conv1, nin_shortcut, q/k/v/proj_out, conv) so 2D weights can be inflated into them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch import Tensor, nn

from isa4d.models.vae.causal_conv import CausalConv3d


def group_norm_fp32_stats(x: Tensor, norm: nn.GroupNorm) -> Tensor:
    """`norm` on x (n, c, ...) in x's dtype, with statistics accumulated in fp32.

    PyTorch's group_norm kernels (CPU and CUDA) accumulate mean and variance of bf16/fp16 inputs in fp32, so
    calling them on the bf16 tensor keeps the precision that matters without materialising an fp32 copy of
    the activation; autocast is turned off here only because its policy would upcast the whole output to
    fp32. This halves the training memory of an explicit `.float()` norm (52 -> 25 GB for a bf16 step of
    the default model on a 1 x 17 x 256 x 256 clip, H100) at equal accuracy.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        weight = None if norm.weight is None else norm.weight.to(x.dtype)
        bias = None if norm.bias is None else norm.bias.to(x.dtype)
        return F.group_norm(x, norm.num_groups, weight, bias, norm.eps)


def channels_innermost(x: Tensor) -> bool:
    """True when x (b, c, t, h, w) has its channels innermost in memory (channels_last_3d, or a time slice of
    such a video): per-frame work then runs on a channels_last frames view, with no layout copies."""
    return x.shape[1] > 1 and x.stride(1) == 1


def frames_view(x: Tensor) -> Tensor:
    """(b, c, t, h, w) channels_last_3d-contiguous -> ((b t), c, h, w) channels_last, a view (no copy).

    Built through the (b t h w c) order rather than transpose + reshape, so that the frames' batch stride is
    h w c even for a single frame: kernels read the layout from the strides (suggest_memory_format), and an
    odd stride on a size-1 batch dim makes CPU group_norm copy to the standard layout.
    """
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 3, 4, 1).view(b * t, h, w, c).permute(0, 3, 1, 2)


def video_view(frames: Tensor, b: int) -> Tensor:
    """((b t), c, h, w) -> (b, c, t, h, w) channels_last_3d: a view of channels_last frames, else one copy."""
    n, c, h, w = frames.shape
    x = frames.permute(0, 2, 3, 1).reshape(b, n // b, h, w, c).permute(0, 4, 1, 2, 3)
    return x.contiguous(memory_format=torch.channels_last_3d)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm of a video (b, c, t, h, w) applied to each frame independently (statistics in fp32).

    Standard layout: each frame's channels are t h w apart, so the frames are gathered by a copy and scattered
    back by another. Channels-last videos (b t h w c in memory) are frames already: norm on the view. The
    channels-last kernel is the CPU's and Inductor's; CUDA's eager group_norm computes in the standard layout
    (it copies its input and the result is copied back here), so on the GPU the gain needs torch.compile.
    """

    def forward(self, x: Tensor) -> Tensor:  # x: (b, c, t, h, w)
        if channels_innermost(x):
            x = x.contiguous(memory_format=torch.channels_last_3d)  # no-op unless a time slice with b > 1
            return video_view(group_norm_fp32_stats(frames_view(x), self), x.shape[0])  # channels_last_3d
        frames = rearrange(x, "b c t h w -> (b t) c h w")
        return rearrange(group_norm_fp32_stats(frames, self), "(b t) c h w -> b c t h w", b=x.shape[0])


def frame_norm(channels: int, groups: int) -> FrameGroupNorm:
    if channels % groups:
        raise ValueError(f"norm_groups={groups} must divide every channel width, not {channels}")
    return FrameGroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock3D(nn.Module):
    """SD's ResnetBlock with causal 3x3x3 convs: norm, SiLU, conv, norm, SiLU, dropout, conv, + shortcut."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = frame_norm(in_channels, norm_groups)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = frame_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        # A 1x1x1 conv mixes no frames, so it needs no causal padding.
        self.nin_shortcut = (nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels
                             else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:  # x: (b, c, t, h, w)
        h = self.conv1(F.silu(self.norm1(x)))  # (b, c', t, h, w)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (b, c', t, h, w)
        return self.nin_shortcut(x) + h


class SpatialAttention(nn.Module):
    """SD's single-head mid-block self-attention, over the h*w tokens of each frame separately."""

    def __init__(self, channels: int, norm_groups: int) -> None:
        super().__init__()
        self.norm = frame_norm(channels, norm_groups)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:  # x: (b, c, t, h, w)
        b, _, t, h, w = x.shape
        tokens = rearrange(self.norm(x), "b c t h w -> (b t) 1 (h w) c")  # one head
        q, k, v = self.q(tokens), self.k(tokens), self.v(tokens)  # ((b t), 1, n, c)
        out = F.scaled_dot_product_attention(q, k, v)  # ((b t), 1, n, c)
        out = rearrange(self.proj_out(out), "(b t) 1 (h w) c -> b c t h w", b=b, t=t, h=h, w=w)
        return x + out


class Downsample(nn.Module):
    """Spatial x2 (and, if `temporal`, causal temporal x2) downsampling by one strided causal conv.

    Space: SD's asymmetric (0, 1, 0, 1) pad + stride 2. Time: stride 2 over the replicate-padded sequence, so
    frame 0 alone gives output 0 and frames (2j - 1, 2j) give output j (with earlier frames as context).
    With `shortcut`, the conv learns a residual over `average_down` (the mean of each 2 x 2 (x 2) cell, space
    and time folded into channel groups), as in DC-AE's residual autoencoding and Wan2.2's AvgDown: docs/vae.md.
    """

    def __init__(self, channels: int, temporal: bool, shortcut: bool = False) -> None:
        super().__init__()
        self.temporal, self.shortcut = temporal, shortcut
        stride = (2 if temporal else 1, 2, 2)
        self.conv = CausalConv3d(channels, channels, 3, stride=stride, spatial_padding=(0, 1, 0, 1))

    def forward(self, x: Tensor) -> Tensor:  # x: (b, c, t, h, w)
        starts_clip = not self.conv.continuing  # read before the conv call fills its cache
        out = self.conv(x)  # (b, c, 1 + (t - 1) / 2 if temporal else t, h / 2, w / 2)
        if self.shortcut:
            out = out + average_down(x, self.temporal, starts_clip)
        return out


def average_down(x: Tensor, temporal: bool, starts_clip: bool) -> Tensor:
    """The parameter-free path of a shortcut Downsample: (b, c, t, h, w) -> the mean over each 2 x 2 pixel cell
    (and causal frame pair (2j - 1, 2j), frame 0 paired with itself), (b, c, t', h / 2, w / 2). Causal and exact
    under chunked coding: a clip's first chunk has an odd frame count, later chunks even ones."""
    if temporal and starts_clip:
        x = torch.cat([x[:, :, :1], x], dim=2)  # frame 0 pairs with itself: (b, c, 1 + t, h, w)
    r = 2 if temporal else 1
    return reduce(x, "b c (t r) (h i) (w j) -> b c t h w", "mean", r=r, i=2, j=2)


def duplicate_up(x: Tensor, out_channels: int, temporal: bool, starts_clip: bool) -> Tensor:
    """The parameter-free path of a shortcut upsampler, the inverse of `average_down`: each channel copied to the
    2 x 2 (x 2) cell it stands for, channels averaged in groups when `out_channels` is fewer (Wan2.2's DupUp):
    (b, c, t, h, w) -> (b, out_channels, 1 + 2 (t - 1) or t, 2 h, 2 w)."""
    r = 2 if temporal else 1
    c = x.shape[1]
    if c % out_channels:
        raise ValueError(f"a shortcut upsampler needs out_channels ({out_channels}) to divide channels ({c})")
    x = reduce(x, "b (o g) t h w -> b o t h w", "mean", o=out_channels)  # (b, c_out, t, h, w)
    x = repeat(x, "b c t h w -> b c (t r) (h i) (w j)", r=r, i=2, j=2)
    return x[:, :, r - 1:] if temporal and starts_clip else x


class Upsample(nn.Module):
    """Nearest x2 in space, then a causal conv; with `temporal`, it emits 2c channels that become 2 frames.

    Depth-to-time inverts Downsample: each latent frame gives 2 frames except the clip's first, which gives 1
    (the earlier of its pair is dropped), so 1 + (t - 1) frames become 1 + 2 (t - 1).
    """

    def __init__(self, channels: int, temporal: bool, shortcut: bool = False) -> None:
        super().__init__()
        self.temporal, self.shortcut = temporal, shortcut
        self.factor = 2 if temporal else 1
        self.conv = CausalConv3d(channels, channels * self.factor, 3)

    def forward(self, x: Tensor) -> Tensor:  # x: (b, c, t, h, w)
        starts_clip = not self.conv.continuing  # read before the conv call fills its cache
        skip = duplicate_up(x, x.shape[1], self.temporal, starts_clip) if self.shortcut else None
        x = upsample_space(x)  # (b, c, t, 2h, 2w)
        x = self.conv(x)  # (b, r c, t, 2h, 2w)
        if self.temporal:
            x = depth_to_time(x, self.factor, starts_clip)  # (b, c, 1 + r (t - 1), 2h, 2w)
        return x if skip is None else x + skip


class FactorizedUpsample(nn.Module):
    """Upsample with time and space factorised (as Wan2.1's decoder does), a cheaper alternative to Upsample.

    With `temporal`, a causal 3x1x1 conv at the *input* resolution emits 2c channels that become 2 frames
    (depth-to-time as in Upsample); then nearest x2 in space and a 1x3x3 conv to `out_channels`. Per output
    frame, Upsample's 3x3x3 conv costs 3 c / out_channels times this spatial conv, and 36 times this time conv
    (which has 3 taps and runs on a quarter of the pixels).
    """

    def __init__(self, channels: int, out_channels: int, temporal: bool, shortcut: bool = False) -> None:
        super().__init__()
        self.temporal, self.shortcut, self.out_channels = temporal, shortcut, out_channels
        self.factor = 2 if temporal else 1
        self.time_conv = CausalConv3d(channels, 2 * channels, (3, 1, 1)) if temporal else None
        self.conv = CausalConv3d(channels, out_channels, (1, 3, 3))

    def forward(self, x: Tensor) -> Tensor:  # x: (b, c, t, h, w)
        starts_clip = not self.conv.continuing  # read before the conv calls fill their caches
        skip = duplicate_up(x, self.out_channels, self.temporal, starts_clip) if self.shortcut else None
        if self.time_conv is not None:
            x = depth_to_time(self.time_conv(x), self.factor, starts_clip)  # (b, c, 1 + 2 (t - 1), h, w)
        x = self.conv(upsample_space(x))  # (b, c_out, t', 2h, 2w)
        return x if skip is None else x + skip


def upsample_space(x: Tensor) -> Tensor:
    """Nearest x2 in space: (b, c, t, h, w) -> (b, c, t, 2h, 2w), in x's layout (standard or channels-last).

    Channels-last videos are upsampled as frames by the 2D kernel, which has a channels-last version on CPU
    and CUDA; CUDA's 3D nearest kernel computes in the standard layout (a copy in and one out). Same values.
    """
    if channels_innermost(x):
        x = x.contiguous(memory_format=torch.channels_last_3d)  # no-op unless a time slice with b > 1
        frames = F.interpolate(frames_view(x), scale_factor=2.0, mode="nearest")  # ((b t), c, 2h, 2w)
        return video_view(frames, x.shape[0])
    return F.interpolate(x.contiguous(), scale_factor=(1.0, 2.0, 2.0), mode="nearest")


def depth_to_time(x: Tensor, factor: int, starts_clip: bool) -> Tensor:
    """(b, r c, t, h, w) -> (b, c, r t, h, w), dropping the r - 1 frames before a clip's first frame.

    One copy either way; a channels-last input is copied into the (b, t, r, h, w, c) order, so the result
    stays channels_last_3d (the einops reshape would return the standard layout, and with t = 1 a mere view,
    (b, h, w, r, c) in memory).
    """
    if channels_innermost(x):
        b, rc, t, h, w = x.shape
        x = x.permute(0, 2, 3, 4, 1).unflatten(4, (factor, rc // factor))  # (b, t, h, w, r, c), a view
        x = x.permute(0, 1, 4, 2, 3, 5).contiguous()  # (b, t, r, h, w, c): the copy
        x = x.view(b, t * factor, h, w, rc // factor)  # (b, (t r), h, w, c)
        x = x.permute(0, 4, 1, 2, 3)  # (b, c, r t, h, w) channels_last_3d
    else:
        x = rearrange(x, "b (r c) t h w -> b c (t r) h w", r=factor)  # (b, c, r t, h, w)
    return x[:, :, factor - 1:] if starts_clip else x
