"""The 2D-map baseline (paper's ControlNet comparison): normal maps of the posed bodies against the rasteriser,
their plumbing through ISA-DiT (zero-init, dropout, guidance, padding, windows), and the four pose-ablation
overlays through the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from einops import rearrange

from conftest import toy_world_batch
from isa4d.body.smpl import BodyModel
from isa4d.cli import run_cli
from isa4d.diffusion.sampling import condition_guidance
from isa4d.diffusion.windows import sliding_window
from isa4d.geometry.ndc import points_to_ndc
from isa4d.models.dit import DiTConditions, ISADiT, PoseConditioner
from isa4d.render import Mesh, TorchRenderer, normal_maps

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests/assets/toy_world"
C, F, S = 8, 4, 4  # latent channels, video frames per latent frame, pixels per latent pixel


@pytest.fixture(scope="module")
def toy_clips():
    """Three training clips of the committed toy world at 64x64, 13 frames (1, 2 and 3 people)."""
    return toy_world_batch("train", 64, 64, 13, 4)


def test_normal_maps_cover_exactly_the_rasterisers_silhouette(toy_body_dir, toy_clips):
    b, body = toy_clips, BodyModel(toy_body_dir)
    verts, _ = body(b.smpl.betas, b.smpl.global_orient, b.smpl.body_pose, b.smpl.transl)  # (B, P, T, V, 3)
    B, P, T = verts.shape[:3]
    present = b.person_mask.clone()
    present[2, 1] = False  # a person left out draws nothing
    maps = normal_maps(rearrange(verts, "b p t v c -> (b t) p v c"), body.faces, rearrange(b.K, "b t i j -> (b t) i j"),
                       rearrange(b.w2c, "b t i j -> (b t) i j"), present.repeat_interleave(T, 0), 64, 64)
    maps = rearrange(maps, "(b t) c h w -> b t c h w", b=B)
    renderer = TorchRenderer(64, 64)
    faces = body.faces.numpy()
    for i in range(B):
        for t in (0, 6, 12):
            meshes = [Mesh(vertices=verts[i, p, t].double().numpy(), faces=faces, instance_id=p + 1)
                      for p in range(P) if present[i, p]]
            mask = torch.from_numpy(renderer.render(meshes, b.K[i, t].double().numpy(),
                                                    b.w2c[i, t].double().numpy()).instance > 0)
            covered = maps[i, t].abs().sum(0) > 0
            assert mask.any() and torch.equal(covered, mask), (i, t)
            assert torch.allclose(maps[i, t].norm(dim=0)[covered], torch.ones(()), atol=1e-5)  # unit normals
            # the posed vertices project onto the silhouette (within a pixel: the mesh's own edges)
            ndc, ok = points_to_ndc(verts[i, present[i], t], b.K[i, t], b.w2c[i, t], 64, 64, 0.1, 20.0)
            uv = ((ndc[..., :2][ok] + 1) * 32 - 0.5).round().long().clamp(0, 63)
            grown = torch.nn.functional.max_pool2d(covered[None, None].float(), 3, 1, 1)[0, 0] > 0
            assert grown[uv[:, 1], uv[:, 0]].float().mean() > 0.99
    # seen from the camera, the visible surface faces it: normals point back towards the camera (z < 0)
    z = maps[:, :, 2][maps.abs().sum(2) > 0]
    assert (z < 0).float().mean() > 0.9


def tiny_net(pose: str, seed: int = 0, **kw) -> ISADiT:
    torch.manual_seed(seed)
    return ISADiT(latent_channels=C, hidden_size=32, depth=2, num_heads=2, patch_size=1, mlp_ratio=2.0,
                  frames_per_latent=F, num_points=6, max_people=3, point_freqs=3, ispe_freqs=3, pose=pose,
                  spatial_factor=S, **kw)


def open_gates(net: ISADiT, maps: bool = False) -> ISADiT:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if hasattr(m, "adaLN_modulation"):
                m.adaLN_modulation[-1].weight.copy_(torch.randn(m.adaLN_modulation[-1].weight.shape, generator=g) * .05)
                m.adaLN_modulation[-1].bias.copy_(torch.randn(m.adaLN_modulation[-1].bias.shape, generator=g) * .3)
        net.final_layer.linear.weight.copy_(torch.randn(net.final_layer.linear.weight.shape, generator=g) * 0.1)
        if maps:
            net.map_embedder.proj.weight.copy_(torch.randn(net.map_embedder.proj.weight.shape, generator=g) * 0.1)
    return net


def conditions(B=2, P=2, T=3, V=6, h=4, w=4, seed=0) -> DiTConditions:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return DiTConditions(
        points_world=r(B, P, T, F, V, 3), points_ndc=torch.rand(B, P, T, V, 3, generator=g) * 2 - 1,
        points_valid=torch.ones(B, P, T, V, dtype=torch.bool), person_mask=torch.ones(B, P, dtype=torch.bool),
        plucker=r(B, T, 6 * F, h, w), ref_latent=r(B, C, h, w), ref_points_ndc=torch.rand(B, P, V, 2, generator=g),
        ref_points_valid=torch.ones(B, P, V, dtype=torch.bool), background=r(B, C, T, h, w),
        body_maps=r(B, T, 3 * F, h * S, w * S))


def test_zero_init_map_network_equals_the_no_pose_network():
    maps = open_gates(tiny_net("maps")).eval()
    none = tiny_net("none").eval()
    missing, unexpected = none.load_state_dict(maps.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("map_embedder.") for k in unexpected)
    cond, x, t = conditions(), torch.randn(2, C, 3, 4, 4), torch.tensor([0.2, 0.7])
    with torch.no_grad():
        assert torch.equal(maps(x, t, cond), none(x, t, cond))
        open_gates(maps, maps=True)  # once trained, the maps change the prediction
        assert not torch.allclose(maps(x, t, cond), none(x, t, cond), atol=1e-4)


def test_maps_are_the_pose_condition_for_dropout_and_guidance():
    net = open_gates(tiny_net("maps"), maps=True).eval()
    cond, x, t = conditions(), torch.randn(2, C, 3, 4, 4), torch.tensor([0.2, 0.7])
    other = DiTConditions(**{**vars(cond), "body_maps": torch.randn_like(cond.body_maps)})
    with torch.no_grad():
        v, v_other = net(x, t, cond), net(x, t, other)
        assert not torch.allclose(v, v_other, atol=1e-4)
        dropped = net(x, t, cond, force_drop={"pose": torch.tensor([True, False])})
        assert torch.equal(dropped[0], net(x, t, other, force_drop={"pose": True})[0])  # sample 0: maps unread
        assert torch.equal(dropped[1], v[1])
        # the unconditional prediction, computed another way: the same network with its map projection zeroed
        blind = open_gates(tiny_net("maps")).eval()
        blind.load_state_dict({k: torch.zeros_like(p) if k.startswith("map_embedder.proj") else p
                               for k, p in net.state_dict().items()})
        v_uncond = blind(x, t, cond)
        guided = condition_guidance(net, {"pose": 3.0}, cond=cond)(x, t)
        assert torch.allclose(guided, v_uncond + 3.0 * (v - v_uncond), atol=1e-5)
    net.train()
    net.condition_dropout.probabilities["pose"] = 1.0  # training dropout of "pose" drops the maps too
    with torch.no_grad():
        assert torch.equal(net(x, t, cond), net(x, t, other))


def test_maps_survive_people_padding_and_are_sliced_by_windows():
    net = open_gates(tiny_net("maps"), maps=True).eval()
    cond, x, t = conditions(T=5), torch.randn(2, C, 5, 4, 4), torch.tensor([0.2, 0.7])
    padded = cond.pad_people(3)
    assert padded.body_maps is cond.body_maps and padded.person_mask.shape == (2, 3)
    part = cond.slice(1, 4)
    assert torch.equal(part.body_maps, cond.body_maps[:, 1:4]) and part.plucker.shape[1] == 3
    with torch.no_grad():
        assert torch.equal(net(x, t, padded), net(x, t, cond))
        net_fn = sliding_window(lambda xw, tw, s, e: net(xw, tw, cond.slice(s, e)), 5, window=3, overlap=1)
        v = net_fn(x, t)
        # latent frames 0 and 4 are each covered by one window only: that window's velocity, on its sliced maps
        manual = net(x[:, :, 2:5], t, DiTConditions(**{**vars(part), **{k: getattr(cond.slice(2, 5), k)
                                                                         for k in ("points_world", "points_ndc",
                                                                                   "points_valid", "plucker",
                                                                                   "background", "body_maps")}}))
        assert torch.equal(v[:, :, 4], manual[:, :, 2])


def test_pose_conditioner_renders_maps_per_video_frame_grouped_by_latent_frame(toy_body_dir, toy_clips):
    b = toy_clips
    conditioner = PoseConditioner(str(toy_body_dir), 32, body_maps=True)
    geometry, _ = conditioner(b.K, b.w2c, b.smpl, b.person_mask, b.ref_K, b.ref_w2c, b.ref_smpl, b.ref_has_camera,
                              64, 64, b.gender)
    maps = geometry["body_maps"]
    B = len(b)
    assert maps.shape == (B, 4, 3 * 4, 64, 64)  # 13 frames: latent frame 0 holds frame 0 four times
    per_frame = conditioner.normal_maps(b.K, b.w2c, b.smpl, b.person_mask, 64, 64, b.gender)  # (B, 13, 3, H, W)
    assert torch.equal(maps[:, 0], rearrange(per_frame[:, [0, 0, 0, 0]], "b f c h w -> b (f c) h w"))
    assert torch.equal(maps[:, 2, 6:9], per_frame[:, 7])  # latent frame 2 = video frames 5..8
    # a person marked absent draws nothing: the maps equal those of the clip without them
    mask = b.person_mask.clone()
    mask[2, 2] = False
    kept = conditioner.normal_maps(b.K, b.w2c, b.smpl, mask, 64, 64, b.gender)[2]
    alone = b.smpl.apply(lambda a: a[2:3, :2])
    assert torch.equal(kept, conditioner.normal_maps(b.K[2:3], b.w2c[2:3], alone, mask[2:3, :2], 64, 64)[0])
    assert not torch.equal(kept, per_frame[2])


VARIANTS = sorted((ROOT / "configs/dit/ablation").glob("*.yaml"))


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda p: p.stem)
def test_ablation_overlay_trains_one_step_through_the_cli(variant, tiny_vae_checkpoint, toy_body_dir, tmp_path):
    args = [
        "fit", "-c", str(ROOT / "configs/dit/tiny.yaml"), "-c", str(variant),
        "-c", str(ROOT / "configs/data/toy.yaml"), "-c", str(ROOT / "configs/trainer/cpu_debug.yaml"),
        f"--data.init_args.train_urls={ASSETS}/train-*.tar", f"--data.init_args.val_urls={ASSETS}/val-*.tar",
        "--data.init_args.num_workers=0",
        '--data.init_args.buckets=[{"height": 32, "width": 32, "num_frames": 9, "batch_size": 2}]',
        f"--model.init_args.vae_checkpoint={tiny_vae_checkpoint}", f"--model.init_args.body_model_dir={toy_body_dir}",
        "--trainer.max_steps=1", "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}/runs",
    ]
    cli = run_cli(args)
    net = cli.model.network
    assert cli.trainer.global_step == 1 and np.isfinite(cli.trainer.logged_metrics["train/loss"].item())
    expected = {"isa_ispe": ("points", True), "isa_no_ispe": ("points", False), "maps": ("maps", None),
                "no_pose": ("none", None)}[variant.stem]
    assert net.pose == expected[0]
    assert (net.point_embedder is not None) == (expected[0] == "points")
    assert (net.map_embedder is not None) == (expected[0] == "maps")
    if expected[1] is not None:
        assert net.blocks[0].isa.use_ispe == expected[1]


def test_map_network_runs_in_bf16_parameters_and_under_bf16_autocast():
    """bf16 as on GPUs: FSDP's bf16 parameters (the maps are cast at the input boundary with the other "compute"
    fields) and the single-GPU trainer's bf16 autocast; both stay close to the fp32 prediction."""
    net = open_gates(tiny_net("maps"), maps=True).eval()
    cond, x, t = conditions(), torch.randn(2, C, 3, 4, 4), torch.tensor([0.2, 0.7])
    with torch.no_grad():
        ref = net(x, t, cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = net(x, t, cond)
        half = net.to(torch.bfloat16)(x, t, cond)
    assert half.dtype == torch.bfloat16
    for v in (auto, half):
        assert torch.isfinite(v).all() and (v.float() - ref).abs().max() < 0.05 * ref.abs().max()
