"""The metrics wired into validation and test: `VideoEvaluation` on real toy-world batches, and `isa4d test` writing
them to TensorBoard and JSON for a stage-1 checkpoint (the stage-2 CLI path is in test_dit_module.py)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import toy_world_batch
from isa4d.cli import run_cli
from isa4d.metrics import psnr_per_frame, ssim_per_frame
from isa4d.models.dit import PoseConditioner
from isa4d.training.evaluation import VideoEvaluation

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests/assets/toy_world"


@pytest.fixture(scope="module")
def toy_clips():
    """The committed toy world's three training clips at 64x64, 13 frames (with background plates), normalised."""
    return toy_world_batch("train", 64, 64, 13, 3)


def _meshes(batch, body_dir):
    c = PoseConditioner(str(body_dir), num_points=32)
    s, r = batch.smpl, batch.ref_smpl
    verts = c.mesh(s.betas, s.global_orient, s.body_pose, s.transl, batch.gender)
    ref = c.mesh(r.betas, r.global_orient, r.body_pose, r.transl, batch.gender)
    body = c.bodies["neutral"]
    return verts, ref, body.faces, body.part_ids


def test_body_metrics_score_the_ground_truth_above_a_shifted_and_a_recoloured_video(toy_clips, toy_body_dir):
    batch = toy_clips
    assert batch.has_bg.all()
    meshes = _meshes(batch, toy_body_dir)

    def scores(video):
        ev = VideoEvaluation(("psnr", "ssim", "part_appearance", "pose_iou"))
        ev.update(batch, video, *meshes)
        out = ev.compute()
        ev.close()
        return out

    truth = scores(batch.video)
    shifted = scores(torch.roll(batch.video, shifts=12, dims=-1))  # the people 12 px off their bodies
    recoloured = scores(batch.video.flip(2))  # RGB -> BGR: same silhouettes, other colours
    assert truth["psnr"] == 100.0 and truth["ssim"] == pytest.approx(1.0)
    assert truth["pose_iou"] > 0.6 and shifted["pose_iou"] < truth["pose_iou"] - 0.2, (truth, shifted)
    assert truth["part_appearance"] < recoloured["part_appearance"] - 0.05, (truth, recoloured)
    assert truth["pose_iou_num_frames"] == batch.video.shape[0] * batch.video.shape[1]
    assert truth["pose_iou_num_skipped_clips"] == 0 and truth["part_appearance_num_frames"] > 0


def test_psnr_ssim_match_the_per_frame_functions_and_fvd_counts_short_clips(toy_clips):
    batch = toy_clips
    noisy = (batch.video + 0.1 * torch.randn_like(batch.video)).clamp(-1, 1)
    ev = VideoEvaluation(("psnr", "ssim", "fvd"))
    ev.update(batch, noisy)
    with pytest.warns(UserWarning, match="fewer than 16 frames"):
        out = ev.compute()
    assert out["psnr"] == pytest.approx(psnr_per_frame(noisy, batch.video).mean().item(), rel=1e-6)
    assert out["ssim"] == pytest.approx(ssim_per_frame(noisy, batch.video).mean().item(), rel=1e-6)
    assert math.isnan(out["fvd"]) and out["fvd_num_short_clips"] == 3  # 13 frames < 16: skipped and counted
    ev.reset()
    assert ev.compute() == {}


def test_fvd_is_zero_for_the_ground_truth_and_positive_for_noise(toy_clips):
    long = replace(toy_clips, video=torch.cat([toy_clips.video, toy_clips.video[:, :4]], 1))  # 17 frames
    ev = VideoEvaluation(("fvd",))
    ev.update(long, long.video)
    same = ev.compute()
    ev.reset()
    ev.update(long, (long.video + 0.5 * torch.randn_like(long.video)).clamp(-1, 1))
    noisy = ev.compute()
    assert same["fvd"] == pytest.approx(0.0, abs=1e-6) and same["fvd_num_real"] == 3 == same["fvd_num_fake"]
    assert noisy["fvd"] > 1.0


def test_bad_metric_configuration_is_refused():
    with pytest.raises(ValueError, match="unknown metrics.*'fid'"):
        VideoEvaluation(("psnr", "fid"))
    with pytest.raises(ValueError, match="face_sim needs body_model_dir"):
        VideoEvaluation(("face_sim",))
    ev = VideoEvaluation(("pose_iou",))
    with pytest.raises(ValueError, match="need the posed vertices"):
        ev.update(type("B", (), {"video": torch.zeros(1, 2, 3, 8, 8)})(), torch.zeros(1, 2, 3, 8, 8))


def test_isa4d_test_writes_vae_metrics_with_rfvd_to_json_and_tensorboard(marker_shards, tmp_path):
    urls = f"--data.init_args.train_urls=[{', '.join(marker_shards)}]"
    common = [
        "-c", str(ROOT / "configs/vae/tiny.yaml"), "-c", str(ROOT / "configs/data/toy.yaml"),
        "-c", str(ROOT / "configs/trainer/cpu_debug.yaml"), urls,
        f"--data.init_args.val_urls=[{', '.join(marker_shards[:1])}]", "--data.init_args.num_workers=0",
        '--data.init_args.buckets=[{"height": 32, "width": 32, "num_frames": 17, "batch_size": 2}]',
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}/runs",
    ]
    fit = run_cli(["fit", *common, "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
                   "--trainer.callbacks+=isa4d.training.checkpoint.AtomicCheckpoint",
                   f"--trainer.callbacks.dirpath={tmp_path}/ckpt", "--trainer.callbacks.save_last=true"])
    assert "val/rfvd" in fit.trainer.logged_metrics and "val/psnr" in fit.trainer.logged_metrics
    out = tmp_path / "eval/vae.json"
    run_cli(["test", *common, "--trainer.limit_test_batches=2", f"--ckpt_path={tmp_path}/ckpt/last.ckpt",
             f"--metrics_json={out}"])
    record = json.loads(out.read_text())
    m = record["metrics"]
    assert record["subcommand"] == "test" and record["checkpoint_step"] == 2 and record["model"] == "VAEModule"
    assert {"test/l1", "test/psnr", "test/ssim", "test/rfvd", "test/rfvd_num_real"} <= set(m), sorted(m)
    assert m["test/rfvd_num_real"] == 4 and m["test/rfvd"] >= 0 and 0 < m["test/ssim"] <= 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = [p.parent for p in Path(tmp_path, "runs").rglob("events.out.tfevents*")]
    tags = set()
    for d in logs:
        acc = EventAccumulator(str(d))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"test/psnr", "test/rfvd", "val/psnr", "val/rfvd"} <= tags
