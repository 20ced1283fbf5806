"""The cached-latent path of stage 2 (isa4d.data.latents, data_prep/cache_latents.py): the writer caches the toy
world, the loader streams, resumes and checks cached samples, and a DiT step on a cached batch is the step it takes
when it encodes the same clips on the fly."""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from data_prep.cache_latents import cache_latents
from isa4d.cli import run_cli
from isa4d.data.batch import collate
from isa4d.data.buckets import Bucket
from isa4d.data.contract import SampleError, npz_bytes, parse_sample
from isa4d.data.datamodule import ShardDataModule
from isa4d.data.dataset import ClipDataset
from isa4d.data.examples import ClipOptions, decode_example
from isa4d.data.inspect import inspect
from isa4d.data.latents import LatentSample, parse_any, vae_fingerprint
from isa4d.data.shards import expand_urls, iter_samples
from isa4d.models.dit import ISADiT
from isa4d.models.vae import load_vae
from isa4d.training.dit_module import DiTModule
from isa4d.training.vae_module import VAELossWeights, VAEModule

TOY_TRAIN = str(Path(__file__).resolve().parent / "assets/toy_world/train-*.tar")  # 3 clips, 64x64x13, bg
BUCKET = Bucket(32, 32, 9, 3)
JITTER = ClipOptions(stride_jitter=1, crop_jitter=0.5)


def _raise(url, exn):
    raise exn


def raw_samples(pattern: str) -> list[dict]:
    return list(iter_samples(expand_urls(pattern), _raise))


def write_tar(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write({k: v for k, v in s.items() if k != "__url__" and v is not None})  # None: key left out
    return str(path)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_vae_checkpoint) -> tuple[str, dict]:
    """The toy train clips cached at 32x32x9 in float32: pass 0 centred, pass 1 random; 4 samples a shard."""
    out = tmp_path_factory.mktemp("cache") / "train-%06d.tar"
    summary = cache_latents(tiny_vae_checkpoint, TOY_TRAIN, str(out), BUCKET, passes=2, seed=5, options=JITTER,
                            dtype="float32", maxcount=4)
    return str(out.parent / "train-*.tar"), summary


def tiny_module(vae_path, body_dir, pose: str = "points") -> DiTModule:
    torch.manual_seed(0)
    net = ISADiT(latent_channels=16, hidden_size=64, depth=2, num_heads=4, patch_size=1, mlp_ratio=2.0,
                 num_points=32, point_freqs=4, ispe_freqs=4, pose=pose)
    return DiTModule(net, vae_checkpoint=str(vae_path), body_model_dir=str(body_dir))


def first_batch(urls: str, bucket: Bucket = BUCKET):
    return next(iter(ClipDataset(urls, [bucket], train=False))).normalize()


def test_writer_caches_each_clip_once_per_pass_and_inspect_accepts_the_shards(cache, tiny_vae_checkpoint):
    urls, summary = cache
    fingerprint = vae_fingerprint(load_vae(tiny_vae_checkpoint))
    assert summary["samples_per_pass"] == [3, 3] and summary["with_background"] == 6
    assert summary["shards"] == ["train-000000.tar", "train-000001.tar"]  # maxcount 4
    record = json.loads((Path(urls).parent / "latents.json").read_text())["caches"]["train-%06d.tar"]
    assert record["vae"]["fingerprint"] == fingerprint and record["bucket"] == {"height": 32, "width": 32,
                                                                                "num_frames": 9}
    report = inspect([urls])
    assert (report.samples, report.valid, report.problems) == (6, 6, [])
    assert dict(report.cached_vaes) == {fingerprint: 6} and dict(report.sizes) == {"32x32": 6}

    samples = {s.key: s for s in map(parse_any, raw_samples(urls))}
    assert all(isinstance(s, LatentSample) and s.example.latents.fingerprint == fingerprint for s in samples.values())
    video = next(iter(ClipDataset(TOY_TRAIN, [BUCKET], train=False)))  # the validation cut: centred
    for i, key in enumerate(video.key):
        centred = samples[f"{key}_p0"].example
        np.testing.assert_array_equal(centred.frame_index, video.frame_index[i].numpy())
        assert centred.latents.video.shape == (32, 3, 4, 4) and centred.latents.video.dtype == np.float32
        assert samples[f"{key}_p0"].meta["latents"]["source_key"] == key
    moved = [k for k in video.key if not np.array_equal(samples[f"{k}_p0"].example.K, samples[f"{k}_p1"].example.K)
             or not np.array_equal(samples[f"{k}_p0"].example.frame_index, samples[f"{k}_p1"].example.frame_index)]
    assert moved, "pass 1 cut every clip like pass 0"
    with pytest.raises(FileExistsError, match="--overwrite"):
        cache_latents(tiny_vae_checkpoint, TOY_TRAIN, str(Path(urls).parent / "train-%06d.tar"), BUCKET)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("pose", ["points", "maps"])
def test_cached_training_step_equals_the_on_the_fly_step(cache, tiny_vae_checkpoint, toy_body_dir, pose):
    """The key property: for a float32 cache, a training step on cached latents is the step on the videos of the
    same windows, posterior sample and flow-matching noise included (same seed); for the 2D-map baseline too, whose
    maps are rendered from the bodies and cameras both kinds of batch carry."""
    urls, _ = cache
    video, cached = first_batch(TOY_TRAIN), first_batch(urls)  # pass 0 comes first: the same centred windows
    assert cached.video is None and cached.key == [f"{k}_p0" for k in video.key]
    assert len(cached) == 3 and cached.num_frames == 9 and cached.image_size == video.image_size == (32, 32)
    for name in ("K", "w2c", "ref", "ref_K", "ref_w2c", "ref_has_camera", "frame_index", "fps", "person_mask",
                 "has_bg"):
        torch.testing.assert_close(getattr(cached, name), getattr(video, name), msg=name)
    for field in ("betas", "global_orient", "body_pose", "transl"):
        torch.testing.assert_close(getattr(cached.smpl, field), getattr(video.smpl, field))
        torch.testing.assert_close(getattr(cached.ref_smpl, field), getattr(video.ref_smpl, field))

    module = tiny_module(tiny_vae_checkpoint, toy_body_dir, pose).train()
    assert module.latent_sample  # a posterior sample, not the mean: the cache must keep the moments

    def step(batch, seed):
        torch.manual_seed(seed)
        return module.training_step(batch, 0).detach()

    torch.testing.assert_close(step(cached, 1), step(video, 1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(step(cached, 1), step(cached, 2))  # the seed matters, so the equality is not vacuous
    torch.manual_seed(3)
    x0, cond, _ = module.encode(video)
    torch.manual_seed(3)
    x0_cached, cond_cached, _ = module.encode(cached)
    torch.testing.assert_close(x0_cached, x0, rtol=1e-5, atol=1e-5)
    for name, value in vars(cond).items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(getattr(cond_cached, name), value, rtol=1e-5, atol=1e-5, msg=name)
    assert cond.background is not None and cond.ref_latent.abs().sum() > 0
    assert (cond.body_maps is not None and cond.body_maps.abs().sum() > 0) == (pose == "maps")


def test_cached_stream_resumes_with_the_same_batches(cache):
    """ShardDataModule's data position on a cached stream: steps 4.. of a stream resumed there are those of a run
    that never stopped (2 workers, segments of 3 steps, so the resume replays part of a segment)."""
    urls, _ = cache

    def stream(next_step: int | None, n: int):
        dm = ShardDataModule(train_urls=urls, buckets=[Bucket(32, 32, 9, 2)], num_workers=2, segment_steps=3,
                             shuffle_buffer=3, pin_memory=False, seed=1)
        if next_step is not None:
            dm.load_state_dict({**dm.state_dict(), "next_step": next_step})
        batches = []
        for batch in dm.train_dataloader():
            batches.append(batch)
            if len(batches) == n:
                return batches

    whole, resumed = stream(None, 7), stream(4, 3)
    assert [b.stats["step"] for b in resumed] == [4, 5, 6]
    assert len({k for b in whole for k in b.key}) > 2
    for a, b in zip(whole[4:], resumed):
        assert a.key == b.key and a.video is None
        torch.testing.assert_close(a.latents.video, b.latents.video)
        torch.testing.assert_close(a.K, b.K)


def _corrupt(samples: list[dict]) -> list[tuple[str, dict]]:
    """(reason, sample) for each defect of a cached sample, built from good ones."""
    good = samples[0]
    arrays = dict(np.load(io.BytesIO(good["latents.npz"])))

    def variant(tag, **changes):
        return {**good, "__key__": f"bad_{tag}", **changes}

    meta = json.loads(good["json"])
    no_record = {k: v for k, v in meta.items() if k != "latents"}
    return [
        ("missing_key", variant("noref", **{"latents.npz": npz_bytes(video=arrays["video"])})),
        ("missing_key", variant("nocam", **{"cam.npz": None})),
        ("missing_key", variant("norecord", json=json.dumps(no_record).encode())),
        ("bad_shape", variant("intdtype", **{"latents.npz": npz_bytes(**{**arrays,
                                                                         "video": arrays["video"].astype(np.int32)})})),
        ("bad_shape", variant("ndim", **{"latents.npz": npz_bytes(**{**arrays, "video": arrays["video"][0]})})),
        ("bad_shape", variant("refshape", **{"latents.npz": npz_bytes(**{**arrays, "ref": arrays["ref"][:, :2]})})),
        ("nonfinite", variant("nan", **{"latents.npz": npz_bytes(**{**arrays, "bg": arrays["bg"] * np.nan})})),
        ("malformed", variant("png", **{"ref.png": b"\x89PNG broken"})),
        ("bad_value", variant("frames", json=json.dumps({**meta, "latents": {**meta["latents"],
                                                                            "frame_index": [0, 1]}}).encode())),
    ]


def test_corrupt_cached_samples_are_skipped_and_counted_with_their_reason(cache, tmp_path):
    urls, _ = cache
    good = raw_samples(urls)
    bad = _corrupt(good)
    for reason, sample in bad:
        with pytest.raises(SampleError) as e:
            parse_any({k: v for k, v in sample.items() if v is not None})  # None: key left out
        assert e.value.reason == reason, (sample["__key__"], str(e.value))
    mixed = []
    for i, (_, sample) in enumerate(bad):
        mixed += [sample] + good[i:i + 1]
    shard = write_tar(tmp_path / "mixed.tar", mixed)
    batches = list(ClipDataset(shard, [Bucket(32, 32, 9, 20)], train=False, max_skip_fraction=1.0))
    assert [k for b in batches for k in b.key] == [s["__key__"] for s in good]
    assert batches[-1].stats["skipped"] == Counter(reason for reason, _ in bad)
    assert batches[-1].stats["seen"] == len(mixed)


def test_fingerprint_mismatch_names_the_sample_and_both_vaes(cache, tiny_vae_checkpoint, toy_body_dir, tmp_path):
    urls, _ = cache
    vae = load_vae(tiny_vae_checkpoint)
    state = torch.load(tiny_vae_checkpoint, weights_only=False)
    before = vae_fingerprint(vae)
    vae.decoder.conv_out.weight.data += 1  # a new decoder or latent statistics leave a cache valid
    vae.set_latent_stats(torch.full((16,), 0.5), torch.full((16,), 2.0))
    assert vae_fingerprint(vae) == before
    vae.encoder.conv_in.weight.data[0, 0, 0, 0, 0] += 1e-3  # one encoder weight does not
    assert vae_fingerprint(vae) != before
    other = tmp_path / "other.ckpt"
    torch.save({**state, "state_dict": {f"vae.{k}": v for k, v in vae.state_dict().items()}}, other)

    batch = first_batch(urls)
    module = tiny_module(other, toy_body_dir)
    with pytest.raises(ValueError) as e:
        module.encode(batch)
    message = str(e.value)
    assert batch.key[0] in message and before in message and module.vae_fingerprint in message
    assert "cache_latents" in message
    tiny_module(tiny_vae_checkpoint, toy_body_dir).encode(batch)  # the cache's own VAE reads it


def test_a_cache_fills_only_buckets_of_its_own_size(cache, tiny_vae_checkpoint, tmp_path, caplog):
    """A video of 32x32x9 would fill a 16x16x5 bucket (downscaled, a shorter window); cached latents would not."""
    urls, _ = cache
    small = cache_latents(tiny_vae_checkpoint, TOY_TRAIN, str(tmp_path / "small-%06d.tar"), Bucket(16, 16, 5, 3))
    assert small["samples"] == 3
    sample = parse_any(raw_samples(urls)[0])
    assert sample.fits(BUCKET) and not sample.fits(Bucket(16, 16, 5, 1)) and not sample.fits(Bucket(32, 32, 5, 1))
    with pytest.raises(SampleError) as e:
        sample.to_example(Bucket(32, 32, 5, 1))
    assert e.value.reason == "no_bucket"
    with caplog.at_level(logging.WARNING, logger="isa4d.data"):
        ds = ClipDataset([urls, str(tmp_path / "small-000000.tar")],
                         [Bucket(32, 32, 9, 2)], train=True, resampled=False, max_skip_fraction=1.0)
        keys = [k for b in ds for k in b.key]
    assert keys and all(not k.startswith("small") and k.endswith(("_p0", "_p1")) for k in keys)
    skipped = [r.getMessage() for r in caplog.records if "[data/skipped/no_bucket]" in r.getMessage()]
    assert len(skipped) == 3 and all("cached latents 16x16x5 fits no bucket" in m for m in skipped), skipped


def test_one_batch_holds_one_kind_and_video_steps_refuse_cached_batches(cache, tiny_vae_checkpoint, toy_body_dir):
    urls, _ = cache
    cached = parse_any(raw_samples(urls)[0]).example
    clip = decode_example(parse_sample(raw_samples(TOY_TRAIN)[0]), BUCKET, ClipOptions(), None)
    with pytest.raises(ValueError, match="cannot mix cached-latent samples .*and video samples"):
        collate([cached, clip])
    with pytest.raises(ValueError, match="cannot mix"):
        list(ClipDataset([TOY_TRAIN, urls], [Bucket(32, 32, 9, 4)], train=False))

    batch = collate([cached, cached]).normalize()
    assert batch.to("meta").latents.video.device.type == "meta" and batch.to("meta").K.device.type == "meta"
    assert batch.normalize() is batch and batch.latents.video.dtype == torch.float32
    with pytest.raises(ValueError, match="DiT validation .*data.val_urls at contract shards"):
        tiny_module(tiny_vae_checkpoint, toy_body_dir).validation_step(batch, 0)
    no_gan = VAELossWeights(perceptual=0.0, gan_2d=0.0, gan_3d=0.0)
    vae_module = VAEModule(load_vae(tiny_vae_checkpoint, frozen=False), loss=no_gan)
    for step in (vae_module.training_step, vae_module.validation_step):
        with pytest.raises(ValueError, match="VAE .* needs videos.*holds cached latents"):
            step(batch, 0)


def test_tiny_dit_trains_on_a_cache_and_validates_on_videos_through_the_cli(cache, tiny_vae_checkpoint, toy_body_dir,
                                                                             tmp_path):
    """configs/data/toy_cached.yaml pointed at the test cache: `isa4d fit` trains on latents, validates on videos."""
    urls, _ = cache
    root = Path(__file__).resolve().parents[1]
    cli = run_cli([
        "fit", "-c", str(root / "configs/dit/tiny.yaml"), "-c", str(root / "configs/data/toy_cached.yaml"),
        "-c", str(root / "configs/trainer/cpu_debug.yaml"), f"--data.init_args.train_urls={urls}",
        f"--data.init_args.val_urls={TOY_TRAIN.replace('train-', 'val-')}", "--data.init_args.num_workers=0",
        '--data.init_args.buckets=[{"height": 32, "width": 32, "num_frames": 9, "batch_size": 2}]',
        f"--model.init_args.vae_checkpoint={tiny_vae_checkpoint}", f"--model.init_args.body_model_dir={toy_body_dir}",
        "--model.init_args.sample_steps=2", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}/runs",
    ])
    assert cli.trainer.global_step == 2
    assert {"train/loss", "val/loss", "val/psnr"} <= set(cli.trainer.logged_metrics)
    assert cli.model._cache_checked == {cli.model.vae_fingerprint}


@pytest.mark.gpu
def test_the_writer_encodes_on_cuda_and_cached_batches_pin_and_move(cache, tiny_vae_checkpoint, toy_body_dir,
                                                                    tmp_path):
    """--device cuda: bf16 autocast, moments close to the fp32 CPU cache's, the same fingerprint; a cached batch
    pins, moves to the GPU and trains there."""
    urls, _ = cache
    summary = cache_latents(tiny_vae_checkpoint, TOY_TRAIN, str(tmp_path / "gpu-%06d.tar"), BUCKET, device="cuda")
    cpu, gpu = first_batch(urls), first_batch(str(tmp_path / "gpu-*.tar"))
    assert summary["vae"]["fingerprint"] == cpu.latents.fingerprint[0] == gpu.latents.fingerprint[0]
    assert gpu.latents.video.dtype == torch.float16
    error = (gpu.latents.video.float() - cpu.latents.video).norm() / cpu.latents.video.norm()
    assert error < 0.05, error  # bf16 autocast and float16 storage against float32 throughout
    on_gpu = cpu.pin_memory().to("cuda", non_blocking=True)
    assert on_gpu.latents.video.is_cuda and on_gpu.latents.ref.is_cuda and on_gpu.K.is_cuda
    module = tiny_module(tiny_vae_checkpoint, toy_body_dir).cuda()
    x0, cond, _ = module.encode(on_gpu)
    assert x0.is_cuda and x0.shape == (3, 16, 3, 4, 4) and cond.background.is_cuda
