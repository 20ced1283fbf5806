"""Videos to TensorBoard as animated GIFs, written with Pillow.

`SummaryWriter.add_video` encodes through moviepy and needs moviepy 1.0.3: with moviepy 2.x it logs nothing
and says nothing. An image summary may hold any encoded image, and TensorBoard's Images tab plays an animated
GIF, so the GIF is written here and logged as an image (what add_video does under the hood, minus moviepy).
"""

from __future__ import annotations

import io

import torch
from einops import rearrange

from isa4d.geometry.camera import project
from lightning.fabric.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> [0, 255] uint8, clamped and rounded."""
    return ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def video_grid(videos: list[torch.Tensor], nrow: int | None = None) -> torch.Tensor:
    """Videos in [-1, 1], each (T, 3, H, W) or a batch (B, T, 3, H, W) -> one (T, 3, H', W') uint8 grid.

    Panels go clip by clip, the given videos side by side: with batches [gt, recon, error] of B clips, row b
    is gt_b | recon_b | error_b. `nrow` is the number of panels per row (torchvision's make_grid name), by
    default len(videos); a last row left short is filled with black.
    """
    batches = [v.unsqueeze(0) if v.dim() == 4 else v for v in videos]
    shapes = {tuple(v.shape) for v in batches}
    if len(shapes) != 1 or batches[0].dim() != 5 or batches[0].shape[2] != 3:
        raise ValueError(f"videos must share one shape, (T, 3, H, W) or (B, T, 3, H, W): {sorted(shapes)}")
    panels = rearrange(torch.stack(batches, 1), "b n t c h w -> (b n) t c h w")
    per_row = nrow or len(videos)
    rows = -(-len(panels) // per_row)
    blank = panels.new_full((rows * per_row - len(panels), *panels.shape[1:]), -1.0)
    panels = to_uint8(torch.cat([panels, blank]))
    return rearrange(panels, "(gh gw) t c h w -> t c (gh h) (gw w)", gw=per_row)  # (T, 3, rows·H, per_row·W)


def error_video(a: torch.Tensor, b: torch.Tensor, gain: float = 2.0) -> torch.Tensor:
    """Grey-scale absolute error of two videos in [-1, 1] (channels at dim -3), as a video in [-1, 1].

    Black is no error; brightness is `gain` times the mean-over-channels |a − b| in intensity units ([0, 1]
    spans the whole value range), so with the default gain of 2, white is an error of half the range or more.
    """
    err = (a - b).abs().mean(dim=-3, keepdim=True) / 2  # intensity units, 0..1
    return ((gain * err).clamp(max=1) * 2 - 1).expand_as(a)


def gif_bytes(frames: torch.Tensor, fps: float) -> bytes:
    """(T, 3, H, W) uint8 -> an endlessly looping animated GIF.

    GIF frame times are whole hundredths of a second, so fps is rounded to that; Pillow quantises each frame
    to a 256-colour palette and merges identical consecutive frames into one longer frame.
    """
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be (T, 3, H, W) uint8, got {tuple(frames.shape)} {frames.dtype}")
    images = [Image.fromarray(f) for f in rearrange(frames.cpu(), "t c h w -> t h w c").numpy()]
    out = io.BytesIO()
    images[0].save(out, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps),
                   loop=0)
    return out.getvalue()


def log_video(logger_or_writer: object, tag: str, frames: torch.Tensor, step: int, fps: float = 8) -> bool:
    """Log (T, 3, H, W) uint8 frames as an animated GIF under `tag`; True when logged.

    Takes a Lightning TensorBoardLogger or a torch SummaryWriter; any other logger (or None, or a rank other
    than zero, whose experiment is a dummy) is silently skipped and gives False.
    """
    writer = logger_or_writer
    if isinstance(writer, TensorBoardLogger):
        writer = writer.experiment
    if not isinstance(writer, SummaryWriter):
        return False
    image = Summary.Image(height=frames.shape[2], width=frames.shape[3], colorspace=3,
                          encoded_image_string=gif_bytes(frames, fps))
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
    return True


PERSON_COLOURS = ((0.1, 1.0, 0.2), (1.0, 0.25, 0.2), (0.25, 0.5, 1.0), (1.0, 0.9, 0.1), (1.0, 0.2, 1.0))


def draw_points(video: torch.Tensor, uv: torch.Tensor, valid: torch.Tensor, person: torch.Tensor,
                radius: int = 0) -> torch.Tensor:
    """A copy of video (T, 3, H, W) in [-1, 1] with points uv (T, K, 2) (pixels) drawn as dots of their person's
    colour; valid (T, K) bool, person (K,) long. Dots are (2·radius + 1)² pixels, clipped at the borders."""
    out = video.detach().clone()
    T, _, H, W = out.shape
    colours = torch.tensor(PERSON_COLOURS, dtype=out.dtype, device=out.device) * 2 - 1  # (5, 3)
    col = colours[person % len(PERSON_COLOURS)]  # (K, 3)
    for du in range(-radius, radius + 1):
        for dv in range(-radius, radius + 1):
            u = uv[..., 0].round().long() + du  # (T, K)
            v = uv[..., 1].round().long() + dv
            ok = valid & (u >= 0) & (u < W) & (v >= 0) & (v < H)
            ti, ki = ok.nonzero(as_tuple=True)
            out[ti, :, v[ti, ki], u[ti, ki]] = col[ki]
    return out


def body_points_overlay(video: torch.Tensor, points: torch.Tensor, K: torch.Tensor, w2c: torch.Tensor,
                        person_mask: torch.Tensor) -> torch.Tensor:
    """video (T, 3, H, W) with the posed body points (P, T, V, 3) drawn in their person's colour, projected with
    K (T, 3, 3) and w2c (T, 4, 4); points of padded people (person_mask (P,) False) and behind the camera left out."""
    P, V = points.shape[0], points.shape[2]
    uvz = project(rearrange(points, "p t v c -> t (p v) c"), K, w2c)  # (T, P·V, 3)
    valid = (uvz[..., 2] > 0) & person_mask.repeat_interleave(V)[None]
    person = torch.arange(P, device=points.device).repeat_interleave(V)  # (P·V,)
    return draw_points(video, uvz[..., :2], valid, person)
