"""Loading a trained stage-1 VAE for stage 2 and inference: the architecture and weights from one file.

`VAEModule` writes the VAE's constructor arguments into every checkpoint (`vae_config`), so a DiT config only
names the checkpoint path. Accepted files: a Lightning checkpoint of `VAEModule` (`.ckpt`, weights under
`state_dict` with the `vae.` prefix), a `.safetensors` file from `isa4d export` (its metadata carries
`vae_config`), or a `.pt`/`.safetensors` file of the VAE's own state dict with its config given separately.
A sharded (FSDP) checkpoint folder is read directly; `ema=True` takes the EMA weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from isa4d.models.vae.autoencoder import CausalVideoVAE


def load_vae(path: str | Path, config: dict | None = None, map_location: str | torch.device = "cpu",
             frozen: bool = True, ema: bool = False) -> CausalVideoVAE:
    """The VAE stored at `path` (see the module doc), in eval mode and (by default) with gradients off.

    `ema`: take the EMA callback's weights from a checkpoint that has them. Raises FileNotFoundError naming the
    path and how to make one, or ValueError naming what the file lacks.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"VAE checkpoint not found: {path}. Train stage 1 first (`make train-vae` writes "
                                f"runs/vae_tiny/checkpoints/last.ckpt) or point `vae_checkpoint` at your file.")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        if ema:
            raise ValueError(f"{path}: a .safetensors file holds one set of weights; export it with --ema instead")
        try:
            state = load_file(str(path), device="cpu")
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as e:  # noqa: BLE001 - safetensors' errors do not name the file
            raise ValueError(f"{path}: cannot read this .safetensors file (truncated or another format?): "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        stored_config = json.loads(meta["vae_config"]) if "vae_config" in meta else None
    else:  # a Lightning .ckpt file or a sharded checkpoint folder
        from isa4d.training.export import read_weights

        state, meta = read_weights(path, ema=ema)
        stored_config = meta.get("vae_config")
    if any(k.startswith("vae.") for k in state):
        state = {k[len("vae."):]: v for k, v in state.items() if k.startswith("vae.")}
    config = config if config is not None else stored_config
    if config is None:
        raise ValueError(f"{path} holds no `vae_config` (written by an older isa4d or another tool): retrain "
                         f"with `make train-vae`, or pass the VAE's constructor arguments as `config`")
    vae = CausalVideoVAE(**config)
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the VAE config; missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    vae.to(map_location).eval()
    if frozen:
        vae.requires_grad_(False)
    return vae
