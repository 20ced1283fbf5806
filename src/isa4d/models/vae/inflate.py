"""Start the causal video VAE from a pretrained 2D image VAE, as the paper does with SD3's (paper §4).

Reads an SD3/FLUX-layout `AutoencoderKL` (16 latent channels, no quant convs) from a local path, either a diffusers
folder (config.json + diffusion_pytorch_model.safetensors, or a pipeline folder with a `vae/` subfolder) or a
single original-layout file (SD3's / FLUX's `ae.safetensors`), and inflates it into `CausalVideoVAE`:

- every 3x3 conv kernel goes to the *last* causal tap of the 3x3x3 kernel (the current frame), zeros at the two
  earlier taps: each layer starts frame-wise, output frame t depending on input frame t alone, as in the 2D network
  (I3D's averaging, kernel / 3 at every tap, would code a still video alike but blend frames from the start);
- a temporal Upsample conv emits 2c channels for two frames: the 2D kernel is written into both halves;
- 1x1 shortcuts, GroupNorms and the mid-attention q/k/v/proj_out are copied (they mix no frames);
- the image VAE's latent normalisation z' = (z - shift_factor) * scaling_factor (or its per-channel
  latents_mean/latents_std) goes into `latent_mean` / `latent_std`, so `normalize_latents` hands the DiT the same
  unit-scale latents the image model's DiT sees.

With these weights a static video codes to latent frames that each equal the 2D posterior of the frame, and
decodes to the 2D decoding of every frame (tests/test_vae_inflate.py): training starts from the image model and
only has to learn time. No diffusers import: both layouts are plain safetensors, read here.

isa4d's own image stage (the same VAE trained on one-frame clips) is started from by `collapse_image_stage`, the
same idea for a network that already has time taps.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from isa4d.models.vae.autoencoder import CausalVideoVAE
from isa4d.models.vae.blocks import FactorizedUpsample
from isa4d.models.vae.causal_conv import CausalConv3d

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_HELP = "docs/vae_pretrained.md"
_PREFIXES = ("first_stage_model.", "vae.")  # SD3's full single-file checkpoint; a bare `vae.` wrapper


@dataclass
class ImageVAE:
    """A 2D AutoencoderKL's weights in the original (SD / FLUX `ae.safetensors`) key layout, which isa4d's module
    names follow, and its diffusers config when one came with it."""

    state: dict[str, Tensor]
    config: dict | None
    source: Path


# ------------------------------------------------------------------------------------------------------ reading

def read_image_vae(path: str | Path) -> ImageVAE:
    """The image VAE at `path` (a diffusers folder, a pipeline folder with `vae/`, or one .safetensors file).

    A single file takes the diffusers config.json beside it when there is one. Raises FileNotFoundError or
    ValueError with one line naming the path and what is wrong.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"pretrained image VAE not found: {path} (give a diffusers AutoencoderKL folder with "
                                f"config.json and {WEIGHTS_NAME}, or an SD3/FLUX ae.safetensors file; {_HELP})")
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").exists() else path
        weights = next((folder / n for n in (WEIGHTS_NAME, WEIGHTS_NAME.replace(".safetensors", ".fp16.safetensors"))
                        if (folder / n).exists()), folder / WEIGHTS_NAME)
        if not weights.exists():
            raise ValueError(f"{path}: no {WEIGHTS_NAME} in this folder (a diffusers AutoencoderKL folder holds "
                             f"config.json and {WEIGHTS_NAME}; {_HELP})")
    else:
        folder, weights = path.parent, path
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: not a .safetensors file (isa4d reads safetensors weights only; {_HELP})")
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else None
    if config is not None and config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"{config_path}: a {config['_class_name']} config, not an AutoencoderKL one")
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        keys = list(f.keys())
        # an all-in-one checkpoint (SD3's) holds the VAE under a prefix: read only those tensors
        prefix = next((p for p in _PREFIXES if any(k.startswith(p + "encoder.") for k in keys)), "")
        keys = [k for k in keys if k.startswith(prefix)]
        if prefix + "encoder.conv_in.weight" not in keys or prefix + "decoder.conv_in.weight" not in keys:
            raise ValueError(f"{weights}: not an AutoencoderKL state dict (no encoder/decoder.conv_in.weight; its "
                             f"keys start {sorted(keys)[:3]})")
        state = {k[len(prefix):]: f.get_tensor(k) for k in keys}
    quant = sorted({k.split(".")[0] for k in state if k.split(".")[0] in ("quant_conv", "post_quant_conv")})
    if quant:
        raise ValueError(f"{weights}: has {'/'.join(quant)}, the SD1/SD2/SDXL layout (4 latent channels); isa4d "
                         f"inflates the SD3/FLUX layout, which has none (use_quant_conv=false)")
    if any(".down_blocks." in k or ".up_blocks." in k for k in state):
        state = diffusers_to_original(state)
    return ImageVAE(state, config, weights)


def diffusers_to_original(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a diffusers AutoencoderKL state dict to the original SD/FLUX keys (the inverse of diffusers'
    single-file conversion); diffusers lists decoder levels coarse to fine, the original layout by level."""
    levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    renames = [
        (r"\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r".down.\1.block.\2."),
        (r"\.down_blocks\.(\d+)\.downsamplers\.0\.", r".down.\1.downsample."),
        (r"\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f".up.{levels - 1 - int(m.group(1))}.block.{m.group(2)}."),
        (r"\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f".up.{levels - 1 - int(m.group(1))}.upsample."),
        (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
        (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
        (r"\.mid_block\.attentions\.0\.", ".mid.attn_1."),
        (r"\.attn_1\.group_norm\.", ".attn_1.norm."),
        (r"\.attn_1\.(to_q|query)\.", ".attn_1.q."),
        (r"\.attn_1\.(to_k|key)\.", ".attn_1.k."),
        (r"\.attn_1\.(to_v|value)\.", ".attn_1.v."),
        (r"\.attn_1\.(to_out\.0|proj_attn)\.", ".attn_1.proj_out."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
        (r"\.conv_norm_out\.", ".norm_out."),
    ]
    out = {}
    for key, value in state.items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------- config and stats

def video_vae_config(image: ImageVAE, norm_groups: int | None = None) -> dict:
    """CausalVideoVAE arguments that hold `image`'s weights: its widths, depth and latent channels (read from the
    weight shapes, so a single file needs no config), SD's upsampler inflated, and isa4d's temporal compression
    (the last two downsamplings also halve time: 4x for the 4-level SD3/FLUX layout, as the default).

    `norm_groups`: the config's norm_num_groups, else 32 (every SD/FLUX VAE; GroupNorm's group count is not in
    its weights).
    """
    state = image.state
    levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
    blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
    widths = [state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)]
    base = widths[0]
    if any(w % base for w in widths):
        raise ValueError(f"{image.source}: level widths {widths} are not multiples of the first")
    latent_channels = state["decoder.conv_in.weight"].shape[1]
    if norm_groups is None:
        norm_groups = (image.config or {}).get("norm_num_groups", 32)
    return dict(in_channels=state["encoder.conv_in.weight"].shape[1], latent_channels=latent_channels,
                base_channels=base, channel_mults=[w // base for w in widths], num_res_blocks=blocks,
                temporal_downsample=[i >= levels - 3 for i in range(levels - 1)],
                mid_attention="encoder.mid.attn_1.q.weight" in state, norm_groups=norm_groups, upsampler="inflated")


def latent_stats(config: dict, latent_channels: int) -> tuple[Tensor, Tensor] | None:
    """(latent_mean, latent_std) such that (z - mean) / std is diffusers' normalised latent: (z - shift) * scale,
    or (z - latents_mean) * scale / latents_std when the config gives per-channel statistics; None without
    a scaling_factor."""
    if config.get("scaling_factor") is None:
        return None
    scale = float(config["scaling_factor"])
    if config.get("latents_mean") is not None and config.get("latents_std") is not None:
        mean = torch.tensor(config["latents_mean"], dtype=torch.float32)
        std = torch.tensor(config["latents_std"], dtype=torch.float32) / scale
    else:
        mean = torch.full((latent_channels,), float(config.get("shift_factor") or 0.0))
        std = torch.full((latent_channels,), 1.0 / scale)
    return mean, std


# -------------------------------------------------------------------------------------------------- inflation

def inflate_into(vae: CausalVideoVAE, image: ImageVAE) -> None:
    """Write `image`'s 2D weights, inflated, into `vae`'s encoder and decoder in place (module doc); the image
    decoder of the regulariser keeps its initialisation. Raises ValueError naming the first key that is missing,
    left over or of another shape (a VAE config that does not match the image VAE)."""
    if vae.config["upsampler"] != "inflated":
        raise ValueError(f"{image.source}: inflation needs upsampler='inflated' (SD's upsampler); the factorised "
                         f"one has no 2D counterpart")
    source = dict(image.state)
    target = {k: v for k, v in vae.state_dict().items() if k.startswith(("encoder.", "decoder."))}
    missing = sorted(k for k in target if k not in source)  # isa4d's module names are the original layout's keys
    if missing:
        raise ValueError(f"{image.source}: has no {missing[0]} ({len(missing)} weights of the video VAE missing; "
                         f"its config does not match this image VAE)")
    with torch.no_grad():
        for key, param in target.items():
            param.copy_(inflate_tensor(key, source.pop(key), tuple(param.shape), image.source))
    if source:
        raise ValueError(f"{image.source}: {len(source)} weights have no place in the video VAE, e.g. "
                         f"{sorted(source)[:3]} (the video VAE's config does not match this image VAE)")


def inflate_tensor(key: str, w: Tensor, shape: tuple[int, ...], source: Path) -> Tensor:
    """One 2D tensor -> its video-VAE shape: conv (o, i, kh, kw) -> (o, i, kt, kh, kw) with the kernel at the last
    tap; a temporal upsampler's (2o, ...) conv and bias get it twice; 1x1 convs as 1x1x1 convs or linears."""
    w = w.float()
    if len(shape) == 5:  # CausalConv3d or the 1x1x1 nin_shortcut
        out = w.new_zeros((w.shape[0], *shape[1:]))  # (o, i, kt, kh, kw)
        if w.ndim == 4 and w.shape[1:] == (shape[1], *shape[3:]):
            out[:, :, -1] = w  # the last causal tap sees the current frame
            w = out
    elif len(shape) == 2 and w.ndim == 4 and w.shape[2:] == (1, 1):  # the original layout's 1x1-conv attention
        w = w[:, :, 0, 0]
    if ".upsample.conv." in key and shape[0] == 2 * w.shape[0]:
        w = torch.cat([w, w])  # depth-to-time: channels [0, c) make the earlier frame, [c, 2c) the later
    if tuple(w.shape) != shape:
        raise ValueError(f"{source}: {key} is {tuple(w.shape)} after inflation, the video VAE expects {shape} "
                         f"(its config does not match this image VAE)")
    return w


# ------------------------------------------------------------------------------------------------ entry points

def load_image_vae_weights(vae: CausalVideoVAE, path: str | Path) -> None:
    """Inflate the image VAE at `path` into an already built `vae` (what `VAEModule(vae_init=...)` does); its
    latent_mean/latent_std become the image VAE's normalisation when its config gives one, else keep theirs.

    `path` may also be an isa4d VAE checkpoint of the image stage (the same VAE trained on one-frame clips): its
    weights are collapsed to the last tap instead (`collapse_image_stage`).
    """
    if is_isa4d_checkpoint(Path(path)):
        load_image_stage(vae, path)
        return
    image = read_image_vae(path)
    inflate_into(vae, image)
    stats = latent_stats(image.config or {}, vae.latent_channels)
    if stats is not None:
        vae.set_latent_stats(*stats)


def inflate_image_vae(path: str | Path, scaling_factor: float | None = None, shift_factor: float | None = None,
                      norm_groups: int | None = None, **overrides) -> CausalVideoVAE:
    """A CausalVideoVAE built to match the image VAE at `path` and holding its inflated weights.

    `scaling_factor` / `shift_factor` override the config's (a bare ae.safetensors carries none: SD3's config.json
    gives 1.5305 / 0.0609, FLUX's 0.3611 / 0.1159); `overrides` are other CausalVideoVAE arguments that leave
    the weights' shapes alone (image_regularizer, image_decoder_channels, temporal_downsample, ...).
    """
    image = read_image_vae(path)
    config = {**video_vae_config(image, norm_groups), **overrides}
    vae = CausalVideoVAE(**config)
    inflate_into(vae, image)
    diffusers_config = dict(image.config or {})
    if scaling_factor is not None:
        diffusers_config["scaling_factor"] = scaling_factor
    if shift_factor is not None:
        diffusers_config["shift_factor"] = shift_factor
    stats = latent_stats(diffusers_config, vae.latent_channels)
    if stats is not None:
        vae.set_latent_stats(*stats)
    return vae


# ------------------------------------------------------------------------------------------------ image stage

def is_isa4d_checkpoint(path: Path) -> bool:
    """An isa4d VAE checkpoint: a Lightning .ckpt, a sharded checkpoint folder, or an `isa4d export` file (whose
    metadata carries vae_config), as `load_vae` reads them."""
    if path.suffix == ".ckpt" or (path.is_dir() and (path / ".metadata").is_file()):
        return True
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return "vae_config" in (f.metadata() or {})
    return False


def load_image_stage(vae: CausalVideoVAE, path: str | Path) -> None:
    """Start `vae` from the isa4d image stage at `path`: the same VAE trained on one-frame clips, collapsed to the
    last tap (`collapse_image_stage`), its image decoder and latent statistics kept. Raises ValueError when the
    two configs differ."""
    from isa4d.models.vae.io import load_vae

    image_stage = load_vae(path, frozen=False)
    if image_stage.config != vae.config:
        differ = sorted(k for k in vae.config if image_stage.config.get(k) != vae.config[k])
        raise ValueError(f"{path}: an image-stage VAE of another config ({', '.join(differ)} differ)")
    collapse_image_stage(image_stage)
    vae.load_state_dict(image_stage.state_dict())


@torch.no_grad()
def collapse_image_stage(vae: CausalVideoVAE) -> CausalVideoVAE:
    """In place: each causal conv's kernel summed over time into its last tap; the second half of each temporal
    upsampler's 2c outputs copied into the first. Returns `vae`.

    A one-frame clip is padded with copies of its frame, so a VAE trained on images only ever used the sum of its
    time taps, and only the later frame of each depth-to-time pair (a clip's first latent frame drops the
    earlier): the collapsed VAE codes images exactly as before and, like an inflated 2D VAE, codes a still video
    as its frames.
    """
    for net in (vae.encoder, vae.decoder):
        for module in net.modules():
            if isinstance(module, CausalConv3d) and module.kernel_size[0] > 1:
                summed = module.weight.sum(2)  # (o, i, kh, kw)
                module.weight.zero_()
                module.weight[:, :, -1] = summed
        for stage in getattr(net, "up", []):
            upsample = getattr(stage, "upsample", None)
            if upsample is None or not upsample.temporal:
                continue
            conv = upsample.time_conv if isinstance(upsample, FactorizedUpsample) else upsample.conv
            for tensor in (conv.weight, conv.bias):
                half = tensor.shape[0] // 2
                tensor[:half] = tensor[half:]  # depth_to_time: channels [c, 2c) make the later frame
    return vae
