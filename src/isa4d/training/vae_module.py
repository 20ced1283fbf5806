"""Stage 1 training: the causal video VAE with L1, LPIPS, KL, image-decoding regularisation and 2D + 3D GAN losses.

Two optimisers (VAE, discriminators), so optimisation is manual: one generator step, then, once the GAN is on, one
discriminator step on the same batch. The adversarial weight is adaptive (reconstruction vs GAN gradient norms at the
decoder's last layer). Validation (and `isa4d test`) logs L1 and the `evaluation` metrics (PSNR, SSIM, rFVD by
default) and the first clips' reconstructions as videos. Latent statistics for stage 2 are pooled over each
validation pass and stored in the VAE's buffers, so every checkpoint carries them.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
from einops import rearrange
from lightning.pytorch.cli import OptimizerCallable
from torchmetrics import MeanMetric

from isa4d.data.batch import Batch
from isa4d.metrics.reconstruction import VideoPSNR, lowpass_baseline
from isa4d.models.vae import CausalVideoVAE, latent_moments, stats_from_moments
from isa4d.models.vae.discriminators import PatchDiscriminator2D, PatchDiscriminator3D
from isa4d.models.vae.inflate import load_image_vae_weights
from isa4d.models.vae.losses import adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from isa4d.models.vae.lpips import LPIPS, perceptual_video
from isa4d.parallel import ParallelConfig, configure_parallel
from isa4d.training.augment import structured_motion
from isa4d.training.evaluation import VideoEvaluation
from isa4d.training.faults import finite_or_skip
from isa4d.training.video_logging import error_video, log_video, video_grid

_VIDEO_SHARDS = "stage 1 learns from frames: give it contract shards with mp4 videos"


@dataclass
class VAELossWeights:
    """λ of each term (paper §4; values not given there, so SD/Cosmos-like defaults, docs/vae.md)."""

    l1: float = 1.0
    perceptual: float = 0.1
    kl: float = 1e-6
    image_reg: float = 1.0
    gan_2d: float = 0.05
    gan_3d: float = 0.05
    gan_start_step: int = 2000
    adaptive_gan: bool = True
    perceptual_frames: int = 4  # LPIPS on this many random frames per clip


class VAEModule(L.LightningModule):
    checkpoint_monitor = ("val/l1", "min")  # the best checkpoint (isa4d.training.checkpoint, monitor="model")

    def __init__(
        self,
        vae: CausalVideoVAE,
        disc_2d: PatchDiscriminator2D | None = None,
        disc_3d: PatchDiscriminator3D | None = None,
        loss: VAELossWeights = VAELossWeights(),
        optimizer: OptimizerCallable = lambda p: torch.optim.AdamW(p, lr=1e-4, betas=(0.5, 0.9), weight_decay=0.0),
        disc_optimizer: OptimizerCallable = lambda p: torch.optim.AdamW(p, lr=1e-4, betas=(0.5, 0.9), weight_decay=0.0),
        lpips_vgg_path: str | None = None,
        lpips_lin_path: str | None = None,
        motion_shift: float = 0.25,
        motion_prob: float = 0.5,
        gradient_clip: float = 1.0,
        video_log_count: int = 2,
        evaluation: VideoEvaluation | None = None,
        parallel: ParallelConfig = ParallelConfig(),
        vae_init: str | None = None,
    ):
        """`evaluation`: the validation/test metrics, by default PSNR, SSIM and rFVD (FVD of the reconstructions
        against their inputs, logged as `val/rfvd`). `vae_init`: a pretrained 2D image VAE (a diffusers
        AutoencoderKL folder or an SD3/FLUX ae.safetensors), or an isa4d image-stage checkpoint, inflated into
        `vae` at setup, before training starts (a checkpoint given to fit/validate then overwrites it);
        docs/vae_pretrained.md."""
        super().__init__()
        if parallel.cuda_graphs:
            raise ValueError("parallel.cuda_graphs is supported for the DiT stage only: the VAE stage runs the "
                             "generator and discriminators several times per step; set parallel.cuda_graphs=false")
        if (loss.gan_2d > 0 and disc_2d is None) or (loss.gan_3d > 0 and disc_3d is None):
            raise ValueError("a GAN weight is > 0 but its discriminator is missing (disc_2d / disc_3d)")
        if loss.image_reg > 0 and not vae.image_regularizer:
            raise ValueError("loss.image_reg > 0 needs a VAE built with image_regularizer=True")
        self.vae, self.disc_2d, self.disc_3d, self.w = vae, disc_2d, disc_3d, loss
        # LPIPS weights come from local files only; with weight 0 they are not needed (the toy presets).
        self.lpips = LPIPS(lpips_vgg_path, lpips_lin_path) if loss.perceptual > 0 else None
        self.optimizer_fn, self.disc_optimizer_fn = optimizer, disc_optimizer
        self.motion_shift, self.motion_prob, self.gradient_clip = motion_shift, motion_prob, gradient_clip
        self.video_log_count = video_log_count
        self.evaluation = evaluation if evaluation is not None else VideoEvaluation(("psnr", "ssim", "fvd"))
        self.parallel = parallel
        self.vae_init = vae_init
        self.automatic_optimization = False
        self._stats: list[torch.Tensor] = []
        self._l1 = MeanMetric()  # validation L1, weighted by clips and gathered over ranks
        # PSNR of the x8 low-pass codec (area down, bicubic up) on the same clips: a working VAE beats it early
        self._psnr_lowpass = VideoPSNR()

    # ------------------------------------------------------------------------------------------------ losses

    def _gan_on(self) -> bool:
        return (self.w.gan_2d > 0 or self.w.gan_3d > 0) and self.global_step >= self.w.gan_start_step

    def _reconstruction_losses(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        recon, posterior = self.vae(x)  # (B, 3, T, H, W)
        logs = {"l1": (recon - x).abs().mean(), "kl": posterior.kl_mean().mean()}
        rec = self.w.l1 * logs["l1"]
        if self.lpips is not None:
            logs["lpips"] = perceptual_video(self.lpips, recon, x, self.w.perceptual_frames)
            rec = rec + self.w.perceptual * logs["lpips"]
        total = rec + self.w.kl * logs["kl"]
        if self.w.image_reg > 0:
            frames, index = self.vae.decode_subframes(posterior.sample())
            logs["image_reg"] = (frames - x[:, :, index]).abs().mean()
            total = total + self.w.image_reg * logs["image_reg"]
        if self._gan_on():
            g = torch.zeros((), device=x.device)
            if self.w.gan_2d > 0:
                g = g + self.w.gan_2d * hinge_g_loss(self.disc_2d(recon))
            if self.w.gan_3d > 0:
                g = g + self.w.gan_3d * hinge_g_loss(self.disc_3d(recon))
            last = self.vae.decoder.conv_out.weight  # the decoder's last layer
            weight = adaptive_gan_weight(rec, g, last) if self.w.adaptive_gan else torch.ones((), device=x.device)
            logs["gan_g"], logs["gan_weight"] = g, weight
            total = total + weight * g
        logs["loss"] = total
        return total, logs, recon

    def _disc_loss(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        real, fake = x.detach(), recon.detach()
        d = torch.zeros((), device=x.device)
        if self.w.gan_2d > 0:
            d = d + hinge_d_loss(self.disc_2d(real), self.disc_2d(fake))
        if self.w.gan_3d > 0:
            d = d + hinge_d_loss(self.disc_3d(real), self.disc_3d(fake))
        return d

    # ------------------------------------------------------------------------------------------------- steps

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        x = rearrange(batch.require_video("VAE training", _VIDEO_SHARDS), "b t c h w -> b c t h w")
        opts = self.optimizers()
        opt_g, opt_d = opts if isinstance(opts, (list, tuple)) else (opts, None)
        x = structured_motion(x, self.motion_shift, self.motion_prob)
        self.step_counts = {"samples": x.shape[0], "tokens": x.shape[0] * x.shape[2]}  # frames; throughput.py
        total, logs, recon = self._reconstruction_losses(x)
        if not finite_or_skip(self, total):
            return
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(total)
        self.clip_gradients(opt_g, gradient_clip_val=self.gradient_clip, gradient_clip_algorithm="norm")
        opt_g.step()
        if self._gan_on():
            d = self._disc_loss(x, recon)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d)
            self.clip_gradients(opt_d, gradient_clip_val=self.gradient_clip, gradient_clip_algorithm="norm")
            # The raw optimizer: Lightning counts every wrapped step in global_step, and global_step must count
            # generator steps only (gan_start_step, the loader's bucket schedule and resume all key on it).
            opt_d.optimizer.step()
            logs["gan_d"] = d
        loss = logs.pop("loss")
        self.log_dict({f"train/{k}": v.detach() for k, v in logs.items()}, batch_size=len(batch))
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(batch))

    @torch.no_grad()
    def validation_step(self, batch: Batch, batch_idx: int, stage: str = "val") -> None:
        x = rearrange(batch.require_video("VAE evaluation", _VIDEO_SHARDS), "b t c h w -> b c t h w")
        z = self.vae.encode(x).mode()
        recon = self.vae.decode(z).clamp(-1, 1)
        if batch.stats.get("padding"):  # run for FSDP's lockstep across ranks, counted nowhere
            return
        self._l1.update((recon - x).abs().mean(), weight=len(batch))
        if x.shape[-1] % 8 == 0 and x.shape[-2] % 8 == 0:
            frames = rearrange(x, "b c t h w -> b t c h w")
            self._psnr_lowpass.update(lowpass_baseline(frames, 8), frames)
        self.evaluation.update(batch, rearrange(recon, "b c t h w -> b t c h w"))
        if batch_idx == 0 and self.video_log_count > 0 and self.trainer.is_global_zero:
            self._log_reconstructions(x[: self.video_log_count], recon[: self.video_log_count], stage)
        self._stats.append(latent_moments(z))

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx, stage="test")

    def _log_reconstructions(self, x: torch.Tensor, recon: torch.Tensor, stage: str = "val") -> None:
        """ground truth | reconstruction | error, one row per clip, as an animated GIF in TensorBoard."""
        gt, rc = rearrange(x, "b c t h w -> b t c h w"), rearrange(recon, "b c t h w -> b t c h w")
        for i in range(len(gt)):
            grid = video_grid([gt[i], rc[i], error_video(gt[i], rc[i])])
            log_video(self.logger, f"{stage}/reconstruction_{i}", grid.cpu(), self.global_step)

    def on_validation_epoch_end(self, stage: str = "val") -> None:
        """The metrics of the pass (FVD as `rfvd`: of reconstructions), and the per-channel latent mean/std over it
        (summed over ranks) -> the VAE's buffers (when validating during training)."""
        metrics = {"l1": self._l1.compute(), **self.evaluation.compute()}  # both gathered over ranks
        if self._psnr_lowpass.num_frames > 0 or self.trainer.world_size > 1:
            metrics["psnr_lowpass"] = self._psnr_lowpass.compute()
        self._l1.reset()
        self._psnr_lowpass.reset()
        self.evaluation.reset()
        self.log_dict({f"{stage}/r{k}" if k.startswith("fvd") else f"{stage}/{k}": v for k, v in metrics.items()})
        moments = torch.stack(self._stats).sum(0) if self._stats else \
            torch.zeros(3, self.vae.latent_channels, dtype=torch.float64, device=self.device)  # (sum, sq, count)
        self._stats.clear()
        if stage != "val":
            return
        if self.trainer.world_size > 1:  # on every rank, also one that saw no batch
            moments = self.trainer.strategy.reduce(moments, reduce_op="sum")
        if not moments[2].all():
            return
        mean, std = stats_from_moments(moments)
        self.vae.set_latent_stats(mean, std)
        self.log_dict({"val/latent_std_mean": std.mean().float(), "val/latent_mean_abs": mean.abs().mean().float()}, sync_dist=False)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end(stage="test")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.loaded_step = checkpoint.get("global_step")  # reported by `isa4d validate/test`

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["vae_config"] = dict(self.vae.config)  # isa4d.models.vae.load_vae rebuilds the VAE from it

    def setup(self, stage: str) -> None:
        if self.vae_init is not None:  # at setup, not in __init__: configs parse and build without the weights
            load_image_vae_weights(self.vae, self.vae_init)
            self.vae_init = None  # once: a later stage's setup must not undo training
        if stage in ("fit", "validate", "test"):  # not for predict: sampling needs no metric networks
            self.evaluation.build()

    def configure_model(self) -> None:
        """FSDP2 under ModelParallelStrategy (VAE and discriminators sharded, LPIPS frozen); else nothing."""
        discs = [m for m in (self.disc_2d, self.disc_3d) if m is not None]
        lpips = [self.lpips] if self.lpips is not None else []
        configure_parallel(self, trainable=[self.vae, *discs], frozen=lpips, config=self.parallel)

    def configure_optimizers(self):
        discs = [m for m in (self.disc_2d, self.disc_3d) if m is not None]
        opt_g = self.optimizer_fn(self.vae.parameters())
        if not discs:  # no adversarial terms: one optimiser
            return opt_g
        return opt_g, self.disc_optimizer_fn([p for m in discs for p in m.parameters()])
