"""Identity: face boxes from projected SMPL head landmarks, dlib face-sim on photos shipped by scikit-image,
ArcFace's weight handling, body-part colour appearance."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from isa4d.metrics.appearance import PartAppearance, part_color_stats
from isa4d.metrics.identity import (
    OUT_OF_VIEW,
    TOO_SMALL,
    TURNED_AWAY,
    VISIBLE,
    FaceSimilarity,
    face_boxes,
    face_landmark_vertex_ids,
)

HAS_DLIB = all(importlib.util.find_spec(m) is not None for m in ("dlib", "face_recognition_models"))
HAS_SKIMAGE = importlib.util.find_spec("skimage") is not None

# Landmarks (nose, right eye, left eye, right ear, left ear) of a head facing the camera, camera axes (x right,
# y down, z forward), metres, relative to the head: ears 0.15 m apart, so the face box side is 0.9 x 0.15 m.
FRONTAL = np.array([[0.0, 0.02, -0.11], [-0.033, -0.01, -0.09], [0.033, -0.01, -0.09],
                    [-0.075, 0.0, 0.0], [0.075, 0.0, 0.0]])
BOX_CENTER_OFFSET = FRONTAL[:3].mean(0) + np.array([0.0, 0.1 * 0.9 * 0.15, 0.0])  # see face_boxes


def _rot_y(deg):
    a = math.radians(deg)
    return np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])


def head_for_box(box, f=500.0, size=(512, 512), yaw=0.0):
    """World landmarks (w2c = identity) whose face box, seen by K(f), is `box` (x0, y0, x1, y1)."""
    H, W = size
    K = np.array([[f, 0, (W - 1) / 2], [0, f, (H - 1) / 2], [0, 0, 1]])
    side = box[2] - box[0]
    z = 0.9 * 0.15 * f / side
    u, v = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    center = np.array([(u - K[0, 2]) * z / f, (v - K[1, 2]) * z / f, z])
    points = (FRONTAL - BOX_CENTER_OFFSET) @ _rot_y(yaw).T + center
    return torch.tensor(points, dtype=torch.float64), torch.tensor(K), torch.eye(4, dtype=torch.float64)


def test_face_boxes_geometry():
    cases = [((175, 76, 265, 166), 0.0, VISIBLE), ((175, 76, 265, 166), 70.0, TURNED_AWAY),
             ((175, 76, 265, 166), 30.0, VISIBLE), ((200, 200, 220, 220), 0.0, TOO_SMALL),
             ((530, 76, 620, 166), 0.0, OUT_OF_VIEW)]
    pts, Ks, w2cs = zip(*(head_for_box(box, yaw=yaw) for box, yaw, _ in cases))
    boxes, status = face_boxes(torch.stack(pts), torch.stack(Ks), torch.stack(w2cs), (512, 512))
    assert status.tolist() == [s for _, _, s in cases]
    np.testing.assert_allclose(boxes[0].numpy(), cases[0][0], atol=0.5)
    # a camera behind the head: turned away; behind the camera: out of view
    behind = torch.diag(torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64))
    behind[2, 3] = 2 * pts[0][:, 2].mean()
    _, status = face_boxes(pts[0][None], Ks[0][None], behind[None], (512, 512))
    assert status.item() == TURNED_AWAY
    _, status = face_boxes(-pts[0][None], Ks[0][None], w2cs[0][None], (512, 512))
    assert status.item() == OUT_OF_VIEW


def test_face_landmarks_on_toy_body_face_forward(toy_body_dir):
    """The toy body faces +z at rest: its landmarks give a visible face to a camera on +z and none from -z."""
    from isa4d.body import BodyModel

    ids = face_landmark_vertex_ids(toy_body_dir)
    body = BodyModel(toy_body_dir)
    verts, _ = body(torch.zeros(1, 10), torch.zeros(1, 1, 3), torch.zeros(1, 1, 69))
    pts = verts[0, 0, ids].double()
    head = pts.mean(0)
    front = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))  # camera on +z looking at -z
    front[:3, 3] = -front[:3, :3] @ (head + torch.tensor([0, 0, 0.6], dtype=torch.float64))
    back = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64))  # camera on -z looking at +z
    back[:3, 3] = -back[:3, :3] @ (head - torch.tensor([0, 0, 0.6], dtype=torch.float64))
    K = torch.tensor([[300.0, 0, 127.5], [0, 300.0, 127.5], [0, 0, 1]], dtype=torch.float64)
    _, status = face_boxes(pts[None].expand(2, 5, 3), K.expand(2, 3, 3), torch.stack([front, back]), (256, 256))
    assert status.tolist() == [VISIBLE, TURNED_AWAY]


def _skimage_photo(name: str) -> np.ndarray:
    from PIL import Image

    root = Path(list(importlib.util.find_spec("skimage").submodule_search_locations)[0]) / "data"
    return np.asarray(Image.open(root / name).convert("RGB"))


def _to_unit(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 127.5 - 1


@pytest.mark.skipif(not (HAS_DLIB and HAS_SKIMAGE), reason="needs dlib-bin, face_recognition_models, scikit-image")
def test_face_sim_separates_same_and_different_faces():
    """scikit-image ships two photos of people: the astronaut (Eileen Collins) and the cameraman. Same face: the
    astronaut photo mirrored, shrunk, gamma-changed and moved; different: the cameraman (both in grey)."""
    from PIL import Image

    astronaut = _skimage_photo("astronaut.png")
    ref_box = (175, 76, 265, 166)  # where dlib's own detector finds her face
    # same person, another image: mirrored, scaled to 70 %, darker, pasted at (100, 150) on a grey canvas
    small = np.asarray(Image.fromarray(astronaut[:, ::-1]).resize((358, 358), Image.BILINEAR)).astype(np.float64)
    same = np.full((512, 512, 3), 128, np.uint8)
    same[150:508, 100:458] = np.round(255 * (small / 255) ** 1.4).astype(np.uint8)
    s = 358 / 512
    same_box = (100 + (512 - 265) * s, 150 + 76 * s, 100 + (512 - 175) * s, 150 + 166 * s)
    camera = _skimage_photo("camera.png")
    grey = np.repeat(np.asarray(Image.fromarray(astronaut).convert("L"))[..., None], 3, axis=-1)
    frames = [(same, same_box, 0), (grey, ref_box, 0), (camera, (185, 105, 265, 185), 1)]

    ref_pts, ref_K, ref_w2c = head_for_box(ref_box)
    video = torch.stack([_to_unit(f) for f, _, _ in frames])[None]  # (1, 3, 3, 512, 512)
    pts, Ks, w2cs = zip(*(head_for_box(box) for _, box, _ in frames))
    scores = []
    for t in range(3):  # one metric per frame, to read each frame's score
        metric = FaceSimilarity()
        metric.update(video[:, t:t + 1], torch.stack(pts)[None, t:t + 1], torch.stack(Ks)[None, t:t + 1],
                      torch.stack(w2cs)[None, t:t + 1], _to_unit(astronaut)[None], ref_pts[None], ref_K[None],
                      ref_w2c[None])
        out = metric.compute()
        assert out["num_frames"] == 1
        scores.append((out["face_dist"].item(), out["face_sim"].item()))
    (d_same, s_same), (d_grey, s_grey), (d_other, s_other) = scores
    print("face-sim (dist, cos): same", scores[0], "grey", scores[1], "other", scores[2])
    assert d_same < 0.4 and d_grey < 0.4 and d_other > 0.6, scores  # dlib's same-person threshold is 0.6
    assert min(s_same, s_grey) > s_other + 0.1, scores


@pytest.mark.skipif(not HAS_DLIB, reason="needs dlib-bin and face_recognition_models")
def test_face_sim_counts_excluded_frames_and_clips():
    calls = []
    stub = lambda image, box: (calls.append(tuple(box)), np.ones(128))[1]  # noqa: E731
    metric = FaceSimilarity(embedder=stub)
    boxes_yaws = [((175, 76, 265, 166), 0.0), ((175, 76, 265, 166), 80.0), ((250, 250, 260, 260), 0.0),
                  ((600, 76, 690, 166), 0.0)]
    pts, Ks, w2cs = (torch.stack(x)[None] for x in zip(*(head_for_box(b, yaw=y) for b, y in boxes_yaws)))
    ref_pts, ref_K, ref_w2c = head_for_box((175, 76, 265, 166))
    video = torch.zeros(1, 4, 3, 512, 512)
    ref = torch.zeros(1, 3, 512, 512)
    metric.update(video, pts, Ks, w2cs, ref, ref_pts[None], ref_K[None], ref_w2c[None])
    metric.update(video, pts, Ks, w2cs, ref, ref_pts[None], ref_K[None], ref_w2c[None], torch.tensor([False]))
    out = metric.compute()
    assert (out["num_frames"], out["num_turned_away"], out["num_too_small"], out["num_out_of_view"]) == (1, 1, 1, 1)
    assert out["num_clips_no_reference"] == 1 and out["face_sim"].item() == pytest.approx(1.0)
    assert len(calls) == 2  # the reference and the one visible frame


def test_arcface_needs_weights_and_runs_with_them(tmp_path):
    from isa4d.metrics.arcface import ArcFaceWeightsMissing, IResNet, load_iresnet

    with pytest.raises(ArcFaceWeightsMissing, match="user-provided weights"):
        load_iresnet(tmp_path / "backbone.pth")
    tiny = (1, 1, 1, 1)  # IResNet-100 is (3, 13, 30, 3): same keys per block, 65M parameters
    torch.save(IResNet(tiny).state_dict(), tmp_path / "backbone.pth")
    net = load_iresnet(tmp_path / "backbone.pth", tiny)
    assert net(torch.zeros(2, 3, 112, 112)).shape == (2, 512)
    assert sum(p.numel() for p in IResNet().parameters()) > 60e6
    if HAS_DLIB and HAS_SKIMAGE:
        from isa4d.metrics.arcface import ArcFaceEmbedder

        emb = ArcFaceEmbedder(tmp_path / "backbone.pth", layers=tiny)
        crop = emb.align(_skimage_photo("astronaut.png"), (175, 76, 265, 166))
        assert crop.shape == (1, 3, 112, 112) and crop.std() > 0.05
        assert np.linalg.norm(emb(_skimage_photo("astronaut.png"), (175, 76, 265, 166))) == pytest.approx(1.0)


def test_part_color_stats_against_numpy():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 10, 12, generator=g) * 2 - 1
    parts = torch.randint(-1, 4, (2, 10, 12), generator=g)
    count, mean, std = part_color_stats(img, parts, 4)
    for n in range(2):
        for p in range(4):
            sel = img[n].permute(1, 2, 0)[parts[n] == p].double().numpy()
            assert count[n, p] == len(sel)
            np.testing.assert_allclose(mean[n, p].numpy(), sel.mean(0), atol=1e-12)
            np.testing.assert_allclose(std[n, p].numpy(), sel.std(0), atol=1e-9)


def test_part_appearance_zero_for_same_colours_grows_with_change():
    g = torch.Generator().manual_seed(1)
    parts = torch.full((1, 3, 16, 16), -1)
    parts[:, :, 2:8, 2:14] = 0
    parts[:, :, 8:14, 2:14] = 1
    parts[0, 2] = -1  # a frame with no body visible
    ref_parts = parts[:, 0]
    ref = torch.rand(1, 3, 16, 16, generator=g) - 0.5  # room for +0.5 without clamping
    video = ref[:, None].repeat(1, 3, 1, 1, 1)
    metric = PartAppearance()
    metric.update(video, parts, ref, ref_parts)
    out = metric.compute()
    assert out["part_appearance"].item() == pytest.approx(0.0, abs=1e-12)
    assert (out["num_frames"], out["num_frames_excluded"], out["parts_per_frame"].item()) == (2, 1, 2.0)
    shifted = video.clone()
    shifted[:, :, 0, 8:14] += 0.5  # part 1's red channel brighter by 0.5
    metric = PartAppearance()
    metric.update(shifted, parts, ref, ref_parts)
    assert metric.compute()["part_appearance"].item() == pytest.approx(0.25, abs=1e-6)  # (0 + 0.5) / 2 parts
