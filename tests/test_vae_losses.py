"""LPIPS from local weights, discriminators and GAN loss pieces of the VAE objective."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from isa4d.models.vae.discriminators import PatchDiscriminator2D, PatchDiscriminator3D
from isa4d.models.vae.losses import adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from isa4d.models.vae.lpips import LPIPS, LPIPSWeightsMissing, perceptual_video

CONV_IDX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # torchvision vgg16.features conv layers
WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """Random weights in the exact key layouts of torchvision's vgg16 checkpoint and lpips' vgg.pth."""
    d = tmp_path_factory.mktemp("lpips")
    g = torch.Generator().manual_seed(0)
    vgg, c_in = {}, 3
    for i, c in zip(CONV_IDX, WIDTHS):
        vgg[f"features.{i}.weight"] = torch.randn(c, c_in, 3, 3, generator=g) * (2 / (9 * c_in)) ** 0.5
        vgg[f"features.{i}.bias"] = torch.zeros(c)
        c_in = c
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # present in the real file, ignored
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(vgg, d / "vgg16.pth")
    torch.save(lin, d / "lin.pth")
    return str(d / "vgg16.pth"), str(d / "lin.pth"), vgg, lin


def _reference_lpips(x, y, vgg, lin):
    """LPIPS written out layer by layer with F.conv2d on the raw state dicts."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    hs = [(x - shift) / scale, (y - shift) / scale]
    blocks = [(0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28)]
    total = 0
    for k, block in enumerate(blocks):
        if k:
            hs = [F.max_pool2d(h, 2) for h in hs]
        for i in block:
            hs = [F.relu(F.conv2d(h, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"], padding=1)) for h in hs]
        a, b = (h / (h.norm(dim=1, keepdim=True) + 1e-10) for h in hs)
        total = total + F.conv2d((a - b) ** 2, lin[f"lin{k}.model.1.weight"]).mean(dim=(1, 2, 3))
    return total


def test_lpips_matches_a_layer_by_layer_reference(lpips_files):
    vgg_path, lin_path, vgg, lin = lpips_files
    m = LPIPS(vgg_path, lin_path)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    torch.testing.assert_close(m(x, y), _reference_lpips(x, y, vgg, lin), rtol=1e-4, atol=1e-6)


def test_lpips_is_a_frozen_distance_with_input_gradients(lpips_files):
    m = LPIPS(*lpips_files[:2])
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    noise = torch.randn(1, 3, 32, 32, generator=g)
    assert m(x, x).abs().item() < 1e-6
    d = [m(x, (x + s * noise).clamp(-1, 1)).item() for s in (0.05, 0.2, 0.8)]
    assert d[0] < d[1] < d[2]
    y = (x + 0.3 * noise).clamp(-1, 1)
    torch.testing.assert_close(m(x, y), m(y, x))
    assert not any(p.requires_grad for p in m.parameters())
    m.train()
    assert not m.training
    xr = x.clone().requires_grad_(True)
    m(xr, y).sum().backward()
    assert xr.grad is not None and xr.grad.abs().sum() > 0
    video = torch.stack([x[0], y[0], x[0]], dim=1)[None]  # (1, 3, 3, H, W)
    assert perceptual_video(m, video, video).item() < 1e-6


def test_lpips_missing_or_wrong_weights_fail_clearly(lpips_files, tmp_path):
    with pytest.raises(LPIPSWeightsMissing, match="vgg_path=.*not a file.*perceptual loss weight to 0"):
        LPIPS(str(tmp_path / "nope.pth"), lpips_files[1])
    with pytest.raises(LPIPSWeightsMissing, match="lin_path"):
        LPIPS(lpips_files[0], None)
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a torchvision VGG-16"):
        LPIPS(str(tmp_path / "bad.pth"), lpips_files[1])
    with pytest.raises(ValueError, match="not an LPIPS v0.1"):
        LPIPS(lpips_files[0], str(tmp_path / "bad.pth"))


@pytest.mark.parametrize("t", [5, 9, 17])
def test_discriminators_judge_patches(t):
    video = torch.randn(2, 3, t, 64, 64)
    d2 = PatchDiscriminator2D(channels=8, num_layers=3)
    d3 = PatchDiscriminator3D(channels=8, num_layers=3)
    out2, out3 = d2(video), d3(video)
    assert out2.shape[0] == 2 * t and out2.shape[1] == 1 and out2.shape[-1] > 1  # a logit per patch per frame
    assert out3.shape[:2] == (2, 1) and out3.shape[-1] > 1
    # the 2D critic sees frames independently: changing frame 0 leaves the other frames' logits alone
    v2 = video.clone()
    v2[:, :, 0] += 1
    o2 = d2(v2).view(2, t, -1)
    torch.testing.assert_close(o2[:, 1:], out2.view(2, t, -1)[:, 1:])
    assert not torch.allclose(o2[:, 0], out2.view(2, t, -1)[:, 0])


def test_hinge_losses_and_adaptive_weight():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # d: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3 / 3))
    assert hinge_g_loss(fake).item() == pytest.approx(-fake.mean().item())
    w = torch.randn(4, 4, requires_grad=True)
    rec, gan = 3.0 * (w ** 2).sum(), 0.5 * (w ** 2).sum()  # gradients 6w and w: ratio 6
    assert adaptive_gan_weight(rec, gan, w).item() == pytest.approx(6.0, rel=1e-3)


def _adaptive_weight_worker(rank: int, init_file: str, result_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        w, x = _adaptive_weight_problem()
        half = x[rank::2]  # this rank's share of the global batch
        weight = adaptive_gan_weight(((half @ w) - 1).abs().mean(), (half @ w).square().mean(), w)
        gathered = [torch.zeros(()) for _ in range(2)]
        dist.all_gather(gathered, weight)
        if rank == 0:
            torch.save(torch.stack(gathered), result_file)
    finally:
        dist.destroy_process_group()


def _adaptive_weight_problem() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 3, generator=g, requires_grad=True)
    x = torch.randn(8, 6, generator=g) * torch.linspace(0.1, 3.0, 8)[:, None]  # the two halves differ
    return w, x


def test_adaptive_weight_under_data_parallelism_is_the_global_batch_weight(tmp_path):
    """Two processes, each with half the batch, both get the weight one process computes from the whole batch
    (a weight from a rank's own half differs, which made 2-GPU VAE curves part from 1-GPU ones after the GAN
    came on)."""
    import torch.multiprocessing as mp

    w, x = _adaptive_weight_problem()
    single = adaptive_gan_weight(((x @ w) - 1).abs().mean(), (x @ w).square().mean(), w)
    own_half = adaptive_gan_weight(((x[0::2] @ w) - 1).abs().mean(), (x[0::2] @ w).square().mean(), w)
    assert abs(own_half.item() - single.item()) > 0.01 * single.item()  # the problem tells the two apart
    result = tmp_path / "weights.pt"
    mp.start_processes(_adaptive_weight_worker, args=(str(tmp_path / "pg"), str(result)), nprocs=2, join=True,
                       start_method="spawn")
    both = torch.load(result, weights_only=True)
    torch.testing.assert_close(both, single.expand(2), rtol=1e-5, atol=0)
