"""Inflating a pretrained 2D image VAE (diffusers AutoencoderKL, SD3/FLUX layout) into the causal video VAE.

A static video must code exactly as the 2D VAE codes each of its frames; the same for isa4d's own image stage
(the VAE trained on one-frame clips) once collapsed to the last tap. Everything runs on small, randomly initialised
models written to tmp_path: nothing is downloaded.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from isa4d.cli import run_cli
from isa4d.models.vae import CausalVideoVAE
from isa4d.models.vae.inflate import (diffusers_to_original, inflate_image_vae, inflate_into, load_image_vae_weights,
                                      read_image_vae)

diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
SD3_SCALE, SD3_SHIFT = 1.5305, 0.0609
# fp32 tolerance: conv3d (three taps, two of them zero) and conv2d reduce in different orders, so sums round
# differently; zero taps add exact zeros, so only the summation order differs (measured max error ~4e-6 on
# outputs of magnitude ~2).
TOL = dict(rtol=1e-5, atol=1e-5)


def small_image_vae(latent_channels: int = 8, quant_conv: bool = False, seed: int = 0):
    """The SD3/FLUX layout family (DownEncoderBlock2D levels, mid attention, no quant convs) at toy widths; every
    parameter perturbed so no norm stays the identity and no bias stays zero."""
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4,
        use_quant_conv=quant_conv, use_post_quant_conv=quant_conv, scaling_factor=SD3_SCALE,
        shift_factor=SD3_SHIFT)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def image_vae(tmp_path_factory):
    """(model, folder): a small random AutoencoderKL saved as a diffusers folder."""
    model = small_image_vae()
    folder = tmp_path_factory.mktemp("image_vae")
    model.save_pretrained(folder)
    return model, folder


def assert_static_video_codes_like_frames(model, vae: CausalVideoVAE, frames: torch.Tensor) -> dict[str, float]:
    """Every latent frame of the still video = the 2D posterior of its frame; decoding a still latent = the 2D
    decoding in every frame. Returns the largest errors and magnitudes, for the record."""
    with torch.no_grad():
        post_2d = model.encode(frames).latent_dist
        video = frames[:, :, None].expand(-1, -1, 9, -1, -1).contiguous()  # (b, 3, 9, H, W): 3 latent frames
        post_3d = vae.encode(video)
        assert post_3d.mean.shape[2] == 3
        for i in range(3):
            torch.testing.assert_close(post_3d.mean[:, :, i], post_2d.mean, **TOL)
            torch.testing.assert_close(post_3d.logvar[:, :, i], post_2d.logvar, **TOL)
        decoded_2d = model.decode(post_2d.mean).sample  # (b, 3, H, W)
        decoded_3d = vae.decode(post_2d.mean[:, :, None].expand(-1, -1, 3, -1, -1))  # (b, 3, 9, H, W)
        assert decoded_3d.shape[2] == 9
        for t in range(9):
            torch.testing.assert_close(decoded_3d[:, :, t], decoded_2d, **TOL)
    return {"latent_mean_error": (post_3d.mean - post_2d.mean[:, :, None]).abs().max().item(),
            "latent_mean_max": post_2d.mean.abs().max().item(),
            "decoded_error": (decoded_3d - decoded_2d[:, :, None]).abs().max().item(),
            "decoded_max": decoded_2d.abs().max().item()}


def test_static_video_codes_as_the_image_vae_codes_each_frame(image_vae):
    model, folder = image_vae
    vae = inflate_image_vae(folder).eval()
    assert vae.config["channel_mults"] == [1, 2, 2] and vae.config["norm_groups"] == 4
    assert vae.temporal_factor == 4 and vae.config["upsampler"] == "inflated"
    frames = torch.rand(2, 3, 32, 40) * 2 - 1
    assert_static_video_codes_like_frames(model, vae, frames)
    # the image VAE's latent normalisation, (z - shift) * scale, is what normalize_latents now computes
    z = torch.randn(2, 8, 3, 4, 5)
    torch.testing.assert_close(vae.normalize_latents(z), (z - SD3_SHIFT) * SD3_SCALE)
    # last-tap inflation makes every layer frame-wise: on any video the inflated encoder starts by coding each
    # window's last frame (4i) alone, and the decoder holds each latent frame's 2D decoding over its window
    moving = torch.rand(1, 3, 9, 32, 40) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(moving).mean  # (1, 8, 3, 4, 5)
        decoded = vae.decode(latents)  # (1, 3, 9, 32, 40)
        for i in range(3):
            last = model.encode(moving[:, :, 4 * i]).latent_dist.mean
            torch.testing.assert_close(latents[:, :, i], last, **TOL)
            earlier = model.encode(moving[:, :, max(4 * i - 1, 1)]).latent_dist.mean  # the frames do differ
            assert (latents[:, :, i] - earlier).abs().max() > 0.01
            held = model.decode(latents[:, :, i]).sample  # (1, 3, 32, 40)
            for t in range(max(4 * i - 3, 0), 4 * i + 1):
                torch.testing.assert_close(decoded[:, :, t], held, **TOL)


def test_single_original_layout_file_inflates_like_the_diffusers_folder(image_vae, tmp_path):
    """An SD3/FLUX ae.safetensors (original keys, 1x1-conv attention) gives the same video VAE. The key mapping is
    checked against diffusers' own single-file conversion, so it does not merely invert itself."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    model, folder = image_vae
    original = diffusers_to_original(model.state_dict())
    original = {k: v[:, :, None, None] if ".attn_1." in k and v.ndim == 2 else v for k, v in original.items()}
    back = convert_ldm_vae_checkpoint(original, dict(model.config))
    assert back.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(back[key].reshape(value.shape), value), key
    file = tmp_path / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, str(file))
    vae = inflate_image_vae(file, scaling_factor=SD3_SCALE, shift_factor=SD3_SHIFT, norm_groups=4).eval()
    reference = inflate_image_vae(folder)
    for (key, a), b in zip(vae.state_dict().items(), reference.state_dict().values()):
        if not key.startswith("image_decoder."):  # the regulariser head is not inflated: random either way
            assert torch.equal(a, b), key
    assert_static_video_codes_like_frames(model, vae, torch.rand(1, 3, 32, 32) * 2 - 1)
    # SD3's all-in-one checkpoint: the VAE under first_stage_model., beside the other networks
    all_in_one = {**{f"first_stage_model.{k}": v.contiguous() for k, v in original.items()},
                  "model.diffusion_model.x_embedder.proj.weight": torch.zeros(4, 16, 2, 2)}
    save_file(all_in_one, str(tmp_path / "sd3_medium.safetensors"))
    from_all = inflate_image_vae(tmp_path / "sd3_medium.safetensors", norm_groups=4)
    assert all(torch.equal(a, b) for a, b in zip(from_all.encoder.state_dict().values(),
                                                 reference.encoder.state_dict().values()))


def test_missing_or_mismatched_weights_give_one_clear_error(image_vae, tmp_path):
    model, folder = image_vae
    with pytest.raises(FileNotFoundError, match=f"pretrained image VAE not found: {tmp_path / 'nope'}"):
        inflate_image_vae(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no diffusion_pytorch_model.safetensors in this folder"):
        inflate_image_vae(tmp_path / "empty")
    save_file({"model.layer.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors: not an AutoencoderKL state dict"):
        inflate_image_vae(tmp_path / "other.safetensors")
    small_image_vae(latent_channels=4, quant_conv=True).save_pretrained(tmp_path / "sd1")
    with pytest.raises(ValueError, match="sd1.*has post_quant_conv/quant_conv, the SD1/SD2/SDXL layout"):
        inflate_image_vae(tmp_path / "sd1")
    image = read_image_vae(folder)
    wider = CausalVideoVAE(latent_channels=8, base_channels=16, channel_mults=(1, 1, 1), num_res_blocks=1,
                           temporal_downsample=(True, True), norm_groups=4, image_regularizer=False)
    with pytest.raises(ValueError, match=r"encoder.conv_in.weight is \(8, 3, 3, 3, 3\) after inflation, "
                                         r"the video VAE expects \(16, 3, 3, 3, 3\)"):
        inflate_into(wider, image)
    deeper = CausalVideoVAE(latent_channels=8, base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=2,
                            temporal_downsample=(True, True), norm_groups=4, image_regularizer=False)
    with pytest.raises(ValueError, match="has no decoder.up.0.block.2.conv1.bias"):
        inflate_into(deeper, image)
    factorized = CausalVideoVAE(**{**inflate_image_vae(folder).config, "upsampler": "factorized"})
    with pytest.raises(ValueError, match="upsampler='inflated'"):
        inflate_into(factorized, image)


def _fit_args(tmp_path, *extra):
    assets = ROOT / "tests/assets/toy_world"
    return [
        "fit", "-c", str(ROOT / "configs/vae/tiny.yaml"), "-c", str(ROOT / "configs/data/toy.yaml"),
        "-c", str(ROOT / "configs/trainer/cpu_debug.yaml"),
        f"--data.init_args.train_urls={assets}/train-*.tar", f"--data.init_args.val_urls={assets}/val-*.tar",
        "--data.init_args.num_workers=0",
        '--data.init_args.buckets=[{"height": 32, "width": 32, "num_frames": 5, "batch_size": 1}]',
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}/runs",
        *extra,
    ]


def test_vae_init_inflates_the_image_vae_and_trains_through_the_cli(image_vae, tmp_path):
    """`--model.init_args.vae_init=FOLDER` on the tiny preset (its VAE resized to the image VAE's layout): one
    AdamW step later every inflated weight is within the step size of the image VAE's, and the latent
    normalisation is SD3's."""
    model, folder = image_vae
    lr = 1e-4
    cli = run_cli(_fit_args(
        tmp_path, f"--model.init_args.vae_init={folder}",
        "--model.init_args.vae.init_args.latent_channels=8", "--model.init_args.vae.init_args.base_channels=8",
        "--model.init_args.vae.init_args.channel_mults=[1, 2, 2]",
        "--model.init_args.vae.init_args.temporal_downsample=[true, true]",
        "--model.init_args.vae.init_args.norm_groups=4",
        "--model.init_args.vae.init_args.image_decoder_channels=[8, 8]",
        f"--model.init_args.optimizer.init_args.lr={lr}", "--trainer.max_steps=1", "--trainer.limit_val_batches=0"))
    assert cli.trainer.global_step == 1
    trained = cli.model.vae.state_dict()
    reference = inflate_image_vae(folder).state_dict()
    inflated = [k for k in reference if k.startswith(("encoder.", "decoder."))]
    steps = torch.stack([(trained[k] - reference[k]).abs().max() for k in inflated])
    assert steps.max() <= 1.01 * lr  # an Adam step moves each weight by at most ~lr
    assert steps.max() > 0  # and it did train
    torch.testing.assert_close(cli.model.vae.latent_mean, torch.full((8,), SD3_SHIFT))
    torch.testing.assert_close(cli.model.vae.latent_std, torch.full((8,), 1 / SD3_SCALE))


def test_sd3_preset_stops_clearly_without_the_weights(tmp_path):
    """configs/vae/sd3_inflated.yaml builds the SD3 layout and, with no weights at its path, stops at setup with
    the path in the message (built here at a quarter width: the check is the same)."""
    args = _fit_args(tmp_path, "--model.init_args.loss.perceptual=0", "--model.init_args.vae_init=missing/sd3_vae",
                     "--model.init_args.vae.init_args.base_channels=32")
    args[2] = str(ROOT / "configs/vae/sd3_inflated.yaml")  # in place of the tiny preset
    cli = run_cli(args[1:], run=False)
    assert cli.model.vae.config["channel_mults"] == [1, 2, 4, 4] and cli.model.vae.config["norm_groups"] == 32
    with pytest.raises(FileNotFoundError, match="pretrained image VAE not found: missing/sd3_vae"):
        cli.model.setup("fit")


SD3_CONFIG = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32,
                  use_quant_conv=False, use_post_quant_conv=False, scaling_factor=SD3_SCALE, shift_factor=SD3_SHIFT)


def test_sd3_layout_gives_the_presets_video_vae():
    """The video VAE built from SD3's VAE config (shapes only, on the meta device) is configs/vae/sd3_inflated.yaml's,
    and its latent normalisation is the preset's."""
    import yaml

    from isa4d.models.vae.inflate import ImageVAE, latent_stats, video_vae_config

    with torch.device("meta"):
        model = diffusers.AutoencoderKL(**SD3_CONFIG)
    image = ImageVAE(diffusers_to_original(model.state_dict()), dict(model.config), Path("sd3"))
    preset = yaml.safe_load((ROOT / "configs/vae/sd3_inflated.yaml").read_text())["model"]["init_args"]["vae"]
    defaults = {k: p.default for k, p in inspect.signature(CausalVideoVAE).parameters.items()}
    preset = {**defaults, **preset["init_args"]}
    built = video_vae_config(image)
    assert {k: preset[k] for k in built} == {k: list(v) if isinstance(v, tuple) else v for k, v in built.items()}
    mean, std = latent_stats(dict(model.config), 16)
    torch.testing.assert_close(mean, torch.tensor(preset["latent_mean"]))
    torch.testing.assert_close(std, torch.tensor(preset["latent_std"]))


@pytest.mark.slow
def test_sd3_size_image_vae_inflates_exactly(tmp_path):
    """The same equivalence at SD3's full size (a random 84M AutoencoderKL with SD3's config, 64x64 frames)."""
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**SD3_CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    vae = inflate_image_vae(tmp_path).eval()
    print(assert_static_video_codes_like_frames(model, vae, torch.rand(1, 3, 64, 64) * 2 - 1))  # docs/vae_pretrained.md


def random_video_vae(upsampler: str = "inflated", seed: int = 0) -> CausalVideoVAE:
    torch.manual_seed(seed)
    vae = CausalVideoVAE(latent_channels=8, base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=1,
                         temporal_downsample=(True, True), norm_groups=4, image_decoder_channels=(8, 8),
                         upsampler=upsampler)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae.eval()


def assert_codes_still_videos_as_images(image_stage: CausalVideoVAE, vae: CausalVideoVAE) -> None:
    """`vae` codes a still 9-frame video as `image_stage` codes its one frame, latent and decoding."""
    x = torch.rand(2, 3, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        image = image_stage.encode(x)
        video = vae.encode(x.expand(-1, -1, 9, -1, -1).contiguous())
        decoded = vae.decode(image.mean.expand(-1, -1, 3, -1, -1))  # (2, 3, 9, 32, 32)
        reference = image_stage.decode(image.mean)  # (2, 3, 1, 32, 32)
    for i in range(3):
        torch.testing.assert_close(video.mean[:, :, i], image.mean[:, :, 0], **TOL)
        torch.testing.assert_close(video.logvar[:, :, i], image.logvar[:, :, 0], **TOL)
    torch.testing.assert_close(decoded, reference.expand_as(decoded), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("upsampler", ["inflated", "factorized"])
def test_image_stage_collapses_to_a_vae_that_codes_still_videos_as_images(upsampler, tmp_path):
    """An isa4d VAE trained on one-frame clips (the image stage; random here) given as vae_init, from an `isa4d
    export`-style file: collapsed to the last tap, a still video codes as the image stage codes its frame. As trained,
    it does not: the earlier frame of each depth-to-time pair was never used on images."""
    import json

    image_stage = random_video_vae(upsampler)
    file = tmp_path / "image_stage.safetensors"
    save_file({k: v.contiguous() for k, v in image_stage.state_dict().items()}, str(file),
              metadata={"vae_config": json.dumps(image_stage.config)})
    vae = random_video_vae(upsampler, seed=1)
    load_image_vae_weights(vae, file)
    assert_codes_still_videos_as_images(image_stage, vae)
    torch.testing.assert_close(vae.image_decoder.state_dict(), image_stage.image_decoder.state_dict())
    with torch.no_grad():
        z = image_stage.encode(torch.rand(1, 3, 1, 32, 32)).mean
        uncollapsed = image_stage.decode(z.expand(-1, -1, 3, -1, -1))
    assert (uncollapsed - image_stage.decode(z)).abs().max() > 0.1
    other = CausalVideoVAE(**{**image_stage.config, "norm_groups": 2})
    with pytest.raises(ValueError, match="image_stage.safetensors: an image-stage VAE of another config "
                                         r"\(norm_groups differ\)"):
        load_image_vae_weights(other, file)


def test_image_stage_trains_on_toy_frames_through_the_cli(tmp_path):
    """configs/data/toy_frames.yaml: one step of the tiny VAE on single toy-world frames, then its checkpoint as
    vae_init of the video stage codes still videos as the image stage codes frames."""
    args = _fit_args(tmp_path, "--trainer.max_steps=1", "--trainer.limit_val_batches=0")
    args[4] = str(ROOT / "configs/data/toy_frames.yaml")
    args = [a.replace('"num_frames": 5, "batch_size": 1', '"num_frames": 1, "batch_size": 4') for a in args]
    cli = run_cli(args)
    assert cli.trainer.global_step == 1
    assert cli.model.step_counts == {"samples": 4, "tokens": 4}  # 4 clips of 1 frame
    checkpoint = tmp_path / "image_stage.ckpt"
    cli.trainer.save_checkpoint(checkpoint)
    video = CausalVideoVAE(**cli.model.vae.config)
    load_image_vae_weights(video, checkpoint)
    assert_codes_still_videos_as_images(cli.model.vae.eval(), video.eval())
