"""Damaged checkpoints fail with one line naming the file and the reason: a truncated `.ckpt`, `meta.pt` or shard,
a text file, a truncated `.safetensors`, a missing VAE checkpoint, a dangling `last` link."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from isa4d.training.checkpoint import CheckedCheckpointIO, CheckpointError, check_sharded
from isa4d.training.export import read_weights


def _truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture
def single(tmp_path):
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": {"w": torch.randn(64, 64)}, "global_step": 3}, path)
    return path


@pytest.fixture
def sharded(tmp_path):
    """A DCP folder as FSDP2Strategy writes it (shards + .metadata + meta.pt), written without a process group."""
    import torch.distributed.checkpoint as dcp

    path = tmp_path / "last.ckpt"
    dcp.save({"state_dict": {"w": torch.randn(64, 64), "b": torch.randn(64)}}, checkpoint_id=path, no_dist=True)
    torch.save({"global_step": 3, "callbacks": {}}, path / "meta.pt")
    return path


def _one_line(message: str, path) -> None:
    assert "\n" not in message and str(path) in message and len(message) < 400, message


@pytest.mark.parametrize("damage, reason", [("truncate", "truncated"), ("text", "not a torch checkpoint")])
def test_a_damaged_single_file_checkpoint_names_the_file(single, damage, reason):
    if damage == "truncate":
        _truncate(single)
    else:
        single.write_text("step: 3\nthis is a config, not a checkpoint\n")
    for load in (lambda: CheckedCheckpointIO().load_checkpoint(single), lambda: read_weights(single)):
        with pytest.raises(CheckpointError, match=reason) as e:
            load()
        _one_line(str(e.value), single)
    # the same through Lightning's resume with the trainer configs' plugin
    trainer = L.Trainer(max_steps=1, plugins=[CheckedCheckpointIO()], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=single.parent)
    from lightning.pytorch.demos.boring_classes import BoringModel

    model = BoringModel()
    with pytest.raises(CheckpointError, match=reason):
        trainer.fit(model, ckpt_path=single)


def test_a_damaged_sharded_checkpoint_names_the_shard_or_meta(sharded):
    check_sharded(sharded)  # sound
    assert read_weights(sharded)[1]["global_step"] == 3
    shard = sorted(sharded.glob("*.distcp"))[0]
    original = shard.read_bytes()
    _truncate(shard)
    for load in (lambda: check_sharded(sharded), lambda: read_weights(sharded)):
        with pytest.raises(CheckpointError, match=r"truncated shard \(\d+ of \d+ bytes\)") as e:
            load()
        _one_line(str(e.value), shard)
    shard.unlink()
    with pytest.raises(CheckpointError, match="shard missing"):
        check_sharded(sharded)
    shard.write_bytes(original)
    _truncate(sharded / "meta.pt")
    with pytest.raises(CheckpointError, match="meta.pt: cannot read this checkpoint metadata: truncated") as e:
        read_weights(sharded)
    _one_line(str(e.value), sharded / "meta.pt")


def test_vae_checkpoints_missing_truncated_or_dangling(tmp_path, sharded):
    from isa4d.models.vae import load_vae

    with pytest.raises(FileNotFoundError, match=r"VAE checkpoint not found: .*nope\.ckpt"):
        load_vae(tmp_path / "nope.ckpt")
    from safetensors.torch import save_file

    weights = tmp_path / "vae.safetensors"
    save_file({"w": torch.randn(128, 128)}, weights)
    _truncate(weights)
    with pytest.raises(ValueError, match="cannot read this .safetensors file") as e:
        load_vae(weights)
    _one_line(str(e.value), weights)
    link = tmp_path / "copied_last.ckpt"
    link.symlink_to(tmp_path / ".store/last.gone.ckpt")
    with pytest.raises(FileNotFoundError, match="is a link to .*last.gone.ckpt, which does not exist"):
        read_weights(link)
