"""Shared fixtures: global-state hygiene, the toy SMPL body, marker-world shards."""

from __future__ import annotations

import importlib
import random
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from data_prep.make_toy_body import write_toy_body
from data_prep.synthetic_shards import make_clip, write_shards
from isa4d.data.contract import CameraSequence, ParsedSample, SMPLSequence, encode_sample, parse_sample
from isa4d.data.shards import iter_samples
from isa4d.data.video import VideoError, decode_frames, encode_video, probe
from video_pathologies import flip_bit, mux

# Frame sizes of the session's marker clips: landscape, portrait and square, for buckets of every aspect.
MARKER_SIZES = ((64, 96), (96, 64), (80, 80))


@pytest.fixture(autouse=True)
def _restore_global_state():
    """Restore torch's default dtype and every RNG, and tear down a process group a test left behind."""
    dtype = torch.get_default_dtype()
    torch_rng, np_rng, py_rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    yield
    torch.set_default_dtype(dtype)
    torch.set_rng_state(torch_rng)
    np.random.set_state(np_rng)
    random.setstate(py_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="session")
def toy_body_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy_body")
    write_toy_body(out)
    return out


@pytest.fixture(scope="session")
def marker_shards(tmp_path_factory) -> list[str]:
    """2 shards x 4 marker clips: MARKER_SIZES, 24-40 frames, 1-3 people, fps 24/25/30, with bg and mask."""
    return write_shards(tmp_path_factory.mktemp("markers"), shards=2, per_shard=4, seed=0, sizes=MARKER_SIZES,
                        frames=(24, 40))


@pytest.fixture(scope="session")
def marker_samples(marker_shards) -> dict[str, ParsedSample]:
    """The session's marker clips, parsed, by key (in shard order)."""
    def fail(url, exn):
        raise exn

    return {s.key: s for s in map(parse_sample, iter_samples(marker_shards, fail))}


# --------------------------------------------------------------------------------- good and defective samples

GOOD_META = {"fps": 25.0, "gender": "female"}


def _arrays_sample(key: str, clip: dict, video: bytes, *, smpl=None, cam=None, meta=None, **kw) -> dict:
    return encode_sample(key, video, smpl or clip["smpl"], cam or clip["cam"], meta or GOOD_META, **kw)


@pytest.fixture(scope="session")
def small_clips() -> list[dict]:
    """Three small marker clips (48x64, 24 frames, 1-2 people, textured) with their encoded video bytes."""
    rng = np.random.default_rng(7)
    clips = []
    for people in (1, 2, 2):
        clip = make_clip(rng, 48, 64, 24, people, GOOD_META["fps"])
        clip["mp4"] = encode_video(clip["video"], GOOD_META["fps"])
        clips.append(clip)
    return clips


@pytest.fixture(scope="session")
def good_samples(small_clips) -> list[dict]:
    """Seven contract-valid samples, keys good_0 .. good_6."""
    return [_arrays_sample(f"good_{i}", c, c["mp4"]) for i, c in enumerate(small_clips * 3)][:7]


@pytest.fixture(scope="session")
def defective_samples(small_clips) -> list[tuple[str, dict]]:
    """(reason the loader must give, sample) for each kind of defect; each sample's key names the defect.

    All but `too_short` and `bad_bitflip` fail `parse_sample`. `too_short` parses but has 10 frames, fewer than a
    window of 8 at stride 2 needs (15); `bad_bitflip` parses (its header is intact) but one flipped bit damages a
    frame of its centred window, which only decoding finds.
    """
    clip = small_clips[1]
    smpl, cam, F = clip["smpl"], clip["cam"], clip["video"].shape[0]
    rng = np.random.default_rng(8)

    def sample(key, **kw):
        return _arrays_sample(key, clip, clip["mp4"], **kw)

    out = []
    s = sample("bad_undecodable")
    s["mp4"] = b"\x00\x00\x00\x18ftypisom" + rng.bytes(2000)
    out.append(("undecodable", s))
    s = sample("bad_nocam")
    del s["cam.npz"]
    out.append(("missing_key", s))
    s = sample("bad_npz")
    s["smpl.npz"] = b"PK\x03\x04" + rng.bytes(100)
    out.append(("malformed", s))
    s = sample("bad_json")
    s["json"] = b'{"fps": 25.0, "gender": '
    out.append(("malformed", s))
    short = np.arange(F - 2)
    out.append(("frame_mismatch", sample("bad_framecount", smpl=smpl.take(short), cam=cam.take(short))))
    pose = smpl.body_pose.copy()
    pose[0, 5, 7] = np.nan
    nan_smpl = SMPLSequence(smpl.betas, smpl.global_orient, pose, smpl.transl)
    out.append(("nonfinite", sample("bad_nanpose", smpl=nan_smpl)))
    K = cam.K.copy()
    K[3, 0, 2] = np.inf
    out.append(("nonfinite", sample("bad_infcam", cam=CameraSequence(K, cam.w2c))))
    w2c = cam.w2c.copy()
    w2c[4, :3, :3] *= 1.2
    out.append(("bad_camera", sample("bad_nonrigid", cam=CameraSequence(cam.K, w2c))))
    out.append(("bad_value", sample("bad_gender", meta={"fps": 25.0, "gender": "robot"})))
    tiny = make_clip(rng, 48, 64, 10, 1, 25.0)
    out.append(("too_short", _arrays_sample("bad_tooshort", tiny, encode_video(tiny["video"], 25.0))))
    out.append(("frame_mismatch", sample("bad_bgsize", bg=np.zeros((F, 32, 48, 3), np.uint8))))
    faststart = mux(clip["video"], faststart=True, rate=int(GOOD_META["fps"]))  # moov first: opens when cut
    out.append(("undecodable", _arrays_sample("bad_truncated", clip, faststart[: len(faststart) * 3 // 4])))
    window = list(range(4, 19))  # the centred window of 8 frames at stride 2 in 24 frames
    while True:
        flipped = flip_bit(clip["mp4"], rng)
        try:
            probe(flipped)
            decode_frames(flipped, window)
        except VideoError as e:
            if "corrupt frame" in str(e):  # a damaged frame the decoder concealed, the case that went unnoticed
                break
    out.append(("undecodable", _arrays_sample("bad_bitflip", clip, flipped)))
    return out


def pytest_collection_modifyitems(config, items):
    """gpu / multigpu tests are skipped, not failed, where the hardware is absent (CI has no GPU)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        if "gpu" in item.keywords and gpus < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "multigpu" in item.keywords and gpus < 2:
            item.add_marker(pytest.mark.skip(reason="needs 2 or more CUDA GPUs"))


# ------------------------------------------------------------------------------------------ stage-1 stand-in

@pytest.fixture(scope="session")
def tiny_vae_checkpoint(tmp_path_factory) -> Path:
    """An untrained VAE of configs/vae/tiny.yaml's architecture, saved as VAEModule saves it (`vae.` weights and
    `vae_config`): what stage-2 tests load in place of a trained stage 1."""
    import yaml

    from isa4d.models.vae import CausalVideoVAE

    root = Path(__file__).resolve().parents[1]
    args = yaml.safe_load((root / "configs/vae/tiny.yaml").read_text())["model"]["init_args"]["vae"]["init_args"]
    torch.manual_seed(0)
    vae = CausalVideoVAE(**args)
    path = tmp_path_factory.mktemp("vae_tiny") / "last.ckpt"
    torch.save({"state_dict": {f"vae.{k}": v for k, v in vae.state_dict().items()}, "vae_config": vae.config,
                "global_step": 0}, path)
    return path


def toy_world_batch(split: str, height: int, width: int, num_frames: int, batch_size: int):
    """The first batch of the committed toy world's `split` shards (tests/assets/toy_world) at one bucket,
    normalised, as a validation loader gives it (centred windows and crops)."""
    from isa4d.data.datamodule import ShardDataModule
    from isa4d.data.dataset import Bucket

    urls = str(Path(__file__).resolve().parent / f"assets/toy_world/{split}-*.tar")
    dm = ShardDataModule(val_urls=urls, buckets=[Bucket(height, width, num_frames, batch_size)], num_workers=0,
                         pin_memory=False)
    dm.setup("validate")
    return next(iter(dm.val_dataloader())).normalize()


def import_script(folder: Path, module: str) -> ModuleType:
    """Import `module` from a folder that is not a package (bench/, the assets' generator scripts), leaving
    sys.path as it was."""
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(str(folder))
