"""Generate a video with a trained ISA-DiT: conditions -> noise -> windowed, guided ODE -> chunked VAE decoding.

`sample_latent` is the denoising loop shared by validation and `isa4d sample`; `generate` runs it for a batch of
inputs (`isa4d.inference.inputs`) and decodes. Long videos are denoised as overlapping temporal windows whose
velocities are blended at every step (`isa4d.diffusion.windows`), and decoded by the causal VAE in temporal chunks,
so length is bounded by neither the training clip length nor memory. Noise is drawn on the CPU from the seed, so a
seed gives the same video on any device (up to the device's arithmetic).

Several reference images (one per person) are laid side by side into one reference canvas: the 2D identity path
attends to all of them, and each person's points sample the features of their own tile (`tile_reference_points`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Mapping

import torch
from torch import nn

from isa4d.data.batch import Batch
from isa4d.diffusion.sampling import SAMPLERS, condition_guidance
from isa4d.diffusion.schedules import sampling_timesteps
from isa4d.diffusion.windows import sliding_window, window_starts
from isa4d.geometry.ndc import points_to_ndc
from isa4d.models.dit import DiTConditions


@dataclass
class ReferenceTiles:
    """Reference views of P people, one image each, laid side by side (person p in tile p) in `Batch.ref`.

    K (B, P, 3, 3) in pixels of one tile (the video's size), w2c (B, P, 4, 4): the camera of each person's image.
    """

    K: torch.Tensor
    w2c: torch.Tensor

    @property
    def num_tiles(self) -> int:
        return self.K.shape[1]


def tile_reference_points(ref_points: torch.Tensor, tiles: ReferenceTiles, person_mask: torch.Tensor, height: int,
                          width: int, near: float = 0.1, far: float = 20.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each person's points (B, P, V, 3) projected into their own tile of the reference canvas.

    Returns (ndc (B, P, V, 2) in the canvas' grid_sample coordinates, valid (B, P, V)). A tile spans
    x in [-1 + 2p/N, -1 + 2(p+1)/N] of a canvas of N tiles, so x_canvas = -1 + (2p + x_tile + 1) / N.
    """
    P, N = ref_points.shape[1], tiles.num_tiles
    if P > N:
        raise ValueError(f"{P} people but {N} reference tiles: give one reference image per person")
    ndc, ok = points_to_ndc(ref_points, tiles.K[:, :P], tiles.w2c[:, :P], height, width, near, far)
    p = torch.arange(P, device=ndc.device, dtype=ndc.dtype)[None, :, None]  # (1, P, 1)
    x = -1 + (2 * p + ndc[..., 0] + 1) / N
    xy = torch.stack([x, ndc[..., 1]], -1)  # (B, P, V, 2)
    ok = ok & person_mask[:, :, None]
    return torch.where(ok[..., None], xy, torch.zeros_like(xy)), ok


def calls_per_window(sampler: str, steps: int) -> int:
    """Network evaluations of one window over a whole sampling run (for progress bars)."""
    return 2 * steps - 1 if sampler == "heun" else steps


@torch.no_grad()
def sample_latent(network: nn.Module, cond: DiTConditions, noise: torch.Tensor, timesteps: torch.Tensor,
                  guidance: Mapping[str, float], sampler: str = "euler", window: int | None = None,
                  overlap: int = 2, on_call: Callable[[], None] | None = None) -> torch.Tensor:
    """Integrate from `noise` (B, C, T, h, w) along `timesteps` with per-condition guidance, in temporal windows of
    `window` latent frames sharing `overlap` (None: one window, the plain sampler). `on_call()` after each
    window's network evaluation."""
    T = noise.shape[2]
    window = T if window is None else min(window, T)

    def net_window(x: torch.Tensor, t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        v = condition_guidance(network, guidance, cond=cond.slice(start, stop))(x, t)
        if on_call is not None:
            on_call()
        return v

    net_fn = sliding_window(net_window, T, window, min(overlap, window - 1))
    return SAMPLERS[sampler](net_fn, noise, timesteps)


@torch.no_grad()
def generate(module, batch: Batch, tiles: ReferenceTiles | None = None, *, steps: int | None = None,
             guidance: Mapping[str, float] | None = None, seed: int = 0, window: int | None = None,
             overlap: int = 2, sampler: str | None = None, decode_chunk_frames: int | None = None,
             progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A video for every clip of a normalised `batch` (its video is only a shape: frames and size).

    module: a `DiTModule` (network, frozen VAE, conditioner). `window` (latent frames) and `overlap` set the
    temporal windows; the time shift is that of one window, as in training. Returns (video (B, T, 3, H, W) in
    [-1, 1], posed surface points of every frame (B, P, T, V, 3) for overlays).
    """
    vae, network = module.vae, module.network
    cond, points = module.conditions(batch)
    B, F, (H, W) = len(batch), batch.num_frames, batch.image_size
    if tiles is not None:
        with torch.autocast(batch.K.device.type, enabled=False):
            ref = batch.ref_smpl
            ref_points = module.conditioner.pose(ref.betas, ref.global_orient, ref.body_pose, ref.transl,
                                                 batch.gender)[:, :, 0]  # (B, P, V, 3)
            xy, ok = tile_reference_points(ref_points, tiles, batch.person_mask, H, W, module.conditioner.near,
                                           module.conditioner.far)
        cond = replace(cond, ref_points_ndc=xy, ref_points_valid=ok)
    shape = (B, vae.latent_channels, vae.num_latent_frames(F), H // vae.spatial_factor, W // vae.spatial_factor)
    T = shape[2]
    window = T if window is None else min(window, T)
    shift = module.shift_for((*shape[:2], window, *shape[3:]))  # the shift of what the network sees
    steps, sampler = steps or module.sample_steps, sampler or module.sampler
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(cond.plucker.device)
    timesteps = sampling_timesteps(steps, shift, device=noise.device)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        windows = len(window_starts(T, window, min(overlap, window - 1)))
        bar = tqdm(total=windows * calls_per_window(sampler, steps), unit="call",
                   desc=f"denoising {steps} steps x {windows} window{'s' * (windows > 1)}")
    latent = sample_latent(network, cond, noise, timesteps, module.guidance if guidance is None else guidance,
                           sampler, window, overlap, on_call=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    return module.decode(latent, decode_chunk_frames), points


def seam_ratio(video: torch.Tensor, starts: list[int], window: int, temporal_factor: int = 4) -> dict[str, float]:
    """How much a windowed video jumps where windows begin or end, relative to the rest of it.

    video (T, 3, H, W); `starts` and `window` in latent frames. Latent frame j >= 1 holds video frames
    f(j - 1) + 1 .. f·j (f = temporal_factor), so a window edge at latent frame j is the transition between video
    frames f(j - 1) and f(j - 1) + 1. Only transitions between latent frames are compared: inside a latent frame the
    causal VAE changes frames less, so comparing against those would call every latent boundary a seam. Returns
    `ratio`, the mean frame-to-frame change across window edges over the median change across the other latent
    boundaries (1: no seam), `ratio_max` with the largest edge change instead of the mean, and the counts.
    """
    change = (video[1:] - video[:-1]).float().abs().mean(dim=(1, 2, 3))  # (T - 1,): frame t -> t + 1
    latents = (video.shape[0] - 1) // temporal_factor + 1
    edges = ({s for s in starts[1:]} | {s + window for s in starts[:-1]}) & set(range(1, latents))
    boundary = [temporal_factor * (j - 1) for j in sorted(edges)]
    others = [temporal_factor * (j - 1) for j in range(1, latents) if j not in edges]
    if not boundary or not others:
        raise ValueError(f"need window edges and other latent boundaries to compare: edges {sorted(edges)} of "
                         f"{latents} latent frames")
    elsewhere = change[others].median()
    return {"ratio": (change[boundary].mean() / elsewhere).item(), "ratio_max": (change[boundary].max() / elsewhere).item(),
            "edges": len(boundary), "others": len(others)}
