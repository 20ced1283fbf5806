"""A torchmetrics `Metric` that runs a frozen network (I3D, LPIPS, ArcFace) without owning its weights.

The network is kept outside the module tree, so it never enters `state_dict()` (a LightningModule holding the
metric does not write 50 MB of I3D weights into every checkpoint, and loading old checkpoints stays strict), nor
`parameters()` (optimisers and FSDP never see it); `.to()`, `.cuda()` and friends still move it. It stays in
float32 whatever dtype the holder is cast to (Lightning's "bf16-true" casts the whole LightningModule), because
FVD and LPIPS are defined on float32 features.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchmetrics import Metric


class NetworkMetric(Metric):
    def set_network(self, name: str, network: nn.Module) -> None:
        """Attach `network` (frozen, eval) as attribute `name`, outside the module tree."""
        object.__setattr__(self, name, network.requires_grad_(False).eval())
        names = self.__dict__.setdefault("_network_names", [])
        if name not in names:
            names.append(name)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "NetworkMetric":
        for name in self.__dict__.get("_network_names", []):
            getattr(self, name)._apply(fn).float()
        return super()._apply(fn, *args, **kwargs)
