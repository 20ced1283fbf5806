"""FSDP2 for isa4d models, applied in one documented order (torchtitan's `parallelize.py`).

For each wrap unit the model declares (`fsdp_units()`, deepest first), then for the model itself:

    1. activation checkpointing   per unit ('none' | 'full' | 'selective': keep matmul/conv/attention outputs,
                                  recompute the cheap element-wise and norm ops in between)
    2. torch.compile              per unit
    3. fully_shard                per unit, then the model (the root); a unit's outputs that are views are
                                  copied first (FSDP2 hooks its backward all-gather on them)

so a unit runs FSDP(compile(checkpoint(forward))), torchtitan's nesting (checkpointing and compile apply to the
units that hold no other unit): FSDP's gather and free stay outside the
compiled and recomputed region. Checkpointing and compile wrap the unit's `forward` in place, so module names
and state-dict keys do not change (no `_checkpoint_wrapped_module` or `_orig_mod` in checkpoints).

Models stay single-device PyTorch (STYLE.md rules 1, 7): they may define

    fsdp_units(self) -> list[nn.Module]     modules whose forward is *called* (their hooks gather the parameters)
    fsdp_forward_methods: tuple[str, ...]   methods besides forward that run the model (e.g. the VAE's encode),
                                            so FSDP gathers the root's parameters for them too

and nothing else. Mixed precision 'bf16' computes in bf16, reduces gradients in fp32 and keeps the sharded fp32
parameters as master weights (the optimiser steps on them); the root returns fp32 outputs. 'fp32' is plain;
'auto' (the default) is bf16 on GPUs and fp32 on CPUs (the gloo test path).
Frozen modules (the DiT's VAE, LPIPS) are never sharded: `keep_frozen` turns off their gradients and casts them
to bf16 on GPUs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

ActivationCheckpointing = Literal["none", "full", "selective"]
Precision = Literal["auto", "bf16", "fp32"]

_aten = torch.ops.aten
# Outputs worth keeping under selective checkpointing: the FLOP-heavy ops (torchtitan's op-level SAC list).
_SAVE_OPS = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default, _aten.convolution.default,
    _aten._scaled_dot_product_flash_attention.default, _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default, _aten._scaled_dot_product_flash_attention_for_cpu.default,
}


@dataclass
class ParallelConfig:
    """How a LightningModule's trainable models are parallelised under ModelParallelStrategy (see module doc)."""

    activation_checkpointing: ActivationCheckpointing = "none"
    compile: bool = False
    mixed_precision: Precision = "auto"
    reshard_after_forward: bool = True
    # replay each compiled unit's kernels as CUDA graphs (torch.compile mode "reduce-overhead"): removes the host's
    # per-kernel launch cost, which bounds small steps (docs/benchmarks.md). One device only: FSDP gathers
    # parameters into new memory every step, which a recorded graph cannot follow. The training loop must call
    # torch.compiler.cudagraph_mark_step_begin() per step (DiTModule does).
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if self.activation_checkpointing not in ("none", "full", "selective"):
            raise ValueError(f"activation_checkpointing must be 'none', 'full' or 'selective', "
                             f"got {self.activation_checkpointing!r}")
        if self.mixed_precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"mixed_precision must be 'auto', 'bf16' or 'fp32', got {self.mixed_precision!r}")
        if self.cuda_graphs and not self.compile:
            raise ValueError("parallel.cuda_graphs replays compiled units: it needs parallel.compile=true")
        if self.cuda_graphs and self.activation_checkpointing != "none":
            raise ValueError("parallel.cuda_graphs with activation checkpointing is not supported: recomputation "
                             "in backward replays the forward graph again; set activation_checkpointing=none")

    @property
    def compile_options(self) -> dict[str, Any] | None:
        return {"mode": "reduce-overhead"} if self.cuda_graphs else None


def resolve_precision(mixed_precision: Precision, device_mesh: DeviceMesh | None) -> str:
    if mixed_precision != "auto":
        return mixed_precision
    return "bf16" if device_mesh is not None and device_mesh.device_type == "cuda" else "fp32"


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def data_parallel_mesh(device_mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D mesh FSDP shards over: Lightning's ('data_parallel', 'tensor_parallel') mesh gives its dp axis."""
    names = device_mesh.mesh_dim_names or ()
    if device_mesh.ndim > 1 and "data_parallel" in names:
        return device_mesh["data_parallel"]
    return device_mesh


def wrap_units(module: nn.Module) -> list[nn.Module]:
    """The model's declared units, deepest first (fully_shard goes bottom-up), without duplicates or the root."""
    units = list(module.fsdp_units()) if hasattr(module, "fsdp_units") else []
    names = {id(m): n for n, m in module.named_modules()}
    missing = [type(u).__name__ for u in units if id(u) not in names]
    if missing:
        raise ValueError(f"{type(module).__name__}.fsdp_units() returned modules outside the model: {missing}")
    seen: set[int] = set()
    unique = [u for u in units if u is not module and not (id(u) in seen or seen.add(id(u)))]
    return sorted(unique, key=lambda u: -names[id(u)].count("."))


def keep_frozen(module: nn.Module, *, device_mesh: DeviceMesh | None = None,
                mixed_precision: Precision = "auto") -> nn.Module:
    """A frozen module, left unsharded: gradients off, eval mode, and bf16 weights when the mesh is on GPUs.

    Its callers cast inputs to its dtype (`next(m.parameters()).dtype`); on CPUs it stays fp32.
    """
    module.requires_grad_(False).eval()
    if resolve_precision(mixed_precision, device_mesh) == "bf16" and device_mesh is not None \
            and device_mesh.device_type == "cuda":
        module.to(torch.bfloat16)
    return module


def checkpoint_and_compile(units: Sequence[nn.Module], activation_checkpointing: ActivationCheckpointing = "none",
                           compile: bool = False, compile_options: dict[str, Any] | None = None) -> None:
    """Steps 1-2 on the units that hold no other unit, in place: their `forward` becomes
    compile(checkpoint(forward)). With FSDP (`parallelize`) or without it (one device, `configure_parallel`)."""
    unit_ids = {id(u) for u in units}
    leaves = [u for u in units if not any(id(m) in unit_ids for m in u.modules() if m is not u)]
    if activation_checkpointing == "none" and not compile:
        return
    for unit in leaves:  # a unit holding other units is only sharded: its inner units' FSDP hooks must not
        if getattr(unit, "_isa4d_wrapped", False):  # run inside a compiled or recomputed region
            continue  # Lightning may call configure_model twice
        forward = unit.forward
        if activation_checkpointing != "none":  # 1.
            extra = {"context_fn": partial(create_selective_checkpoint_contexts, _selective_policy)} \
                if activation_checkpointing == "selective" else {}
            forward = partial(checkpoint, forward, use_reentrant=False, **extra)
        if compile:  # 2.
            forward = torch.compile(forward, **(compile_options or {}))
        unit.forward = forward
        unit._isa4d_wrapped = True


def parallelize(module: nn.Module, *, device_mesh: DeviceMesh,
                activation_checkpointing: ActivationCheckpointing = "none", compile: bool = False, mixed_precision: Precision = "auto", reshard_after_forward: bool = True,
                frozen: Sequence[nn.Module] = (), compile_options: dict[str, Any] | None = None) -> nn.Module:
    """Checkpointing -> compile -> fully_shard per declared unit -> fully_shard(module), in place.

    `frozen`: submodules of `module` to leave unsharded (their parameters are ignored by FSDP) and to freeze with
    `keep_frozen`. A module already sharded is returned unchanged (Lightning may call configure_model twice).
    """
    ParallelConfig(activation_checkpointing, compile, mixed_precision, reshard_after_forward)  # validates
    if isinstance(module, FSDPModule):
        return module
    mesh = data_parallel_mesh(device_mesh)
    ignored = {p for m in frozen
               for p in keep_frozen(m, device_mesh=mesh, mixed_precision=mixed_precision).parameters()}
    units = [u for u in wrap_units(module) if any(p not in ignored for p in u.parameters())]

    checkpoint_and_compile(units, activation_checkpointing, compile, compile_options)
    bf16 = resolve_precision(mixed_precision, mesh) == "bf16"
    # FSDP casts every floating tensor a unit receives (dataclass fields too) to bf16 unless the model says it
    # manages its input dtypes itself (`fsdp_cast_inputs = False`): ISA-DiT keeps rotary angles and NDC codes fp32
    cast = getattr(module, "fsdp_cast_inputs", True)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                  cast_forward_inputs=cast) if bf16 else MixedPrecisionPolicy()
    for unit in [*units, module]:  # before fully_shard, so these hooks run ahead of FSDP's post-forward
        if not getattr(unit, "_isa4d_owns_outputs", False):
            unit.register_forward_hook(_own_outputs)
            unit._isa4d_owns_outputs = True
    for unit in units:  # 3.
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                    ignored_params=ignored & set(unit.parameters()) or None)
    root_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                       output_dtype=torch.float32, cast_forward_inputs=cast) if bf16 else policy
    # The root keeps its parameters gathered from forward to backward (FSDP's default for a root, which only
    # applies when reshard_after_forward is left unset).
    fully_shard(module, mesh=mesh, mp_policy=root_policy, ignored_params=ignored or None)
    for name in getattr(module, "fsdp_forward_methods", ()):
        register_fsdp_forward_method(module, name)
    return module


def _own_outputs(module: nn.Module, args: Any, output: Any) -> Any:
    """A wrapped unit's outputs that are views (a temporal upsampler's frame slice) copied into tensors of their
    own: FSDP2 hooks the pre-backward all-gather on the outputs, and an in-place op on a view would drop that
    hook (FSDP's "returned a view tensor" warning). Costs a copy only where an output is a view, in training."""
    if not torch.is_grad_enabled():
        return output
    return torch.utils._pytree.tree_map_only(
        torch.Tensor, lambda t: t.clone() if t._base is not None and t.requires_grad else t, output)


def configure_parallel(pl_module: Any, *, trainable: Sequence[nn.Module], frozen: Sequence[nn.Module] = (),
                       config: ParallelConfig | None = None) -> bool:
    """The body of a LightningModule's `configure_model`: parallelise each trainable model (its own FSDP root) and
    keep the frozen ones unsharded, when the strategy is ModelParallelStrategy (`pl_module.device_mesh` set).
    Under any other strategy (one device, DDP) only activation checkpointing and compile apply, per unit.
    Returns whether it sharded anything.

        def configure_model(self):
            configure_parallel(self, trainable=[self.dit], frozen=[self.vae], config=self.parallel)
    """
    mesh = getattr(pl_module, "device_mesh", None)
    config = config or ParallelConfig()
    if mesh is None:
        for m in trainable:
            checkpoint_and_compile(wrap_units(m), config.activation_checkpointing, config.compile,
                                   config.compile_options)
        return False
    if config.cuda_graphs:
        raise ValueError("parallel.cuda_graphs needs one device without FSDP (FSDP gathers the parameters into new "
                         "memory every step, which a recorded CUDA graph cannot follow); this run shards over "
                         f"{mesh.size()} device(s) with ModelParallelStrategy: set parallel.cuda_graphs=false")
    for m in frozen:
        keep_frozen(m, device_mesh=data_parallel_mesh(mesh), mixed_precision=config.mixed_precision)
    for m in trainable:
        parallelize(m, device_mesh=mesh, activation_checkpointing=config.activation_checkpointing,
                    compile=config.compile, mixed_precision=config.mixed_precision,
                    reshard_after_forward=config.reshard_after_forward)
    return True


def reshard(module: nn.Module) -> nn.Module:
    """Put every FSDP module under `module` back to sharded parameters (the root keeps its gathered ones after a
    forward without backward, e.g. validation); a no-op for unsharded models. Code that reads or writes the
    parameters by name between steps (EMA) calls this first."""
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return module


def shard_like(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`tensor` (a full tensor) laid out like `reference`: a DTensor of its mesh and placements if it is one."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(reference, DTensor) and not isinstance(tensor, DTensor):
        return distribute_tensor(tensor.to(reference.device), reference.device_mesh, reference.placements)
    return tensor
