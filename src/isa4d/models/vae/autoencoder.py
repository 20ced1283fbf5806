"""The causal video VAE of ISA4D (paper §4): the SD3 image VAE with every conv inflated to a causal 3D conv.

Compression 4 x 8 x 8 (time x space) by default, 16 latent channels. A clip of 1 + 4k frames codes to 1 + k
latent frames: frame 0 alone (an image is a valid one-frame clip), then each latent frame i >= 1 covers frames
4(i-1)+1 .. 4i. Encoder and decoder are causal at latent-frame granularity, which is what allows exact chunked
coding (tiling.py). The image-decoding regulariser (image_decoder.py) is an optional training-time head.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch import Tensor, nn

from isa4d.models.vae.blocks import (Downsample, FactorizedUpsample, ResnetBlock3D, SpatialAttention, Upsample,
                                     frame_norm)
from isa4d.models.vae.causal_conv import CausalConv3d
from isa4d.models.vae.image_decoder import ImageDecoder
from isa4d.models.vae.tiling import run_chunked, run_tiled


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) from the encoder's (b, 2c, n, h, w) moments, held in fp32."""

    def __init__(self, moments: Tensor) -> None:
        self.mean, logvar = moments.float().chunk(2, dim=1)  # (b, c, n, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)  # SD's clamp: keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        mean = self.mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + self.std * noise  # (b, c, n, h, w)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over all non-batch dims: (b,)."""
        return self._kl_elements().flatten(1).sum(1)

    def kl_mean(self) -> Tensor:
        """KL per latent element, averaged over the non-batch dims: (b,); independent of clip size."""
        return self._kl_elements().flatten(1).mean(1)

    def _kl_elements(self) -> Tensor:
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar)


def _mid_block(channels: int, attention: bool, norm_groups: int, dropout: float) -> nn.Module:
    """SD's mid block: Resnet, per-frame spatial attention, Resnet (block_1, attn_1, block_2)."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock3D(channels, channels, norm_groups, dropout)
    mid.attn_1 = SpatialAttention(channels, norm_groups) if attention else nn.Identity()
    mid.block_2 = ResnetBlock3D(channels, channels, norm_groups, dropout)
    return mid


class Encoder(nn.Module):
    """conv_in -> [ResnetBlock x num_res_blocks -> Downsample] per level -> mid -> norm, SiLU, conv_out."""

    def __init__(self, in_channels: int, out_channels: int, base_channels: int,
                 channel_mults: tuple[int, ...], num_res_blocks: int, temporal_downsample: tuple[bool, ...],
                 mid_attention: bool, norm_groups: int, dropout: float, shortcuts: bool = False) -> None:
        super().__init__()
        widths = [base_channels * m for m in channel_mults]
        self.shortcuts, self.out_channels = shortcuts, out_channels
        self.conv_in = CausalConv3d(in_channels, widths[0], 3)
        self.down = nn.ModuleList()
        block_in = widths[0]
        for level, width in enumerate(widths):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock3D(block_in, width, norm_groups, dropout))
                block_in = width
            if level < len(widths) - 1:
                stage.downsample = Downsample(width, temporal_downsample[level], shortcuts)
            self.down.append(stage)
        self.mid = _mid_block(block_in, mid_attention, norm_groups, dropout)
        self.norm_out = frame_norm(block_in, norm_groups)
        self.conv_out = CausalConv3d(block_in, out_channels, 3)

    def forward(self, x: Tensor) -> Tensor:  # x: (b, 3, T, H, W)
        h = self.conv_in(x)  # (b, c0, T, H, W)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)  # (b, c_l, t / 2 or t, h / 2, w / 2)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))  # (b, c, n, H / 8, W / 8)
        moments = self.conv_out(F.silu(self.norm_out(h)))  # (b, 2 c_z, n, H / 8, W / 8)
        if self.shortcuts:  # the means also get h's channel groups averaged (DC-AE's space-to-channel shortcut)
            skip = reduce(h, "b (z g) n h w -> b z n h w", "mean", z=self.out_channels // 2)
            moments = moments + torch.cat([skip, torch.zeros_like(skip)], dim=1)
        return moments


UPSAMPLERS = ("inflated", "factorized")


class Decoder(nn.Module):
    """Mirror of Encoder: conv_in -> mid -> [ResnetBlock x (num_res_blocks + 1) -> Upsample] per level.

    `upsampler` "inflated" is SD's upsampler with its conv inflated to 3x3x3 (Upsample); "factorized" splits time
    and space (FactorizedUpsample) and already maps to the next level's width.
    """

    def __init__(self, out_channels: int, latent_channels: int, base_channels: int,
                 channel_mults: tuple[int, ...], num_res_blocks: int, temporal_downsample: tuple[bool, ...],
                 mid_attention: bool, norm_groups: int, dropout: float, upsampler: str = "inflated",
                 shortcuts: bool = False) -> None:
        super().__init__()
        widths = [base_channels * m for m in channel_mults]
        block_in = widths[-1]
        self.shortcuts = shortcuts
        self.conv_in = CausalConv3d(latent_channels, block_in, 3)
        self.mid = _mid_block(block_in, mid_attention, norm_groups, dropout)
        up = []
        for level in reversed(range(len(widths))):  # built coarse to fine; stored by level as SD's `up[i]`
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock3D(block_in, widths[level], norm_groups, dropout))
                block_in = widths[level]
            if level > 0 and upsampler == "factorized":
                stage.upsample = FactorizedUpsample(block_in, widths[level - 1], temporal_downsample[level - 1],
                                                    shortcuts)
                block_in = widths[level - 1]
            elif level > 0:
                stage.upsample = Upsample(block_in, temporal_downsample[level - 1], shortcuts)
            up.insert(0, stage)
        self.up = nn.ModuleList(up)
        self.norm_out = frame_norm(block_in, norm_groups)
        self.conv_out = CausalConv3d(block_in, out_channels, 3)

    def forward(self, z: Tensor) -> Tensor:  # z: (b, c_z, n, h, w)
        h = self.conv_in(z)  # (b, c, n, h, w)
        if self.shortcuts:  # each latent channel copied to its group of h's channels, the inverse of the encoder's
            h = h + repeat(z, "b z n h w -> b (z g) n h w", g=h.shape[1] // z.shape[1])
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))  # (b, c, n, h, w)
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)  # (b, c_l, 1 + 2 (t - 1) or t, 2h, 2w)
        return self.conv_out(F.silu(self.norm_out(h)))  # (b, 3, T, H, W)


class CausalVideoVAE(nn.Module):
    """Causal video VAE: videos (b, 3, T, H, W) in [-1, 1], T = 1 + f_t k <-> latents (b, c_z, 1 + k, h, w).

    h, w = H / f_s, W / f_s. `chunk_frames` (video frames per temporal chunk, a multiple of f_t, for encode
    and decode alike) bounds memory for long clips, exactly; `tile` = (tile_h, tile_w, overlap) in video
    pixels (multiples of f_s) bounds it for large frames, approximately. `latent_mean` / `latent_std` are
    persistent buffers, saved with the weights, used by `normalize_latents` to hand the DiT unit-scale
    latents. `upsampler` picks the decoder's upsampling: "inflated" (SD's, every conv 3x3x3, as the paper
    inflates) or "factorized" (a 3x1x1 time conv at the lower resolution and a 1x3x3 space conv, as Wan2.1).
    `shortcuts` adds parameter-free
    residual paths (DC-AE's space-to-channel shortcuts, Wan2.2's AvgDown/DupUp) around every down/upsampler and the
    latent projections, so an untrained VAE already codes each 8 x 8 x 4 cell by its mean and the network learns
    the residual; docs/vae.md says why it learns much faster.
    """

    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 16,
        base_channels: int = 128,
        channel_mults: tuple[int, ...] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        temporal_downsample: tuple[bool, ...] = (False, True, True),
        mid_attention: bool = True,
        norm_groups: int = 32,
        dropout: float = 0.0,
        upsampler: str = "inflated",
        shortcuts: bool = False,
        image_regularizer: bool = True,
        sub_latents: int = 4,
        image_decoder_channels: tuple[int, ...] = (64, 128),
        latent_mean: tuple[float, ...] | None = None,
        latent_std: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__()
        channel_mults, temporal_downsample = tuple(channel_mults), tuple(temporal_downsample)
        # the constructor arguments, saved with checkpoints so stage 2 rebuilds this VAE from the file alone
        self.config = dict(in_channels=in_channels, latent_channels=latent_channels, base_channels=base_channels,
                           channel_mults=list(channel_mults), num_res_blocks=num_res_blocks,
                           temporal_downsample=list(temporal_downsample), mid_attention=mid_attention,
                           norm_groups=norm_groups, dropout=dropout, upsampler=upsampler, shortcuts=shortcuts,
                           image_regularizer=image_regularizer,
                           sub_latents=sub_latents, image_decoder_channels=list(image_decoder_channels))
        if not channel_mults or base_channels <= 0 or min(channel_mults) <= 0:
            raise ValueError(f"need base_channels > 0 and positive channel_mults, got {base_channels}, "
                             f"{channel_mults}")
        if len(temporal_downsample) != len(channel_mults) - 1:
            raise ValueError(f"temporal_downsample needs one flag per downsampling "
                             f"({len(channel_mults) - 1}), got {temporal_downsample}")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        if upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler must be one of {UPSAMPLERS}, got {upsampler!r}")
        self.in_channels, self.latent_channels = in_channels, latent_channels
        self.spatial_factor = 2 ** (len(channel_mults) - 1)
        self.temporal_factor = 2 ** sum(temporal_downsample)
        args = (base_channels, channel_mults, num_res_blocks, temporal_downsample, mid_attention, norm_groups,
                dropout)
        widths = [base_channels * m for m in channel_mults]
        if shortcuts and (widths[-1] % latent_channels or any(
                a % b for a, b in zip(widths[1:], widths[:-1]))):
            raise ValueError(f"shortcuts need latent_channels ({latent_channels}) to divide the last width and each "
                             f"width to divide the next one, got widths {widths}")
        self.encoder = Encoder(in_channels, 2 * latent_channels, *args, shortcuts=shortcuts)
        self.decoder = Decoder(in_channels, latent_channels, *args, upsampler=upsampler, shortcuts=shortcuts)

        self.image_regularizer = image_regularizer
        if image_regularizer:
            if sub_latents != self.temporal_factor or latent_channels % sub_latents:
                raise ValueError(f"sub_latents ({sub_latents}) must equal the temporal factor "
                                 f"({self.temporal_factor}) and divide latent_channels ({latent_channels})")
            self.sub_latents = sub_latents
            self.image_decoder = ImageDecoder(latent_channels // sub_latents, in_channels,
                                              tuple(image_decoder_channels), len(channel_mults) - 1,
                                              norm_groups)

        # Identity statistics until set_latent_stats (or a checkpoint) provides real ones.
        self.register_buffer("latent_mean", torch.zeros(latent_channels), persistent=True)
        self.register_buffer("latent_std", torch.ones(latent_channels), persistent=True)
        if latent_mean is not None or latent_std is not None:
            self.set_latent_stats(self.latent_mean if latent_mean is None else torch.tensor(latent_mean),
                                  self.latent_std if latent_std is None else torch.tensor(latent_std))

    # ------------------------------------------------------------------------------------------ wrap units

    fsdp_forward_methods = ("encode", "decode", "decode_subframes")  # entry points besides forward

    def fsdp_units(self) -> list[nn.Module]:
        """The modules isa4d.parallel wraps one by one (checkpointing, compile, FSDP): every Resnet block,
        attention and down/upsampler, the whole encoder, and the image decoder. The decoder's conv_in, norm_out
        and conv_out stay with the root, whose parameters stay gathered from forward to backward: the adaptive
        GAN weight differentiates with respect to conv_out's weight."""
        units: list[nn.Module] = []
        for net, stages in ((self.encoder, self.encoder.down), (self.decoder, self.decoder.up)):
            for stage in stages:
                units += list(stage.block)
                units += [getattr(stage, n) for n in ("downsample", "upsample") if hasattr(stage, n)]
            units += [net.mid.block_1, net.mid.attn_1, net.mid.block_2]
        units.append(self.encoder)
        if self.image_regularizer:
            units.append(self.image_decoder)
        return [u for u in units if any(True for _ in u.parameters())]

    def compile_blocks(self, backend: str = "inductor") -> int:
        """Compile in place, for inference with static shapes, every repeated block of the encoder and decoder
        (Resnet blocks, attention, down/upsamplers); returns how many. Fuses the per-frame norms, SiLUs and
        padding copies that make eager coding memory-bound (1.75-1.86x Wan2.1's frames/s instead of 1.1-1.3x on an
        H100, docs/benchmarks.md).

        nn.Module.compile keeps each module in the tree, so `streaming()` still finds the CausalConv3d children.
        Dynamo traces their streaming caches (read as graph inputs, the new cache written back after the graph) and
        guards on them, so the first chunk (no cache), later chunks and a shorter last chunk each get a graph per
        block shape; blocks of one class share the entries of its forward. The limit on entries is raised to fit
        them all, and hitting it raises instead of silently running the remaining variants eager."""
        config = torch._dynamo.config
        config.cache_size_limit = max(config.cache_size_limit, 512)
        config.accumulated_cache_size_limit = max(config.accumulated_cache_size_limit, 4096)
        if hasattr(config, "fail_on_cache_limit_hit"):
            config.fail_on_cache_limit_hit = True
        kinds = (ResnetBlock3D, SpatialAttention, Upsample, FactorizedUpsample, Downsample)
        blocks = [m for net in (self.encoder, self.decoder) for m in net.modules() if isinstance(m, kinds)]
        for block in blocks:
            block.compile(dynamic=False, backend=backend)
        return len(blocks)

    # ----------------------------------------------------------------------------------------------- coding

    def num_latent_frames(self, num_frames: int) -> int:
        if num_frames < 1 or (num_frames - 1) % self.temporal_factor:
            raise ValueError(f"a clip needs 1 + {self.temporal_factor} k frames (k >= 0), got {num_frames}")
        return 1 + (num_frames - 1) // self.temporal_factor

    def encode(self, x: Tensor, chunk_frames: int | None = None,
               tile: tuple[int, int, int] | None = None) -> DiagonalGaussian:
        """x (b, 3, T, H, W) -> posterior over (b, c_z, 1 + (T - 1) / f_t, H / f_s, W / f_s)."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected a video (b, {self.in_channels}, t, h, w), got {tuple(x.shape)}")
        self.num_latent_frames(x.shape[2])
        if x.shape[-2] % self.spatial_factor or x.shape[-1] % self.spatial_factor:
            raise ValueError(f"frame size {tuple(x.shape[-2:])} must be a multiple of {self.spatial_factor}")
        return DiagonalGaussian(self._code(self.encoder, x, chunk_frames, tile, frames_per_step=1,
                                           pixels_per_step=1))

    def decode(self, z: Tensor, chunk_frames: int | None = None,
               tile: tuple[int, int, int] | None = None) -> Tensor:
        """z (b, c_z, n, h, w) -> video (b, 3, 1 + f_t (n - 1), h f_s, w f_s)."""
        if z.ndim != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents (b, {self.latent_channels}, n, h, w), got {tuple(z.shape)}")
        return self._code(self.decoder, z, chunk_frames, tile, frames_per_step=self.temporal_factor,
                          pixels_per_step=self.spatial_factor)

    def forward(self, x: Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()  # (b, c_z, n, h, w)
        return self.decode(z), posterior  # (b, 3, T, H, W)

    def _code(self, net: nn.Module, x: Tensor, chunk_frames: int | None, tile: tuple[int, int, int] | None,
              frames_per_step: int, pixels_per_step: int) -> Tensor:
        """net(x) over temporal chunks and/or spatial tiles; sizes in video frames and pixels."""
        run = net
        if chunk_frames is not None:
            if chunk_frames <= 0 or chunk_frames % self.temporal_factor:
                raise ValueError(f"chunk_frames must be a positive multiple of {self.temporal_factor}, "
                                 f"got {chunk_frames}")
            run = partial(run_chunked, net, chunk=chunk_frames // frames_per_step)
        if tile is None:
            return run(x)
        if len(tile) != 3 or any(v % self.spatial_factor for v in tile):
            raise ValueError(f"tile (tile_h, tile_w, overlap) = {tile} must be multiples of "
                             f"{self.spatial_factor}")
        tile_h, tile_w, overlap = (v // pixels_per_step for v in tile)
        return run_tiled(run, x, tile_h, tile_w, overlap)

    # ---------------------------------------------------------------------------- image-decoding regulariser

    def decode_subframes(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Decode each sub-latent alone into the frame it stands for (paper §4, image-decoding regulariser).

        z (b, c_z, n, h, w): sub-latent k (channels k c_s .. (k+1) c_s) of latent frame i >= 1 gives video
        frame f_t (i - 1) + 1 + k; latent frame 0 codes frame 0 alone, so only its sub-latent 0 is decoded.
        Returns (frames (b, 3, N, H, W), target_index (N,)); the loss is L1(frames, x[:, :, target_index]).
        """
        if not self.image_regularizer:
            raise RuntimeError("this VAE was built with image_regularizer=False: it has no image decoder")
        b, _, n, _, _ = z.shape
        k, c_sub = self.sub_latents, self.latent_channels // self.sub_latents
        first = z[:, :c_sub, 0]  # (b, c_s, h, w)
        rest = rearrange(z[:, :, 1:], "b (k c) n h w -> (b n k) c h w", k=k)  # (b (n-1) k, c_s, h, w)
        images = self.image_decoder(torch.cat([first, rest], dim=0))  # (b + b (n-1) k, 3, H, W)
        rest_frames = rearrange(images[b:], "(b n k) c h w -> b c (n k) h w", b=b, n=n - 1, k=k)
        frames = torch.cat([images[:b, :, None], rest_frames], dim=2)  # (b, 3, 1 + (n-1) k, H, W)
        latent_frame, sub = torch.arange(1, n)[:, None], torch.arange(k)[None, :]
        rest_index = (self.temporal_factor * (latent_frame - 1) + 1 + sub).flatten()  # (n-1) k
        target_index = torch.cat([torch.zeros(1, dtype=torch.long), rest_index]).to(z.device)
        return frames, target_index

    # ------------------------------------------------------------------------------------- latent statistics

    def set_latent_stats(self, mean: Tensor, std: Tensor) -> None:
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != (self.latent_channels,) or std.shape != (self.latent_channels,):
            raise ValueError(f"latent stats must have shape ({self.latent_channels},), "
                             f"got {tuple(mean.shape)}, {tuple(std.shape)}")
        if not bool((std > 0).all()) or not bool(torch.isfinite(mean).all()):
            raise ValueError("latent_std must be positive and latent_mean finite")
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)

    def normalize_latents(self, z: Tensor) -> Tensor:
        return (z - self._channel_view(self.latent_mean, z)) / self._channel_view(self.latent_std, z)

    def denormalize_latents(self, z: Tensor) -> Tensor:
        return z * self._channel_view(self.latent_std, z) + self._channel_view(self.latent_mean, z)

    @staticmethod
    def _channel_view(stat: Tensor, z: Tensor) -> Tensor:
        return stat.to(z.dtype).view(1, -1, *([1] * (z.ndim - 2)))  # (1, c, 1, ...)


@torch.no_grad()
def estimate_latent_stats(vae: CausalVideoVAE, videos: Iterable[Tensor], max_batches: int,
                          sample_posterior: bool = False) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of the latents of up to `max_batches` video batches (b, 3, T, H, W).

    Pooled over batch, time and space in float64. Uses the posterior mode by default (deterministic; with the
    tiny KL weight of video VAEs the posterior std is negligible next to the spread of the means); pass
    sample_posterior=True to include it when the DiT is trained on posterior samples.
    """
    if max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    moments = None
    for i, x in enumerate(videos):
        if i >= max_batches:
            break
        posterior = vae.encode(x.to(vae.latent_mean.device))
        m = latent_moments(posterior.sample() if sample_posterior else posterior.mode())
        moments = m if moments is None else moments + m
    if moments is None:
        raise ValueError("no videos to estimate latent statistics from")
    return stats_from_moments(moments)


def latent_moments(z: Tensor) -> Tensor:
    """Per-channel (sum, sum of squares, count) of latents (b, c, n, h, w), float64 (3, c); moments add up over
    batches and ranks, so statistics pool exactly."""
    z = rearrange(z.double(), "b c n h w -> c (b n h w)")
    return torch.stack([z.sum(1), z.pow(2).sum(1), torch.full_like(z[:, 0], z.shape[1])])


def stats_from_moments(moments: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, std) per channel, float32, from summed `latent_moments`."""
    total, total_sq, count = moments
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    return mean.float(), std.float()
