"""Long videos by sliding temporal windows whose velocities are blended at every denoising step.

ISA-DiT is trained on clips of a fixed number of latent frames. A latent many times longer is denoised whole: at
every step of the sampler, overlapping windows of `window` latent frames each get a velocity from the network, and
the velocities are averaged frame by frame with weights that ramp across each overlap. The windows of one step see
the same x_t, so the blend is one velocity field on the long latent and the ODE stays a single trajectory; as the
weights move smoothly from one window to the next there is no seam (MultiDiffusion, Bar-Tal et al. 2023, on the
time axis; Gen-L-Video, Wang et al. 2023, blends video windows the same way). `sliding_window` returns a drop-in
`net_fn(x, t)` for `euler_sample`/`heun_sample`. The network's conditions give each window its part themselves
(any object with `slice(start, stop)` over latent frames, `TimeSliceable`; ISA-DiT's `DiTConditions` is one):

    cond = ...  # the conditions of the whole video: PoseConditioner on all 1 + 4·(T − 1) video frames

    def net_window(x, t, start, stop):
        return condition_guidance(net, scales, cond=cond.slice(start, stop))(x, t)

    x0 = euler_sample(sliding_window(net_window, T, window=13, overlap=4), noise, timesteps)

Count the tokens of one window, not of the whole video, for `shift_for_tokens`: the network sees windows, and the
shift must match the one it was trained with.

Weights (`blend_weights`). Window k covers [s_k, e_k); it shares `up` frames with the window before it and `down`
with the one after. Its i-th frame into the leading overlap (i = 1..up) has weight r(i / (up + 1)), its i-th frame
from the trailing end r(i / (down + 1)); the window's weight is the smaller of the two, 1 in between. The sequence's
own ends have no neighbour, so the first window starts and the last ends at weight 1. The ramp r is
  "linear":  r(u) = u            the hand-over spread evenly over the overlap;
  "cosine":  r(u) = sin²(π·u/2)  (the default) flat at both ends of the overlap, so a window's edge frames weigh
                                 less: the frames where it lacks temporal context on one side, and where a later
                                 window holds the out-of-distribution frame of the caveat below.
Both satisfy r(u) + r(1 − u) = 1, so where two windows overlap their weights sum to 1 (a partition of unity before
any normalisation); where the spacing makes three or more windows share a frame the ramps are clipped and
the sum differs from 1. Every frame lies in some window with a weight in (0, 1], so the sum is strictly positive and
the blend Σ w_k·v_k / Σ w_k is always defined.

Caveat: latent frame 0 is special. The causal VAE codes video frame 0 alone (an image latent) and every later latent
frame from four new video frames (`isa4d.geometry.plucker.latent_frame_groups`), and the conditions say the same:
the points and Plücker rays of latent frame 0 are frame 0 repeated four times. Training clips always begin at video
frame 0, so the network has only ever seen an image latent as the first frame of its input. A window that starts
later begins on an ordinary latent frame. Temporal RoPE is relative, so the network cannot see its absolute position.
It can only read the first frame's content, and it may pull that frame's velocity toward image-latent statistics.
Why this is acceptable: that frame is the leading edge of the window's overlap, where its weight is the lowest
(cosine, overlap 4: 0.095) and the previous window, for which it is an ordinary interior frame, carries the blend. The
sliced conditions are the true ones for an ordinary latent frame (four distinct video frames), so they do not
contradict it. What the caller should do:
  * encode and decode the long video with the causal VAE in one pass, never per window, and build the conditions
    for the whole video and slice them; conditions built from a window's own video frames would mark its first
    latent frame as a repeated single frame;
  * use an overlap of at least 2 latent frames, so the leading frame is shared and down-weighted;
  * for a model that must be exact here, fine-tune on latent crops that start at a random latent frame of a longer
    encoded clip; the network then sees ordinary first frames too, and nothing here changes.
There is no "anchor" option that puts latent frame 0 in every window. It would make the window non-contiguous in
time, a RoPE gap the network never saw. Frame 0 is as noisy as any other at each step, so it is not a clean anchor,
and identity is already carried to every window by the reference-image tokens.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol, Sequence

import torch

RAMPS = ("linear", "cosine")


class TimeSliceable(Protocol):
    """Conditions that cut themselves to latent frames [start, stop) (per-clip parts kept whole)."""

    def slice(self, start: int, stop: int) -> "TimeSliceable": ...


def window_starts(length: int, window: int, overlap: int) -> list[int]:
    """First latent frames of the windows of `window` frames that cover [0, length).

    Neighbours share at least `overlap` frames, the first window starts at 0 and the last ends at `length`. The
    fewest windows that allow this are used, n = 1 + ceil((length − window) / (window − overlap)), with
    starts s_k = floor(k·(length − window) / (n − 1)). Consecutive strides therefore differ by at most one frame,
    and none exceeds window − overlap. When length <= window there is one window, [0], clipped to the length.
    """
    if length < 1:
        raise ValueError(f"length must be >= 1 latent frame, got {length}")
    if window < 1:
        raise ValueError(f"window must be >= 1 latent frame, got {window}")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be in [0, window) = [0, {window}), got {overlap}")
    if length <= window:
        return [0]
    span, stride = length - window, window - overlap
    n = 1 + -(-span // stride)  # ceil division
    return [k * span // (n - 1) for k in range(n)]


def _ramp(i: torch.Tensor, n: int, ramp: str) -> torch.Tensor:
    """Weight of the i-th frame (i >= 1) into an overlap of n frames: r(i / (n + 1)) in (0, 1) for i <= n, else 1."""
    u = i / (n + 1)
    r = u if ramp == "linear" else torch.sin(0.5 * math.pi * u) ** 2
    return torch.where(i > n, torch.ones_like(r), r)


def blend_weights(length: int, window: int, starts: Sequence[int], ramp: str = "cosine") -> torch.Tensor:
    """(K, length) float64 weight of each of the K windows starting at `starts` on each latent frame.

    The weight is zero outside the window. Inside it, the weight ramps over the frames the window shares with the
    window before it and with the window after it, with the ramp chosen here (see the module docstring). The
    starts must begin at 0, increase, leave no gap and reach the end: `window_starts` gives such starts.
    """
    if ramp not in RAMPS:
        raise ValueError(f"ramp must be one of {RAMPS}, got {ramp!r}")
    if window < 1 or length < 1:
        raise ValueError(f"window and length must be >= 1, got {window} and {length}")
    starts = list(starts)
    if not starts or starts[0] != 0:
        raise ValueError(f"the first window must start at latent frame 0, got starts {starts}")
    if any(b <= a or b > a + window for a, b in zip(starts[:-1], starts[1:])):
        raise ValueError(f"starts must increase by 1 to {window} (the window) so that no frame is left out, "
                         f"got {starts}")
    if starts[-1] >= length or starts[-1] + window < length:
        raise ValueError(f"the last window must end at latent frame {length}, got starts {starts} of {window} "
                         f"frames")
    stops = [min(s + window, length) for s in starts]
    f = torch.arange(length, dtype=torch.float64)  # (T,)
    weights = torch.zeros(len(starts), length, dtype=torch.float64)  # (K, T)
    for k, (s, e) in enumerate(zip(starts, stops)):
        up = stops[k - 1] - s if k > 0 else 0
        down = e - starts[k + 1] if k + 1 < len(starts) else 0
        i = f[s:e]  # (e − s,)
        weights[k, s:e] = torch.minimum(_ramp(i - s + 1, up, ramp), _ramp(e - i, down, ramp))
    return weights


def sliding_window(net_window: NetWindow, length: int, window: int, overlap: int,
                   ramp: str = "cosine") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`net_fn(x, t)` for the samplers that denoises a latent of `length` frames as blended windows.

    `net_window(x_window, t, start, stop)` predicts the velocity of latent frames [start, stop) from
    x_window = x[:, :, start:stop] and t (B,); it closes over whatever conditions the network needs and slices
    them with their `slice` (`TimeSliceable`). The windows come from `window_starts(length, window, overlap)`. The returned
    net_fn maps x (B, C, length, h, w) to Σ_k w_k·v_k / Σ_k w_k with the `blend_weights`. It accumulates in at
    least float32 and returns the velocities' dtype.

    One window (length <= window) returns net_window's output unchanged, so the plain network's samples are
    reproduced bit for bit. A frame that only one window covers also gets that window's velocity exactly.
    """
    starts = window_starts(length, window, overlap)
    weights = blend_weights(length, window, starts, ramp)
    weights = weights / weights.sum(dim=0)  # (K, T), columns sum to 1; exactly 1.0 where one window covers a frame
    spans = [(s, min(s + window, length)) for s in starts]

    def net_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[2] != length:
            raise ValueError(f"sliding windows were built for {length} latent frames, x has {x.shape[2]}")
        out = None
        for k, (s, e) in enumerate(spans):
            x_k = x[:, :, s:e]  # (B, C, e − s, h, w)
            v = net_window(x_k, t, s, e)
            if v.shape != x_k.shape:
                raise ValueError(f"net_window returned {tuple(v.shape)} for the window [{s}, {e}) of shape "
                                 f"{tuple(x_k.shape)}")
            if out is None:
                out = torch.zeros(x.shape, dtype=torch.promote_types(v.dtype, torch.float32), device=v.device)
            w = weights[k, s:e].to(out)  # (e − s,)
            out[:, :, s:e] += w[:, None, None] * v  # (B, C, e − s, h, w)
        return out.to(v.dtype)

    return net_fn

