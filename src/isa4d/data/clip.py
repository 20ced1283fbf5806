"""Clip sampling: which frames of a video a training example uses. Pure functions of sizes and an RNG."""

from __future__ import annotations

import numpy as np

from isa4d.data.contract import SampleError


def span(num_frames: int, stride: int) -> int:
    """Frames of the source a window of `num_frames` at `stride` covers."""
    return (num_frames - 1) * stride + 1


def choose_stride(total: int, num_frames: int, stride: int, jitter: int, rng: np.random.Generator | None) -> int:
    """The stride for one clip: `stride`, or with `rng`, uniform in [stride - jitter, stride + jitter] among those that fit.

    Stride jitter varies the apparent speed of motion (the paper's dynamic speed adjustment).
    """
    if rng is None or jitter <= 0:
        return stride
    options = [s for s in range(max(1, stride - jitter), stride + jitter + 1) if span(num_frames, s) <= total]
    return int(rng.choice(options)) if options else stride


def sample_window(total: int, num_frames: int, stride: int, rng: np.random.Generator | None, key: str = "?") -> np.ndarray:
    """Indices of `num_frames` frames at `stride` inside a video of `total` frames.

    With an rng the start is uniform over every start that fits; without one the window is centred, so validation
    sees the same frames every time.
    """
    need = span(num_frames, stride)
    if need > total:
        raise SampleError("too_short", f"clip has {total} frames, a window of {num_frames} at stride {stride} needs {need}", key)
    slack = total - need
    start = int(rng.integers(0, slack + 1)) if rng is not None else slack // 2
    return start + stride * np.arange(num_frames)


def reference_frame(total: int, window: np.ndarray, rng: np.random.Generator | None) -> int:
    """A frame far from the window, for the reference image when the sample has no `ref.png`.

    Picks the frame farthest from the window; with an rng, uniformly among frames at least half that far, so the
    model cannot copy the reference into the nearest generated frame.
    """
    frames = np.arange(total)
    dist = np.maximum(window[0] - frames, frames - window[-1]).clip(min=0)
    if rng is None or dist.max() == 0:
        return int(frames[np.argmax(dist)])
    far = frames[dist >= max(1, dist.max() // 2)]
    return int(rng.choice(far))
