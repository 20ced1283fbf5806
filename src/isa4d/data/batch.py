"""The batch contract: what every training and evaluation step receives (docs/data_format.md#batch).

The loader ships `video`, `ref`, `bg` and `mask` as uint8 to keep worker-to-trainer traffic 4x smaller;
`Batch.normalize()` (run by the datamodule after the batch reaches the device) turns them into float in [-1, 1]
(`mask` into {0, 1}). Model code only ever sees normalised batches.

A batch of cached-latent samples (isa4d.data.latents, written by data_prep/cache_latents.py) carries the frozen
VAE's posterior moments in `latents` instead of frames: its `video`, `bg` and `mask` are None, everything else is
as in a video batch. One batch holds one kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch
from einops import rearrange


@dataclass
class SMPLBatch:
    """SMPL parameters, people padded to the batch's largest P (see `Batch.person_mask`)."""

    betas: torch.Tensor  # (B, P, 10)
    global_orient: torch.Tensor  # (B, P, T, 3)
    body_pose: torch.Tensor  # (B, P, T, 69)
    transl: torch.Tensor  # (B, P, T, 3)

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "SMPLBatch":
        return SMPLBatch(*(fn(getattr(self, f.name)) for f in fields(self)))


@dataclass
class LatentBatch:
    """Cached posterior moments of the frozen VAE: mean and logvar stacked on channels, un-normalised (the encoder's
    output), so a training step draws from the posterior exactly as when it encodes on the fly."""

    video: torch.Tensor  # (B, 2C, T', h, w) moments of the clip
    ref: torch.Tensor  # (B, 2C, h, w) moments of the reference image
    height: int  # H, W: the size of the images the latents code
    width: int
    fingerprint: list[str]  # the VAE of each sample (isa4d.data.latents.vae_fingerprint)
    bg: torch.Tensor | None = None  # (B, 2C, T', h, w) moments of the background plate, zeros where not has_bg

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "LatentBatch":
        return replace(self, video=fn(self.video), ref=fn(self.ref), bg=None if self.bg is None else fn(self.bg))


@dataclass
class Batch:
    video: torch.Tensor | None  # (B, T, 3, H, W): uint8 in the loader, [-1, 1] after normalize(); None: latents
    K: torch.Tensor  # (B, T, 3, 3) pixels of `video`
    w2c: torch.Tensor  # (B, T, 4, 4) world-to-camera, OpenCV axes
    smpl: SMPLBatch
    person_mask: torch.Tensor  # (B, P) bool, True for real people
    ref: torch.Tensor  # (B, 3, H, W) reference image, same size as the video
    ref_K: torch.Tensor  # (B, 3, 3) camera of the reference (valid where ref_has_camera)
    ref_w2c: torch.Tensor  # (B, 4, 4)
    ref_smpl: SMPLBatch  # T = 1: the bodies seen in the reference (valid where ref_has_camera)
    ref_has_camera: torch.Tensor  # (B,) bool
    frame_index: torch.Tensor  # (B, T) long, source frame of each clip frame
    fps: torch.Tensor  # (B,) float, frame rate of the clip as sampled (source fps / stride)
    key: list[str]
    gender: list[str]
    bg: torch.Tensor | None = None  # (B, T, 3, H, W) clean background plate, zeros where not has_bg
    has_bg: torch.Tensor | None = None  # (B,) bool
    mask: torch.Tensor | None = None  # (B, T, 1, H, W) person mask
    has_mask: torch.Tensor | None = None  # (B,) bool
    stats: dict[str, Any] = field(default_factory=dict)  # loader health, see isa4d.data.dataset
    normalized: bool = False
    latents: LatentBatch | None = None  # cached VAE moments in place of video, bg and mask

    def __len__(self) -> int:
        return self.K.shape[0]

    @property
    def num_frames(self) -> int:
        return self.K.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the clip's frames, whether the batch carries them or their cached latents."""
        if self.video is None:
            return self.latents.height, self.latents.width
        return tuple(self.video.shape[-2:])

    def require_video(self, purpose: str, fix: str) -> torch.Tensor:
        """The video, or a ValueError saying that `purpose` cannot run on a cached-latent batch and what to do."""
        if self.video is None:
            keys = ", ".join(self.key[:3]) + (", ..." if len(self.key) > 3 else "")
            raise ValueError(f"{purpose} needs videos, but this batch ({keys}) holds cached latents "
                             f"(data_prep/cache_latents.py): {fix}")
        return self.video

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Batch":
        """A copy with `fn` applied to every tensor."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            nested = isinstance(v, (SMPLBatch, LatentBatch))
            out[f.name] = v.apply(fn) if nested else fn(v) if isinstance(v, torch.Tensor) else v
        return Batch(**out)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return self.apply(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return self.apply(lambda t: t.pin_memory())

    def normalize(self) -> "Batch":
        """uint8 images -> float in [-1, 1] (mask -> {0, 1}); idempotent."""
        if self.normalized:
            return self
        to_unit = lambda x: None if x is None else x.float().div_(127.5).sub_(1.0)  # noqa: E731
        mask = None if self.mask is None else (self.mask >= 128).float()
        return replace(self, video=to_unit(self.video), ref=to_unit(self.ref), bg=to_unit(self.bg), mask=mask, normalized=True)


@dataclass
class LatentExample:
    """One clip's cached posterior moments (see LatentBatch), numpy."""

    video: np.ndarray  # (2C, T', h, w) float16 or float32
    ref: np.ndarray  # (2C, h, w)
    num_frames: int  # T, H, W of the frames the latents code
    height: int
    width: int
    fingerprint: str
    bg: np.ndarray | None = None  # (2C, T', h, w)


@dataclass
class ClipExample:
    """One decoded clip, numpy, as a loader worker produces it before collation; a cached-latent clip has `latents`
    instead of `video`, `bg` and `mask`."""

    key: str
    video: np.ndarray | None  # (T, H, W, 3) uint8
    K: np.ndarray  # (T, 3, 3)
    w2c: np.ndarray  # (T, 4, 4)
    betas: np.ndarray  # (P, 10)
    global_orient: np.ndarray  # (P, T, 3)
    body_pose: np.ndarray  # (P, T, 69)
    transl: np.ndarray  # (P, T, 3)
    ref: np.ndarray  # (H, W, 3) uint8
    ref_K: np.ndarray  # (3, 3)
    ref_w2c: np.ndarray  # (4, 4)
    ref_global_orient: np.ndarray  # (P, 1, 3)
    ref_body_pose: np.ndarray  # (P, 1, 69)
    ref_transl: np.ndarray  # (P, 1, 3)
    ref_has_camera: bool
    frame_index: np.ndarray  # (T,)
    fps: float
    gender: str
    bg: np.ndarray | None = None  # (T, H, W, 3) uint8
    mask: np.ndarray | None = None  # (T, H, W, 1) uint8
    latents: LatentExample | None = None

    @property
    def size(self) -> tuple[int, int, int]:
        """(T, H, W) of the clip."""
        if self.latents is not None:
            return self.latents.num_frames, self.latents.height, self.latents.width
        return self.video.shape[:3]


def _pad_people(arrays: Sequence[np.ndarray], num_people: int) -> torch.Tensor:
    out = np.zeros((len(arrays), num_people) + arrays[0].shape[1:], dtype=np.float32)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = a
    return torch.from_numpy(out)


def _frames(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    return rearrange(torch.from_numpy(np.stack(arrays)), "b t h w c -> b t c h w")


def collate(examples: Sequence[ClipExample], stats: dict[str, Any] | None = None) -> Batch:
    """Stack examples of one bucket into a Batch, padding people to the largest P with `person_mask`."""
    if not examples:
        raise ValueError("cannot collate an empty list")
    cached = [e.key for e in examples if e.latents is not None]
    if 0 < len(cached) < len(examples):
        videos = [e.key for e in examples if e.latents is None]
        raise ValueError(f"a batch cannot mix cached-latent samples ({', '.join(cached[:3])}) and video samples "
                         f"({', '.join(videos[:3])}): give one run shards of one kind (data_prep/cache_latents.py "
                         f"writes cached ones)")
    shapes = {(e.size, None if e.latents is None else e.latents.video.shape) for e in examples}
    if len(shapes) != 1:
        raise ValueError(f"examples of one batch must share (T, H, W) and latent shape; got {sorted(shapes)}")
    B, P = len(examples), max(e.betas.shape[0] for e in examples)
    T, H, W = examples[0].size
    person_mask = torch.zeros(B, P, dtype=torch.bool)
    for i, e in enumerate(examples):
        person_mask[i, : e.betas.shape[0]] = True
    smpl = SMPLBatch(*(_pad_people([getattr(e, n) for e in examples], P) for n in ("betas", "global_orient", "body_pose", "transl")))
    ref_smpl = SMPLBatch(
        smpl.betas.clone(),
        *(_pad_people([getattr(e, "ref_" + n) for e in examples], P) for n in ("global_orient", "body_pose", "transl")),
    )
    stack = lambda name: torch.from_numpy(np.stack([np.asarray(getattr(e, name), dtype=np.float32) for e in examples]))  # noqa: E731
    latents = _latents([e.latents for e in examples]) if cached else None
    has_bg = torch.tensor([(e.bg if e.latents is None else e.latents.bg) is not None for e in examples])
    has_mask = torch.tensor([e.mask is not None for e in examples])
    bg = None
    if has_bg.any() and not cached:
        bg = _frames([e.bg if e.bg is not None else np.full((T, H, W, 3), 128, np.uint8) for e in examples])
    mask = _frames([e.mask if e.mask is not None else np.zeros((T, H, W, 1), np.uint8) for e in examples]) if has_mask.any() else None
    return Batch(
        video=None if cached else _frames([e.video for e in examples]),
        K=stack("K"),
        w2c=stack("w2c"),
        smpl=smpl,
        person_mask=person_mask,
        ref=rearrange(torch.from_numpy(np.stack([e.ref for e in examples])), "b h w c -> b c h w"),
        ref_K=stack("ref_K"),
        ref_w2c=stack("ref_w2c"),
        ref_smpl=ref_smpl,
        ref_has_camera=torch.tensor([e.ref_has_camera for e in examples]),
        frame_index=torch.from_numpy(np.stack([e.frame_index for e in examples]).astype(np.int64)),
        fps=torch.tensor([e.fps for e in examples], dtype=torch.float32),
        key=[e.key for e in examples],
        gender=[e.gender for e in examples],
        bg=bg,
        has_bg=has_bg if has_bg.any() else None,
        mask=mask,
        has_mask=has_mask if mask is not None else None,
        stats=dict(stats or {}),
        latents=latents,
    )


def _latents(examples: Sequence[LatentExample]) -> LatentBatch:
    """Stack cached moments; a clip without a background plate gets zero moments (its latent is masked out)."""
    stack = lambda arrays: torch.from_numpy(np.stack(arrays))  # noqa: E731
    bg = None
    if any(e.bg is not None for e in examples):
        bg = stack([e.bg if e.bg is not None else np.zeros_like(e.video) for e in examples])
    return LatentBatch(video=stack([e.video for e in examples]), ref=stack([e.ref for e in examples]),
                       height=examples[0].height, width=examples[0].width,
                       fingerprint=[e.fingerprint for e in examples], bg=bg)
