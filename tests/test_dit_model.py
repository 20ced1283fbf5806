"""ISA-DiT, the network alone: tokenisers, rotary positions, interspatial attention and its invariances, the
conditioning contract (padding, masks, dropout, guidance), adaLN-zero, and a tiny network that memorises a clip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import import_script
from isa4d.diffusion.flow import FlowMatching
from isa4d.diffusion.sampling import condition_guidance, euler_sample
from isa4d.diffusion.schedules import sampling_timesteps
from isa4d.geometry.ndc import sinusoidal_embedding, token_grid_ndc
from isa4d.models.dit import DiTConditions, ISADiT
from isa4d.models.dit.attention import SelfAttention, apply_rope, grid_positions, rope_frequencies
from isa4d.models.dit.embeddings import ConditionDropout, patchify, unpatchify
from isa4d.models.dit.isa import ISPE, InterspatialAttention, ispe_code

C, F = 8, 4  # latent channels, video frames per latent frame


def tiny_net(**kw) -> ISADiT:
    args = dict(latent_channels=C, hidden_size=32, depth=2, num_heads=2, patch_size=1, mlp_ratio=2.0,
                frames_per_latent=F, num_points=6, max_people=3, point_freqs=3, ispe_freqs=3)
    return ISADiT(**{**args, **kw})


def randomize_gates(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the zero-initialised adaLN and output maps random weights, so every path reaches the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if hasattr(m, "adaLN_modulation"):
                lin = m.adaLN_modulation[-1]
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.05)
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.3)
        net.final_layer.linear.weight.copy_(torch.randn(net.final_layer.linear.weight.shape, generator=g) * 0.1)
    return net


def random_conditions(B=2, P=2, T=2, V=6, h=4, w=4, seed=0, background=True) -> DiTConditions:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return DiTConditions(
        points_world=r(B, P, T, F, V, 3),
        points_ndc=torch.rand(B, P, T, V, 3, generator=g) * 2 - 1,
        points_valid=torch.ones(B, P, T, V, dtype=torch.bool),
        person_mask=torch.ones(B, P, dtype=torch.bool),
        plucker=r(B, T, 6 * F, h, w),
        ref_latent=r(B, C, h, w),
        ref_points_ndc=torch.rand(B, P, V, 2, generator=g) * 2 - 1,
        ref_points_valid=torch.ones(B, P, V, dtype=torch.bool),
        background=r(B, C, T, h, w) if background else None,
    )


def replace(cond: DiTConditions, **fields) -> DiTConditions:
    return DiTConditions(**{**vars(cond), **fields})


# ------------------------------------------------------------------------------------------------ tokenisers


def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 3, 5, 6, 8)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 5, 12, 12)
    assert torch.equal(unpatchify(tokens, 2, 3, 4), x)
    # token (row 1, column 2) of frame 4 holds pixels [2:4, 4:6] of every channel, channel-major
    assert torch.equal(tokens[1, 4, 1 * 4 + 2], x[1, :, 4, 2:4, 4:6].reshape(-1))
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        patchify(torch.randn(1, 3, 1, 5, 8), 2)


def test_rope_scores_depend_only_on_relative_position():
    """q·k after rotary embedding is a function of the position difference, on each axis of a 2D grid."""
    torch.manual_seed(0)
    dim = 16
    angles = rope_frequencies(grid_positions(5, 7), (dim // 2, dim // 2))  # (35, 8)
    q, k = torch.randn(dim), torch.randn(dim)
    rq = apply_rope(q.expand(35, dim), angles)
    rk = apply_rope(k.expand(35, dim), angles)
    scores = rq @ rk.T  # (35, 35)
    idx = lambda r, c: r * 7 + c  # noqa: E731
    for (a, b), (c, d) in [((idx(0, 0), idx(2, 3)), (idx(1, 2), idx(3, 5))),
                           ((idx(4, 6), idx(1, 1)), (idx(3, 5), idx(0, 0)))]:
        assert torch.allclose(scores[a, b], scores[c, d], atol=1e-5)
    assert not torch.allclose(scores[idx(0, 0), idx(0, 1)], scores[idx(0, 0), idx(1, 0)], atol=1e-3)
    assert torch.allclose(rq.norm(dim=-1), q.norm().expand(35), atol=1e-5)  # a rotation


def test_padding_people_changes_no_output():
    """Absent people padded onto the batch (one shape for torch.compile) leave the velocity unchanged."""
    net = randomize_gates(tiny_net()).eval()
    cond, x, t = random_conditions(P=2), torch.randn(2, C, 2, 4, 4), torch.rand(2)
    padded = cond.pad_people(3)
    assert padded.person_mask.shape == (2, 3) and not padded.points_valid[:, 2:].any()
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, padded), net(x, t, cond), rtol=0, atol=1e-5)
    assert cond.pad_people(2) is cond


def test_rope_traced_for_compile_equals_eager():
    """`apply_rope` has two forms, a complex multiply in eager mode and real products where torch.compile traces
    it (Inductor lowers no complex tensors): both equal a rotation written out by hand."""
    torch.manual_seed(0)
    angles = rope_frequencies(grid_positions(4, 6), (8, 8))  # (24, 8): rotates 16 of 20 channels
    x = torch.randn(2, 3, 24, 20)
    c, s = angles.cos(), angles.sin()
    manual = x.clone()
    manual[..., 0:16:2] = x[..., 0:16:2] * c - x[..., 1:16:2] * s
    manual[..., 1:16:2] = x[..., 0:16:2] * s + x[..., 1:16:2] * c
    torch.testing.assert_close(apply_rope(x, angles), manual, rtol=0, atol=1e-6)
    traced = torch.compile(apply_rope, backend="eager", fullgraph=True)
    torch.testing.assert_close(traced(x, angles), manual, rtol=0, atol=1e-6)


def test_bench_rotary_flip_is_the_models_rotation():
    """bench_dit_parts --rotary times `rotary_flip` against the model's `apply_rope`: the same rotation (eager and
    traced for compile), so the bench compares two kernels of one function."""
    rotary_flip = import_script(Path(__file__).resolve().parents[1] / "bench", "bench_dit_parts").rotary_flip
    torch.manual_seed(0)
    angles = rope_frequencies(grid_positions(4, 6), (8, 8))  # rotates 16 of 20 channels
    x = torch.randn(2, 3, 24, 20)
    torch.testing.assert_close(rotary_flip(x, angles), apply_rope(x, angles), rtol=0, atol=1e-6)
    traced = torch.compile(apply_rope, backend="eager", fullgraph=True)
    torch.testing.assert_close(rotary_flip(x, angles), traced(x, angles), rtol=0, atol=1e-6)
    assert not torch.allclose(rotary_flip(x, angles), rotary_flip(x, angles.flip(0)))  # positions matter


def test_ispe_codes_tokens_and_points_in_one_space():
    """A 3D point at a token's NDC (depth 0) gets exactly that token's code; the code is the sinusoid of the
    coordinates (a reference computed by hand) through the shared linear map."""
    torch.manual_seed(0)
    ispe = ISPE(16, num_freqs=4)
    grid = token_grid_ndc(3, 5)  # (15, 3)
    point = grid[7].clone()
    # one row against a row of 15: float32 matmuls may round differently by batch shape, hence the atol
    assert torch.allclose(ispe(ispe_code(point[None], 4)), ispe(ispe_code(grid, 4))[7:8], atol=1e-6)
    x = torch.tensor([[0.3, -0.5, 0.9]])
    freqs = torch.pi * 2.0 ** torch.arange(4)  # period 2 at the lowest frequency, octaves above
    manual = torch.cat([torch.cat([(c * freqs).sin(), (c * freqs).cos()]) for c in x[0]])[None]  # per coordinate
    assert torch.allclose(sinusoidal_embedding(x, 4), manual, atol=1e-6)
    assert torch.allclose(ispe_code(x, 4), manual, atol=1e-6)
    assert torch.allclose(ispe(ispe_code(x, 4)), manual @ ispe.proj.weight.T + ispe.proj.bias, atol=1e-6)


# ----------------------------------------------------------------------------------- interspatial attention


def _isa(use_ispe=True, seed=0):
    """The ISA layer as a function of NDC (the network passes their codes, computed once per forward)."""
    torch.manual_seed(seed)
    isa = InterspatialAttention(32, 2, use_ispe=use_ispe, ispe_freqs=3)
    return lambda z, y, z_ndc, y_ndc, mask: isa(z, y, ispe_code(z_ndc, 3), ispe_code(y_ndc, 3), mask)


def test_isa_is_equivariant_to_token_order():
    """Permuting 3D tokens permutes their updates and leaves the video's; permuting video tokens together with their
    NDC permutes the video updates and leaves the 3D ones: ISA has no notion of order, only of NDC position."""
    isa = _isa()
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(3, 10, 32, generator=g), torch.randn(3, 7, 32, generator=g)
    z_ndc, y_ndc = torch.rand(3, 10, 3, generator=g) * 2 - 1, torch.rand(3, 7, 3, generator=g) * 2 - 1
    mask = torch.rand(3, 7, generator=g) > 0.3
    dz, dy = isa(z, y, z_ndc, y_ndc, mask)
    pm, pn = torch.randperm(7, generator=g), torch.randperm(10, generator=g)
    dz2, dy2 = isa(z, y[:, pm], z_ndc, y_ndc[:, pm], mask[:, pm])
    assert torch.allclose(dz2, dz, atol=1e-5) and torch.allclose(dy2, dy[:, pm], atol=1e-5)
    dz3, dy3 = isa(z[:, pn], y, z_ndc[:, pn], y_ndc, mask)
    assert torch.allclose(dz3, dz[:, pn], atol=1e-5) and torch.allclose(dy3, dy, atol=1e-5)


def test_isa_masked_points_are_invisible_and_frames_are_independent():
    isa = _isa()
    g = torch.Generator().manual_seed(2)
    z, y = torch.randn(2, 6, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    z_ndc, y_ndc = torch.rand(6, 3, generator=g), torch.rand(2, 5, 3, generator=g)
    mask = torch.tensor([[True, True, False, True, False], [False] * 5])
    dz, _ = isa(z, y, z_ndc, y_ndc, mask)
    y2, y_ndc2 = y.clone(), y_ndc.clone()
    y2[0, 2] += 5.0
    y2[1] += 3.0  # frame 1 has no visible point: only the null key
    y_ndc2[0, 4] -= 0.7
    dz2, _ = isa(z, y2, z_ndc, y_ndc2, mask)
    assert torch.allclose(dz, dz2, atol=1e-6)
    y3 = y.clone()
    y3[0, 0] += 1.0  # a visible point of frame 0 changes frame 0 only
    dz3, _ = isa(z, y3, z_ndc, y_ndc, mask)
    assert not torch.allclose(dz3[0], dz[0], atol=1e-4) and torch.allclose(dz3[1], dz[1], atol=1e-6)


def test_isa_uses_ndc_only_with_ispe():
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(2, 6, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    z_ndc, y_ndc = torch.rand(6, 3, generator=g), torch.rand(2, 5, 3, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    for use_ispe in (True, False):
        isa = _isa(use_ispe)
        dz, dy = isa(z, y, z_ndc, y_ndc, mask)
        dz2, dy2 = isa(z, y, z_ndc, y_ndc + 0.5, mask)
        assert torch.allclose(dz, dz2, atol=1e-6) != use_ispe
        assert torch.allclose(dy, dy2, atol=1e-6) != use_ispe


# ---------------------------------------------------------------------------------------------- the network


def test_fresh_network_predicts_zero_and_every_block_is_the_identity():
    net = tiny_net()
    cond = random_conditions()
    x, t = torch.randn(2, C, 2, 4, 4), torch.rand(2)
    assert torch.equal(net(x, t, cond), torch.zeros_like(x))
    z, y = torch.randn(2, 2, 16, 32), torch.randn(2, 2, 12, 32)
    captured = {}

    def grab(module, args, out):
        captured.setdefault("io", (args, out))

    handle = net.blocks[0].register_forward_hook(grab)
    net(x, t, cond)
    handle.remove()
    (z_in, y_in, *_), (z_out, y_out) = captured["io"]
    assert torch.equal(z_in, z_out) and torch.equal(y_in, y_out)
    assert z.shape == (2, 2, 16, 32) and y.shape == (2, 2, 12, 32)


def test_both_streams_carry_the_compute_dtype_under_autocast():
    """Under bf16 autocast (the single-GPU trainer) the video and the 3D token streams enter every block in bf16,
    with or without the reference texture (grid_sample returns fp32 there), as they do under FSDP's bf16 params."""
    for ref_points in (True, False):
        net = tiny_net(ref_points=ref_points)
        seen = []
        hooks = [b.register_forward_pre_hook(lambda m, args: seen.append((args[0].dtype, args[1].dtype)))
                 for b in net.blocks]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            net(torch.randn(2, C, 2, 4, 4), torch.rand(2), random_conditions())
        for h in hooks:
            h.remove()
        assert seen == [(torch.bfloat16, torch.bfloat16)] * len(net.blocks), (ref_points, seen)


def test_output_shape_gradients_and_batch_independence():
    net = randomize_gates(tiny_net(patch_size=2))
    cond = random_conditions(h=4, w=6)
    x, t = torch.randn(2, C, 2, 4, 6, requires_grad=True), torch.tensor([0.2, 0.9])
    v = net(x, t, cond)
    assert v.shape == x.shape
    v[0].square().sum().backward()
    assert x.grad[1].abs().max() == 0 and x.grad[0].abs().max() > 0  # sample 0 never sees sample 1
    assert [n for n, p in net.named_parameters() if p.grad is None] == []  # every path reaches the output
    alone = net(x[1:].detach(), t[1:], cond.apply(lambda a: a[1:]))
    assert torch.allclose(alone, v[1:].detach(), atol=1e-5)


def test_padded_people_and_invisible_points_change_nothing():
    """A padding person (person_mask False, points marked invalid) with arbitrary coordinates, and points that are
    never visible (3D tokens talk across time only with themselves), do not reach the video."""
    net = randomize_gates(tiny_net()).eval()
    cond = random_conditions(P=2)
    cond.points_valid[0, 1, :, :3] = False  # three points of person 1 behind the camera in every frame
    cond.ref_points_valid[1, 0, 2:] = False
    x, t = torch.randn(2, C, 2, 4, 4), torch.rand(2)
    v = net(x, t, cond)
    g = torch.Generator().manual_seed(9)
    pad = lambda a, fill: torch.cat([a, fill], dim=1)  # noqa: E731
    padded = replace(
        cond,
        points_world=pad(cond.points_world, torch.randn(2, 1, 2, F, 6, 3, generator=g) * 3),
        points_ndc=pad(cond.points_ndc, torch.rand(2, 1, 2, 6, 3, generator=g)),
        points_valid=pad(cond.points_valid, torch.zeros(2, 1, 2, 6, dtype=torch.bool)),
        person_mask=pad(cond.person_mask, torch.zeros(2, 1, dtype=torch.bool)),
        ref_points_ndc=pad(cond.ref_points_ndc, torch.rand(2, 1, 6, 2, generator=g)),
        ref_points_valid=pad(cond.ref_points_valid, torch.zeros(2, 1, 6, dtype=torch.bool)),
    )
    assert torch.allclose(net(x, t, padded), v, atol=1e-5)
    moved = cond.points_world.clone()
    moved[0, 1, :, :, :3] += 2.0  # the invisible points move
    moved_ndc = cond.points_ndc.clone()
    moved_ndc[0, 1, :, :3] += 0.3
    assert torch.allclose(net(x, t, replace(cond, points_world=moved, points_ndc=moved_ndc)), v, atol=1e-5)
    moved[0, 0, 0, :, 0] += 0.5  # a visible point moves: the video changes
    assert not torch.allclose(net(x, t, replace(cond, points_world=moved))[0], v[0], atol=1e-4)


def test_condition_dropout_matches_the_missing_condition():
    """Dropping the pose equals having no visible point; dropping the background equals the zero latent; dropped
    conditions are per sample."""
    net = randomize_gates(tiny_net()).eval()
    cond = random_conditions()
    x, t = torch.randn(2, C, 2, 4, 4), torch.rand(2)
    no_pose = net(x, t, replace(cond, points_valid=torch.zeros_like(cond.points_valid)))
    assert torch.allclose(net(x, t, cond, force_drop={"pose": True}), no_pose, atol=1e-6)
    no_bg = net(x, t, replace(cond, background=torch.zeros_like(cond.background)))
    assert torch.allclose(net(x, t, cond, force_drop={"background": True}), no_bg, atol=1e-6)
    assert torch.allclose(net(x, t, replace(cond, background=None)), no_bg, atol=1e-6)
    full = net(x, t, cond)
    one = net(x, t, cond, force_drop={"ref": torch.tensor([True, False])})
    assert torch.allclose(one[1], full[1], atol=1e-6) and not torch.allclose(one[0], full[0], atol=1e-4)
    for name in ("camera", "ref"):
        assert not torch.allclose(net(x, t, cond, force_drop={name: True}), full, atol=1e-4), name
    with pytest.raises(ValueError, match="unknown conditions"):
        net(x, t, cond, force_drop={"text": True})


def test_training_dropout_rates_and_eval_keeps_everything():
    drop = ConditionDropout({"pose": 0.25, "background": 1.0})
    g = torch.Generator().manual_seed(0)
    out = drop(20_000, torch.device("cpu"), generator=g)
    assert abs(out["pose"].float().mean().item() - 0.25) < 0.015
    assert out["background"].all() and not out["ref"].any()
    drop.eval()
    assert not any(v.any() for v in drop(100, torch.device("cpu")).values())
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        ConditionDropout({"pose": 1.5})


def test_guidance_scale_one_is_the_conditional_prediction():
    net = randomize_gates(tiny_net()).eval()
    cond = random_conditions()
    x, t = torch.randn(2, C, 2, 4, 4), torch.rand(2)
    conditional = net(x, t, cond)
    guided = condition_guidance(net, {"pose": 1.0}, cond=cond)(x, t)
    assert torch.allclose(guided, conditional, atol=1e-5)
    uncond = net(x, t, cond, force_drop={"pose": True, "ref": True})
    v_pose = net(x, t, cond, force_drop={"ref": True})
    v_ref = net(x, t, cond, force_drop={"pose": True})
    multi = condition_guidance(net, {"pose": 2.0, "ref": 3.0}, cond=cond)(x, t)
    assert torch.allclose(multi, uncond + 2 * (v_pose - uncond) + 3 * (v_ref - uncond), atol=1e-5)


def test_bad_inputs_are_named():
    net = tiny_net()
    cond = random_conditions()
    with pytest.raises(ValueError, match="latent channels"):
        net(torch.randn(2, C + 1, 2, 4, 4), torch.rand(2), cond)
    with pytest.raises(ValueError, match="latent frames"):
        net(torch.randn(2, C, 3, 4, 4), torch.rand(2), cond)
    with pytest.raises(ValueError, match="max_people"):
        net(torch.randn(2, C, 2, 4, 4), torch.rand(2), random_conditions(P=4))
    with pytest.raises(ValueError, match="head size"):
        tiny_net(hidden_size=30, num_heads=4)


def test_a_tiny_network_memorises_one_clip_and_samples_it():
    """Flow matching on one latent clip with its conditions: the loss falls by >= 5x and Euler sampling from fresh
    noise lands near the clip."""
    torch.manual_seed(0)
    net = tiny_net(hidden_size=64, num_heads=4)
    cond = random_conditions(B=1)
    x0 = torch.randn(1, C, 2, 4, 4)
    flow = FlowMatching()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for step in range(300):
        loss, _ = flow.loss(net, x0.expand(8, -1, -1, -1, -1), {"cond": cond.repeat(8)})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first / 5, (first, last)
    net.eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        sample = euler_sample(lambda x, t: net(x, t, cond), torch.randn(1, C, 2, 4, 4, generator=g),
                              sampling_timesteps(20, 1.0))
    err = (sample - x0).square().mean() / x0.square().mean()
    assert err < 0.1, err.item()
