"""Lightning's ModelParallelStrategy for FSDP2 runs, with everything sharded in the checkpoint, callbacks included.

ModelParallelStrategy writes the model and optimiser states as a torch.distributed.checkpoint (DCP) folder and
every other entry (loops, callbacks, the datamodule) with `torch.save` from rank 0 into `meta.pt`. A callback
state that holds DTensors, the EMA's shadow weights sharded like the model, would lose every shard but rank 0's
there. This strategy moves such DTensors into the DCP folder (so they are saved sharded and resharded on load to
any world size) and leaves a small marker in `meta.pt`. It also shards over all processes by default (pure FSDP:
data_parallel_size = world size) and fails with a message naming the path when a checkpoint is missing.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.strategies.model_parallel import _is_sharded_checkpoint
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor, Replicate, Shard

from isa4d.training.checkpoint import check_sharded, load_torch_file

log = logging.getLogger("isa4d.parallel")
MARKER = "__isa4d_dtensor__"  # meta.pt stand-in for a DTensor saved in the DCP folder
EXTRA_KEY = "sharded_extra"  # the DCP entry that holds them


def _placement_to_spec(p: Any) -> list:
    if isinstance(p, Shard):
        return ["shard", p.dim]
    if isinstance(p, Replicate):
        return ["replicate"]
    raise TypeError(f"cannot checkpoint a DTensor with placement {p}")


def _spec_to_placement(spec: list) -> Any:
    return Shard(spec[1]) if spec[0] == "shard" else Replicate()


def extract_dtensors(obj: Any, out: dict[str, DTensor], path: str = "") -> Any:
    """`obj` with each DTensor replaced by a marker dict (plain types, safe for weights_only loading); the
    DTensors go into `out` under their path."""
    if isinstance(obj, DTensor):
        out[path] = obj
        return {MARKER: path, "shape": list(obj.shape), "dtype": str(obj.dtype).removeprefix("torch."),
                "placements": [_placement_to_spec(p) for p in obj.placements],
                "mesh_dims": list(obj.device_mesh.mesh_dim_names or ())}
    if isinstance(obj, dict):
        return {k: extract_dtensors(v, out, f"{path}/{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [extract_dtensors(v, out, f"{path}/{i}") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    return obj


def find_markers(obj: Any) -> list[dict]:
    if isinstance(obj, dict):
        if MARKER in obj:
            return [obj]
        return [m for v in obj.values() for m in find_markers(v)]
    if isinstance(obj, (list, tuple)):
        return [m for v in obj for m in find_markers(v)]
    return []


def replace_markers(obj: Any, loaded: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if MARKER in obj:
            return loaded[obj[MARKER]]
        return {k: replace_markers(v, loaded) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [replace_markers(v, loaded) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    return obj


class FSDP2Strategy(ModelParallelStrategy):
    """ModelParallelStrategy with data_parallel_size = world size by default, sharded callback states in the DCP
    checkpoint and clear errors for missing checkpoints. Configure FSDP itself in the module's `configure_model`
    (isa4d.parallel.configure_parallel)."""

    def __init__(self, data_parallel_size: int | str = "auto", tensor_parallel_size: int | str = 1,
                 save_distributed_checkpoint: bool = True, process_group_backend: str | None = None,
                 save_threads: int = 8) -> None:
        """`save_threads`: threads per process writing its checkpoint shard (DCP's FileSystemWriter); one thread
        writes a multi-GB shard at a single stream's speed."""
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend)
        if save_threads < 1:
            raise ValueError(f"save_threads must be >= 1, got {save_threads}")
        self.save_threads = save_threads

    def _setup_distributed(self) -> None:
        super()._setup_distributed()
        tp = 1 if self._tensor_parallel_size == "auto" else int(self._tensor_parallel_size)
        self._tensor_parallel_size = tp
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.world_size // tp

    # ------------------------------------------------------------------------------------------------- save

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any,
                        storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            # one file from rank 0: gather sharded callback tensors (a collective, so on every rank) first
            full = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
            checkpoint.update(_gather_dtensors(full))
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        from torch.distributed.checkpoint import save

        path = Path(self.broadcast(filepath))
        if path.is_file():
            path.unlink()
        path.mkdir(parents=True, exist_ok=True)
        state: dict[str, Any] = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        extra: dict[str, DTensor] = {}
        checkpoint = extract_dtensors(checkpoint, extra)
        if extra:
            state[EXTRA_KEY] = extra
        from torch.distributed.checkpoint import FileSystemWriter

        start = time.perf_counter()
        save(state, storage_writer=FileSystemWriter(path, thread_count=self.save_threads))
        if self.global_rank == 0:
            torch.save(checkpoint, path / _METADATA_FILENAME)  # last: its presence marks a complete folder
        self.barrier()
        if self.global_rank == 0:
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e9
            seconds = time.perf_counter() - start
            log.info("saved %s: %.2f GB in %.1f s (%.2f GB/s, %d writer threads per rank)", path.name, size, seconds,
                     size / max(seconds, 1e-9), self.save_threads)

    # ------------------------------------------------------------------------------------------------- load

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if path.is_dir() and not _is_sharded_checkpoint(path):
            raise FileNotFoundError(f"{path} is a folder without {_METADATA_FILENAME}: not a complete sharded "
                                    f"checkpoint (a save interrupted before it finished?)")
        if path.is_file():
            return self._load_full_checkpoint(path, weights_only)
        check_sharded(path)  # a missing or short shard: one line naming it, before DCP's per-rank tracebacks
        metadata = self._load_sharded_checkpoint(path, weights_only)
        markers = find_markers(metadata)
        if not markers:
            return metadata
        if not path.is_dir():
            raise ValueError(f"{path}: DTensor markers in a single-file checkpoint")
        from torch.distributed.checkpoint import load
        from torch.distributed.tensor import empty as dtensor_empty

        targets = {}
        for m in markers:
            names = tuple(m["mesh_dims"])
            full = tuple(self.device_mesh.mesh_dim_names or ())
            sub = names[0] if len(names) == 1 else names
            mesh = self.device_mesh if not names or names == full else self.device_mesh[sub]
            targets[m[MARKER]] = dtensor_empty(*m["shape"], dtype=getattr(torch, m["dtype"]), device_mesh=mesh,
                                               placements=[_spec_to_placement(p) for p in m["placements"]])
        load({EXTRA_KEY: targets}, checkpoint_id=path)
        return replace_markers(metadata, targets)


    def _load_sharded_checkpoint(self, path: Path, weights_only: bool | None) -> dict[str, Any]:
        """Model and optimiser states from the DCP folder, `meta.pt` returned. As Lightning's own loader, except
        that entries under the module's `external_state_prefixes` (frozen parts such as stage 2's VAE, which
        `on_save_checkpoint` leaves out because they live in their own checkpoint) keep their current values
        instead of failing the load; any other entry the folder lacks is an error naming it."""
        from torch.distributed.checkpoint import FileSystemReader, load
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_optimizer_state_dict)

        stored = set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
        module = self.lightning_module
        external = tuple(getattr(module, "external_state_prefixes", ()))
        strict = module.strict_loading
        state = get_model_state_dict(self.model)
        absent = [k for k in state if f"state_dict.{k}" not in stored and not k.startswith(external)]
        if absent and strict:
            raise KeyError(f"{path}: the checkpoint has no entry for {len(absent)} of the model's states, e.g. "
                           f"{absent[:5]}: was it written by another model or config?")
        load({"state_dict": {k: v for k, v in state.items() if f"state_dict.{k}" in stored}}, checkpoint_id=path)
        self.model.load_state_dict(state, strict=strict)
        for i, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{i}"
            optim_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optim_state[key],
                                     options=StateDictOptions(cpu_offload=True))
        return load_torch_file(path / _METADATA_FILENAME, "checkpoint metadata", weights_only=weights_only)

    def _load_full_checkpoint(self, path: Path, weights_only: bool | None) -> dict[str, Any]:
        """A single-file checkpoint (a one-device run, or save_distributed_checkpoint=False) into the sharded
        model. Lightning's own path names each optimiser's states by the module's first parameters, which is
        wrong for every optimiser but the first (the VAE's discriminator optimiser); here each optimiser's
        states are named by its own parameters."""
        from lightning.fabric.strategies.model_parallel import _load_raw_module_state
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        checkpoint = load_torch_file(path, map_location="cpu", mmap=True, weights_only=weights_only)
        strict = self.lightning_module.strict_loading
        _load_raw_module_state(checkpoint.pop("state_dict"), self.model, strict=strict)
        names = {id(p): n for n, p in self.model.named_parameters()}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
        for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", [])):
            order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
            if any(isinstance(i, int) for g in state["param_groups"] for i in g["params"]):  # ids, not names
                state = {"state": {order[i]: v for i, v in state["state"].items()},
                         "param_groups": [{**g, "params": [order[i] for i in g["params"]]}
                                          for g in state["param_groups"]]}
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state, options=options)
        return checkpoint


def _gather_dtensors(obj: Any) -> Any:
    if isinstance(obj, DTensor):
        return obj.full_tensor().cpu()
    if isinstance(obj, dict):
        return {k: _gather_dtensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_gather_dtensors(v) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    return obj
