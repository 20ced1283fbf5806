"""LPIPS perceptual distance (Zhang et al., CVPR 2018), VGG-16 variant, loading weights from local files.

No weights are downloaded: `vgg_path` is torchvision's VGG-16 ImageNet checkpoint (`vgg16-397923af.pth`, keys
`features.N.weight`) and `lin_path` the LPIPS v0.1 linear heads (`vgg.pth` from the lpips package, keys
`linK.model.1.weight`). Both are plain state dicts; torchvision itself is not needed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

# VGG-16 "features": conv widths, "M" = max-pool. LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (3, 8, 15, 22, 29)  # index in torchvision's `features` of the ReLU after each tapped conv
_WIDTHS = (64, 128, 256, 512, 512)


class LPIPSWeightsMissing(FileNotFoundError):
    pass


def _vgg_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    c = 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
            c = v
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """Perceptual distance between images in [-1, 1], (B, 3, H, W) -> (B,). Frozen; gradients flow to the inputs."""

    def __init__(self, vgg_path: str | None, lin_path: str | None):
        super().__init__()
        for name, path in (("vgg_path", vgg_path), ("lin_path", lin_path)):
            if not path or not Path(path).is_file():
                raise LPIPSWeightsMissing(
                    f"LPIPS needs local weights: {name}={path!r} is not a file. Provide torchvision's VGG-16 "
                    "checkpoint (vgg16-397923af.pth) as vgg_path and the lpips package's v0.1 vgg.pth as lin_path "
                    "(docs/vae.md), or set the perceptual loss weight to 0."
                )
        self.features = _vgg_features()[: _TAPS[-1] + 1]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _WIDTHS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self._load(vgg_path, lin_path)
        self.requires_grad_(False)
        self.eval()

    def _load(self, vgg_path: str, lin_path: str) -> None:
        vgg = torch.load(vgg_path, map_location="cpu", weights_only=True)
        feats = {k[len("features."):]: v for k, v in vgg.items() if k.startswith("features.")}
        wanted = set(self.features.state_dict())
        missing = wanted - set(feats)
        if missing:
            raise ValueError(f"{vgg_path}: not a torchvision VGG-16 state dict (missing features.{sorted(missing)[0]} ...)")
        self.features.load_state_dict({k: feats[k] for k in wanted})
        lin = torch.load(lin_path, map_location="cpu", weights_only=True)
        try:
            self.lins.load_state_dict({f"{i}.weight": lin[f"lin{i}.model.1.weight"] for i in range(5)})
        except KeyError as e:
            raise ValueError(f"{lin_path}: not an LPIPS v0.1 vgg.pth (missing {e})") from e

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # always frozen: no dropout/bn state to switch

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, y]).float()
        h = (h - self.shift) / self.scale
        dist = 0.0
        tap = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == _TAPS[tap]:
                a, b = h.chunk(2)
                a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
                b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
                dist = dist + self.lins[tap]((a - b) ** 2).mean(dim=(1, 2, 3))
                tap += 1
        return dist


def perceptual_video(lpips: LPIPS, x: torch.Tensor, y: torch.Tensor, max_frames: int | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean LPIPS over frames of videos (B, C, T, H, W); optionally over a random subset of `max_frames` frames."""
    t = x.shape[2]
    idx = torch.arange(t, device=x.device)
    if max_frames is not None and t > max_frames:
        idx = torch.randperm(t, generator=generator)[:max_frames].to(x.device)
    xs = x.index_select(2, idx).transpose(1, 2).flatten(0, 1)  # (B*t', C, H, W)
    ys = y.index_select(2, idx).transpose(1, 2).flatten(0, 1)
    return lpips(xs, ys).mean()
