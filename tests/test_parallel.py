"""isa4d.parallel in one process: wrap units, the order checkpointing -> compile -> FSDP, mixed precision, frozen
modules, and the DTensor markers of sharded checkpoints. A 1-rank gloo group stands in for the cluster (the
2-process runs are in test_parallel_fsdp.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from isa4d.models.vae import CausalVideoVAE
from isa4d.models.vae.discriminators import PatchDiscriminator2D, PatchDiscriminator3D
from isa4d.parallel import ParallelConfig, configure_parallel, keep_frozen, parallelize, reshard, wrap_units
from isa4d.parallel.strategy import MARKER, FSDP2Strategy, extract_dtensors, find_markers, replace_markers


def tiny_vae() -> CausalVideoVAE:
    return CausalVideoVAE(base_channels=16, channel_mults=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8,
                          image_decoder_channels=(16, 16))


@pytest.fixture
def mesh(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    return init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))


def test_models_declare_units_that_parallel_orders_deepest_first():
    vae = tiny_vae()
    units = wrap_units(vae)
    names = {id(m): n for n, m in vae.named_modules()}
    depths = [names[id(u)].count(".") for u in units]
    assert depths == sorted(depths, reverse=True)
    assert vae.encoder in units and vae.image_decoder in units and vae.decoder not in units
    owned = {id(p) for u in units for p in u.parameters()}
    root_only = [n for n, p in vae.named_parameters() if id(p) not in owned]
    assert root_only and all(n.startswith("decoder.") for n in root_only)
    assert any(n.startswith("decoder.conv_out.") for n in root_only)  # the adaptive GAN weight's layer
    for disc in (PatchDiscriminator2D(channels=8, num_layers=2), PatchDiscriminator3D(channels=8, num_layers=2)):
        assert len(wrap_units(disc)) == 4


def _loss(vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
    recon, posterior = vae(x, sample_posterior=False)
    frames, index = vae.decode_subframes(posterior.mode())
    return (recon - x).abs().mean() + (frames - x[:, :, index]).abs().mean()


@pytest.mark.parametrize("ac", ["none", "full", "selective"])
def test_parallelized_model_matches_the_plain_one(mesh, ac):
    """Same loss and gradients as the unsharded model, for each activation checkpointing mode; the parameters
    become DTensors, their names do not change."""
    torch.manual_seed(0)
    plain = tiny_vae()
    sharded = parallelize(copy.deepcopy(plain), device_mesh=mesh, activation_checkpointing=ac)
    assert all(type(p).__name__ == "DTensor" for p in sharded.parameters())
    assert [n for n, _ in sharded.named_parameters()] == [n for n, _ in plain.named_parameters()]
    calls = []
    sharded.encoder.down[0].block[0].conv1.register_forward_hook(lambda *_: calls.append(1))
    x = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    expected, got = _loss(plain, x), _loss(sharded, x)
    expected.backward()
    got.backward()
    assert len(calls) == (1 if ac == "none" else 2)  # checkpointed blocks run again in backward
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    grads = dict(sharded.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name].grad.full_tensor(), p.grad, rtol=1e-5, atol=1e-7, msg=name)
    z = sharded.encode(x).mode()  # a registered forward method gathers the root's parameters too
    torch.testing.assert_close(sharded.decode(z), plain.decode(plain.encode(x).mode()), rtol=0, atol=1e-5)


def test_bf16_computes_in_bf16_keeps_fp32_master_weights_and_outputs(mesh):
    vae = parallelize(tiny_vae(), device_mesh=mesh, mixed_precision="bf16")
    seen = []
    vae.encoder.down[0].block[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    recon, _ = vae(torch.rand(1, 3, 5, 32, 32))
    assert seen == [torch.bfloat16] and recon.dtype == torch.float32
    reshard(vae)
    assert all(p.dtype == torch.float32 for p in vae.parameters())  # the optimiser's master weights


def test_frozen_modules_stay_whole_and_fp32_on_cpu(mesh):
    class WithFrozen(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.teacher = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.body(x) + self.teacher(x)

    m = WithFrozen()
    parallelize(m, device_mesh=mesh, frozen=[m.teacher], mixed_precision="bf16")
    assert type(m.body.weight).__name__ == "DTensor" and type(m.teacher.weight).__name__ != "DTensor"
    assert not m.teacher.weight.requires_grad and m.teacher.weight.dtype == torch.float32  # bf16 only on GPUs
    other = keep_frozen(nn.Linear(2, 2), device_mesh=mesh)
    assert not other.training and not any(p.requires_grad for p in other.parameters())


def test_compile_per_unit_keeps_names_and_results(mesh):
    torch.manual_seed(0)
    plain = tiny_vae()
    compiled = parallelize(copy.deepcopy(plain), device_mesh=mesh, compile=True, compile_options={"backend": "eager"})
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in plain.named_parameters()]
    x = torch.rand(1, 3, 5, 32, 32)
    torch.testing.assert_close(_loss(compiled, x), _loss(plain, x), rtol=0, atol=1e-6)


def test_configure_parallel_without_model_parallel_strategy_only_checkpoints():
    """One device (no mesh): nothing is sharded, but activation checkpointing per unit still applies (and
    compile, the same wrapper), with unchanged results."""
    class Plain:
        device_mesh = None

    torch.manual_seed(0)
    vae = tiny_vae()
    assert configure_parallel(Plain(), trainable=[vae]) is False
    assert not any(type(p).__name__ == "DTensor" for p in vae.parameters())
    checkpointed = copy.deepcopy(vae)
    configure_parallel(Plain(), trainable=[checkpointed], config=ParallelConfig(activation_checkpointing="full"))
    configure_parallel(Plain(), trainable=[checkpointed], config=ParallelConfig(activation_checkpointing="full"))
    calls = []
    checkpointed.encoder.down[0].block[0].conv1.register_forward_hook(lambda *_: calls.append(1))
    x = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    expected, got = _loss(vae, x), _loss(checkpointed, x)
    got.backward()
    assert len(calls) == 2  # recomputed once in backward, and wrapped once although configured twice
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="activation_checkpointing"):
        ParallelConfig(activation_checkpointing="some")


def test_parallelize_twice_is_harmless(mesh):
    vae = parallelize(tiny_vae(), device_mesh=mesh)
    assert parallelize(vae, device_mesh=mesh) is vae


def test_dtensor_markers_round_trip(mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    shadow = distribute_tensor(torch.arange(6.0).reshape(3, 2), mesh["data_parallel"], [Shard(0)])
    state = {"callbacks": {"EMA{}": {"shadow": {"w": shadow}, "num_updates": 3}}, "step": 5, "pair": (1, [2])}
    out: dict = {}
    plain = extract_dtensors(state, out)
    marker = plain["callbacks"]["EMA{}"]["shadow"]["w"]
    assert marker[MARKER] in out and marker["shape"] == [3, 2] and marker["placements"] == [["shard", 0]]
    assert marker["mesh_dims"] == ["data_parallel"] and plain["pair"] == (1, [2])
    torch.save(plain, "/dev/null")  # plain types only
    assert find_markers(plain) == [marker]
    assert replace_markers(plain, out)["callbacks"]["EMA{}"]["shadow"]["w"] is shadow


def test_strategy_names_missing_and_incomplete_checkpoints(tmp_path):
    strategy = FSDP2Strategy()
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nope.ckpt"):
        strategy.load_checkpoint(tmp_path / "nope.ckpt")
    partial = tmp_path / "half.ckpt"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="not a complete sharded checkpoint"):
        strategy.load_checkpoint(partial)


def test_isa_dit_keeps_its_geometry_fp32_under_bf16_fsdp(mesh):
    """FSDP's mixed precision would cast every floating input of every unit to bf16, rotary angles and ISPE's NDC
    codes included; ISA-DiT opts out (fsdp_cast_inputs) and casts its tokens itself."""
    from test_dit_model import random_conditions, tiny_net

    sharded = parallelize(tiny_net(), device_mesh=mesh, mixed_precision="bf16")
    seen = {}
    sharded.blocks[0].register_forward_pre_hook(
        lambda m, args: seen.update(z=args[0].dtype, rope=args[3].temporal_rope.dtype, code=args[3].y_code.dtype))
    cond = random_conditions()
    out = sharded(torch.randn(2, 8, 2, 4, 4), torch.rand(2), cond)
    assert cond.points_ndc.dtype == torch.float32 and out.dtype == torch.float32
    assert seen == {"z": torch.bfloat16, "rope": torch.float32, "code": torch.float32}


@pytest.mark.parametrize("ac", ["none", "full"])
def test_isa_dit_sharded_matches_the_plain_one(mesh, ac):
    """ISA-DiT under FSDP2 (its blocks are the units): same velocity and gradients as the plain network."""
    from test_dit_model import random_conditions, randomize_gates, tiny_net

    plain = randomize_gates(tiny_net())
    sharded = parallelize(copy.deepcopy(plain), device_mesh=mesh, activation_checkpointing=ac)
    cond, x, t = random_conditions(), torch.randn(2, 8, 2, 4, 4), torch.rand(2)
    expected, got = plain(x, t, cond), sharded(x, t, cond)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    expected.square().mean().backward()
    got.square().mean().backward()
    grads = dict(sharded.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name].grad.full_tensor(), p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_cuda_graphs_compile_units_in_reduce_overhead_mode_on_one_device_only(monkeypatch, mesh):
    """parallel.cuda_graphs: each unit compiled with mode="reduce-overhead" (CUDA graphs) when nothing is sharded;
    with FSDP, without compile or with checkpointing it is refused with the setting to change."""
    from isa4d.parallel import fsdp

    class Plain:
        device_mesh = None

    class Sharded:
        device_mesh = mesh

    options = []
    monkeypatch.setattr(fsdp.torch, "compile", lambda fn, **kw: options.append(kw) or fn)
    vae = tiny_vae()
    configure_parallel(Plain(), trainable=[vae], config=ParallelConfig(compile=True, cuda_graphs=True))
    assert options and all(kw == {"mode": "reduce-overhead"} for kw in options)
    assert len(options) == len([u for u in wrap_units(vae) if not any(m is not u and m in wrap_units(vae)
                                                                       for m in u.modules())])
    options.clear()
    configure_parallel(Plain(), trainable=[tiny_vae()], config=ParallelConfig(compile=True))
    assert options and all(kw == {} for kw in options)
    with pytest.raises(ValueError, match="cuda_graphs=false"):
        configure_parallel(Sharded(), trainable=[tiny_vae()], config=ParallelConfig(compile=True, cuda_graphs=True))
    with pytest.raises(ValueError, match="parallel.compile=true"):
        ParallelConfig(cuda_graphs=True)
    with pytest.raises(ValueError, match="activation_checkpointing=none"):
        ParallelConfig(compile=True, cuda_graphs=True, activation_checkpointing="full")
