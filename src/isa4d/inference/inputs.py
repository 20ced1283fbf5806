"""What `isa4d sample` generates from: reference image(s), SMPL motions, a camera path, an optional background.

`SampleInputs` is the LightningDataModule of `isa4d predict`/`isa4d sample`: it turns the user's files into one
`SampleRequest`, a batch of the training contract (`isa4d.data.batch.Batch`) whose video is only a shape, so the
DiT conditions on it exactly as in training. Conventions (docs/inference.md):

- The people are the motions, laid out in one world (`motion.combine_people`); the camera path looks at their
  mean pelvis (`motion.look_target`).
- A cam.npz camera path may be longer than the sample: its first frames are used.
- Frames: the motion's length at `fps`, cut to 1 + 4k (the VAE codes four frames per latent frame after the
  first), or exactly `num_frames`, which must be of that form and no longer than the motion.
- A reference image shows its person(s) as the first frame would: in the motion's first pose, seen by the path's
  first camera, unless a `ref.npz` (the contract's layout: K and w2c of the image, optionally its own SMPL pose)
  says otherwise. Images are scaled to cover the video size and centre-cropped, intrinsics with them.
- Several reference images, one per person: laid side by side into one canvas (`generate.ReferenceTiles`).
- A background (a video, or an image for a static camera) is scaled and cropped the same way; a video must have
  at least as many frames as the sample.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import lightning as L
import numpy as np
import torch
from einops import rearrange
from torch.utils.data import DataLoader

from isa4d.data import video as videolib
from isa4d.data.batch import Batch, SMPLBatch
from isa4d.data.contract import CameraSequence, SampleError, parse_reference
from isa4d.data.dataset import Bucket
from isa4d.data.examples import decode_cropped, reference_image
from isa4d.geometry.camera import cover_crop
from isa4d.inference.camera_path import camera_path
from isa4d.inference.generate import ReferenceTiles
from isa4d.inference.motion import Motion, combine_people, load_motion, look_target

def _as_is(request: SampleRequest) -> SampleRequest:
    return request


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class SampleRequest:
    """One sample to generate: the conditioning batch (B = 1) and, for one reference image per person, its tiles."""

    batch: Batch
    tiles: ReferenceTiles | None = None
    name: str = "sample"
    output_dir: str = "samples"
    overlay: bool = True


def latent_frames_fit(frames: int, temporal_factor: int = 4) -> int:
    """The longest 1 + temporal_factor·k not above `frames`."""
    return 1 + temporal_factor * ((frames - 1) // temporal_factor)


class SampleInputs(L.LightningDataModule):
    """The inputs of one generated video, as `predict_dataloader()` -> [SampleRequest].

    motions: one SMPL motion file per person (contract smpl.npz or AMASS-style npz, `motion.load_motion`).
    ref: one reference image for all people, or one per person (same order as `motions`).
    ref_camera: optional ref.npz per reference image (K, w2c in the image's pixels; optional SMPL pose).
    camera: a camera path spec ('static', 'orbit', 'orbit:degrees=360,radius=3', 'dolly:start=4,end=2') or a
    cam.npz. background: a video or image file. height, width, num_frames, fps: the output (fps None: the
    motions' own). offsets: (P, 3) metres per person, else `spacing` apart along x. up_axis, face_forward: see
    `load_motion`. keep_world: the motions stay where they are (no recentring, turning or spacing), for people
    captured in one world and a ref.npz in that world. output_dir, name, overlay: `writer.SampleWriter` writes
    `output_dir/<name>.mp4` and, with `overlay`, `<name>_pose.mp4` (sample | sample with the bodies).
    """

    def __init__(
        self,
        motions: str | list[str],
        ref: str | list[str],
        camera: str = "static",
        background: str | None = None,
        ref_camera: str | list[str] | None = None,
        height: int = 64,
        width: int = 64,
        num_frames: int | None = None,
        fps: float | None = None,
        body_model_dir: str = "data/body",
        gender: str | None = None,
        offsets: list[list[float]] | None = None,
        spacing: float = 1.0,
        up_axis: str | None = None,
        face_forward: bool = True,
        keep_world: bool = False,
        fov: float = 50.0,
        temporal_factor: int = 4,
        name: str = "sample",
        output_dir: str = "samples",
        overlay: bool = True,
    ):
        super().__init__()
        self.motions = [motions] if isinstance(motions, str) else list(motions)
        self.refs = [ref] if isinstance(ref, str) else list(ref)
        self.ref_cameras = [ref_camera] if isinstance(ref_camera, str) else list(ref_camera or [])
        if not self.motions:
            raise ValueError("data.motions: give at least one SMPL motion file")
        if len(self.refs) not in (1, len(self.motions)):
            raise ValueError(f"data.ref: give one reference image, or one per person ({len(self.motions)}); got "
                             f"{len(self.refs)}")
        if self.ref_cameras and len(self.ref_cameras) != len(self.refs):
            raise ValueError(f"data.ref_camera: give one ref.npz per reference image ({len(self.refs)}); got "
                             f"{len(self.ref_cameras)}")
        for key, files in (("motions", self.motions), ("ref", self.refs), ("ref_camera", self.ref_cameras),
                           ("background", [background] if background else [])):
            missing = [f for f in files if not Path(f).is_file()]
            if missing:
                raise FileNotFoundError(f"data.{key}: no such file {missing[0]}")
        self.camera, self.background = camera, background
        self.height, self.width, self.num_frames, self.fps = height, width, num_frames, fps
        self.body_model_dir, self.gender, self.offsets, self.spacing = body_model_dir, gender, offsets, spacing
        self.up_axis, self.face_forward, self.fov, self.keep_world = up_axis, face_forward, fov, keep_world
        self.temporal_factor, self.name, self.output_dir, self.overlay = temporal_factor, name, output_dir, overlay

    # ----------------------------------------------------------------------------------------------- pieces

    def motion(self) -> Motion:
        """All people in one world, cut to the output's frame count."""
        people = [load_motion(m, body_model_dir=self.body_model_dir, gender=self.gender, fps=self.fps,
                              up_axis=self.up_axis, face_forward=self.face_forward and not self.keep_world)
                  for m in self.motions]
        if self.keep_world:
            motion = combine_people(people, np.zeros((len(people), 3)), recenter=False)
        else:
            motion = combine_people(people, self.offsets, self.spacing)
        available, F = motion.num_frames, self.num_frames
        if F is None:
            F = latent_frames_fit(available, self.temporal_factor)
        elif (F - 1) % self.temporal_factor:
            raise ValueError(f"data.num_frames={F}: must be 1 + {self.temporal_factor}k (the VAE codes "
                             f"{self.temporal_factor} frames per latent frame after the first), e.g. "
                             f"{latent_frames_fit(F, self.temporal_factor)}")
        if F > available:
            many = len(self.motions) > 1
            raise ValueError(f"data.num_frames={F} but the motion{'s' * many} {', '.join(self.motions)} "
                             f"give{'' if many else 's'} only {available} frames at {motion.fps:g} fps")
        smpl = motion.smpl.take(np.arange(F))
        return Motion(smpl, motion.fps, motion.gender)

    def _image(self, path: str) -> tuple[np.ndarray, object]:
        try:
            return reference_image(Path(path).read_bytes(), Bucket(self.height, self.width, 1, 1), path)
        except SampleError as e:
            raise ValueError(f"data.ref: {path}: {e}") from e

    def _reference(self, i: int, motion: Motion, cams: CameraSequence, people: Sequence[int]):
        """Image (H, W, 3) uint8, K (3, 3), w2c (4, 4), pose (P', 3 + 69 + 3 per person) of reference image i."""
        image, crop = self._image(self.refs[i])
        K, w2c = cams.K[0], cams.w2c[0]
        go, bp, tr = (a[list(people), :1] for a in (motion.smpl.global_orient, motion.smpl.body_pose,
                                                      motion.smpl.transl))  # (P', 1, ...)
        if self.ref_cameras:
            path = self.ref_cameras[i]
            try:
                view = parse_reference(b"", Path(path).read_bytes(), path, len(people))
            except SampleError as e:
                raise ValueError(f"data.ref_camera: {e}") from e
            K, w2c = crop.apply_to_K(view.K.astype(np.float64)), view.w2c
            if view.smpl is not None:
                go, bp, tr = view.smpl.global_orient, view.smpl.body_pose, view.smpl.transl
        return image, np.asarray(K, np.float32), np.asarray(w2c, np.float32), (go, bp, tr)

    def _background(self, F: int) -> np.ndarray:
        """(F, H, W, 3) uint8 background frames."""
        path = Path(self.background)
        if path.suffix.lower() in IMAGE_SUFFIXES:
            image, _ = reference_image(path.read_bytes(), Bucket(self.height, self.width, 1, 1), str(path))
            return np.repeat(image[None], F, 0)
        data = path.read_bytes()
        try:
            info = videolib.probe(data)
        except videolib.VideoError as e:
            raise ValueError(f"data.background: {path}: {e}") from e
        if info.num_frames < F:
            raise ValueError(f"data.background: {path} has {info.num_frames} frames, the sample needs {F}")
        crop = cover_crop(info.height, info.width, self.height, self.width)
        try:  # only the frames the sample uses, decoded at the covering size and cropped as the loader does
            return decode_cropped(data, np.arange(F), crop, str(path), "background")
        except SampleError as e:
            raise ValueError(f"data.background: {e}") from e

    def request(self) -> SampleRequest:
        motion = self.motion()
        smpl, F, P = motion.smpl, motion.num_frames, motion.smpl.num_people
        target = look_target(smpl, self.body_model_dir, motion.gender)
        cams = camera_path(self.camera, F, self.height, self.width, target, fov=self.fov, trim_npz=True)
        if len(self.refs) == 1:
            views = [self._reference(0, motion, cams, range(P))]
        else:
            views = [self._reference(p, motion, cams, [p]) for p in range(P)]
        image = np.concatenate([v[0] for v in views], axis=1)  # (H, N·W, 3): one tile per reference image
        pose = [np.concatenate([v[3][k] for v in views]) for k in range(3)]  # (P, 1, ...)
        t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))[None]  # noqa: E731  numpy -> (1, ...)
        bg = None if self.background is None else rearrange(torch.from_numpy(self._background(F)),
                                                            "t h w c -> 1 t c h w")
        batch = Batch(
            video=torch.zeros(1, F, 3, self.height, self.width, dtype=torch.uint8),  # only its shape is used
            K=t(cams.K), w2c=t(cams.w2c),
            smpl=SMPLBatch(t(smpl.betas), t(smpl.global_orient), t(smpl.body_pose), t(smpl.transl)),
            person_mask=torch.ones(1, P, dtype=torch.bool),
            ref=rearrange(torch.from_numpy(np.ascontiguousarray(image)), "h w c -> 1 c h w"),
            ref_K=t(views[0][1]), ref_w2c=t(views[0][2]),
            ref_smpl=SMPLBatch(t(smpl.betas), *(t(a) for a in pose)),
            ref_has_camera=torch.ones(1, dtype=torch.bool),
            frame_index=torch.arange(F)[None], fps=torch.tensor([motion.fps], dtype=torch.float32),
            key=[self.name], gender=[motion.gender],
            bg=bg, has_bg=None if bg is None else torch.ones(1, dtype=torch.bool),
        )
        tiles = None
        if len(views) > 1:
            tiles = ReferenceTiles(torch.stack([torch.as_tensor(v[1]) for v in views])[None],
                                   torch.stack([torch.as_tensor(v[2]) for v in views])[None])
        return SampleRequest(batch, tiles, self.name, self.output_dir, self.overlay)

    # --------------------------------------------------------------------------------------- LightningDataModule

    def predict_dataloader(self) -> DataLoader:
        return DataLoader([self.request()], batch_size=None, collate_fn=_as_is)

    def on_after_batch_transfer(self, request: SampleRequest, dataloader_idx: int) -> SampleRequest:
        return replace(request, batch=request.batch.normalize())
