"""ArcFace face embedding (Deng et al., CVPR 2019) with the IResNet-100 backbone, an optional face-sim embedder.

No package ships ArcFace weights: pass the path of an insightface `arcface_torch` IResNet-100 state dict (e.g.
`ms1mv3_arcface_r100_fp16/backbone.pth`; keys `conv1.weight`, `layer1.0.bn1.weight`, ..., `features.weight`).
The architecture follows insightface's `recognition/arcface_torch/backbones/iresnet.py`. Faces are aligned to
ArcFace's 112x112 five-point template by a similarity transform fitted to dlib's 5-point landmarks (eye centres
and the base of the nose, mapped to the template's eyes and a point just below its nose tip): close to, but not
exactly, insightface's own alignment, which uses eyes, nose tip and mouth corners from its detector.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from isa4d.metrics.identity import DlibFaceEmbedder, _dlib_models

IRESNET100_LAYERS = (3, 13, 30, 3)
ARCFACE_SIZE = 112
# template points in the 112x112 crop: eye centre (image left), eye centre (image right), base of the nose
_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 77.0]])


class ArcFaceWeightsMissing(FileNotFoundError):
    pass


class IBasicBlock(nn.Module):
    """BN -> 3x3 conv -> BN -> PReLU -> 3x3 conv (stride) -> BN, plus the (projected) input."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes, eps=1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """Aligned faces (B, 3, 112, 112) RGB in [-1, 1] -> embeddings (B, 512) (not normalised)."""

    def __init__(self, layers: tuple[int, ...] = IRESNET100_LAYERS, num_features: int = 512):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stage = [IBasicBlock(inplanes, planes, stride=2)] + [IBasicBlock(planes, planes) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))  # (B, 64, 112, 112)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 512, 7, 7)
        x = self.dropout(torch.flatten(self.bn2(x), 1))  # (B, 25088)
        return self.features(self.fc(x))  # (B, 512)


def load_iresnet(weights_path: str | Path | None, layers: tuple[int, ...] = IRESNET100_LAYERS) -> IResNet:
    """IResNet with the weights at `weights_path`, frozen, eval; a clear error when the file is missing."""
    if not weights_path or not Path(weights_path).is_file():
        raise ArcFaceWeightsMissing(
            f"ArcFace needs user-provided weights: {weights_path!r} is not a file. Pass the path of an insightface "
            "arcface_torch IResNet-100 state dict (e.g. ms1mv3_arcface_r100_fp16/backbone.pth); no package ships "
            "them, and the default face-sim embedder (dlib) needs none.")
    model = IResNet(layers)
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights_path}: not an IResNet{'-100' if layers == IRESNET100_LAYERS else ''} state dict "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.requires_grad_(False).eval()


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama, 1991) mapping points src (k, 2) onto dst (k, 2): (2, 3) matrix."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(d.T @ s / len(src))
    e = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    R = u @ e @ vt
    scale = (sig * np.diag(e)).sum() / s.var(0).sum()
    return np.concatenate([scale * R, (mu_d - scale * R @ mu_s)[:, None]], axis=1)


class ArcFaceEmbedder(nn.Module):
    """Face-sim embedder: `embedder(image uint8 (H, W, 3), box)` -> unit (512,) ArcFace embedding (numpy)."""

    def __init__(self, weights_path: str | Path | None, models_dir: str | Path | None = None,
                 layers: tuple[int, ...] = IRESNET100_LAYERS):
        super().__init__()
        self.network = load_iresnet(weights_path, layers)
        self.landmarks = DlibFaceEmbedder(models_dir)  # for dlib's 5-point shape predictor

    def align(self, image: np.ndarray, box) -> torch.Tensor:
        """The face in `box`, warped to ArcFace's 112x112 template: (1, 3, 112, 112) in [-1, 1]."""
        dlib, predictor, _ = _dlib_models(self.landmarks.models_dir)
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        shape = predictor(image, dlib.rectangle(x0, y0, x1, y1))
        p = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], dtype=np.float64)
        src = np.stack([p[2:4].mean(0), p[0:2].mean(0), p[4]])  # image-left eye, image-right eye, nose base
        A = similarity_transform(_TEMPLATE, src)  # template pixel -> image pixel
        device = next(self.network.parameters()).device
        jj, ii = torch.meshgrid(torch.arange(ARCFACE_SIZE, dtype=torch.float64),
                                torch.arange(ARCFACE_SIZE, dtype=torch.float64), indexing="ij")
        pts = torch.stack([ii, jj, torch.ones_like(ii)], -1) @ torch.from_numpy(A).T  # (112, 112, 2) image pixels
        H, W = image.shape[:2]
        grid = torch.stack([(2 * pts[..., 0] + 1) / W - 1, (2 * pts[..., 1] + 1) / H - 1], -1)
        img = torch.from_numpy(np.array(image, dtype=np.float64)).permute(2, 0, 1)[None] / 127.5 - 1
        crop = F.grid_sample(img, grid[None], mode="bilinear", padding_mode="zeros", align_corners=False)
        return crop.float().to(device)

    @torch.no_grad()
    def forward(self, image: np.ndarray, box) -> np.ndarray:
        e = self.network(self.align(image, box))[0].double()
        return (e / e.norm().clamp(min=1e-12)).cpu().numpy()
