"""Pose adherence and part appearance on rendered toy bodies: silhouettes from a background plate vs the
conditioning SMPL's rendered silhouette; IoU 1 for the ground truth, lower when the pose moves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from isa4d.metrics.appearance import PartAppearance
from isa4d.metrics.body_maps import NUM_PARTS, render_body_maps
from isa4d.metrics.pose import SilhouetteIoU, silhouette_from_background
from isa4d.render import Mesh, MeshRenderer, RenderError

try:
    MeshRenderer(8, 8).close()
except RenderError as _e:  # pragma: no cover - environment dependent
    pytest.skip(f"headless OpenGL (EGL) unavailable: {_e}", allow_module_level=True)

H = W = 96
PART_COLOURS = np.random.default_rng(0).uniform(0.1, 0.9, (NUM_PARTS, 3))


@pytest.fixture(scope="module")
def scene(toy_body_dir):
    """Two frames of one toy body (arms slightly lowered, second frame turned) seen from 2.5 m, and the renderer."""
    from isa4d.body import BodyModel

    body = BodyModel(toy_body_dir)
    pose = torch.zeros(1, 2, 69)
    pose[:, :, 15 * 3 + 2], pose[:, :, 16 * 3 + 2] = -0.5, 0.5  # shoulders (joints 16, 17): arms down a bit
    orient = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.6, 0.0]]])
    verts, _ = body(torch.zeros(1, 10), orient, pose, torch.zeros(1, 2, 3))  # (1, 2, V, 3)
    w2c = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))  # camera on +z looking at the body's front
    w2c[1, 3], w2c[2, 3] = -0.3, 2.5  # aimed at the body's middle (y = -0.3)
    K = torch.tensor([[100.0, 0, (W - 1) / 2], [0, 100.0, (H - 1) / 2], [0, 0, 1]])
    with MeshRenderer(H, W) as renderer:
        yield {"verts": verts[None], "faces": body.faces, "parts": body.part_ids, "K": K.expand(1, 2, 3, 3),
               "w2c": w2c.expand(1, 2, 4, 4), "renderer": renderer}


def _render_video(scene, background: np.ndarray, verts=None) -> torch.Tensor:
    """The body with per-part colours over `background` (H, W, 3) uint8: (1, T, 3, H, W) in [-1, 1]."""
    verts = scene["verts"] if verts is None else verts
    faces, parts = scene["faces"].numpy(), scene["parts"].numpy()
    frames = []
    for t in range(verts.shape[2]):
        mesh = Mesh(vertices=verts[0, 0, t].numpy(), faces=faces, colors=PART_COLOURS[parts], part_ids=parts)
        out = scene["renderer"].render([mesh], scene["K"][0, t].numpy(), scene["w2c"][0, t].numpy(),
                                       background=background, ambient=0.8)
        frames.append(torch.from_numpy(out.rgb.copy()).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(frames)[None]


def _plate(seed=1) -> np.ndarray:
    """A dark, slightly noisy background plate, far from the body's shaded colours."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(12, 3, (H, W, 3)), 0, 255).astype(np.uint8)


def test_body_maps_ids_and_coverage(scene):
    sil, parts = render_body_maps(scene["renderer"], scene["verts"], scene["faces"], scene["parts"], scene["K"],
                                  scene["w2c"])
    assert sil.shape == parts.shape == (1, 2, H, W) and sil.dtype == torch.bool
    assert torch.equal(sil, parts >= 0)
    assert 0.05 < sil.float().mean() < 0.5
    assert set(parts[sil].unique().tolist()) <= set(range(NUM_PARTS)) and len(parts[sil].unique()) >= 10
    no_one = render_body_maps(scene["renderer"], scene["verts"], scene["faces"], scene["parts"], scene["K"],
                              scene["w2c"], person_mask=torch.zeros(1, 1, dtype=torch.bool))[0]
    assert not no_one.any()


def test_pose_iou_is_one_for_ground_truth_and_drops_when_pose_moves(scene):
    plate = _plate()
    bg = torch.from_numpy(plate).permute(2, 0, 1).float().div(127.5).sub(1).expand(1, 2, 3, H, W)
    target, _ = render_body_maps(scene["renderer"], scene["verts"], scene["faces"], scene["parts"], scene["K"],
                                 scene["w2c"])
    video = _render_video(scene, plate)

    exact = SilhouetteIoU()
    exact.update(target, target)
    assert exact.compute()["pose_iou"].item() == 1.0
    truth = SilhouetteIoU()
    truth.update_from_background(video, bg, target, has_bg=torch.tensor([True]))
    gt = truth.compute()
    assert gt["pose_iou"].item() > 0.97 and gt["num_frames"] == 2, gt  

    scores = []
    for dx in (0.05, 0.15, 0.4):  # the generated person stands dx metres to the side of the condition
        moved = scene["verts"] + torch.tensor([dx, 0.0, 0.0])
        metric = SilhouetteIoU()
        metric.update_from_background(_render_video(scene, plate, moved), bg, target)
        scores.append(metric.compute()["pose_iou"].item())
    assert gt["pose_iou"].item() > scores[0] > scores[1] > scores[2], scores
    assert scores[2] < 0.3


def test_pose_iou_skips_clips_without_plate():
    masks = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    masks[:, :, 2:6, 2:6] = True
    metric = SilhouetteIoU()
    metric.update(masks, masks, valid=torch.tensor([True, False]))
    out = metric.compute()
    assert (out["pose_iou"].item(), out["num_frames"], out["num_skipped_clips"]) == (1.0, 1, 1)


def test_silhouette_from_background_threshold_and_noise():
    bg = torch.zeros(1, 1, 3, 16, 16)
    video = bg.clone()
    video[..., 4:10, 4:10] = 0.5  # a person
    video[..., 0, 12, 12] = 0.9  # one noisy pixel
    video[..., 1, 14, 2] = 0.1  # below the threshold
    video[..., 2, 12, 1:8] = -0.6  # a 1-pixel-thin limb
    mask = silhouette_from_background(video, bg)
    expected = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    expected[..., 4:10, 4:10] = True
    expected[..., 12, 2:7] = True  # its two tips have one neighbour each
    assert torch.equal(mask, expected)


def test_part_appearance_on_rendered_bodies(scene):
    plate = _plate()
    _, parts = render_body_maps(scene["renderer"], scene["verts"], scene["faces"], scene["parts"], scene["K"],
                                scene["w2c"])
    video = _render_video(scene, plate)
    same = PartAppearance()
    same.update(video, parts, video[:, 0], parts[:, 0])
    out = same.compute()
    assert out["num_frames"] == 2 and out["parts_per_frame"] >= 10
    global PART_COLOURS
    saved = PART_COLOURS.copy()
    try:
        PART_COLOURS = np.clip(saved + [0.3, -0.2, 0.0], 0, 1)  # another person's clothes
        other = _render_video(scene, plate)
    finally:
        PART_COLOURS = saved
    changed = PartAppearance()
    changed.update(other, parts, video[:, 0], parts[:, 0])
    # frame 0 is the reference itself (0); frame 1 is turned, its shading differs a little
    assert out["part_appearance"] < 0.1 < changed.compute()["part_appearance"], (out, changed.compute())
