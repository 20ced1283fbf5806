"""Identity as face similarity ("face-sim"): the generated person's face against the reference image's face.

The face is located by geometry, not by a detector (a detector that misses badly generated faces would drop
exactly the frames that should score low): five landmarks of the posed SMPL head (nose, eyes, ears) are projected
with the frame's camera. Frames where the face is out of view, turned away from the camera (angle between the
head's facing direction and the direction to the camera above `max_angle`) or smaller than `min_face_px` are
excluded and counted. In each kept face box dlib's 5-point shape predictor places the landmarks and dlib's
ResNet (`dlib_face_recognition_resnet_model_v1`, 128-d, from the `face_recognition_models` package, run with
the `dlib-bin` wheel) embeds the aligned face. face-sim is the cosine similarity of the two embeddings; face-dist
their Euclidean distance (dlib's own measure: below 0.6 counts as the same person). ArcFace (`arcface.py`) can
replace the embedder where its weights are provided.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import nn

from isa4d.metrics.network_metric import NetworkMetric

FACE_LANDMARKS = ("nose", "right_eye", "left_eye", "right_ear", "left_ear")
_SMPL_KEYS = ("nose", "reye", "leye", "rear", "lear")  # smplx's vertex_ids names of FACE_LANDMARKS
VISIBLE, OUT_OF_VIEW, TURNED_AWAY, TOO_SMALL = 0, 1, 2, 3
DLIB_MATCH_THRESHOLD = 0.6
MODELS_HINT = "pip install dlib-bin face_recognition_models"


def face_landmark_vertex_ids(model_dir, gender: str = "neutral") -> list[int]:
    """Vertex indices of FACE_LANDMARKS on the body model: the file's own `vertex_ids` (the toy body stores them)
    or smplx's defaults for SMPL (nose 332, eyes 6260/2800, ears 4071/583)."""
    from smplx.vertex_ids import vertex_ids as smplx_ids

    from isa4d.body.smpl import load_model_data

    ids = load_model_data(model_dir, gender).get("vertex_ids") or smplx_ids["smplh"]
    return [int(ids[k]) for k in _SMPL_KEYS]


def face_boxes(points: torch.Tensor, K: torch.Tensor, w2c: torch.Tensor, image_size: tuple[int, int],
               max_angle: float = 45.0, min_face_px: float = 32.0, box_scale: float = 0.9,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Face boxes of heads seen by cameras.

    points (N, 5, 3) world FACE_LANDMARKS, K (N, 3, 3), w2c (N, 4, 4), image_size (H, W).
    Returns boxes (N, 4) float pixels (x0, y0, x1, y1) and status (N,) long: VISIBLE, OUT_OF_VIEW (eyes or nose
    behind the camera or outside the image), TURNED_AWAY (facing direction more than `max_angle` degrees from the
    direction to the camera) or TOO_SMALL (box side below `min_face_px`). The box is a square of side
    box_scale x ear-to-ear distance (about the face box of dlib's detector), centred a tenth of that below the
    eyes-and-nose centroid.
    """
    p = points.double()
    nose, eyes, ears = p[:, 0], p[:, 1:3], p[:, 3:5]
    across = ears[:, 1] - ears[:, 0]  # right ear -> left ear
    width = across.norm(dim=-1)  # (N,)
    x_axis = across / width[:, None].clamp(min=1e-9)
    forward = nose - ears.mean(dim=1)
    forward = forward - (forward * x_axis).sum(-1, keepdim=True) * x_axis
    forward = forward / forward.norm(dim=-1, keepdim=True).clamp(min=1e-9)
    up = torch.cross(forward, x_axis, dim=-1)
    center = torch.cat([eyes, nose[:, None]], dim=1).mean(dim=1) - 0.1 * box_scale * width[:, None] * up  # (N, 3)

    R, t = w2c[:, :3, :3].double(), w2c[:, :3, 3].double()
    cam_center = -(R.transpose(1, 2) @ t[..., None])[..., 0]  # (N, 3) world
    to_cam = cam_center - center
    cos = (forward * to_cam).sum(-1) / to_cam.norm(dim=-1).clamp(min=1e-9)

    def project(x):  # (N, k, 3) world -> (N, k, 2) pixels, (N, k) depth
        xc = x @ R.transpose(1, 2) + t[:, None]
        uvw = xc @ K.double().transpose(1, 2)
        return uvw[..., :2] / uvw[..., 2:].clamp(min=1e-9), xc[..., 2]

    uv, z = project(torch.cat([center[:, None], nose[:, None], eyes], dim=1))  # (N, 4, 2), (N, 4)
    H, W = image_size
    inside = ((z > 1e-3) & (uv[..., 0] >= -0.5) & (uv[..., 0] <= W - 0.5) & (uv[..., 1] >= -0.5)
              & (uv[..., 1] <= H - 0.5)).all(dim=1)
    f = (K[:, 0, 0] * K[:, 1, 1]).double().abs().sqrt()
    side = box_scale * width * f / z[:, 0].clamp(min=1e-3)
    boxes = torch.cat([uv[:, 0] - side[:, None] / 2, uv[:, 0] + side[:, None] / 2], dim=-1)
    status = torch.full_like(side, VISIBLE, dtype=torch.long)
    status[side < min_face_px] = TOO_SMALL
    status[cos < math.cos(math.radians(max_angle))] = TURNED_AWAY
    status[~inside] = OUT_OF_VIEW
    return boxes.float(), status


def face_recognition_models_dir() -> Path:
    """The `face_recognition_models` package's model folder, found without importing it (its __init__ needs
    pkg_resources, which current setuptools no longer ships)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"face-sim needs dlib's face models from `face_recognition_models`: {MODELS_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


@functools.lru_cache(maxsize=4)
def _dlib_models(models_dir: str):
    try:
        import dlib
    except ImportError as e:
        raise ImportError(f"face-sim runs dlib's face models through the `dlib-bin` wheel: {MODELS_HINT}") from e
    root = Path(models_dir)
    files = [root / "shape_predictor_5_face_landmarks.dat", root / "dlib_face_recognition_resnet_model_v1.dat"]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"dlib face model {f} not found: {MODELS_HINT}, or pass models_dir")
    return dlib, dlib.shape_predictor(str(files[0])), dlib.face_recognition_model_v1(str(files[1]))


class DlibFaceEmbedder:
    """dlib's 128-d face descriptor of the face in a box: 5-point landmarks, aligned 150x150 chip, ResNet."""

    def __init__(self, models_dir: str | Path | None = None):
        self.models_dir = str(models_dir or face_recognition_models_dir())
        _dlib_models(self.models_dir)  # fail early, with the fix in the message

    def __call__(self, image: np.ndarray, box) -> np.ndarray:
        """image (H, W, 3) uint8 RGB, box (x0, y0, x1, y1) pixels -> (128,) float64."""
        dlib, predictor, recognizer = _dlib_models(self.models_dir)
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        shape = predictor(image, dlib.rectangle(x0, y0, x1, y1))
        return np.asarray(recognizer.compute_face_descriptor(image, shape, 0, 0.25), dtype=np.float64)


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, rounded (no wrap-around)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return np.ascontiguousarray(rearrange(x, "n c h w -> n h w c").cpu().numpy())


class FaceSimilarity(NetworkMetric):
    """face-sim: cosine similarity of face embeddings, generated frames vs the reference image (higher is better).

    `update(videos, head_points, K, w2c, reference, reference_head_points, reference_K, reference_w2c,
    reference_valid=None)`: videos (B, T, 3, H, W) and reference (B, 3, H', W') in [-1, 1]; head_points
    (B, T, 5, 3) world FACE_LANDMARKS of the posed body in each frame (`face_landmark_vertex_ids` picks them from
    the vertices); K (B, T, 3, 3), w2c (B, T, 4, 4); reference_head_points (B, 5, 3), reference_K (B, 3, 3),
    reference_w2c (B, 4, 4) for the reference image; reference_valid (B,) bool (e.g. Batch.ref_has_camera).
    Several people: call once per person. Clips whose reference face cannot be located are excluded and counted.
    `compute()` -> `face_sim`, `face_dist`, `face_match` (fraction of frames with distance below
    `match_threshold`), `num_frames` (scored) and the excluded counts `num_out_of_view`, `num_turned_away`,
    `num_too_small`, `num_clips_no_reference`.

    embedder: a callable (image uint8 (H, W, 3), box) -> embedding (numpy); default dlib's (`DlibFaceEmbedder`),
    or `arcface.ArcFaceEmbedder` (then set `match_threshold` for its unit-norm embeddings).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False
    COUNTS = ("num_frames", "num_out_of_view", "num_turned_away", "num_too_small", "num_clips_no_reference")

    def __init__(self, embedder=None, max_angle: float = 45.0, min_face_px: float = 32.0, box_scale: float = 0.9,
                 match_threshold: float = DLIB_MATCH_THRESHOLD):
        super().__init__()
        embedder = embedder if embedder is not None else DlibFaceEmbedder()
        if isinstance(embedder, nn.Module):
            self.set_network("embedder", embedder)  # e.g. ArcFace: kept out of state_dict(), moved by .to()
        else:
            self.embedder = embedder
        self.max_angle, self.min_face_px, self.box_scale = max_angle, min_face_px, box_scale
        self.match_threshold = match_threshold
        for name in ("sim_sum", "dist_sum", "match_sum"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        for name in self.COUNTS:
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _boxes(self, points, K, w2c, size):
        return face_boxes(points, K, w2c, size, self.max_angle, self.min_face_px, self.box_scale)

    @torch.no_grad()
    def update(self, videos: torch.Tensor, head_points: torch.Tensor, K: torch.Tensor, w2c: torch.Tensor,
               reference: torch.Tensor, reference_head_points: torch.Tensor, reference_K: torch.Tensor,
               reference_w2c: torch.Tensor, reference_valid: torch.Tensor | None = None) -> None:
        B, T = videos.shape[:2]
        ref_boxes, ref_status = self._boxes(reference_head_points, reference_K, reference_w2c, reference.shape[-2:])
        ref_ok = (ref_status == VISIBLE).cpu()
        if reference_valid is not None:
            ref_ok &= reference_valid.bool().cpu()
        boxes, status = self._boxes(head_points.flatten(0, 1), K.flatten(0, 1), w2c.flatten(0, 1), videos.shape[-2:])
        boxes, status = boxes.view(B, T, 4).cpu(), status.view(B, T).cpu()
        refs = to_uint8_hwc(reference)
        for b in range(B):
            if not ref_ok[b]:
                self.num_clips_no_reference += 1
                continue
            self.num_out_of_view += int((status[b] == OUT_OF_VIEW).sum())
            self.num_turned_away += int((status[b] == TURNED_AWAY).sum())
            self.num_too_small += int((status[b] == TOO_SMALL).sum())
            keep = (status[b] == VISIBLE).nonzero()[:, 0]
            if len(keep) == 0:
                continue
            e_ref = self.embedder(refs[b], ref_boxes[b])
            frames = to_uint8_hwc(videos[b, keep])
            for frame, t in zip(frames, keep.tolist()):
                e = self.embedder(frame, boxes[b, t])
                dist = float(np.linalg.norm(e - e_ref))
                self.sim_sum += float(e @ e_ref / max(np.linalg.norm(e) * np.linalg.norm(e_ref), 1e-12))
                self.dist_sum += dist
                self.match_sum += float(dist < self.match_threshold)
                self.num_frames += 1

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.num_frames
        nan = torch.tensor(math.nan, dtype=torch.float64)
        out = {"face_sim": self.sim_sum / n if n else nan, "face_dist": self.dist_sum / n if n else nan,
               "face_match": self.match_sum / n if n else nan}
        out.update({name: getattr(self, name) for name in self.COUNTS})
        return out
