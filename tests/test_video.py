"""Tests for isa4d.data.video: round trips, windowed decode == full decode, seeking skips work, errors."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import pytest

from isa4d.data.video import VideoError, _decode_window, decode_all, decode_frames, encode_video, probe

H, W = 48, 64


def indexed_frames(n: int, h: int = H, w: int = W) -> np.ndarray:
    """Frames whose content identifies their index: a bright column at i % w, a bright row at (i // w) % h,
    and a background level that ramps with i, on a dark grey canvas."""
    frames = np.full((n, h, w, 3), 40, np.uint8)
    for i in range(n):
        frames[i, :, :, 2] = 40 + (i * 7) % 160
        frames[i, :, i % w] = 230
        frames[i, (i // w) % h, :] = 230
    return frames


def identify(decoded: np.ndarray, originals: np.ndarray) -> np.ndarray:
    """Index of the nearest original frame (MSE) for each decoded frame."""
    d = decoded.astype(np.float32)[:, None]
    o = originals.astype(np.float32)[None]
    return ((d - o) ** 2).mean(axis=(2, 3, 4)).argmin(axis=1)


def encode_offset(
    frames: np.ndarray, rate: Fraction, codec: str, pts_offset: int, b_frames: int | None = None
) -> bytes:
    """Like encode_video, but the first frame's pts is `pts_offset` (a stream with a non-zero start time)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.gop_size = 8
        if b_frames is not None:
            stream.codec_context.max_b_frames = b_frames
        for i, arr in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            frame.pts = i + pts_offset
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def originals() -> np.ndarray:
    return indexed_frames(40)


@pytest.fixture(scope="module")
def videos(originals: np.ndarray) -> dict[str, bytes]:
    return {
        "h264": encode_video(originals, 30, gop=8),  # libx264 defaults: B-frames with pyramid
        "mpeg4": encode_video(originals, 25, codec="mpeg4", gop=8),
        "h264_offset": encode_offset(originals, Fraction(30000, 1001), "libx264", 1000),
        "mpeg4_bframes_offset": encode_offset(originals, Fraction(24), "mpeg4", 500, b_frames=2),
    }


@pytest.mark.parametrize("codec,name", [("libx264", "h264"), ("mpeg4", "mpeg4")])
@pytest.mark.parametrize("fps", [30.0, 25.0, 24.0, 30000 / 1001])
def test_round_trip_probe(codec: str, name: str, fps: float) -> None:
    frames = indexed_frames(20)
    info = probe(encode_video(frames, fps, codec=codec))
    assert info.num_frames == 20
    assert info.fps == pytest.approx(fps, rel=1e-6)
    assert (info.height, info.width) == (H, W)
    assert info.codec == name


@pytest.mark.parametrize("name", ["h264", "mpeg4", "h264_offset", "mpeg4_bframes_offset"])
def test_decode_all_matches_originals(videos: dict[str, bytes], originals: np.ndarray, name: str) -> None:
    frames = decode_all(videos[name])
    assert frames.shape == originals.shape and frames.dtype == np.uint8
    np.testing.assert_array_equal(identify(frames, originals), np.arange(len(originals)))
    assert np.abs(frames.astype(np.int16) - originals).mean() < 6


@pytest.mark.parametrize("name", ["h264", "mpeg4", "h264_offset", "mpeg4_bframes_offset"])
@pytest.mark.parametrize(
    "indices",
    [[0], [0, 1, 2], [13], [15, 16, 17], [7, 8], [8], [20, 21, 22, 23], [39], [36, 37, 38, 39],
     list(range(3, 40, 5)), [5, 5, 5, 6, 30, 30], list(range(40))],
    ids=lambda ix: "-".join(map(str, ix[:6])) + ("..." if len(ix) > 6 else ""),
)
def test_decode_frames_equals_decode_all(videos: dict[str, bytes], name: str, indices: list[int]) -> None:
    full = decode_all(videos[name])
    got = decode_frames(videos[name], indices)
    assert got.shape == (len(indices), H, W, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, full[indices])


@pytest.mark.parametrize("name", ["h264", "mpeg4_bframes_offset"])
def test_every_window_start(videos: dict[str, bytes], name: str) -> None:
    """A 5-frame window at every start: seeks onto, just after and just before keyframes."""
    full = decode_all(videos[name])
    for start in range(0, 36):
        got = decode_frames(videos[name], range(start, start + 5))
        np.testing.assert_array_equal(got, full[start:start + 5])


def test_seek_skips_work() -> None:
    data = encode_video(indexed_frames(300), 30, gop=16)
    assert probe(data).num_frames == 300
    frames, n_decoded = _decode_window(data, [296, 297, 298, 299])
    assert n_decoded <= 2 * 16, f"decoded {n_decoded} frames for a 4-frame window at the end"
    np.testing.assert_array_equal(identify(frames, indexed_frames(300)), [296, 297, 298, 299])
    _, n_middle = _decode_window(data, range(150, 155))
    assert n_middle <= 16 + 5


@pytest.mark.parametrize("size", [(24, 32), (36, 20), (96, 128)])
def test_size_rescales(videos: dict[str, bytes], size: tuple[int, int]) -> None:
    got = decode_frames(videos["h264"], [0, 10, 11], size=size)
    assert got.shape == (3, *size, 3)
    assert decode_all(videos["h264"], size=size).shape == (40, *size, 3)
    # the area filter keeps the mean level of the frame
    full = decode_frames(videos["h264"], [10])
    assert abs(float(got[1].mean()) - float(full.mean())) < 3


def test_gray(videos: dict[str, bytes]) -> None:
    got = decode_frames(videos["mpeg4"], [2, 3], pix_fmt="gray")
    assert got.shape == (2, H, W, 1) and got.dtype == np.uint8
    assert decode_frames(videos["h264"], [1], size=(24, 32), pix_fmt="gray").shape == (1, 24, 32, 1)


def test_encode_gray_input() -> None:
    gray = indexed_frames(10)[..., 0]
    for frames in (gray, gray[..., None]):
        back = decode_all(encode_video(frames, 24))
        assert back.shape == (10, H, W, 3)
        assert np.abs(back.astype(np.int16) - gray[..., None]).mean() < 6


def test_garbage_bytes() -> None:
    with pytest.raises(VideoError, match="undecodable"):
        probe(b"this is not a video" * 50)
    with pytest.raises(VideoError, match="undecodable"):
        decode_frames(b"\x00\x01\x02" * 999, [0])
    with pytest.raises(VideoError, match="undecodable"):
        probe(b"")


def test_truncated(videos: dict[str, bytes]) -> None:
    data = videos["h264"]
    half = data[: len(data) // 2]
    with pytest.raises(VideoError):
        probe(half)
        decode_frames(half, range(40))


def test_index_beyond_end(videos: dict[str, bytes]) -> None:
    with pytest.raises(VideoError, match="video has 40 frames, asked for index 40"):
        decode_frames(videos["h264"], [38, 40])


def test_bad_indices(videos: dict[str, bytes]) -> None:
    with pytest.raises(ValueError, match="non-decreasing"):
        decode_frames(videos["h264"], [5, 4])
    with pytest.raises(ValueError, match=">= 0"):
        decode_frames(videos["h264"], [-1])
    with pytest.raises(ValueError, match="pix_fmt"):
        decode_frames(videos["h264"], [0], pix_fmt="bgr24")
    assert decode_frames(videos["h264"], [], size=(8, 8)).shape == (0, 8, 8, 3)


def test_encode_rejects_odd_size() -> None:
    with pytest.raises(ValueError, match="even"):
        encode_video(np.zeros((4, 47, 64, 3), np.uint8), 30)
    with pytest.raises(ValueError, match="even"):
        encode_video(np.zeros((4, 48, 63, 3), np.uint8), 30, codec="mpeg4")
    with pytest.raises(ValueError, match="uint8"):
        encode_video(np.zeros((4, 48, 64, 3), np.float32), 30)


def test_seek_overshoot_falls_back_to_earlier_keyframe(
    videos: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """If decoding starts after the wanted frame, it restarts from the next candidate keyframe and returns the
    right frames."""
    import isa4d.data.video as video

    real_starts = video._start_packets

    def late_first(index, target_pts):
        keys = [j for j, p in enumerate(index.packets) if p.is_keyframe and p.pts > target_pts]
        return [keys[0], *real_starts(index, target_pts)]  # a keyframe after the wanted frame first

    monkeypatch.setattr(video, "_start_packets", late_first)
    full = decode_all(videos["h264"])
    frames, n_decoded = _decode_window(videos["h264"], [10, 11, 12])
    np.testing.assert_array_equal(frames, full[10:13])
    assert n_decoded > 3  # the late start decoded at least its first frame before it was abandoned


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_crf_controls_quality(codec: str) -> None:
    frames = np.random.default_rng(0).integers(0, 256, (6, H, W, 3), dtype=np.uint8)
    sizes = [len(encode_video(frames, 30, codec=codec, crf=crf)) for crf in (12, 30)]
    assert sizes[0] > 1.3 * sizes[1], f"crf had no effect on {codec}: {sizes}"
