"""Real-video pathologies built with PyAV alone (no downloads, no ffmpeg binary): what phones, editors and broken
copies put into mp4 files. Used by tests/test_video_corpus.py and the converter and inspect tests."""

from __future__ import annotations

import io
import os
import tempfile
from fractions import Fraction

import av
import numpy as np


def indexed_frames(n: int, h: int = 48, w: int = 64) -> np.ndarray:
    """Frames whose content identifies their index: a bright column at i % w, a bright row at (i // w) % h, a
    background level that ramps with i, and a bright block in the top-left corner (so orientation shows)."""
    frames = np.full((n, h, w, 3), 40, np.uint8)
    for i in range(n):
        frames[i, :, :, 2] = 40 + (i * 7) % 160
        frames[i, :, i % w] = 230
        frames[i, (i // w) % h, :] = 230
        frames[i, : h // 4, : w // 4, 0] = 250
    return frames


def identify(decoded: np.ndarray, originals: np.ndarray) -> np.ndarray:
    """Index of the nearest original frame (MSE) for each decoded frame."""
    d = decoded.astype(np.float32)[:, None]
    o = originals.astype(np.float32)[None]
    return ((d - o) ** 2).mean(axis=(2, 3, 4)).argmin(axis=1)


def mux(frames: np.ndarray, *, pts: list[int] | None = None, time_base: Fraction | None = None,
        rotation: float | None = None, shift: int = 0, faststart: bool = False, codec: str = "libx264",
        pix_fmt: str = "yuv420p", gop: int = 8, rate: int = 30) -> bytes:
    """Encode (T, H, W, 3) uint8 frames to mp4 bytes.

    pts/time_base: the frames' timestamps (variable frame rate). rotation: the display matrix's rotation in
    degrees counter-clockwise (a phone's `rotate=90` tag is -90). shift: packets are muxed `shift` frames
    early, so the first ones have negative timestamps and the mp4 muxer writes an edit list that hides them,
    as `ffmpeg -ss T -c copy` does. faststart: the moov box before the media data (`-movflags +faststart`).
    """
    fd, path = tempfile.mkstemp(suffix=".mp4")  # faststart rewrites the file, which needs a real one
    os.close(fd)
    try:
        with av.open(path, "w", format="mp4", options={"movflags": "faststart"} if faststart else {}) as c:
            s = c.add_stream(codec, rate=rate)
            s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
            s.codec_context.gop_size = gop
            s.codec_context.thread_count = 1
            if time_base is not None:
                s.codec_context.time_base = time_base
            if rotation is not None:
                s.set_display_rotation(rotation)
            step = None

            def put(packets):
                nonlocal step
                for p in packets:
                    if shift:
                        step = step or p.duration or 1
                        p.pts, p.dts = p.pts - shift * step, p.dts - shift * step
                    c.mux(p)

            for i, a in enumerate(frames):
                f = av.VideoFrame.from_ndarray(a, format="rgb24")
                f.pts = i if pts is None else int(pts[i])
                put(s.encode(f))
            put(s.encode(None))
        with open(path, "rb") as fh:
            return fh.read()
    finally:
        os.unlink(path)


def plain_decode(data: bytes) -> tuple[np.ndarray, int]:
    """An independent reference: every frame PyAV's own demux-and-decode loop returns, in its order, as RGB, and
    the display rotation of the first (degrees counter-clockwise). libavcodec drops the frames an edit list
    hides, as ffmpeg and OpenCV do."""
    with av.open(io.BytesIO(data)) as c:
        frames = list(c.decode(c.streams.video[0]))
        return np.stack([f.to_ndarray(format="rgb24") for f in frames]), int(frames[0].rotation)


def container_frames(data: bytes) -> int:
    """The frame count the mp4 sample table lists (stream.frames)."""
    with av.open(io.BytesIO(data)) as c:
        return int(c.streams.video[0].frames)


def flip_bit(data: bytes, rng: np.random.Generator) -> bytes:
    """`data` with one random bit flipped inside the mdat payload (the coded frames)."""
    start = data.find(b"mdat") + 4
    moov = data.find(b"moov")
    stop = moov if moov > start else len(data)
    b = bytearray(data)
    b[int(rng.integers(start, stop))] ^= 1 << int(rng.integers(8))
    return bytes(b)
