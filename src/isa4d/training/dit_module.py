"""Stage 2 training: ISA-DiT with flow matching on the latents of the frozen stage-1 VAE (paper §5).

The LightningModule is glue: batch -> frozen VAE latents and `DiTConditions` -> flow-matching loss -> log.
Validation reports a deterministic flow-matching loss (fixed times and noise per batch, so curves of different
runs are comparable, paper Fig. 14) and samples the first validation batches with their own reference, poses,
cameras and background: ground truth | sample | sample with the conditioning body points, as animated GIFs, and
the `evaluation` metrics of the samples (FVD, body-part appearance, pose IoU, PSNR, SSIM by default).
`isa4d test` samples and scores every batch.

Batches of cached latents (data_prep/cache_latents.py) carry the frozen VAE's posterior moments instead of videos:
training draws its latents from them exactly as from the encoder's output, after checking that the cache was made
by this module's VAE (`isa4d.data.latents.vae_fingerprint`). Validation and test need videos, the ground truth of
their metrics.

The VAE is not part of the DiT's checkpoints (it is frozen and has its own file): `on_save_checkpoint` leaves
its weights out and records where they came from; `on_load_checkpoint` puts the current VAE's weights back.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from einops import rearrange
from lightning.pytorch.cli import OptimizerCallable
from torchmetrics import MeanMetric
from torch import nn

from isa4d.data.batch import Batch
from isa4d.data.latents import vae_fingerprint
from isa4d.diffusion.flow import FlowMatching
from isa4d.diffusion.sampling import SAMPLERS
from isa4d.diffusion.schedules import sampling_timesteps, shift_for_tokens
from isa4d.inference.generate import generate, sample_latent
from isa4d.inference.inputs import SampleRequest
from isa4d.models.dit import DiTConditions, ISADiT, PoseConditioner
from isa4d.models.vae import CausalVideoVAE, DiagonalGaussian, load_vae
from isa4d.parallel import ParallelConfig, configure_parallel
from isa4d.training.evaluation import VideoEvaluation
from isa4d.training.video_logging import body_points_overlay, log_video, video_grid


DIT_METRICS = ("psnr", "ssim", "fvd", "part_appearance", "pose_iou")


def _new_cuda_graph_step(module: nn.Module, args: tuple) -> None:
    torch.compiler.cudagraph_mark_step_begin()


class DiTModule(L.LightningModule):
    checkpoint_monitor = ("val/loss", "min")  # the best checkpoint (isa4d.training.checkpoint, monitor="model")
    # frozen parts with checkpoints of their own: left out of this module's checkpoints, kept as loaded on resume
    external_state_prefixes = ("vae.",)

    def __init__(
        self,
        network: ISADiT,
        vae_checkpoint: str | None = None,
        vae_ema: bool = False,
        body_model_dir: str = "data/body",
        objective: FlowMatching | None = None,
        optimizer: OptimizerCallable = lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.0),
        warmup_steps: int = 0,
        gradient_clip: float = 1.0,
        time_shift: float | None = None,
        shift_base_tokens: int = 256,
        max_shift: float = 3.0,
        latent_sample: bool = True,
        surface_seed: int = 0,
        min_points_per_part: int = 2,
        position_frame: str = "mean",
        val_timesteps: list[float] = (0.25, 0.5, 0.75),
        sample_steps: int = 30,
        sampler: str = "euler",
        guidance: dict[str, float] | None = None,
        sample_seed: int = 0,
        sample_window: int | None = None,
        sample_overlap: int = 2,
        decode_chunk_frames: int | None = None,
        val_sample_batches: int = 1,
        video_log_count: int = 2,
        vae: CausalVideoVAE | None = None,
        image_encoder: nn.Module | None = None,
        evaluation: VideoEvaluation | None = None,
        parallel: ParallelConfig = ParallelConfig(),
        pad_people: bool | None = None,
    ):
        """`time_shift` None: SD3's resolution-dependent shift, sqrt(tokens / shift_base_tokens) capped at
        `max_shift`, for training and sampling alike. `vae_checkpoint`: a stage-1 `.ckpt`, sharded folder or exported `.safetensors`
        (`vae_ema`: its EMA weights). `vae` (a built model) replaces `vae_checkpoint` in tests. `evaluation`: the
        metrics of sampled batches, by default `DIT_METRICS`. `sample_window` / `sample_overlap` (latent frames) and
        `decode_chunk_frames` (video frames) bound the memory of `predict` (`isa4d sample`) on long videos.
        `pad_people`: pad every batch's people to the network's `max_people` (one shape for any people count, at the
        cost of masked tokens); None: when `parallel.compile` is on, so blocks compile once per bucket."""
        super().__init__()
        if (vae is None) == (vae_checkpoint is None):
            raise ValueError("give exactly one of vae_checkpoint (a stage-1 checkpoint path) and vae (a model)")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
        self.vae = load_vae(vae_checkpoint, ema=vae_ema) if vae is None else vae.eval().requires_grad_(False)
        if self.vae.latent_channels != network.latent_channels:
            raise ValueError(f"the VAE ({vae_checkpoint or 'given'}) has {self.vae.latent_channels} latent "
                             f"channels but the DiT expects {network.latent_channels}")
        if network.frames_per_latent != self.vae.temporal_factor:
            raise ValueError(f"the DiT's frames_per_latent ({network.frames_per_latent}) must equal the VAE's "
                             f"temporal factor ({self.vae.temporal_factor})")
        if network.pose == "maps" and network.spatial_factor != self.vae.spatial_factor:
            raise ValueError(f"the DiT's spatial_factor ({network.spatial_factor}) must equal the VAE's "
                             f"({self.vae.spatial_factor}): its body maps are patchified with the video tokens' "
                             f"pixel footprint")
        self.vae_checkpoint = vae_checkpoint
        # of the weights as loaded (configure_model may cast the VAE to bf16 later): what cached latents must match
        self.vae_fingerprint = vae_fingerprint(self.vae)
        self._cache_checked: set[str] = set()
        self.network = network
        self.conditioner = PoseConditioner(body_model_dir, network.num_points, surface_seed, min_points_per_part,
                                           self.vae.temporal_factor, self.vae.spatial_factor, network.patch_size,
                                           position_frame=position_frame, body_maps=network.pose == "maps")
        self.image_encoder = image_encoder
        self.objective = objective or FlowMatching()
        self.optimizer_fn, self.warmup_steps, self.gradient_clip = optimizer, warmup_steps, gradient_clip
        self.time_shift, self.shift_base_tokens, self.max_shift = time_shift, shift_base_tokens, max_shift
        self.latent_sample = latent_sample
        self.val_timesteps = tuple(val_timesteps)
        self.sample_steps, self.sampler, self.guidance = sample_steps, sampler, dict(guidance or {})
        self.sample_seed, self.val_sample_batches, self.video_log_count = sample_seed, val_sample_batches, video_log_count
        self.sample_window, self.sample_overlap, self.decode_chunk_frames = sample_window, sample_overlap, decode_chunk_frames
        self.evaluation = evaluation if evaluation is not None else VideoEvaluation(DIT_METRICS)
        self._val_loss = MeanMetric()  # deterministic flow-matching loss, weighted by clips, gathered over ranks
        self.parallel = parallel
        self.pad_people = parallel.compile if pad_people is None else pad_people

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate", "test"):  # not for predict: sampling needs no metric networks
            self.evaluation.build()

    def configure_model(self) -> None:
        """FSDP2 under ModelParallelStrategy: the DiT sharded block by block, the frozen VAE (and image encoder)
        kept whole, in bf16 on GPUs; under any other strategy nothing."""
        frozen = [m for m in (self.vae, self.image_encoder) if m is not None]
        configure_parallel(self, trainable=[self.network], frozen=frozen, config=self.parallel)
        if self.parallel.cuda_graphs and getattr(self, "_graph_step_hook", None) is None:
            # each network call is a new step of the recorded graphs: the outputs of the last one may be reused
            # (training calls the network once per step; sampling once per solver step and guidance term)
            self._graph_step_hook = self.network.register_forward_pre_hook(_new_cuda_graph_step)

    def train(self, mode: bool = True) -> "DiTModule":
        super().train(mode)
        self.vae.eval()  # frozen: always in inference mode
        return self

    # ------------------------------------------------------------------------------------------ conditioning

    def _posterior(self, batch: Batch, name: str) -> DiagonalGaussian:
        """The frozen VAE's posterior over (B, C, T', h, w) of the batch's `video`, `ref` (T' = 1) or `bg`: from the
        cached moments of a cached-latent batch, else encoded (in the VAE's dtype, bf16 when kept frozen on GPU)."""
        if batch.latents is not None:
            self._check_cache(batch)
            moments = getattr(batch.latents, name)
            return DiagonalGaussian(moments[:, :, None] if name == "ref" else moments)
        images = getattr(batch, name)
        x = images[:, :, None] if name == "ref" else rearrange(images, "b t c h w -> b c t h w")
        return self.vae.encode(x.to(next(self.vae.parameters()).dtype))

    def _latent(self, posterior: DiagonalGaussian) -> torch.Tensor:
        """Normalised latent (B, C, T', h, w), float32: a posterior sample in training with `latent_sample`, else
        the mean."""
        z = posterior.sample() if self.latent_sample and self.training else posterior.mode()
        return self.vae.normalize_latents(z.float())

    def _check_cache(self, batch: Batch) -> None:
        """Cached latents must come from this module's VAE; each fingerprint is checked once."""
        for key, fingerprint in zip(batch.key, batch.latents.fingerprint):
            if fingerprint in self._cache_checked:
                continue
            if fingerprint != self.vae_fingerprint:
                raise ValueError(
                    f"cached latents of sample {key!r} were made by VAE {fingerprint}, but this module's VAE "
                    f"({self.vae_checkpoint or 'given'}) is {self.vae_fingerprint}: cache the shards again with this "
                    f"VAE (data_prep/cache_latents.py), or set vae_checkpoint to the VAE the cache names in its "
                    f"latents.json")
            self._cache_checked.add(fingerprint)

    @torch.no_grad()
    def encode(self, batch: Batch) -> tuple[torch.Tensor, DiTConditions, torch.Tensor]:
        """(x0 (B, C, T, h, w), conditions, posed points of every video frame (B, P, T_video, V, 3))."""
        x0 = self._latent(self._posterior(batch, "video"))
        cond, points = self.conditions(batch)
        if self.pad_people:
            cond = cond.pad_people(self.network.max_people)
        return x0, cond, points

    @torch.no_grad()
    def conditions(self, batch: Batch) -> tuple[DiTConditions, torch.Tensor]:
        """What the DiT is conditioned on, from everything in the batch but its video (sampling needs no video):
        (conditions, posed points of every video frame (B, P, T_video, V, 3))."""
        H, W = batch.image_size
        ref = self._latent(self._posterior(batch, "ref"))[:, :, 0]  # (B, C, h, w)
        bg = None
        if batch.has_bg is not None and self.network.background:
            bg = self._latent(self._posterior(batch, "bg"))
            bg = bg * batch.has_bg.to(bg.dtype)[:, None, None, None, None]  # no plate: the zero latent
        with torch.autocast(batch.K.device.type, enabled=False):  # geometry in fp32 (matrix inverses, projection)
            geometry, points = self.conditioner(batch.K.float(), batch.w2c.float(), batch.smpl, batch.person_mask,
                                                batch.ref_K.float(), batch.ref_w2c.float(), batch.ref_smpl,
                                                batch.ref_has_camera, H, W, batch.gender)
        features = self.image_encoder(batch.ref) if self.image_encoder is not None else None
        return DiTConditions(**geometry, ref_latent=ref, background=bg, ref_features=features), points

    def shift_for(self, shape: torch.Size | tuple[int, ...]) -> float:
        """The time shift for latents of `shape` (B, C, T, h, w)."""
        if self.time_shift is not None:
            return float(self.time_shift)
        tokens = shape[2] * (shape[3] // self.network.patch_size) * (shape[4] // self.network.patch_size)
        return shift_for_tokens(tokens, self.shift_base_tokens, 1.0, self.max_shift)

    # ------------------------------------------------------------------------------------------------- steps

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        x0, cond, _ = self.encode(batch)
        shift = self.shift_for(x0.shape)
        loss, logs = self.objective.loss(self.network, x0, {"cond": cond}, shift=shift)
        p = self.network.patch_size
        self.step_counts = {"samples": len(batch), "tokens": x0.shape[0] * x0.shape[2] * (x0.shape[3] // p) *
                            (x0.shape[4] // p), "flops": self.step_flops(x0, cond)}  # isa4d.training.throughput
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        self.log_dict({"train/t_mean": logs["t"].mean(), "train/shift": float(shift)}, batch_size=len(batch))
        return loss

    def step_flops(self, x0: torch.Tensor, cond: DiTConditions) -> float:
        """FLOPs of one forward + backward of the network at these shapes (every matmul and attention, counted by
        torch.utils.flop_counter on a meta-device copy, so no memory or time on the device), cached per shape."""
        key = (tuple(x0.shape), *(None if v is None else tuple(v.shape) for v in vars(cond).values()))
        cache = self.__dict__.setdefault("_flops_cache", {})
        if key not in cache:
            from torch.distributed.fsdp import FSDPModule

            from isa4d.training.throughput import loss_flops

            if not hasattr(self.network, "config"):
                return float("nan")
            cls = next(c for c in type(self.network).__mro__ if not issubclass(c, FSDPModule))  # FSDP's subclass
            meta = torch.device("meta")
            with meta:
                net = cls(**self.network.config)
            cond = cond.apply(lambda t: torch.empty_like(t, device=meta))
            cache[key] = loss_flops(lambda: self.objective.loss(net, torch.empty_like(x0, device=meta),
                                                                {"cond": cond})[0])
        return cache[key]

    @torch.no_grad()
    def validation_step(self, batch: Batch, batch_idx: int, stage: str = "val") -> None:
        batch.require_video(f"DiT {'validation' if stage == 'val' else stage} (the ground truth of its metrics)",
                            "point data.val_urls at contract shards with mp4 videos; cached latents serve training")
        x0, cond, points = self.encode(batch)
        B = len(batch)
        generator = torch.Generator(device=x0.device).manual_seed(self.sample_seed + batch_idx)
        losses = [self.objective.loss(self.network, x0, {"cond": cond}, generator=generator,
                                      t=torch.full((B,), t, device=x0.device))[0] for t in self.val_timesteps]
        padding = batch.stats.get("padding", False)  # run for FSDP's lockstep across ranks, counted nowhere
        if not padding:
            self._val_loss.update(torch.stack(losses).mean(), weight=B)
        if stage == "val" and batch_idx >= self.val_sample_batches:
            return
        video = self.decode(self.sample(cond, x0.shape, generator))  # (B, T, 3, H, W)
        if padding:
            return
        self.score(batch, video)
        if batch_idx == 0 and self.video_log_count > 0 and self.trainer.is_global_zero:
            self._log_samples(batch, video, points, stage)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx, stage="test")

    def score(self, batch: Batch, video: torch.Tensor, evaluation: VideoEvaluation | None = None) -> None:
        """Update `evaluation` (default: the module's) with a video (B, T, 3, H, W) made for `batch`, and with the
        batch's posed body meshes when a metric renders them."""
        evaluation = self.evaluation if evaluation is None else evaluation
        if not evaluation.needs_bodies:
            evaluation.update(batch, video)
            return
        body = self.conditioner.bodies["neutral"]  # faces and part ids, shared by the genders
        evaluation.update(batch, video, self.body_meshes(batch.smpl, batch.gender),
                          self.body_meshes(batch.ref_smpl, batch.gender), body.faces, body.part_ids)

    def body_meshes(self, smpl, gender: list[str]) -> torch.Tensor:
        """All mesh vertices (B, P, T, V, 3) of a batch's `SMPLBatch`, posed in fp32 (for rendering)."""
        with torch.autocast(smpl.betas.device.type, enabled=False):
            return self.conditioner.mesh(smpl.betas, smpl.global_orient, smpl.body_pose, smpl.transl, gender)

    def on_validation_epoch_end(self, stage: str = "val") -> None:
        metrics = {"loss": self._val_loss.compute(), **self.evaluation.compute()}  # both gathered over ranks
        self._val_loss.reset()
        self.evaluation.reset()
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()})

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end(stage="test")

    def sample(self, cond: DiTConditions, shape: tuple[int, ...], generator: torch.Generator | None = None,
               steps: int | None = None, guidance: dict[str, float] | None = None,
               sampler: str | None = None) -> torch.Tensor:
        """A normalised latent (B, C, T, h, w) from noise of `generator`: deterministic for a given seed."""
        device = cond.plucker.device
        noise = torch.randn(shape, generator=generator, device=device)
        timesteps = sampling_timesteps(steps or self.sample_steps, self.shift_for(shape), device=device)
        return sample_latent(self.network, cond, noise, timesteps, self.guidance if guidance is None else guidance,
                             sampler or self.sampler)

    def decode(self, latent: torch.Tensor, chunk_frames: int | None = None) -> torch.Tensor:
        """A normalised latent (B, C, T', h, w) -> video (B, T, 3, H, W) in [-1, 1], float32, through the frozen
        VAE (in its dtype; `chunk_frames`: temporal chunks of that many video frames)."""
        vae_dtype = next(self.vae.parameters()).dtype
        video = self.vae.decode(self.vae.denormalize_latents(latent).to(vae_dtype), chunk_frames=chunk_frames)
        return rearrange(video.float().clamp(-1, 1), "b c t h w -> b t c h w")

    def predict_step(self, request: SampleRequest, batch_idx: int) -> dict:
        """`isa4d sample`: a video for each request of `isa4d.inference.SampleInputs` (written by `SampleWriter`)."""
        video, points = generate(self, request.batch, request.tiles, seed=self.sample_seed,
                                 window=self.sample_window, overlap=self.sample_overlap,
                                 decode_chunk_frames=self.decode_chunk_frames, progress=True)
        return {"video": video, "points": points, "request": request}

    def _log_samples(self, batch: Batch, video: torch.Tensor, points: torch.Tensor, stage: str = "val") -> None:
        """ground truth | sample | sample with the conditioning surface points, one row per clip."""
        for i in range(min(self.video_log_count, len(batch))):
            overlay = body_points_overlay(video[i], points[i], batch.K[i], batch.w2c[i], batch.person_mask[i])
            grid = video_grid([batch.video[i], video[i], overlay])
            log_video(self.logger, f"{stage}/sample_{i}", grid.cpu(), self.global_step)

    # ------------------------------------------------------------------------------------ optimisation, ckpt

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_fn(params)
        if self.warmup_steps <= 0:
            return optimizer
        warmup = self.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip = gradient_clip_val if gradient_clip_val is not None else self.gradient_clip
        if clip and clip > 0 and math.isfinite(clip):
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(self.external_state_prefixes)]:
            del state[key]  # frozen, stored in its own checkpoint
        checkpoint["isa4d"] = {"vae_checkpoint": self.vae_checkpoint, "vae_config": dict(self.vae.config),
                               "network_config": dict(getattr(self.network, "config", {}))}  # rebuilds the network

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.loaded_step = checkpoint.get("global_step")  # reported by `isa4d validate/test`
        state = checkpoint.get("state_dict")
        if state is not None and not any(k.startswith("vae.") for k in state):
            state.update({f"vae.{k}": v for k, v in self.vae.state_dict().items()})
