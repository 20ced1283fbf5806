"""Causal video VAE (models/vae): shapes, causality, chunking, tiling, regulariser, training, stats, dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from isa4d.models.vae import CausalVideoVAE, estimate_latent_stats, run_tiled, streaming
from isa4d.models.vae.causal_conv import causal_convs

# The tiny preset (configs/vae/tiny.yaml): runs on a CPU in well under a second.
TINY = dict(base_channels=16, channel_mults=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8,
            image_decoder_channels=(16, 16))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convs gain little from threads, and on a shared CPU OpenMP spin-waits slow them many times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Decoder upsamplers, and both with the parameter-free shortcuts (DC-AE / Wan2.2 style) around them.
VARIANTS = {"inflated": {}, "factorized": {"upsampler": "factorized"}, "inflated+shortcuts": {"shortcuts": True},
            "factorized+shortcuts": {"upsampler": "factorized", "shortcuts": True}}


def make_vae(dtype: torch.dtype = torch.float32, **overrides) -> CausalVideoVAE:
    torch.manual_seed(0)
    overrides = {**VARIANTS[overrides.pop("upsampler")], **overrides} if "upsampler" in overrides else overrides
    return CausalVideoVAE(**{**TINY, **overrides}).to(dtype).eval()


def video(t: int, h: int = 32, w: int = 32, b: int = 1, dtype: torch.dtype = torch.float32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 3, t, h, w, generator=g, dtype=dtype) * 2 - 1)


# ----------------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("t", [1, 5, 9, 17])
@pytest.mark.parametrize("upsampler", list(VARIANTS))
def test_shapes_round_trip(t, upsampler):
    vae = make_vae(upsampler=upsampler)
    with torch.no_grad():
        posterior = vae.encode(video(t, 32, 48, b=2))
        assert posterior.mean.shape == (2, 16, 1 + (t - 1) // 4, 4, 6)
        assert vae.decode(posterior.sample()).shape == (2, 3, t, 32, 48)


@pytest.mark.parametrize("t", [2, 4, 6, 8])
def test_bad_frame_count_raises(t):
    with pytest.raises(ValueError, match="1 \\+ 4 k frames"):
        make_vae().encode(video(t))


def test_bad_sizes_and_configs_raise():
    vae = make_vae()
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode(video(5, 36, 32))
    with pytest.raises(ValueError, match="multiple of 4"):
        vae.encode(video(9), chunk_frames=3)
    with pytest.raises(ValueError, match="one flag per downsampling"):
        CausalVideoVAE(**{**TINY, "temporal_downsample": (True, True)})
    with pytest.raises(ValueError, match="sub_latents"):
        CausalVideoVAE(**{**TINY, "sub_latents": 2})
    with pytest.raises(ValueError, match="norm_groups"):
        CausalVideoVAE(**{**TINY, "norm_groups": 7})
    with pytest.raises(ValueError, match="upsampler must be one of"):
        CausalVideoVAE(**{**TINY, "upsampler": "bilinear"})


def test_temporal_factor_generalises():
    """One temporal downsampling: 1 + 2k frames, 2 sub-latents of 8 channels."""
    vae = make_vae(temporal_downsample=(False, False, True), sub_latents=2)
    z = vae.encode(video(7)).mode()
    assert z.shape[2] == 4 and vae.decode(z).shape[2] == 7
    assert vae.decode_subframes(z)[1].tolist() == list(range(7))
    with pytest.raises(ValueError, match="1 \\+ 2 k frames"):
        vae.encode(video(5 + 1))


# -------------------------------------------------------------------------------------------------- causality


@pytest.mark.parametrize("shortcuts", [False, True])
def test_encoder_is_causal(shortcuts):
    """Latent frame i sees frames <= 4i only: perturbing frames 5.. leaves latent frames 0, 1 bit-equal."""
    vae = make_vae(torch.float64, shortcuts=shortcuts)
    x = video(9, dtype=torch.float64)
    x2 = x.clone()
    x2[:, :, 5:] += torch.randn_like(x2[:, :, 5:])
    with torch.no_grad():
        m, m2 = vae.encode(x).mean, vae.encode(x2).mean
    assert torch.equal(m[:, :, :2], m2[:, :, :2])
    assert (m[:, :, 2] - m2[:, :, 2]).abs().max() > 1e-3  # the perturbation does reach latent frame 2


@pytest.mark.parametrize("upsampler", list(VARIANTS))
def test_decoder_is_causal(upsampler):
    """Frame t sees latent frames <= ceil(t / 4): perturbing latent frame 2 leaves frames 0..4 bit-equal."""
    vae = make_vae(torch.float64, upsampler=upsampler)
    z = torch.randn(1, 16, 3, 4, 4, dtype=torch.float64)
    z2 = z.clone()
    z2[:, :, 2] += 1.0
    with torch.no_grad():
        y, y2 = vae.decode(z), vae.decode(z2)
    assert torch.equal(y[:, :, :5], y2[:, :, :5])
    assert (y[:, :, 5:] - y2[:, :, 5:]).abs().amax(dim=(0, 1, 3, 4)).min() > 1e-4  # frames 5..8 all move


@pytest.mark.parametrize("upsampler", list(VARIANTS))
def test_first_frame_is_coded_alone(upsampler):
    vae = make_vae(upsampler=upsampler)
    x = video(9)
    with torch.no_grad():
        m = vae.encode(x).mean
        torch.testing.assert_close(vae.encode(x[:, :, :1]).mean, m[:, :, :1], atol=1e-5, rtol=0)
        torch.testing.assert_close(vae.decode(m[:, :, :1]), vae.decode(m)[:, :, :1], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("upsampler", list(VARIANTS))
def test_chunked_equals_unchunked_and_cache_does_not_leak(upsampler):
    vae = make_vae(upsampler=upsampler)
    x = video(17)
    with torch.no_grad():
        m = vae.encode(x).mean
        for chunk in (4, 8, 12):
            torch.testing.assert_close(vae.encode(x, chunk_frames=chunk).mean, m, atol=1e-5, rtol=0)
        y = vae.decode(m)
        for chunk in (4, 8, 16):
            torch.testing.assert_close(vae.decode(m, chunk_frames=chunk), y, atol=1e-5, rtol=0)
        # No state survives a chunked call: caches empty, streaming off, calls repeat exactly.
        assert all(c._cache is None and not c.streaming for c in causal_convs(vae))
        assert torch.equal(vae.encode(x).mean, m)
        assert torch.equal(vae.decode(m), y)
        assert torch.equal(vae.decode(m, chunk_frames=8), vae.decode(m, chunk_frames=8))


def test_cache_cleared_after_error():
    vae = make_vae()
    with pytest.raises(RuntimeError, match="boom"), streaming(vae):
        vae.encoder(video(1))
        assert any(c._cache is not None for c in causal_convs(vae))
        raise RuntimeError("boom")
    assert all(c._cache is None and not c.streaming for c in causal_convs(vae))


# ----------------------------------------------------------------------------------------------------- tiling


@pytest.mark.parametrize("tile", [(32, 32, 16), (32, 48, 8), (40, 40, 0)])
def test_tile_blending_is_exact_for_local_maps(tile):
    """Maps local in space (pool x8 / nearest x8) come out of the tiler unchanged: positions and weights."""
    x = torch.randn(2, 3, 5, 64, 96)
    down = lambda t: torch.tanh(F.avg_pool3d(t, (1, 8, 8)))  # noqa: E731
    up = lambda t: torch.tanh(F.interpolate(t, scale_factor=(1, 8, 8)))  # noqa: E731
    torch.testing.assert_close(run_tiled(down, x, *tile), down(x), atol=1e-6, rtol=0)
    z = x[..., :8, :12]
    torch.testing.assert_close(run_tiled(up, z, *(v // 8 for v in tile)), up(z), atol=1e-6, rtol=0)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().mean() / b.abs().mean()).item()


def test_tiled_vae_exact_for_one_tile_and_close_otherwise():
    vae = make_vae()
    x = video(5, 64, 64)
    with torch.no_grad():
        m = vae.encode(x).mean
        y = vae.decode(m)
        assert torch.equal(vae.encode(x, tile=(64, 64, 16)).mean, m)
        assert torch.equal(vae.decode(m, tile=(64, 64, 16)), y)
        # Per-frame GroupNorm statistics and the mid attention span the whole frame, so tiles cannot be exact;
        # with random weights the gap is large, but blending must beat hard seams and stay bounded.
        blend, seam = (48, 48, 32), (32, 32, 0)
        enc_blend = relative_error(vae.encode(x, tile=blend).mean, m)
        enc_seam = relative_error(vae.encode(x, tile=seam).mean, m)
        dec_blend = relative_error(vae.decode(m, tile=blend), y)
        dec_seam = relative_error(vae.decode(m, tile=seam), y)
        assert enc_blend < enc_seam and dec_blend < dec_seam
        assert enc_blend < 0.6 and dec_blend < 1.0
        # Temporal chunks and spatial tiles compose.
        torch.testing.assert_close(vae.decode(m, chunk_frames=4, tile=blend), vae.decode(m, tile=blend),
                                   atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- regulariser


def test_subframe_targets_and_mapping():
    vae = make_vae()
    z = vae.encode(video(9)).mode().detach()
    frames, index = vae.decode_subframes(z)
    assert frames.shape == (1, 3, 9, 32, 32)
    assert index.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    # Sub-latent k (channels 4k .. 4k+3) of latent frame 1 feeds video frame 1 + k and nothing else.
    z2 = z.clone()
    z2[:, 4:8, 1] += 1.0
    changed = (vae.decode_subframes(z2)[0] - frames).abs().amax(dim=(0, 1, 3, 4)) > 0
    assert changed.tolist() == [i == 2 for i in range(9)]


def test_regulariser_gradient_reaches_encoder_only():
    vae = make_vae()
    x = video(5)
    frames, index = vae.decode_subframes(vae.encode(x).sample())
    F.l1_loss(frames, x[:, :, index]).backward()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert vae.image_decoder.conv_in.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in vae.decoder.parameters())


def test_regulariser_disabled():
    vae = make_vae(image_regularizer=False)
    assert not hasattr(vae, "image_decoder")
    assert not any("image_decoder" in name for name, _ in vae.named_parameters())
    assert sum(p.numel() for p in vae.parameters()) < sum(p.numel() for p in make_vae().parameters())
    with pytest.raises(RuntimeError, match="image_regularizer=False"):
        vae.decode_subframes(torch.zeros(1, 16, 2, 4, 4))


# -------------------------------------------------------------------------------------------------- training


def test_tiny_vae_overfits_one_clip():
    torch.manual_seed(0)
    vae = CausalVideoVAE(latent_channels=8, base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=1,
                         temporal_downsample=(True, True), norm_groups=4, image_regularizer=False)
    t = torch.arange(5.0)[:, None, None]
    yy, xx = torch.linspace(-1, 1, 16)[None, :, None], torch.linspace(-1, 1, 16)[None, None, :]
    clip = 0.8 * torch.stack([torch.sin(3 * xx + 0.5 * t) + 0 * yy, torch.cos(3 * yy - 0.4 * t) + 0 * xx,
                              torch.sin(2 * (xx + yy) + 0.3 * t)])[None]  # (1, 3, 5, 16, 16), moving waves
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        recon, posterior = vae(clip, sample_posterior=False)
        loss = F.l1_loss(recon, clip) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(F.l1_loss(recon, clip).item())
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])  # the issue asks for >= 5x; measured ~10x


# ------------------------------------------------------------------------------------------ latent statistics


def test_latent_stats_normalise_and_persist():
    vae = make_vae()
    clips = [video(5, seed=s) * torch.linspace(0.2, 1.0, 32)[None, None, None, None, :] for s in range(3)]
    with torch.no_grad():
        mean, std = estimate_latent_stats(vae, clips, max_batches=3)
        vae.set_latent_stats(mean, std)
        z = torch.cat([vae.normalize_latents(vae.encode(c).mode()) for c in clips], dim=2)  # (1, 16, n, h, w)
    zc = z.transpose(0, 1).flatten(1)
    assert zc.mean(1).abs().max() < 1e-4 and (zc.std(1, unbiased=False) - 1).abs().max() < 1e-3
    torch.testing.assert_close(vae.normalize_latents(vae.denormalize_latents(z)), z, atol=1e-5, rtol=0)
    state = vae.state_dict()
    assert torch.equal(state["latent_mean"], mean) and torch.equal(state["latent_std"], std)
    fresh = make_vae()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.latent_std, std)
    with pytest.raises(ValueError, match="positive"):
        vae.set_latent_stats(mean, torch.zeros(16))


# ------------------------------------------------------------------------------------------------------ dtype


def test_bf16_autocast_runs_finite():
    vae = make_vae()
    x = video(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon, posterior = vae(x)
        frames, index = vae.decode_subframes(posterior.sample())
        chunked = vae.decode(posterior.mode(), chunk_frames=4)
    assert posterior.mean.dtype == torch.float32  # the posterior is kept in fp32
    for out in (recon, frames, chunked, posterior.kl()):
        assert torch.isfinite(out.float()).all()
    assert recon.shape == x.shape and frames.shape == x[:, :, index].shape


def test_factorized_upsampler_splits_time_and_space():
    """The factorised decoder upsamples with a 3x1x1 time conv before, and a 1x3x3 space conv after, the nearest
    x2 (so the time conv runs at the lower resolution), and reaches the next level's width itself."""
    vae = make_vae(upsampler="factorized")
    kernels = {name: tuple(m.kernel_size) for name, m in vae.decoder.named_modules() if "upsample" in name
               and isinstance(m, torch.nn.Conv3d)}
    temporal = [i for i, stage in enumerate(vae.decoder.up) if hasattr(stage, "upsample") and stage.upsample.temporal]
    assert temporal and all(kernels[f"up.{i}.upsample.time_conv"] == (3, 1, 1) for i in temporal)
    assert all(k == (1, 3, 3) for n, k in kernels.items() if n.endswith("upsample.conv"))
    # no shortcut conv is needed after a factorised upsampler: it already emits the next level's width
    assert all(isinstance(stage.block[0].nin_shortcut, torch.nn.Identity) for stage in vae.decoder.up[:-1])
    # time conv at the low resolution: its input is the stage's (h, w), not (2h, 2w)
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: seen.__setitem__(n, inp[0].shape[-1]))
             for n, m in vae.decoder.named_modules() if n.endswith("upsample.time_conv") or n.endswith("upsample.conv")]
    with torch.no_grad():
        vae.decode(torch.randn(1, 16, 3, 4, 4))
    for h in hooks:
        h.remove()
    for i in temporal:
        assert seen[f"up.{i}.upsample.conv"] == 2 * seen[f"up.{i}.upsample.time_conv"]


def test_shortcut_paths_against_pooling():
    """average_down is a causal 2 x 2 x 2 mean (frame 0 paired with itself); duplicate_up inverts it on cell-constant
    videos; a shortcut VAE refuses widths its channel groups cannot map."""
    from isa4d.models.vae.blocks import average_down, duplicate_up
    x = video(9, 16, 16, b=2, dtype=torch.float64)
    padded = torch.cat([x[:, :, :1], x], dim=2)  # (b, c, 10, h, w)
    torch.testing.assert_close(average_down(x, True, True), F.avg_pool3d(padded, 2), rtol=0, atol=1e-12)
    torch.testing.assert_close(average_down(x, False, True), F.avg_pool3d(x, (1, 2, 2)), rtol=0, atol=1e-12)
    cells = F.avg_pool3d(padded, 2)  # (b, c, 5, 8, 8)
    up = duplicate_up(cells, 3, True, True)
    assert up.shape == x.shape
    torch.testing.assert_close(average_down(up, True, True), cells, rtol=0, atol=1e-12)
    torch.testing.assert_close(duplicate_up(cells.repeat_interleave(2, dim=1), 3, False, True)[:, :, ::1, ::2, ::2],
                               cells, rtol=0, atol=1e-12)  # channel groups averaged, then copied in space
    with pytest.raises(ValueError, match="shortcuts need latent_channels"):
        CausalVideoVAE(**{**TINY, "shortcuts": True, "latent_channels": 12, "sub_latents": 4})
