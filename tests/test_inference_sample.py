"""`isa4d sample`: inputs become a contract batch, generation is deterministic per seed, one window is the plain
sampler, several reference images tile correctly, long videos show no seam at window boundaries, and the command
writes the mp4 and its pose side-by-side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.sample_inputs import write_sample_inputs
from conftest import toy_world_batch
from isa4d.cli import run_cli
from isa4d.data import video as videolib
from isa4d.data.contract import npz_bytes
from isa4d.diffusion.sampling import euler_sample
from isa4d.diffusion.schedules import sampling_timesteps
from isa4d.diffusion.windows import window_starts
from isa4d.geometry.ndc import points_to_ndc
from isa4d.inference.generate import ReferenceTiles, generate, seam_ratio, tile_reference_points
from isa4d.inference.inputs import SampleInputs
from isa4d.models.dit import ISADiT
from isa4d.training.dit_module import DiTModule

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests/assets/toy_world"


@pytest.fixture(scope="module")
def clip_inputs(tmp_path_factory) -> Path:
    """The inputs of the committed toy world's first training clip (13 frames, 64x64) as `isa4d sample` reads them."""
    out = tmp_path_factory.mktemp("sample_inputs")
    write_sample_inputs(str(ASSETS / "train-000000.tar"), 1, out)
    return out


def tiny_module(vae_path, body_dir, **kw) -> DiTModule:
    torch.manual_seed(0)
    net = ISADiT(latent_channels=16, hidden_size=64, depth=2, num_heads=4, patch_size=1, mlp_ratio=2.0,
                 num_points=32, point_freqs=4, ispe_freqs=4)
    return DiTModule(net, vae_checkpoint=str(vae_path), body_model_dir=str(body_dir), sample_steps=4, **kw).eval()


def inputs(clip: Path, body_dir, **kw) -> SampleInputs:
    people = sorted(str(p) for p in clip.glob("person*.npz"))
    args = dict(motions=people, ref=str(clip / "ref.png"), ref_camera=str(clip / "ref.npz"), keep_world=True,
                camera=str(clip / "cam.npz"), background=str(clip / "bg.mp4"), body_model_dir=str(body_dir))
    return SampleInputs(**{**args, **kw})


def test_inputs_become_a_contract_batch_whose_reference_is_the_first_frame(clip_inputs, toy_body_dir,
                                                                             tiny_vae_checkpoint):
    request = inputs(clip_inputs, toy_body_dir).request()
    b = request.batch.normalize()
    P = len(list(clip_inputs.glob("person*.npz")))
    assert b.video.shape == (1, 13, 3, 64, 64) and b.smpl.transl.shape == (1, P, 13, 3) and b.bg.shape == b.video.shape
    assert request.tiles is None and b.ref.shape == (1, 3, 64, 64) and b.has_bg.all()
    module = tiny_module(tiny_vae_checkpoint, toy_body_dir)
    cond, points = module.conditions(b)
    # The reference is the first frame: its points' projection into the reference view is frame 0's NDC.
    ndc0, ok0 = points_to_ndc(points[:, :, 0], b.K[:, None, 0], b.w2c[:, None, 0], 64, 64)
    ok = ok0 & cond.ref_points_valid
    assert ok.sum() > 20 and torch.allclose(cond.ref_points_ndc[ok], ndc0[..., :2][ok], atol=1e-4)
    assert cond.background is not None and cond.background.abs().sum() > 0


def test_bad_inputs_fail_clearly(clip_inputs, toy_body_dir, tmp_path):
    nine = inputs(clip_inputs, toy_body_dir, num_frames=9).request().batch  # the clip's cam.npz cut to 9 frames
    assert nine.K.shape[1] == 9 and nine.bg.shape[1] == 9
    with pytest.raises(ValueError, match=r"num_frames=12: must be 1 \+ 4k.*e.g. 9"):
        inputs(clip_inputs, toy_body_dir, num_frames=12).request()
    with pytest.raises(ValueError, match="num_frames=17 but the motions .*person0.npz.* give only 13 frames"):
        inputs(clip_inputs, toy_body_dir, num_frames=17).request()
    with pytest.raises(ValueError, match="one reference image, or one per person"):
        inputs(clip_inputs, toy_body_dir, ref=[str(clip_inputs / "ref.png")] * 5)
    with pytest.raises(FileNotFoundError, match="data.background: no such file"):
        inputs(clip_inputs, toy_body_dir, background=str(tmp_path / "none.mp4"))
    short = tmp_path / "short.mp4"
    short.write_bytes(videolib.encode_video(np.zeros((5, 64, 64, 3), np.uint8), 15.0))
    with pytest.raises(ValueError, match="short.mp4 has 5 frames, the sample needs 13"):
        inputs(clip_inputs, toy_body_dir, background=str(short)).request()


def test_generation_is_deterministic_and_one_window_is_the_plain_sampler(clip_inputs, toy_body_dir,
                                                                         tiny_vae_checkpoint):
    module = tiny_module(tiny_vae_checkpoint, toy_body_dir)
    with torch.no_grad():  # a trained-looking network: the zero-initialised output layer would predict v = 0
        for p in module.network.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b = inputs(clip_inputs, toy_body_dir).request().batch.normalize()
    a, _ = generate(module, b, seed=3)
    again, _ = generate(module, b, seed=3)
    other, _ = generate(module, b, seed=4)
    windowed, _ = generate(module, b, seed=3, window=4, overlap=2)  # 4 latent frames: one window
    assert torch.equal(a, again) and torch.equal(a, windowed) and (a - other).abs().mean() > 1e-3
    # the plain sampler by hand: CPU noise of the seed, Euler, decode
    cond, _ = module.conditions(b)
    noise = torch.randn((1, 16, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    ts = sampling_timesteps(4, module.shift_for(noise.shape))
    latent = euler_sample(lambda x, t: module.network(x, t, cond=cond), noise, ts)
    plain = module.vae.decode(module.vae.denormalize_latents(latent)).clamp(-1, 1).permute(0, 2, 1, 3, 4)
    assert torch.allclose(a, plain, atol=1e-6)


def test_one_reference_image_per_person_samples_its_own_tile():
    g = torch.Generator().manual_seed(0)
    B, P, V, H, W = 2, 3, 10, 32, 48
    pts = torch.randn(B, P, V, 3, generator=g) * 0.3 + torch.tensor([0.0, 0.0, 3.0])
    K = torch.tensor([[40.0, 0, 23.5], [0, 40.0, 15.5], [0, 0, 1]]).expand(B, P, 3, 3)
    w2c = torch.eye(4).expand(B, P, 4, 4).clone()
    w2c[:, 1, 0, 3] = 0.2  # person 1's reference camera sits elsewhere
    mask = torch.tensor([[True, True, True], [True, True, False]])
    xy, ok = tile_reference_points(pts, ReferenceTiles(K, w2c), mask, H, W)
    for p in range(P):
        tile, tile_ok = points_to_ndc(pts[:, p], K[:, p], w2c[:, p], H, W)
        sel = tile_ok & mask[:, p, None]
        assert torch.equal(ok[:, p], sel)
        lo, hi = -1 + 2 * p / P, -1 + 2 * (p + 1) / P  # the tile's span on the canvas
        expected = lo + (tile[..., 0] + 1) / 2 * (hi - lo)
        assert torch.allclose(xy[:, p, :, 0][sel], expected[sel], atol=1e-6)
        assert torch.allclose(xy[:, p, :, 1][sel], tile[..., 1][sel], atol=1e-6)
    assert not ok[1, 2].any() and (xy[1, 2] == 0).all()  # a padded person samples nothing
    with pytest.raises(ValueError, match="one reference image per person"):
        tile_reference_points(pts, ReferenceTiles(K[:, :2], w2c[:, :2]), mask, H, W)


def test_several_reference_images_make_one_canvas(clip_inputs, toy_body_dir, tiny_vae_checkpoint):
    people = sorted(clip_inputs.glob("person*.npz"))
    refs = [str(clip_inputs / "ref.png")] * len(people)
    request = inputs(clip_inputs, toy_body_dir, ref=refs, ref_camera=None, camera="orbit").request()
    assert request.batch.ref.shape == (1, 3, 64, 64 * len(people)) and request.tiles.num_tiles == len(people)
    module = tiny_module(tiny_vae_checkpoint, toy_body_dir)
    video, _ = generate(module, request.batch.normalize(), request.tiles, seed=0, steps=2)
    assert video.shape == (1, 13, 3, 64, 64) and torch.isfinite(video).all()


def _long_motion(clip: Path, out: Path, repeats: int) -> list[str]:
    """Each person's motion played forward and back `repeats` times (a continuous motion many clips long)."""
    paths = []
    for src in sorted(clip.glob("person*.npz")):
        z = dict(np.load(src))
        idx = np.concatenate([np.arange(13) if k % 2 == 0 else np.arange(11, 0, -1) for k in range(repeats)])
        arrays = {k: (v[:, idx] if k in ("global_orient", "body_pose", "transl") else v) for k, v in z.items()}
        path = out / src.name
        path.write_bytes(npz_bytes(**arrays))
        paths.append(str(path))
    return paths


def test_a_long_video_shows_no_seam_at_window_boundaries(clip_inputs, toy_body_dir, tiny_vae_checkpoint, tmp_path):
    """The tiny model trained briefly on the toy clips, then a video 4x its training length sampled in windows:
    the mean frame-to-frame change across window edges stays within 1.2x of the median change across the other
    latent-frame boundaries (`seam_ratio`)."""
    module = tiny_module(tiny_vae_checkpoint, toy_body_dir)
    x0, cond, _ = module.encode(toy_world_batch("train", 32, 32, 13, 3))
    opt = torch.optim.AdamW(module.network.parameters(), lr=3e-3)
    module.network.train()
    for _ in range(120):
        loss, _ = module.objective.loss(module.network, x0, {"cond": cond}, shift=module.shift_for(x0.shape))
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.network.eval()
    motions = _long_motion(clip_inputs, tmp_path, 5)  # 13 + 4 x 11 = 57 frames: 15 latent frames
    b = inputs(clip_inputs, toy_body_dir, motions=motions, camera="static", background=None, ref_camera=None,
               keep_world=False, height=32, width=32).request().batch.normalize()
    video, _ = generate(module, b, seed=0, steps=8, window=4, overlap=2)  # trained on 4 latent frames
    T = module.vae.num_latent_frames(b.video.shape[1])
    starts = window_starts(T, 4, 2)
    seam = seam_ratio(video[0], starts, 4)
    assert len(starts) >= 6 and seam["ratio"] <= 1.2, seam
    # the statistic sees a seam where there is one: a clip whose windows were cut apart and shifted
    cut, step = video[0].clone(), (video[0, 1:] - video[0, :-1]).abs().mean(dim=(1, 2, 3)).median()
    for s in starts[1:]:
        cut[4 * (s - 1) + 1:] += 3 * step
    assert seam_ratio(cut, starts, 4)["ratio"] > 1.2


def test_isa4d_sample_writes_the_video_and_its_pose_side_by_side(clip_inputs, toy_body_dir, tiny_vae_checkpoint,
                                                                 tmp_path):
    import lightning as L

    config = [
        "-c", str(ROOT / "configs/dit/tiny.yaml"), "-c", str(ROOT / "configs/sample/toy.yaml"),
        "-c", str(ROOT / "configs/trainer/cpu_debug.yaml"), "--trainer.logger=false",
        f"--model.init_args.vae_checkpoint={tiny_vae_checkpoint}", f"--model.init_args.body_model_dir={toy_body_dir}",
        "--model.init_args.sample_steps=2", f"--trainer.default_root_dir={tmp_path}",
    ]
    people = sorted(str(p) for p in clip_inputs.glob("person*.npz"))
    data = [f"--data.init_args.motions=[{', '.join(people)}]", f"--data.init_args.ref={clip_inputs}/ref.png",
            f"--data.init_args.ref_camera={clip_inputs}/ref.npz", f"--data.init_args.body_model_dir={toy_body_dir}",
            "--data.init_args.num_frames=9", f"--data.init_args.output_dir={tmp_path}/out", "--data.init_args.name=s"]
    cli = run_cli([*config, *data], run=False)  # build the configured model, save it untrained
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.strategy.connect(cli.model)
    trainer.save_checkpoint(tmp_path / "dit.ckpt")
    from isa4d.cli import main

    assert main(["sample", *config, *data, f"--ckpt_path={tmp_path}/dit.ckpt"]) == 0
    video = videolib.decode_all((tmp_path / "out/s.mp4").read_bytes())
    side = videolib.decode_all((tmp_path / "out/s_pose.mp4").read_bytes())
    assert video.shape == (9, 64, 64, 3) and side.shape == (9, 64, 128, 3)
    assert np.abs(side[:, :, :64].astype(int) - video.astype(int)).mean() < 3  # left: the sample itself
    assert np.abs(side[:, :, 64:].astype(int) - video.astype(int)).mean() > 3  # right: bodies drawn over it
