"""Metric states sync across two CPU processes (gloo) to the same values as one process seeing all the data."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from isa4d.metrics.appearance import PartAppearance
from isa4d.metrics.fvd import FVD
from isa4d.metrics.identity import FaceSimilarity
from isa4d.metrics.pose import SilhouetteIoU
from isa4d.metrics.reconstruction import VideoPSNR, VideoSSIM

NUM_CLIPS = 5  # uneven split: rank 0 gets clips 0, 2, 4 and rank 1 gets 1, 3


class PoolDetector(nn.Module):
    """A cheap stand-in for I3D: 4x4 average-pooled colours of the clip's mean frame (48-d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x.mean(dim=2), 4).flatten(1)


def _mean_colour_embedder(image: np.ndarray, box) -> np.ndarray:
    """A stand-in face embedder: the mean colour in the box plus a constant (cheap and deterministic)."""
    x0, y0, x1, y1 = (max(int(v), 0) for v in box)
    return np.concatenate([image[y0:y1, x0:x1].reshape(-1, 3).mean(0) / 255.0, [1.0]])


def _clip(i: int) -> dict[str, torch.Tensor]:
    """Clip i of a deterministic evaluation set (1 clip per batch)."""
    g = torch.Generator().manual_seed(100 + i)
    real = torch.rand(1, 16, 3, 32, 32, generator=g) * 2 - 1
    fake = (real + 0.3 * torch.randn(real.shape, generator=g)).clamp(-1, 1)
    mask = torch.rand(1, 16, 32, 32, generator=g) > 0.5
    parts = torch.randint(-1, 5, (1, 16, 32, 32), generator=g)
    # a frontal head 1.5 m in front of an identity camera with f = 400: a visible face, box side 36 px
    K = torch.tensor([[400.0, 0, 15.5], [0, 400.0, 15.5], [0, 0, 1]], dtype=torch.float64)
    head = torch.tensor([[0.0, 0.02, -0.11], [-0.033, -0.01, -0.09], [0.033, -0.01, -0.09], [-0.075, 0, 0],
                         [0.075, 0, 0]], dtype=torch.float64) + torch.tensor([0, 0, 1.5], dtype=torch.float64)
    return {"real": real, "fake": fake, "mask": mask, "pred_mask": mask ^ (torch.rand(mask.shape, generator=g) > 0.8),
            "parts": parts, "head": head.expand(1, 16, 5, 3), "K": K.expand(1, 16, 3, 3),
            "w2c": torch.eye(4, dtype=torch.float64).expand(1, 16, 4, 4)}


def _metrics() -> dict:
    return {"fvd": FVD(detector=PoolDetector()), "psnr": VideoPSNR(), "ssim": VideoSSIM(), "iou": SilhouetteIoU(),
            "parts": PartAppearance(), "face": FaceSimilarity(embedder=_mean_colour_embedder, min_face_px=8)}


def _evaluate(indices) -> dict[str, torch.Tensor]:
    metrics = _metrics()
    for i in indices:
        c = _clip(i)
        metrics["fvd"].update(c["real"], real=True)
        metrics["fvd"].update(c["fake"], real=False)
        metrics["psnr"].update(c["fake"], c["real"])
        metrics["ssim"].update(c["fake"], c["real"])
        metrics["iou"].update(c["pred_mask"], c["mask"])
        metrics["parts"].update(c["fake"], c["parts"], c["real"][:, 0], c["parts"][:, 0])
        metrics["face"].update(c["fake"], c["head"], c["K"], c["w2c"], c["real"][:, 0], c["head"][:, 0],
                               c["K"][:, 0], c["w2c"][:, 0])
    out = {}
    for name, metric in metrics.items():
        value = metric.compute()
        out.update({f"{name}/{k}": v for k, v in value.items()} if isinstance(value, dict) else {name: value})
    return out


def _worker(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        out = _evaluate(range(rank, NUM_CLIPS, world_size))  # compute() gathers every rank's states (in rank order,
        # so sums and the feature order differ from one process: equal up to round-off)
        if rank == 0:
            torch.save(out, result_file)
    finally:
        dist.destroy_process_group()


def test_metrics_sync_across_two_processes_equals_one(tmp_path):
    single = _evaluate(range(NUM_CLIPS))
    result_file = tmp_path / "two_processes.pt"
    mp.start_processes(_worker, args=(2, str(tmp_path / "pg_init"), str(result_file)), nprocs=2, join=True,
                       start_method="spawn")
    both = torch.load(result_file, weights_only=True)
    assert set(both) == set(single)
    assert single["fvd/num_real"] == NUM_CLIPS and single["face/num_frames"] == NUM_CLIPS * 16
    for key, value in single.items():
        assert torch.allclose(both[key].double(), value.double(), rtol=1e-6, atol=1e-9), (key, both[key], value)
        assert torch.isfinite(value.double()).all(), key
