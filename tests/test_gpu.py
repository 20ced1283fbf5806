"""Checks that need a CUDA GPU (skipped elsewhere): the VAE and the batch path on the device, in bf16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]


def _tiny_vae():
    from isa4d.models.vae import CausalVideoVAE

    return CausalVideoVAE(base_channels=16, channel_mults=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8,
                          image_decoder_channels=(16, 16))


@pytest.fixture
def no_tf32():
    """Exact fp32 on the GPU: TF32 convolutions round differently for different chunk shapes."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_vae_chunked_equals_unchunked_on_cuda(no_tf32):
    torch.manual_seed(0)
    vae = _tiny_vae().cuda().eval()
    x = torch.rand(1, 3, 17, 64, 64, device="cuda") * 2 - 1
    with torch.no_grad():
        whole = vae.encode(x).mode()
        chunked = vae.encode(x, chunk_frames=8).mode()
        torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(vae.decode(whole, chunk_frames=8), vae.decode(whole), atol=1e-4, rtol=1e-4)


def test_vae_bf16_autocast_trains():
    torch.manual_seed(0)
    vae = _tiny_vae().cuda()
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    x = torch.nn.functional.avg_pool3d(torch.rand(1, 3, 5, 32, 32, device="cuda") * 2 - 1, (1, 5, 5), 1, (0, 2, 2))
    losses = []
    for _ in range(40):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            recon, post = vae(x)
            loss = (recon.float() - x).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.6 * losses[0]


def test_batch_pins_moves_and_normalises_on_cuda():
    from isa4d.data.buckets import Bucket
    from isa4d.data.dataset import ClipDataset

    ds = ClipDataset(str(ROOT / "tests/assets/toy_world/val-000000.tar"), [Bucket(32, 32, 5, 1)], train=False)
    batch = next(iter(ds)).pin_memory().to("cuda", non_blocking=True).normalize()
    assert batch.video.is_cuda and batch.video.dtype == torch.float32
    assert -1 <= batch.video.min() and batch.video.max() <= 1
    assert batch.smpl.transl.is_cuda and batch.K.is_cuda
