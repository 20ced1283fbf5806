"""Stage 2 under FSDP2 on 2 CPU processes (gloo) through the real `isa4d fit`: the tiny DiT on a frozen tiny VAE,
an exact mid-stream resume (bitwise equal weights and EMA), and resharding 2 -> 1. The frozen VAE is not part of
the DiT's checkpoints (it has its own); a resume keeps the one the module loaded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from resume_helpers import ROOT, callbacks_yaml, dit_fit_command, meta, run, shard_writers

SHARDS = str(ROOT / "tests/assets/toy_world/train-*.tar")
EMA = {"class_path": "isa4d.training.ema.EMA", "init_args": {"decay": 0.9, "submodule": "network"}}


@pytest.fixture(scope="module")
def dit_runs(tmp_path_factory, tiny_vae_checkpoint, toy_body_dir):
    """(A: 4 steps straight, B: 2 steps + resume to 4), each a run folder, and a command builder."""
    tmp = tmp_path_factory.mktemp("fsdp_dit")
    cbs = callbacks_yaml(tmp / "callbacks.yaml", ema=False, extra=[EMA])

    def command(run_dir: Path, *args: str) -> list[str]:
        return dit_fit_command(run_dir, SHARDS, cbs, tiny_vae_checkpoint, toy_body_dir, *args)

    a, b = tmp / "A", tmp / "B"
    for run_dir, steps, extra in ((a, 4, []), (b, 2, []), (b, 4, ["--ckpt_path", "last"])):
        res = run(command(run_dir, f"--trainer.max_steps={steps}", *extra), cwd=tmp, timeout=300)
        assert res.returncode == 0, res.stderr[-6000:]
    return a, b, command


def _weights(checkpoint: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    from isa4d.training.export import read_weights

    return read_weights(checkpoint, ema)[0]


def test_dit_resume_under_fsdp_is_bitwise_exact_and_leaves_the_vae_out(dit_runs):
    a, b, _ = dit_runs
    last_a, last_b = a / "checkpoints/last.ckpt", b / "checkpoints/last.ckpt"
    assert meta(last_a)["global_step"] == meta(last_b)["global_step"] == 4
    assert shard_writers(last_a) == [0, 1]
    for ema in (False, True):
        wa, wb = _weights(last_a, ema), _weights(last_b, ema)
        assert wa and wa.keys() == wb.keys()
        assert not any(k.startswith("vae.") for k in wa), "the frozen VAE has a checkpoint of its own"
        differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert not differ, (ema, differ[:5])
    early = _weights(b / "checkpoints/step=00000003.ckpt")  # the last 2 are kept
    assert any(not torch.equal(early[k], wa[k]) for k in wa), "the comparison must see training happen"


def test_dit_two_processes_resume_on_one(dit_runs, tmp_path):
    _, b, command = dit_runs
    c = tmp_path / "C"
    shutil.copytree(b, c, symlinks=True)
    res = run(command(c, "--trainer.devices=1", "--trainer.max_steps=5", "--ckpt_path", "last"), cwd=tmp_path,
              timeout=300)
    assert res.returncode == 0, res.stderr[-6000:]
    last = c / "checkpoints/last.ckpt"
    assert meta(last)["global_step"] == 5 and shard_writers(last) == [0]
    before, after = _weights(b / "checkpoints/last.ckpt"), _weights(last)
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
