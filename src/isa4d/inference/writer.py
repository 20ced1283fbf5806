"""Write what `isa4d sample` generated: the video as mp4 and, beside it, the video | the video with the conditioning
bodies drawn over it, so adherence to the pose shows at a glance.

The overlay blends the SMPL part map (the conditioning meshes rendered with the sample's cameras, headless EGL or
else the PyTorch rasteriser, `isa4d.metrics.render_body_maps`) over the frames; should neither render, it draws the
projected surface points instead.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import torch
from einops import rearrange

from isa4d.data import video as videolib
from isa4d.metrics import render_body_maps
from isa4d.training.video_logging import body_points_overlay


def encode_mp4(video: torch.Tensor, fps: float) -> bytes:
    """(T, 3, H, W) in [-1, 1] -> mp4 bytes (H.264 at CRF 12, near-lossless)."""
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return videolib.encode_video(rearrange(frames, "t c h w -> t h w c").cpu().numpy(), fps, crf=12)


def part_palette(num_ids: int) -> torch.Tensor:
    """(num_ids, 3) fixed colours in [-1, 1], one per (person, part) id."""
    return torch.rand(num_ids, 3, generator=torch.Generator().manual_seed(7)) * 1.6 - 0.8


def overlay_parts(video: torch.Tensor, parts: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """video (T, 3, H, W) in [-1, 1] with part ids (T, H, W) (-1: none) blended over it."""
    colours = part_palette(int(parts.max()) + 1 if parts.numel() and parts.max() >= 0 else 1).to(video)
    paint = rearrange(colours[parts.clamp(min=0)], "t h w c -> t c h w")
    covered = (parts >= 0)[:, None]
    return torch.where(covered, (1 - alpha) * video + alpha * paint, video)


def pose_overlay(module, batch, video: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(B, T, 3, H, W): each video with its conditioning bodies drawn over it (part maps, else points)."""
    try:
        from isa4d.render import make_renderer

        renderer = make_renderer(*video.shape[-2:], backend="auto")
    except Exception as e:  # no renderer at all: dots at the projected surface points
        warnings.warn(f"no renderer ({e}): the pose overlay draws surface points instead of part maps",
                      stacklevel=2)
        return torch.stack([body_points_overlay(video[b], points[b], batch.K[b], batch.w2c[b], batch.person_mask[b])
                            for b in range(len(video))])
    try:
        body = module.conditioner.bodies["neutral"]
        _, parts = render_body_maps(renderer, module.body_meshes(batch.smpl, batch.gender), body.faces, body.part_ids,
                                    batch.K, batch.w2c, batch.person_mask)
    finally:
        renderer.close()
    return torch.stack([overlay_parts(video[b], parts[b].to(video.device)) for b in range(len(video))])


class SampleWriter(L.Callback):
    """Writes each predicted video of a `SampleRequest` to `<output_dir>/<name>.mp4` and, with its `overlay`,
    `<name>_pose.mp4` (sample | sample with the conditioning bodies), at the motion's frame rate."""

    def __init__(self):
        super().__init__()
        self.written: list[Path] = []

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        if not trainer.is_global_zero:
            return
        if not isinstance(outputs, dict) or "request" not in outputs:
            return
        request, video = outputs["request"], outputs["video"]
        b, out = request.batch, Path(request.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        fps = float(b.fps[0])
        overlays = pose_overlay(pl_module, b, video, outputs["points"]) if request.overlay else None
        written = []
        for i in range(len(video)):
            name = request.name if len(video) == 1 else f"{request.name}_{i}"
            written.append(out / f"{name}.mp4")
            written[-1].write_bytes(encode_mp4(video[i], fps))
            if overlays is not None:
                written.append(out / f"{name}_pose.mp4")
                written[-1].write_bytes(encode_mp4(torch.cat([video[i], overlays[i]], dim=-1), fps))  # side by side
        self.written += written
        print("isa4d sample: wrote " + ", ".join(str(p) for p in written))
