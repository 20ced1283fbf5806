"""Bounded-memory coding of long and large videos: causal temporal chunks and blended spatial tiles.

Temporal chunks are exact: frame 0 goes alone (the causal VAE codes it as an image), then fixed-size groups
follow, each CausalConv3d carrying the past frames it needs in its streaming cache; with per-frame norms and
per-frame attention nothing else crosses frames, so the result equals whole-clip coding up to float rounding.

Spatial tiles are approximate: the convolutions' receptive fields cross tile borders, and the per-frame
GroupNorm statistics and the mid attention span the whole frame, so overlapping tiles are coded separately and
linearly cross-faded in their overlap. A single tile covering the frame is the plain call.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import torch
from torch import Tensor, nn

from isa4d.models.vae.causal_conv import streaming


def causal_chunks(num_frames: int, chunk: int) -> list[slice]:
    """Frame 0 alone, then consecutive slices of `chunk` frames (the last may be shorter)."""
    if chunk <= 0:
        raise ValueError(f"chunk size must be positive, got {chunk}")
    return [slice(0, 1)] + [slice(s, min(s + chunk, num_frames)) for s in range(1, num_frames, chunk)]


def run_chunked(module: nn.Module, x: Tensor, chunk: int) -> Tensor:
    """module(x) over time chunks of x (b, c, t, h, w) with streaming caches; outputs joined on time."""
    with streaming(module):
        return torch.cat([module(x[:, :, s]) for s in causal_chunks(x.shape[2], chunk)], dim=2)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of length `tile` stepping by tile - overlap; the last one is flush with the end."""
    if size <= tile:
        return [0]
    return list(range(0, size - tile, tile - overlap)) + [size - tile]


def _blend_ramp(length: int, ramp: int, fade_in: bool, fade_out: bool) -> Tensor:
    """1D weights: 1 inside, linear ramps over `ramp` cells on the sides that meet a neighbouring tile."""
    w = torch.ones(length)
    r = min(ramp, length)
    if r > 0:
        up = (torch.arange(r) + 0.5) / r  # strictly positive, so every pixel keeps some weight
        if fade_in:
            w[:r] = torch.minimum(w[:r], up)
        if fade_out:
            w[length - r:] = torch.minimum(w[length - r:], up.flip(0))
    return w


def run_tiled(fn: Callable[[Tensor], Tensor], x: Tensor, tile_h: int, tile_w: int, overlap: int) -> Tensor:
    """fn applied to overlapping spatial tiles of x (b, c, t, H, W), blended; sizes in x's pixel units.

    fn must scale space by a fixed ratio (encoder 1/8, decoder 8); tile starts must map to whole output
    pixels.
    """
    if overlap < 0 or overlap >= min(tile_h, tile_w):
        raise ValueError(f"overlap must lie in [0, min(tile_h, tile_w)), got {overlap} for tiles "
                         f"{(tile_h, tile_w)}")
    H, W = x.shape[-2:]
    rows, cols = tile_starts(H, tile_h, overlap), tile_starts(W, tile_w, overlap)
    if len(rows) == 1 and len(cols) == 1:
        return fn(x)
    out = weight = ratio = None
    for top in rows:
        for left in cols:
            y = fn(x[..., top:top + tile_h, left:left + tile_w])  # (b, c', t', h', w')
            if ratio is None:
                ratio = Fraction(y.shape[-2], min(tile_h, H))
                out_h, out_w = int(H * ratio), int(W * ratio)
                out = y.new_zeros((*y.shape[:-2], out_h, out_w), dtype=torch.float32)
                weight = torch.zeros(out_h, out_w, device=y.device)
            y_top, y_left, ramp = top * ratio, left * ratio, overlap * ratio
            if y_top.denominator != 1 or y_left.denominator != 1 or ramp.denominator != 1:
                raise ValueError(f"tile starts ({top}, {left}) and overlap {overlap} must map to whole "
                                 f"output pixels")
            h, w = y.shape[-2:]
            wh = _blend_ramp(h, int(ramp), top > 0, top + tile_h < H)
            ww = _blend_ramp(w, int(ramp), left > 0, left + tile_w < W)
            wt = (wh[:, None] * ww[None, :]).to(y.device)  # (h', w')
            rs, cs = slice(int(y_top), int(y_top) + h), slice(int(y_left), int(y_left) + w)
            out[..., rs, cs] += y.float() * wt
            weight[rs, cs] += wt
    return (out / weight).to(y.dtype)
