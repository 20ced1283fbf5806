"""Stage 1 training glue: losses fall when overfitting, the GAN switches on, the tiny config fits through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from isa4d.cli import run_cli
from isa4d.models.vae import CausalVideoVAE
from isa4d.models.vae.discriminators import PatchDiscriminator2D, PatchDiscriminator3D
from isa4d.training.augment import structured_motion
from isa4d.training.vae_module import VAELossWeights, VAEModule

ROOT = Path(__file__).resolve().parents[1]


def tiny_vae(**kw) -> CausalVideoVAE:
    return CausalVideoVAE(base_channels=16, channel_mults=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8,
                          image_decoder_channels=(16, 16), **kw)


def test_overfitting_one_clip_lowers_every_reconstruction_term():
    torch.manual_seed(0)
    module = VAEModule(tiny_vae(), PatchDiscriminator2D(channels=8, num_layers=2), PatchDiscriminator3D(channels=8, num_layers=2),
                       VAELossWeights(perceptual=0.0, gan_start_step=10**9))
    x = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    x = torch.nn.functional.avg_pool3d(x, (1, 5, 5), 1, (0, 2, 2))  # smooth content, learnable in a few steps
    opt = torch.optim.Adam(module.vae.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        total, logs, _ = module._reconstruction_losses(x)
        opt.zero_grad()
        total.backward()
        opt.step()
        first = first or {k: v.item() for k, v in logs.items()}
    last = {k: v.item() for k, v in logs.items()}
    assert last["l1"] < 0.5 * first["l1"], (first, last)
    assert last["image_reg"] < 0.7 * first["image_reg"], (first, last)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="discriminator is missing"):
        VAEModule(tiny_vae(), None, None, VAELossWeights(perceptual=0.0))
    with pytest.raises(ValueError, match="image_regularizer=True"):
        VAEModule(tiny_vae(image_regularizer=False), None, None, VAELossWeights(perceptual=0.0, gan_2d=0, gan_3d=0))
    with pytest.raises(FileNotFoundError, match="LPIPS needs local weights"):
        VAEModule(tiny_vae(), None, None, VAELossWeights(perceptual=0.1, gan_2d=0, gan_3d=0))


def test_structured_motion_translates_whole_frames():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(2, 3, 5, 32, 32)
    x[:, :, :, 12:20, 12:20] = 1.0  # a square in every frame
    y = structured_motion(x, max_shift=0.3, p=1.0, generator=g)
    assert y.shape == x.shape
    centroid = lambda v: (v[0, 0].sum(-2).argmax(-1)).float()  # noqa: E731  column of the square per frame
    moved = (centroid(y) - centroid(x)).abs()
    assert moved.max() > 0  # frames are displaced...
    assert (y[:, 0].flatten(1).sum(1) - x[:, 0].flatten(1).sum(1)).abs().max() < 0.1 * x[:, 0].flatten(1).sum(1).max()  # ...not erased
    torch.testing.assert_close(structured_motion(x, 0.3, p=0.0), x)


def test_tiny_vae_config_fits_through_the_cli(tmp_path):
    """configs/vae/tiny.yaml on the committed toy-world shards through `isa4d fit`: GAN on after 2 steps, D steps do
    not advance global_step, validation stores latent statistics in the checkpoint."""
    assets = ROOT / "tests/assets/toy_world"
    cli = run_cli([
        "fit", "-c", str(ROOT / "configs/vae/tiny.yaml"), "-c", str(ROOT / "configs/data/toy.yaml"),
        "-c", str(ROOT / "configs/trainer/cpu_debug.yaml"),
        f"--data.init_args.train_urls={assets}/train-*.tar", f"--data.init_args.val_urls={assets}/val-*.tar",
        "--data.init_args.num_workers=0",
        '--data.init_args.buckets=[{"height": 32, "width": 32, "num_frames": 5, "batch_size": 2}]',
        "--model.init_args.loss.gan_start_step=2", "--trainer.max_steps=4", "--trainer.val_check_interval=4",
        "--trainer.limit_val_batches=2", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}/runs", "--trainer.log_every_n_steps=2",
    ])
    assert cli.trainer.global_step == 4
    metrics = cli.trainer.logged_metrics
    assert "train/gan_d" in metrics and "val/psnr" in metrics
    assert metrics["perf/tokens_per_s"] == pytest.approx(5 * metrics["perf/samples_per_s"])  # 5 frames a clip
    ckpt = next(Path(tmp_path).rglob("*.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert not torch.allclose(state["vae.latent_std"], torch.ones(16))  # estimated from data, not the default
    assert "val/ssim" in metrics
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(Path(tmp_path).rglob("events.out.tfevents*")).parent), size_guidance={"images": 0})
    events.Reload()
    image = events.Images("val/reconstruction_0")[0]  # ground truth | reconstruction | error, as a GIF
    assert image.encoded_image_string[:4] == b"GIF8" and image.width == 3 * 32
