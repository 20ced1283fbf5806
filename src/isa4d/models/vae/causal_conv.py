"""Temporally causal 3D convolution with a streaming cache (MAGVIT-v2 / W.A.L.T / CogVideoX style).

Causality: output frame t sees input frames <= t only. The kt - 1 missing past frames at the start of a clip
are **replicates of the first frame** (CogVideoX's choice, not zeros): an image (T = 1) is then coded like a
still video, which keeps the image and video statistics of the first latent frame alike. Space is padded with
zeros as in the SD image VAE this network inflates.

Streaming: inside `streaming(module)` every CausalConv3d keeps, between calls, the tail of its (time-padded)
input that the next output window still needs; a clip fed in consecutive chunks then gives the same output as
the clip fed whole. Outside the context the cache is neither read nor written, so it cannot leak into a plain
forward call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _triple(value: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (value, value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


class CausalConv3d(nn.Conv3d):
    """A Conv3d causal in time. Subclasses nn.Conv3d so its keys stay `weight`/`bias` (as in the 2D SD VAE).

    `spatial_padding` (left, right, top, bottom) defaults to symmetric k // 2; SD's downsampler passes
    (0, 1, 0, 1).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int] = 3,
        stride: int | tuple[int, int, int] = 1,
        spatial_padding: tuple[int, int, int, int] | None = None,
        bias: bool = True,
    ) -> None:
        kt, kh, kw = _triple(kernel_size)
        st = _triple(stride)[0]
        if st > kt:
            raise ValueError(f"temporal stride {st} > temporal kernel {kt} would skip frames")
        symmetric = spatial_padding is None
        if symmetric and (kh % 2 == 0 or kw % 2 == 0):
            raise ValueError(f"symmetric spatial padding needs odd spatial kernels, got {(kh, kw)}")
        # Symmetric zero padding is done by the convolution itself (no copy); other paddings by F.pad.
        conv_padding = (0, kh // 2, kw // 2) if symmetric else 0
        super().__init__(in_channels, out_channels, (kt, kh, kw), stride=stride, padding=conv_padding,
                         bias=bias)
        self.explicit_padding = None if symmetric else tuple(spatial_padding)
        self.time_pad = kt - 1
        self.streaming = False
        self._cache: Tensor | None = None

    @property
    def continuing(self) -> bool:
        """True when streaming and a previous chunk has been seen: this call does not start the clip."""
        return self.streaming and self._cache is not None

    def reset_cache(self) -> None:
        self._cache = None

    def forward(self, x: Tensor) -> Tensor:  # x: (b, c, t, h, w)
        if self.explicit_padding is not None:
            x = F.pad(x, self.explicit_padding)
        # (a conv with one time tap caches nothing: skip the cat, which would copy the whole input; slices, unlike
        # an expanded view, keep a channels_last_3d input in that format through the cat)
        if self.continuing and self._cache.shape[2] > 0:
            x = torch.cat([self._cache, x], dim=2)  # (b, c, cached + t, h, w)
        elif not self.continuing and self.time_pad > 0:
            x = torch.cat([x[:, :, :1]] * self.time_pad + [x], dim=2)  # (b, c, kt - 1 + t, h, w)
        if self.streaming:
            # Keep what the next output window starts from; clone so the whole chunk is not kept alive.
            kt, st = self.kernel_size[0], self.stride[0]
            num_out = max((x.shape[2] - kt) // st + 1, 0)
            self._cache = x[:, :, num_out * st:].clone()
        return self._conv_forward(x, self.weight, self.bias)  # (b, c', t', h', w')


def causal_convs(module: nn.Module) -> list[CausalConv3d]:
    return [m for m in module.modules() if isinstance(m, CausalConv3d)]


def reset_cache(module: nn.Module) -> None:
    """Drop every CausalConv3d cache under `module`."""
    for conv in causal_convs(module):
        conv.reset_cache()


@contextmanager
def streaming(module: nn.Module) -> Iterator[None]:
    """Inside the context, consecutive calls of `module` continue one clip; caches cleared on entry, exit."""
    convs = causal_convs(module)
    if any(c.streaming for c in convs):
        raise RuntimeError("streaming() is already active on this module; nested streams would share caches")
    for conv in convs:
        conv.reset_cache()
        conv.streaming = True
    try:
        yield
    finally:
        for conv in convs:
            conv.streaming = False
            conv.reset_cache()
