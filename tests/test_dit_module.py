"""Stage 2 training glue: the frozen VAE loads from any stage-1 file, real batches become latents and conditions,
the module learns one batch, and configs/dit/tiny.yaml fits, validates, samples and resumes through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import toy_world_batch
from isa4d.cli import run_cli
from isa4d.geometry.plucker import latent_frame_groups
from isa4d.models.dit import ISADiT
from isa4d.models.vae import load_vae
from isa4d.training.dit_module import DiTModule
from isa4d.training.export import export

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests/assets/toy_world"


@pytest.fixture(scope="module")
def toy_batch():
    """Two validation clips of the committed toy world at 32x32, 9 frames, normalised."""
    return toy_world_batch("val", 32, 32, 9, 2)


def tiny_module(vae_path, body_dir, **kw) -> DiTModule:
    torch.manual_seed(0)
    net = ISADiT(latent_channels=16, hidden_size=64, depth=2, num_heads=4, patch_size=1, mlp_ratio=2.0,
                 num_points=32, point_freqs=4, ispe_freqs=4)
    return DiTModule(net, vae_checkpoint=str(vae_path), body_model_dir=str(body_dir), **kw)


def test_load_vae_from_a_checkpoint_an_export_and_with_clear_errors(tiny_vae_checkpoint, tmp_path):
    vae = load_vae(tiny_vae_checkpoint)
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training
    stored = torch.load(tiny_vae_checkpoint, weights_only=False)["state_dict"]
    assert all(torch.equal(v, stored[f"vae.{k}"]) for k, v in vae.state_dict().items())
    exported = export(tiny_vae_checkpoint, tmp_path / "vae.safetensors", submodule="vae")
    again = load_vae(exported)  # the config travels in the safetensors metadata
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), again.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="make train-vae"):
        load_vae(tmp_path / "missing.ckpt")
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": stored}, bare)
    with pytest.raises(ValueError, match="vae_config"):
        load_vae(bare)
    with pytest.raises(ValueError, match="no EMA state"):
        load_vae(tiny_vae_checkpoint, ema=True)


def test_compiling_modules_pad_people_to_one_shape(tiny_vae_checkpoint, toy_body_dir, toy_batch):
    from isa4d.parallel import ParallelConfig

    batch = toy_batch
    plain = tiny_module(tiny_vae_checkpoint, toy_body_dir)
    compiled = tiny_module(tiny_vae_checkpoint, toy_body_dir, parallel=ParallelConfig(compile=True))
    P = batch.person_mask.shape[1]
    assert not plain.pad_people and compiled.pad_people
    assert plain.encode(batch)[1].person_mask.shape[1] == P < 4
    assert compiled.encode(batch)[1].person_mask.shape[1] == compiled.network.point_embedder.max_people == 4


def test_module_checks_the_vae_matches_the_network(tiny_vae_checkpoint, toy_body_dir):
    net = ISADiT(latent_channels=8, hidden_size=32, depth=1, num_heads=2, num_points=16)
    with pytest.raises(ValueError, match="latent channels"):
        DiTModule(net, vae_checkpoint=str(tiny_vae_checkpoint), body_model_dir=str(toy_body_dir))
    with pytest.raises(ValueError, match="exactly one"):
        DiTModule(net, body_model_dir=str(toy_body_dir))


def test_encode_turns_a_batch_into_latents_and_conditions(tiny_vae_checkpoint, toy_body_dir, toy_batch):
    module = tiny_module(tiny_vae_checkpoint, toy_body_dir).eval()
    x0, cond, points = module.encode(toy_batch)
    B, P = len(toy_batch), toy_batch.person_mask.shape[1]
    assert x0.shape == (B, 16, 3, 4, 4)
    assert cond.points_world.shape == (B, P, 3, 4, 32, 3) and cond.points_ndc.shape == (B, P, 3, 32, 3)
    assert cond.plucker.shape == (B, 3, 24, 4, 4) and cond.ref_latent.shape == (B, 16, 4, 4)
    assert points.shape == (B, P, 9, 32, 3)
    assert not cond.points_valid[~toy_batch.person_mask].any()  # padded people are never visible
    assert cond.points_valid[toy_batch.person_mask].float().mean() > 0.5  # the toy people are mostly in view
    # the first latent frame codes video frame 0 alone, so its ISPE position is frame 0's projection, computed here
    # by hand: pinhole projection, then pixel centres to NDC
    assert (latent_frame_groups(9, 4)[0] == 0).all()
    cam = points[:, :, 0] @ toy_batch.w2c[:, None, 0, :3, :3].transpose(-1, -2) + toy_batch.w2c[:, None, 0, None, :3, 3]
    pix = cam @ toy_batch.K[:, None, 0].transpose(-1, -2)
    uv = pix[..., :2] / pix[..., 2:]
    ndc_xy = (2 * uv + 1) / 32 - 1  # pixel u covers [u - 0.5, u + 0.5]: its centre sits at (2u + 1) / W - 1
    ok = cond.points_valid[:, :, 0]
    torch.testing.assert_close(cond.points_ndc[:, :, 0, :, :2][ok], ndc_xy[ok], atol=1e-4, rtol=1e-4)
    assert toy_batch.has_bg.any()  # the toy world films a background plate of every clip
    assert cond.background[toy_batch.has_bg].abs().sum() > 0 and cond.background[~toy_batch.has_bg].abs().sum() == 0


def test_module_learns_one_batch(tiny_vae_checkpoint, toy_body_dir, toy_batch):
    """The deterministic validation loss on one batch falls by >= 5x while training on it."""
    module = tiny_module(tiny_vae_checkpoint, toy_body_dir, latent_sample=False)
    module.network.condition_dropout.probabilities = dict.fromkeys(module.network.condition_dropout.probabilities, 0.0)
    x0, cond, _ = module.encode(toy_batch)

    def val_loss():
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return sum(module.objective.loss(module.network, x0, {"cond": cond}, generator=g,
                                             t=torch.full((len(x0),), t))[0].item() for t in (0.25, 0.5, 0.75)) / 3

    before = val_loss()
    opt = torch.optim.AdamW(module.network.parameters(), lr=3e-3)
    for _ in range(150):
        loss, _ = module.objective.loss(module.network, x0, {"cond": cond}, shift=module.shift_for(x0.shape))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = val_loss()
    assert after < before / 5, (before, after)


def test_tiny_dit_config_fits_samples_and_resumes_through_the_cli(tiny_vae_checkpoint, toy_body_dir, tmp_path):
    args = [
        "-c", str(ROOT / "configs/dit/tiny.yaml"), "-c", str(ROOT / "configs/data/toy.yaml"),
        "-c", str(ROOT / "configs/trainer/cpu_debug.yaml"),
        f"--data.init_args.train_urls={ASSETS}/train-*.tar", f"--data.init_args.val_urls={ASSETS}/val-*.tar",
        "--data.init_args.num_workers=0",
        '--data.init_args.buckets=[{"height": 32, "width": 32, "num_frames": 9, "batch_size": 2}]',
        f"--model.init_args.vae_checkpoint={tiny_vae_checkpoint}", f"--model.init_args.body_model_dir={toy_body_dir}",
        "--model.init_args.sample_steps=3", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=2",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}/runs",
        "--trainer.callbacks+=isa4d.training.checkpoint.AtomicCheckpoint",
        f"--trainer.callbacks.dirpath={tmp_path}/ckpt", "--trainer.callbacks.save_last=true",
    ]
    cli = run_cli(["fit", *args, "--trainer.max_steps=3", "--trainer.log_every_n_steps=2"])
    metrics = cli.trainer.logged_metrics
    assert cli.trainer.global_step == 3
    assert {"train/loss", "val/loss", "val/psnr", "val/part_appearance", "val/pose_iou"} <= set(metrics)
    # throughput of every training run (isa4d.training.throughput): the FLOPs the meta-device count gives
    assert {"perf/steps_per_s", "perf/tokens_per_s", "perf/tflops", "perf/data_wait_fraction"} <= set(metrics)
    assert "perf/mfu" not in metrics  # no known peak on a CPU
    last = tmp_path / "ckpt/last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert not any(k.startswith("vae.") for k in state["state_dict"])  # the frozen VAE has its own file
    assert state["isa4d"]["vae_config"]["latent_channels"] == 16
    assert ISADiT(**state["isa4d"]["network_config"]).num_parameters == cli.model.network.num_parameters
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(Path(tmp_path).rglob("events.out.tfevents*")).parent), size_guidance={"images": 0})
    events.Reload()
    image = events.Images("val/sample_0")[0]  # ground truth | sample | sample with the body points
    assert image.encoded_image_string[:4] == b"GIF8" and image.width == 3 * 32

    resumed = run_cli(["fit", *args, "--trainer.max_steps=5", f"--ckpt_path={last}"])
    assert resumed.trainer.global_step == 5

    run_cli(["test", *args, f"--ckpt_path={last}", f"--metrics_json={tmp_path}/dit.json"])  # samples every batch
    record = json.loads((tmp_path / "dit.json").read_text())
    m = record["metrics"]
    assert record["checkpoint_step"] == 5 and record["model"] == "DiTModule"
    assert {"test/loss", "test/psnr", "test/ssim", "test/part_appearance", "test/pose_iou",
            "test/fvd_num_short_clips"} <= set(m), sorted(m)
    assert m["test/pose_iou_num_frames"] == 9 and 0 <= m["test/pose_iou"] <= 1  # the one 9-frame val clip
    before = {k: v for k, v in state["state_dict"].items() if k.startswith("network.")}
    after = resumed.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # training went on from the checkpoint
    vae = load_vae(tiny_vae_checkpoint)
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in resumed.model.vae.state_dict().items())


def test_encode_keeps_geometry_in_fp32_under_autocast(tiny_vae_checkpoint, toy_body_dir, toy_batch):
    """bf16 autocast (the GPU trainer's precision) must not reach the camera maths: matrix inverses refuse bf16 and
    NDC would lose its fine positions."""
    module = tiny_module(tiny_vae_checkpoint, toy_body_dir).eval()
    reference = module.encode(toy_batch)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, cond, _ = module.encode(toy_batch)
    assert cond.plucker.dtype == torch.float32 and cond.points_ndc.dtype == torch.float32
    torch.testing.assert_close(cond.points_ndc, reference.points_ndc)
    torch.testing.assert_close(cond.plucker, reference.plucker)


def test_cuda_graphs_start_a_graph_step_per_network_call(tiny_vae_checkpoint, toy_body_dir, toy_batch, monkeypatch):
    """With parallel.cuda_graphs every call of the network begins a new step of the recorded graphs (one per
    training step, one per solver step when sampling), registered once however often Lightning configures the
    model; the VAE stage refuses the setting."""
    from isa4d.parallel import ParallelConfig
    from isa4d.training.vae_module import VAEModule

    steps = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the graphs themselves need a GPU (test_gpu.py)
    config = ParallelConfig(compile=True, cuda_graphs=True)
    module = tiny_module(tiny_vae_checkpoint, toy_body_dir, parallel=config)
    module.configure_model()
    module.configure_model()
    calls = []
    module.network.register_forward_pre_hook(lambda *_: calls.append(1))
    module.training_step(toy_batch, 0).backward()
    assert len(calls) == len(steps) == 1
    with pytest.raises(ValueError, match="DiT stage only"):
        VAEModule(vae=None, parallel=config)
