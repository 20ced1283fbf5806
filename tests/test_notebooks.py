"""The notebooks in notebooks/ run top to bottom on small inputs: the committed toy shards, the toy body and an
untrained tiny VAE and DiT. Each is executed with nbclient in a `python3` kernel of this interpreter, from the repository
root, with its parameters set through the environment (notebooks/README.md); a cell that raises fails the test.
Each notebook's last cell displays a JSON summary of what it computed, which the test checks."""

from __future__ import annotations

import math
from pathlib import Path

import nbformat
import pytest
import torch
import yaml
from nbclient import NotebookClient

from isa4d.data import video as videolib
from isa4d.models.dit import ISADiT
from isa4d.render import MeshRenderer, RenderError
from isa4d.training.dit_module import DiTModule

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests/assets/toy_world"  # 64x64 clips of 13 frames: 3 train (1-3 people), 1 val
CELL_TIMEOUT_S = 180
BUCKET = {"height": 64, "width": 64, "num_frames": 9, "batch_size": 2}  # the toy config's 17 frames do not fit

try:
    MeshRenderer(8, 8).close()
    NO_EGL = None
except RenderError as _e:  # pragma: no cover - environment dependent
    NO_EGL = f"headless OpenGL (EGL) unavailable: {_e}"


def check_data(s: dict) -> None:
    assert (s["clips"], s["valid"], s["problems"]) == (4, 4, 0)
    assert s["batch_bucket"] == "64x64x9" and s["batch_video_shape"] == [2, 9, 3, 64, 64]
    assert s["silhouette_iou"] > 0.9  # the rendered SMPL bodies cover the shards' person masks
    assert s["clips_per_bucket"] == {"64x64x9": 4} and s["steps_per_bucket"] == {"64x64x9": 1000}
    travel = s["camera_travel_m"]
    assert len(travel) == 4 and max(travel.values()) > 0.5  # the orbit and dolly cameras move


def check_vae(s: dict) -> None:
    assert s["keys"] == ["toy_val_000000"] and s["video_shape"] == [1, 9, 3, 64, 64]
    assert s["latent_shape"] == [1, 16, 3, 8, 8]  # 4x in time (1 + 2 latent frames), 8x8 in space
    psnr, ssim = s["psnr"][0], s["ssim"][0]
    assert len(psnr) == len(ssim) == 9
    assert all(0 < p < 100 for p in psnr) and all(-1 <= q <= 1 for q in ssim)
    assert math.isclose(s["psnr_mean"], sum(psnr) / 9, rel_tol=1e-6)


def check_sampling(s: dict) -> None:
    assert (s["clip"], s["people"], s["steps"]) == ("toy_train_000002", 3, 3)  # ISA4D_SAMPLE_INDEX: 3 people
    orbit, clip = s["orbit"], s["clip_cameras"]
    assert orbit["video_shape"] == clip["video_shape"] == [1, 13, 3, 64, 64]  # the whole 13-frame motion
    assert orbit["deterministic"] and orbit["seed_change"] > 1e-3  # one seed, one video; another seed, another
    video = videolib.decode_all(Path(orbit["mp4"]).read_bytes())
    side = videolib.decode_all(Path(orbit["pose_mp4"]).read_bytes())  # sample | sample with the bodies
    assert video.shape == tuple(orbit["mp4_shape"]) == (13, 64, 64, 3) and side.shape == (13, 64, 128, 3)
    assert orbit["mp4_error"] < orbit["seed_change"] / 2  # the file holds this video (H.264 4:2:0 loses some)
    assert abs(side[:, :, :64].astype(int) - video.astype(int)).mean() < 3
    assert orbit["metrics"]["part_appearance"] >= 0 and orbit["metrics"]["part_appearance_num_frames"] > 0
    m, real = clip["metrics"], clip["real_metrics"]
    assert clip["background"] and (m["pose_iou_num_frames"], m["pose_iou_num_skipped_clips"]) == (13, 0)
    assert 0 < m["psnr"] < 100 and -1 <= m["ssim"] <= 1 and 0 <= m["pose_iou"] <= 1 and m["part_appearance"] >= 0
    assert real["pose_iou"] > 0.5  # the real clip differs from its plate where the conditioning bodies render
    assert real["part_appearance"] < m["part_appearance"]  # it looks like its first frame; an untrained DiT does not


# (notebook, check of its summary, marks)
NOTEBOOKS = [
    pytest.param("01_data.ipynb", check_data, marks=pytest.mark.skipif(NO_EGL is not None, reason=str(NO_EGL))),
    pytest.param("02_vae.ipynb", check_vae),
    pytest.param("03_sampling.ipynb", check_sampling,
                 marks=pytest.mark.skipif(NO_EGL is not None, reason=str(NO_EGL))),  # metrics render the bodies
]


@pytest.fixture(scope="session")
def tiny_dit_checkpoint(tmp_path_factory, tiny_vae_checkpoint, toy_body_dir) -> tuple[Path, Path]:
    """(checkpoint, config) of an untrained DiT of configs/dit/tiny.yaml's layout (32 body points, 3 sampling
    steps), saved as DiTModule saves it (no `vae.` weights; `isa4d` and `global_step`): what 03_sampling loads in
    place of a trained stage 2. Its weights are nudged off the zero-initialised output layer, which would
    predict zero velocity for every input."""
    out = tmp_path_factory.mktemp("dit_tiny")
    config = yaml.safe_load((ROOT / "configs/dit/tiny.yaml").read_text())
    init = config["model"]["init_args"]
    init.update(vae_checkpoint=str(tiny_vae_checkpoint), body_model_dir=str(toy_body_dir), sample_steps=3)
    init["network"]["init_args"].update(num_points=32, point_freqs=4, ispe_freqs=4)
    (out / "dit.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    network = ISADiT(**init["network"]["init_args"])
    with torch.no_grad():
        for p in network.parameters():
            p.add_(0.05 * torch.randn_like(p))
    module = DiTModule(network, vae_checkpoint=init["vae_checkpoint"], body_model_dir=init["body_model_dir"],
                       sample_steps=3)
    checkpoint = {"state_dict": module.state_dict(), "epoch": 0, "global_step": 0}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, out / "last.ckpt")
    return out / "last.ckpt", out / "dit.yaml"


@pytest.fixture
def notebook_env(monkeypatch, tmp_path, toy_body_dir, tiny_vae_checkpoint, tiny_dit_checkpoint) -> None:
    """The notebooks' parameters, pointing at the test inputs; the kernel inherits this environment."""
    config = yaml.safe_load((ROOT / "configs/data/toy.yaml").read_text())
    config["data"]["init_args"]["buckets"] = [BUCKET]
    data_config = tmp_path / "data.yaml"
    data_config.write_text(yaml.safe_dump(config))
    for name, value in {"ISA4D_DATA": ASSETS, "ISA4D_BODY": toy_body_dir, "ISA4D_VAE_CKPT": tiny_vae_checkpoint,
                        "ISA4D_DATA_CONFIG": data_config, "MPLBACKEND": "Agg"}.items():
        monkeypatch.setenv(name, str(value))
    sampling = {"ISA4D_DIT_CKPT": tiny_dit_checkpoint[0], "ISA4D_DIT_CONFIG": tiny_dit_checkpoint[1],
                "ISA4D_SAMPLE_INPUTS": tmp_path / "sample_inputs",  # missing: 03 writes it from these shards
                "ISA4D_SAMPLE_SHARDS": ASSETS / "train-*.tar", "ISA4D_SAMPLE_INDEX": 2,  # the 3-person clip
                "ISA4D_SAMPLE_OUT": tmp_path / "samples", "ISA4D_DEVICE": "cpu"}
    for name, value in sampling.items():
        monkeypatch.setenv(name, str(value))


def _summary(nb: nbformat.NotebookNode) -> dict:
    """The JSON summary the last code cell displays."""
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    found = [o["data"]["application/json"] for o in last.outputs if "application/json" in o.get("data", {})]
    assert len(found) == 1, f"the last cell should display one application/json summary, got {last.outputs}"
    return found[0]


@pytest.mark.parametrize("name", [p.values[0] for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(name):
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{name}: clear the outputs of cells {dirty} before committing"


@pytest.mark.parametrize("name, check", NOTEBOOKS)
def test_notebook_runs(name, check, notebook_env):
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError, naming the cell and its traceback, when a cell raises
    check(_summary(nb))
