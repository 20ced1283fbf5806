"""Videos without moviepy: grid layout, error video, GIF encoding, an image summary TensorBoard reads back."""

from __future__ import annotations

import io

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image, ImageSequence
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from isa4d.training.video_logging import error_video, gif_bytes, log_video, to_uint8, video_grid

T, H, W = 5, 12, 16


def clip(seed: int, *batch: int) -> torch.Tensor:
    return torch.rand(*batch, T, 3, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def gif_frames(data: bytes) -> list[Image.Image]:
    return [f.convert("RGB") for f in ImageSequence.Iterator(Image.open(io.BytesIO(data)))]


def test_grid_places_videos_side_by_side():
    a, b, c = clip(0), clip(1), clip(2)
    grid = video_grid([a, b, c])
    assert grid.shape == (T, 3, H, 3 * W) and grid.dtype == torch.uint8
    assert torch.equal(grid[..., :W], to_uint8(a))
    assert torch.equal(grid[..., 2 * W:], to_uint8(c))
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]


def test_grid_of_batches_has_one_clip_per_row_and_wraps_with_nrow():
    gt, rc = clip(0, 2), clip(1, 2)
    grid = video_grid([gt, rc])
    assert grid.shape == (T, 3, 2 * H, 2 * W)
    assert torch.equal(grid[:, :, H:, W:], to_uint8(rc[1]))
    wrapped = video_grid([gt, rc], nrow=3)  # 4 panels, 3 a row: the second row is gt_1 then black
    assert wrapped.shape == (T, 3, 2 * H, 3 * W)
    assert torch.equal(wrapped[:, :, :H, 2 * W:], to_uint8(gt[1]))
    assert (wrapped[:, :, H:, W:] == 0).all()
    with pytest.raises(ValueError):
        video_grid([clip(0), clip(1)[:, :, :-1]])


def test_error_video_is_black_where_equal_and_white_where_far():
    a = clip(0)
    assert torch.equal(error_video(a, a), torch.full_like(a, -1.0))
    far = error_video(torch.full_like(a, -1.0), torch.ones_like(a))
    assert torch.equal(far, torch.ones_like(a))
    half = error_video(torch.zeros_like(a), torch.full_like(a, 0.25))  # |a - b| = 1/8 of the range, x2 -> 1/4
    torch.testing.assert_close(half, torch.full_like(a, -0.5))


def test_gif_decodes_to_every_frame_at_its_size():
    data = gif_bytes(to_uint8(clip(0)), fps=10)
    frames = gif_frames(data)
    assert data[:4] == b"GIF8" and len(frames) == T
    assert all(f.size == (W, H) for f in frames)
    assert Image.open(io.BytesIO(data)).info["duration"] == 100


@pytest.mark.parametrize("use_lightning_logger", [False, True])
def test_log_video_writes_an_animated_gif_image_summary(tmp_path, use_lightning_logger):
    frames = video_grid([clip(0), clip(1)])
    if use_lightning_logger:
        logger = TensorBoardLogger(tmp_path, name="", version="")
        writer = logger.experiment
    else:
        logger = writer = SummaryWriter(tmp_path)
    assert log_video(logger, "val/reconstruction", frames, step=7)
    writer.close()

    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    (image,) = events.Images("val/reconstruction")
    assert image.step == 7 and (image.height, image.width) == (H, 2 * W)
    assert image.encoded_image_string.startswith(b"GIF8")
    assert len(gif_frames(image.encoded_image_string)) == T


def test_log_video_skips_other_loggers(tmp_path):
    frames = to_uint8(clip(0))
    assert log_video(CSVLogger(tmp_path), "x", frames, step=0) is False
    assert log_video(None, "x", frames, step=0) is False
