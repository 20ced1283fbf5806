"""The notebooks in notebooks/ run top to bottom on small inputs: the committed toy shards, the toy body and an
untrained tiny VAE. Each is executed with nbclient in a `python3` kernel of this interpreter, from the repository
root, with its parameters set through the environment (notebooks/README.md); a cell that raises fails the test.
Each notebook's last cell displays a JSON summary of what it computed, which the test checks."""

from __future__ import annotations

import math
from pathlib import Path

import nbformat
import pytest
import yaml
from nbclient import NotebookClient

from isa4d.render import MeshRenderer, RenderError

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


# (notebook, check of its summary, marks)
NOTEBOOKS = [
    pytest.param("01_data.ipynb", check_data, marks=pytest.mark.skipif(NO_EGL is not None, reason=str(NO_EGL))),
    pytest.param("02_vae.ipynb", check_vae),
]


@pytest.fixture
def notebook_env(monkeypatch, tmp_path, toy_body_dir, tiny_vae_checkpoint) -> None:
    """The notebooks' parameters, pointing at the test inputs; the kernel inherits this environment."""
    config = yaml.safe_load((ROOT / "configs/data/toy.yaml").read_text())
    config["data"]["init_args"]["buckets"] = [BUCKET]
    data_config = tmp_path / "data.yaml"
    data_config.write_text(yaml.safe_dump(config))
    for name, value in {"ISA4D_DATA": ASSETS, "ISA4D_BODY": toy_body_dir, "ISA4D_VAE_CKPT": tiny_vae_checkpoint,
                        "ISA4D_DATA_CONFIG": data_config, "MPLBACKEND": "Agg"}.items():
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
