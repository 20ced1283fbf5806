"""Assemble toy-world clips (people, motions, scene, camera), render them and write contract shards.

One clip = 1-3 identities, each with a motion, grounded on the floor of a procedural room and seen by one
camera path. Every clip is a pure function of (seed, split, index), so shards are reproducible and clips can
be made in any order by any number of processes. Each process owns one renderer, body model and painter
(:class:`WorldContext`); GL contexts do not survive fork, so they are created in the worker.

Per sample: ``mp4`` (video), ``bg.mp4`` (clean plate: the scene without people), ``mask.mp4`` (person mask,
255 = any person), ``smpl.npz``, ``cam.npz``, ``json``, ``ref.png`` + ``ref.npz`` (the same people in a relaxed
pose facing a front camera in the same room) and ``parts.npz`` (uint8 (F, H, W) ``parts`` = part id + 1 and
``instance`` = person index + 1, 0 = background; lossless, for metrics).
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from data_prep.toy_world.appearance import BodyPainter, identity_split, make_identity
from data_prep.toy_world.cameras import CAMERA_KINDS, bounding_sphere, make_camera
from data_prep.toy_world.motions import (
    J, MOTIONS, Motion, euler_to_body_pose, ground, make_motion, relaxed, root_orient,
)
from data_prep.toy_world.scene import light_direction, make_scene
from isa4d.body.smpl import BodyModel
from isa4d.progress import track
from isa4d.data.contract import CameraSequence, SMPLSequence, encode_sample, npz_bytes
from isa4d.render import Mesh, MeshRenderer

SPLITS = {"train": 0, "val": 1}
SKY = np.array([200, 215, 235], dtype=np.uint8)  # behind everything (only seen above the walls)


@dataclass(frozen=True)
class Preset:
    height: int
    width: int
    num_frames: int
    fps: float
    train_clips: int
    val_clips: int
    train_identities: int
    val_identities: int
    clips_per_shard: int
    people_weights: tuple[float, float, float] = (0.5, 0.3, 0.2)  # P(1, 2, 3 people)
    people_cycle: tuple[int, ...] = ()  # if set, clip i has people_cycle[i % len] people (tiny: all counts)
    samples: int = 4  # MSAA for the colour images; ids, depth and parts are never antialiased
    crf: int = 20
    motion_pool: tuple[str, ...] = MOTIONS  # motions drawn from; in-place ones keep the camera close to the people


PRESETS = {
    "tiny": Preset(64, 64, 13, 12.0, 3, 1, 8, 2, 8, people_cycle=(1, 2, 3), crf=26),
    # no MSAA: it costs ~35 % more CPU on llvmpipe, and loaders downscale 128 -> 64 with an area filter anyway
    "default": Preset(128, 128, 33, 15.0, 320, 40, 32, 8, 64, samples=0),
    "large": Preset(256, 256, 49, 15.0, 8000, 400, 400, 50, 256),
    # `make proof`: people framed large (1-2 people, motions that stay in place, so the camera frames the bodies
    # rather than their walking paths), 128 x 128 as `default`; 1200 clips render in about a minute on 16 cores.
    "proof": Preset(128, 128, 33, 15.0, 1152, 64, 48, 8, 128, people_weights=(0.6, 0.4, 0.0), samples=0,
                    motion_pool=("wave", "squat", "jump", "dance")),
}


class WorldContext:
    """Per-process state: renderer, body model, painter, face list."""

    def __init__(self, body_dir, height: int, width: int, samples: int = 4):
        torch.set_num_threads(1)
        self.body_model = BodyModel(body_dir, "neutral")
        self.painter = BodyPainter(body_dir, "neutral")
        self.faces = self.body_model.faces.numpy().astype(np.int64)
        self.part_ids = self.body_model.part_ids.numpy()
        self.renderer = MeshRenderer(height, width, samples=samples)
        self.background = np.broadcast_to(SKY, (height, width, 3)).copy()

    def close(self) -> None:
        self.renderer.close()


def clip_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], index])


def plan_people(rng, num_people: int, num_frames: int, fps: float, motions: list[str] | None = None,
                min_gap: float = 0.7, tries: int = 30, pool: tuple[str, ...] = MOTIONS) -> list[Motion]:
    """Motions whose pelvis paths stay `min_gap` metres apart, recentred so the group's box is at the origin."""
    for attempt in range(tries):
        names = motions or [str(rng.choice(pool)) for _ in range(num_people)]
        if attempt > tries // 2 and motions is None:  # crowded: fall back to motions that stay in place
            names = [str(rng.choice(["wave", "squat", "dance", "jump"])) for _ in range(num_people)]
        starts = rng.uniform(-0.9, 0.9, (num_people, 2)) * np.sqrt(num_people - 1)
        out = [make_motion(n, rng, num_frames, fps, s, rng.uniform(0, 2 * np.pi)) for n, s in zip(names, starts)]
        paths = np.stack([m.root_xz for m in out])  # (P, F, 2)
        gaps = np.linalg.norm(paths[:, None] - paths[None], axis=-1) + 1e9 * np.eye(num_people)[..., None]
        if gaps.min() >= min_gap:
            break
    centre = 0.5 * (paths.min((0, 1)) + paths.max((0, 1)))
    for m in out:
        m.root_xz = m.root_xz - centre
    return out


def reference_pose(num_people: int, rng) -> list[Motion]:
    """One frame per person: relaxed standing pose, facing +z, side by side along x."""
    out = []
    for p in range(num_people):
        eul = relaxed(1, rng)
        eul[:, [J["left_shoulder"], J["right_shoulder"]], 2] *= 0.7  # arms a little away from the torso
        out.append(Motion("reference", root_orient(np.zeros(1)), euler_to_body_pose(eul),
                          np.array([[0.75 * (p - (num_people - 1) / 2), 0.0]]), np.zeros(1)))
    return out


@torch.no_grad()
def _pose(ctx: WorldContext, betas: np.ndarray, motions: list[Motion]):
    transl = ground(ctx.body_model, betas, motions)
    smpl = SMPLSequence(betas.astype(np.float32), np.stack([m.global_orient for m in motions]).astype(np.float32),
                        np.stack([m.body_pose for m in motions]).astype(np.float32), transl.astype(np.float32))
    params = (smpl.betas, smpl.global_orient, smpl.body_pose, smpl.transl)
    verts, joints = ctx.body_model(*(torch.as_tensor(a) for a in params))
    return smpl, verts.numpy().astype(np.float64), joints.numpy()


def _render(ctx, scene, verts_t, colours, K, w2c, light, ambient):
    people = [Mesh(vertices=v, faces=ctx.faces, face_colors=c, part_ids=ctx.part_ids, instance_id=p + 1)
              for p, (v, c) in enumerate(zip(verts_t, colours))]
    return ctx.renderer.render(scene + people, K, w2c, background=ctx.background,
                               light_dir_cam=w2c[:3, :3] @ light, ambient=ambient, with_normal=False)


def render_frames(ctx: WorldContext, scene: list[Mesh], verts: np.ndarray, colours: list[np.ndarray], cam,
                  light: np.ndarray, ambient: float) -> dict:
    """Video, clean plate, person mask (0/255), part (id + 1) and instance (person + 1) maps of posed people
    `verts` (P, F, V, 3) in `scene`, seen by `cam` (a CameraPath); uint8 arrays (F, H, W[, 3])."""
    F, H, W = cam.K.shape[0], ctx.renderer.height, ctx.renderer.width
    video = np.empty((F, H, W, 3), np.uint8)
    plate, mask = np.empty_like(video), np.empty((F, H, W), np.uint8)
    parts, inst = np.empty((F, H, W), np.uint8), np.empty((F, H, W), np.uint8)
    for t in range(F):
        out = _render(ctx, scene, verts[:, t], colours, cam.K[t], cam.w2c[t], light, ambient)
        video[t], parts[t], inst[t] = out.rgb, out.part, out.instance
        mask[t] = np.where(out.instance > 0, 255, 0)
        if t == 0 or cam.kind != "static":
            plate[t] = _render(ctx, scene, [], [], cam.K[t], cam.w2c[t], light, ambient).rgb
        else:
            plate[t] = plate[0]
    return dict(video=video, bg=plate, mask=mask, parts=parts, instance=inst)


def make_clip(ctx: WorldContext, preset: Preset, split: str, index: int, seed: int = 0,
              identities: list[int] | None = None, motions: list[str] | None = None) -> dict:
    """Render one clip; returns arrays and metadata (see the module docstring for what they mean).
    `identities` / `motions` override the random choice of people / motions (tests)."""
    rng = clip_rng(seed, split, index)
    F, H, W = preset.num_frames, preset.height, preset.width
    ids = identity_split(preset.train_identities, preset.val_identities)[split]
    num_people = (preset.people_cycle[index % len(preset.people_cycle)] if preset.people_cycle
                  else int(rng.choice([1, 2, 3], p=preset.people_weights)))
    if identities is None:
        identities = [int(i) for i in rng.choice(ids, size=num_people, replace=False)]
    who = list(identities)
    idents = [make_identity(i) for i in who]
    betas = np.stack([i.betas for i in idents])
    people = plan_people(rng, len(who), F, preset.fps, motions, pool=preset.motion_pool)
    smpl, verts, joints = _pose(ctx, betas, people)  # verts (P, F, V, 3)
    colours = [ctx.painter.face_colors(i) for i in idents]
    scene = make_scene(rng)
    centre, radius = bounding_sphere(verts[:, :, ::20].reshape(-1, 3))
    kind = str(rng.choice(CAMERA_KINDS))
    cam = make_camera(rng, kind, F, preset.fps, H, W, centre, radius)
    eye = -cam.w2c[0, :3, :3].T @ cam.w2c[0, :3, 3]
    light, ambient = light_direction(rng, towards=eye - centre), float(rng.uniform(0.35, 0.5))
    frames = render_frames(ctx, scene, verts, colours, cam, light, ambient)

    ref_motions = reference_pose(len(who), rng)
    ref_smpl, ref_verts, _ = _pose(ctx, betas, ref_motions)
    c, r = bounding_sphere(ref_verts[:, 0, ::20].reshape(-1, 3))
    ref_cam = make_camera(rng, "static", 1, preset.fps, H, W, c, r, azimuth=rng.uniform(-0.4, 0.4))
    ref = _render(ctx, scene, ref_verts[:, 0], colours, ref_cam.K[0], ref_cam.w2c[0], light, ambient).rgb

    meta = {"fps": preset.fps, "gender": "neutral", "subject": "+".join(f"toy{i:04d}" for i in who),
            "source": "isa4d toy world", "license": "CC0-1.0", "split": split, "identities": who,
            "motions": [m.name for m in people], "camera": kind, "fov_y": cam.fov_y, "seed": seed, "index": index}
    return dict(**frames, smpl=smpl,
                cam=CameraSequence(cam.K.astype(np.float32), cam.w2c.astype(np.float32)), joints=joints, meta=meta,
                ref=ref, ref_smpl=ref_smpl, ref_K=ref_cam.K[0], ref_w2c=ref_cam.w2c[0])


def encode_clip(clip: dict, key: str, crf: int = 20) -> dict:
    """The contract sample (bytes per key) of a clip from :func:`make_clip`."""
    png = io.BytesIO()
    Image.fromarray(clip["ref"]).save(png, format="PNG", optimize=True)
    rs = clip["ref_smpl"]
    sample = encode_sample(
        key, clip["video"], clip["smpl"], clip["cam"], clip["meta"], bg=clip["bg"], mask=clip["mask"],
        ref_png=png.getvalue(), crf=crf,
        ref_npz=dict(K=clip["ref_K"].astype(np.float32), w2c=clip["ref_w2c"].astype(np.float32), betas=rs.betas,
                     global_orient=rs.global_orient, body_pose=rs.body_pose, transl=rs.transl),
    )
    sample["parts.npz"] = npz_bytes(compressed=True, parts=clip["parts"], instance=clip["instance"])
    return sample


# ----------------------------------------------------------------------------- processes and shards
_CTX: WorldContext | None = None


def _init_worker(body_dir: str, preset: Preset) -> None:
    global _CTX
    _CTX = WorldContext(body_dir, preset.height, preset.width, preset.samples)


def _job(args: tuple) -> dict:
    preset, split, index, seed = args
    clip = make_clip(_CTX, preset, split, index, seed)
    return encode_clip(clip, f"toy_{split}_{index:06d}", preset.crf)


def write_split(out: Path, split: str, preset: Preset, seed: int, body_dir, workers: int = 2) -> dict:
    """Render and write `split`'s clips to ``out/{split}-%06d.tar``; returns counts."""
    global _CTX
    n = preset.train_clips if split == "train" else preset.val_clips
    jobs = [(preset, split, i, seed) for i in range(n)]
    stats = {"clips": 0, "people": [0, 0, 0], "shards": [], "motions": {}, "cameras": {}}
    if workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("fork").Pool(workers, _init_worker, (str(body_dir), preset))
        results = pool.imap(_job, jobs, chunksize=1)
    else:
        pool = None
        _init_worker(str(body_dir), preset)
        results = map(_job, jobs)
    sink = None
    try:
        for i, sample in enumerate(track(results, f"toy world {split}", total=n, unit="clips")):
            if i % preset.clips_per_shard == 0:
                if sink is not None:
                    sink.close()
                path = out / f"{split}-{i // preset.clips_per_shard:06d}.tar"
                sink = wds.TarWriter(str(path), mtime=0)
                stats["shards"].append(path.name)
            sink.write(sample)
            meta = json.loads(sample["json"])
            stats["clips"] += 1
            stats["people"][len(meta["identities"]) - 1] += 1
            for m in meta["motions"]:
                stats["motions"][m] = stats["motions"].get(m, 0) + 1
            stats["cameras"][meta["camera"]] = stats["cameras"].get(meta["camera"], 0) + 1
    finally:
        if sink is not None:
            sink.close()
        if pool is not None:
            pool.close()
            pool.join()
        elif _CTX is not None:
            _CTX.close()
            _CTX = None
    return stats


def preset_dict(preset: Preset) -> dict:
    return asdict(preset)
