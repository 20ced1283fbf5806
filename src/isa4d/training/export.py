"""`isa4d export CKPT OUT.safetensors [--ema] [--submodule vae]`: one file of weights for inference.

CKPT is a sharded checkpoint folder (FSDP2Strategy's DCP format; a `last.ckpt` link to one works) or a plain
Lightning `.ckpt` file. The output holds the LightningModule's weights and buffers (`vae.encoder...`), or with
`--submodule vae` those of one submodule without its prefix; with `--ema` the EMA callback's shadow replaces the
weights it averages. No optimiser state is read. The safetensors metadata records the source, step, whether the
weights are the EMA's, and the VAE's constructor arguments (`vae_config`, JSON) when the checkpoint has them.
The export runs in one process on the CPU and needs memory for the weights only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from isa4d.parallel.strategy import EXTRA_KEY, MARKER, find_markers
from isa4d.training.checkpoint import CheckpointError, check_sharded, load_torch_file

META_FILE = "meta.pt"


def _read_dcp(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, sharded extras by marker path, meta.pt contents) of a DCP checkpoint folder, consolidated."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    if not (path / META_FILE).is_file() or not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a complete sharded checkpoint (no {META_FILE} or .metadata): "
                                f"a save that did not finish?")
    check_sharded(path)
    reader = FileSystemReader(str(path))
    available = {k.split(".")[0] for k in reader.read_metadata().state_dict_metadata}
    keys = {"state_dict"} | ({EXTRA_KEY} & available)
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True)
    meta = load_torch_file(path / META_FILE, "checkpoint metadata", map_location="cpu", weights_only=True)
    return state["state_dict"], state.get(EXTRA_KEY, {}), meta


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    try:
        ckpt = load_torch_file(path, map_location="cpu", weights_only=True)
    except (CheckpointError, FileNotFoundError):
        raise
    except Exception:  # older checkpoints with pickled objects (hyperparameters): trusted local files only
        ckpt = load_torch_file(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path}: not a Lightning checkpoint (no state_dict)")
    return ckpt.pop("state_dict"), {}, ckpt


def _ema_state(meta: dict[str, Any], extras: dict[str, torch.Tensor]
               ) -> tuple[str | None, dict[str, torch.Tensor]]:
    """(the EMA's submodule, its shadow weights) from the callback states."""
    states = [(k, v) for k, v in (meta.get("callbacks") or {}).items()
              if k.startswith("EMA") and isinstance(v, dict) and v.get("shadow") is not None]
    if not states:
        raise ValueError("the checkpoint holds no EMA state: train with the isa4d.training.ema.EMA callback, or "
                         "export without --ema")
    if len(states) > 1:
        raise ValueError(f"the checkpoint holds several EMA states ({[k for k, _ in states]}): ambiguous")
    key, state = states[0]
    shadow = {}
    for name, value in state["shadow"].items():
        if isinstance(value, dict) and MARKER in value:
            value = extras[value[MARKER]]
        shadow[name] = value
    return state.get("submodule"), shadow


def read_weights(path: str | Path, ema: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The module's weights (EMA ones swapped in with `ema`) and the checkpoint's metadata (meta.pt / file)."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise FileNotFoundError(f"{path} is a link to {os.readlink(path)}, which does not exist (the checkpoint "
                                f"folder copied without its .store/?)")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    weights, extras, meta = _read_dcp(path) if path.is_dir() else _read_file(path)
    if find_markers(meta) and not extras:
        raise ValueError(f"{path}: metadata refers to sharded tensors the folder lacks")
    if ema:
        submodule, shadow = _ema_state(meta, extras)
        prefix = f"{submodule}." if submodule else ""
        unknown = [k for k in shadow if prefix + k not in weights]
        if unknown:
            raise ValueError(f"EMA weights without a matching model weight: {unknown[:5]}")
        weights = {**weights, **{prefix + k: v.to(weights[prefix + k].dtype) for k, v in shadow.items()}}
    return weights, meta


def export(checkpoint: str | Path, out: str | Path, ema: bool = False, submodule: str | None = None) -> Path:
    from safetensors.torch import save_file

    weights, meta = read_weights(checkpoint, ema)
    if submodule:
        prefix = submodule + "."
        weights = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        if not weights:
            raise ValueError(f"no weights under '{submodule}' in {checkpoint}")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in weights.items()
               if isinstance(v, torch.Tensor)}
    info = {"source": str(checkpoint), "ema": str(ema).lower(), "global_step": str(meta.get("global_step", "")),
            "submodule": submodule or ""}
    if meta.get("vae_config") is not None:
        info["vae_config"] = json.dumps(meta["vae_config"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    save_file(tensors, str(tmp), metadata=info)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="isa4d export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="sharded checkpoint folder or Lightning .ckpt file")
    parser.add_argument("out", help="output .safetensors file")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights")
    parser.add_argument("--submodule", default=None, help="export one submodule (e.g. vae), without its prefix")
    args = parser.parse_args(argv)
    try:
        path = export(args.checkpoint, args.out, args.ema, args.submodule)
    except (FileNotFoundError, ValueError) as e:
        print(f"isa4d export: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0
