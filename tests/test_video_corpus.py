"""A corpus of real-video pathologies (tests/video_pathologies.py): each is decoded as ffmpeg and OpenCV decode it
(checked against PyAV's plain decode loop and against the frames that were encoded), or refused with a
VideoError naming it."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from isa4d.data.contract import SampleError, parse_sample
from isa4d.data.video import VideoError, decode_all, decode_frames, probe
from video_pathologies import container_frames, flip_bit, identify, indexed_frames, mux, plain_decode

N = 40


@pytest.fixture(scope="module")
def originals() -> np.ndarray:
    return indexed_frames(N)


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_rotation_is_applied_as_players_do(originals: np.ndarray, rotation: int) -> None:
    """Frames stored in the sensor's orientation with a display matrix come out as displayed: the plain decode
    turned by the matrix (ffmpeg's autorotate: np.rot90 by the counter-clockwise angle), and close to the
    displayed originals."""
    turns = rotation // 90 % 4
    shown = np.rot90(originals, turns, axes=(1, 2))  # what a player shows
    data = mux(np.ascontiguousarray(np.rot90(shown, -turns, axes=(1, 2))), rotation=rotation)
    info = probe(data)
    assert (info.height, info.width, info.rotation) == (*shown.shape[1:3], turns * 90)
    plain, degrees = plain_decode(data)
    assert plain.shape[1:3] == originals.shape[1:3] and degrees % 360 == rotation % 360  # stored unrotated
    full = decode_all(data)
    np.testing.assert_array_equal(full, np.rot90(plain, turns, axes=(1, 2)))
    assert np.abs(full.astype(np.int16) - shown).mean() < 4
    np.testing.assert_array_equal(decode_frames(data, [7, 8, 20]), full[[7, 8, 20]])
    half = decode_frames(data, [3], size=(shown.shape[1] // 2, shown.shape[2] // 2))
    assert half.shape == (1, shown.shape[1] // 2, shown.shape[2] // 2, 3)
    assert identify(half.repeat(2, 1).repeat(2, 2), shown)[0] == 3


def test_edit_list_hides_frames_as_players_do(originals: np.ndarray) -> None:
    """An edit list that starts 3 frames in (`ffmpeg -ss 0.1 -c copy`): the sample table lists 40 frames, 37 are
    shown. Frame i is the i-th shown one, i.e. original i + 3."""
    data = mux(originals, shift=3)
    assert container_frames(data) == N
    assert probe(data).num_frames == N - 3
    full = decode_all(data)
    plain, _ = plain_decode(data)
    np.testing.assert_array_equal(full, plain)
    np.testing.assert_array_equal(identify(full, originals), np.arange(3, N))
    for start in (0, 5, 17, 33):
        np.testing.assert_array_equal(decode_frames(data, range(start, start + 4)), full[start : start + 4])
    with pytest.raises(VideoError, match=f"video has {N - 3} frames, asked for index {N - 3}"):
        decode_frames(data, [N - 3])


def test_variable_frame_rate_counts_frames(originals: np.ndarray) -> None:
    """Timestamps with gaps of 1-3 frame durations: frame i is the i-th shown frame (OpenCV's and PHALP's
    numbering), never a resampling at the average rate, so no frame is repeated or skipped."""
    gaps = np.random.default_rng(0).choice([1, 1, 1, 2, 3], N - 1)
    pts = np.concatenate([[0], np.cumsum(gaps)]) * 1001
    data = mux(originals, pts=pts.tolist(), time_base=Fraction(1, 30000))
    info = probe(data)
    assert info.num_frames == N and info.fps < 25  # the average rate is lower than the nominal one
    full = decode_all(data)
    np.testing.assert_array_equal(full, plain_decode(data)[0])
    np.testing.assert_array_equal(identify(full, originals), np.arange(N))
    for i in range(0, N - 3, 3):
        np.testing.assert_array_equal(identify(decode_frames(data, [i, i + 1, i + 2]), originals), [i, i + 1, i + 2])


def test_ten_bit(originals: np.ndarray) -> None:
    """H.264 High 10 (yuv420p10le) converts to 8-bit RGB like any other."""
    data = mux(originals, pix_fmt="yuv420p10le")
    full = decode_all(data)
    np.testing.assert_array_equal(full, plain_decode(data)[0])
    assert np.abs(full.astype(np.int16) - originals).mean() < 4
    np.testing.assert_array_equal(decode_frames(data, [11, 12]), full[11:13])


@pytest.mark.parametrize("size,pix_fmt", [((47, 63), "yuv444p"), ((50, 70), "yuv420p")])
def test_odd_sizes(size: tuple[int, int], pix_fmt: str) -> None:
    """Odd sizes (4:4:4) and sizes that are not whole macroblocks decode at their own size."""
    frames = indexed_frames(20, *size)
    data = mux(frames, pix_fmt=pix_fmt)
    info = probe(data)
    assert (info.height, info.width, info.num_frames) == (*size, 20)
    full = decode_all(data)
    np.testing.assert_array_equal(full, plain_decode(data)[0])
    np.testing.assert_array_equal(identify(full, frames), np.arange(20))
    assert decode_frames(data, [4], size=(24, 32)).shape == (1, 24, 32, 3)


def test_bit_flips_are_refused_or_harmless() -> None:
    """A single flipped bit in the coded frames either raises a VideoError saying the stream is corrupt, or
    leaves the decoded frames unchanged; the rare flip that yields another valid bitstream (H.264 has no
    checksum) is the only silent change. Without the check of the decoder's corrupt flag, most flips decoded to
    concealed, wrong pixels without an error."""
    frames = indexed_frames(24, 64, 96)
    clean = mux(frames)
    reference = decode_all(clean)
    rng = np.random.default_rng(1)
    outcome = {"refused": 0, "unchanged": 0, "silent": 0}
    for _ in range(80):
        data = flip_bit(clean, rng)
        try:
            out = decode_all(data)
        except VideoError as e:
            assert "corrupt" in str(e) or "truncated" in str(e), e
            outcome["refused"] += 1
            continue
        outcome["unchanged" if np.array_equal(out, reference) else "silent"] += 1
    print(f"single bit flips: {outcome}")  # docs/data_format.md quotes this line (pytest -s)
    changed = outcome["refused"] + outcome["silent"]
    assert outcome["refused"] >= 0.6 * changed, outcome


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.99])
def test_truncated_with_moov_in_front_is_refused_by_probe(originals: np.ndarray, fraction: float) -> None:
    """With the moov box first (`-movflags +faststart`), a cut-off file still opens and lists every frame; probe
    refuses it, so the contract check (and training's parse) skips it as undecodable."""
    data = mux(originals, faststart=True)
    assert data.find(b"moov") < data.find(b"mdat")
    probe(data)
    cut = data[: int(len(data) * fraction)]
    assert container_frames(cut) == N
    with pytest.raises(VideoError, match="truncated"):
        probe(cut)
    with pytest.raises(VideoError, match="truncated"):
        decode_frames(cut, [0])
    sample = {"__key__": "cut", "mp4": cut, "json": b'{"fps": 30, "gender": "neutral"}', **_body_and_camera(N)}
    with pytest.raises(SampleError) as e:
        parse_sample(sample)
    assert e.value.reason == "undecodable" and "truncated" in str(e.value)


def _body_and_camera(frames: int) -> dict[str, bytes]:
    from isa4d.data.contract import npz_bytes

    K = np.broadcast_to(np.array([[50.0, 0, 32], [0, 50, 24], [0, 0, 1]], np.float32), (frames, 3, 3))
    return {
        "smpl.npz": npz_bytes(betas=np.zeros((1, 10), np.float32),
                              global_orient=np.zeros((1, frames, 3), np.float32),
                              body_pose=np.zeros((1, frames, 69), np.float32),
                              transl=np.zeros((1, frames, 3), np.float32)),
        "cam.npz": npz_bytes(K=np.ascontiguousarray(K),
                             w2c=np.broadcast_to(np.eye(4, dtype=np.float32), (frames, 4, 4)).copy()),
    }
