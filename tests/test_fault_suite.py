"""The fault suite's slow tier (CPU, 1 and 2 processes, the real `isa4d fit` with the shipped trainer configs and
the callbacks `make train-vae` / `make train-dit` add): one trial of each signal and kill -9 case
(tests/fault_suite.py runs many and prints the table of docs/cluster.md), bitwise resume on the default path for
both stages, and a resume onto ordered epochs refused."""

from __future__ import annotations

import random
import subprocess

import pytest
import torch
from fault_suite import CASES, dit_fit_command, fit_command, trial, write_shards
from resume_helpers import ROOT, env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("suite_shards"))


@pytest.mark.parametrize("case", list(CASES))
def test_a_fault_resumes_from_a_saved_step(case, shards, tmp_path):
    result = trial(case, tmp_path, shards, random.Random(case))
    assert result.outcome == "resumed", result.detail


def _run(cmd: list[str], cwd) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env(), timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("stage", ["vae", "dit"])
def test_default_path_resume_is_bitwise_exact(stage, shards, tmp_path, tiny_vae_checkpoint, toy_body_dir):
    """cpu.yaml as `make train-*` runs it: 3 steps, then resumed to 8, equals 8 straight, every tensor bitwise
    (validation at step 4 in between)."""
    if stage == "vae":
        def command(run_dir, *args):
            return fit_command(run_dir, shards, 1, "--model.init_args.loss.gan_start_step=2", *args)
    else:
        def command(run_dir, *args):
            return dit_fit_command(run_dir, str(ROOT / "tests/assets/toy_world/train-*.tar"), tiny_vae_checkpoint,
                                   toy_body_dir, *args)
    a, b = tmp_path / "A", tmp_path / "B"
    _run(command(a, "--trainer.max_steps=8"), tmp_path)
    _run(command(b, "--trainer.max_steps=3"), tmp_path)
    early = _weights(b)
    res = _run(command(b, "--trainer.max_steps=8", "--ckpt_path", "last"), tmp_path)
    assert "Restoring states from the checkpoint path" in res.stdout + res.stderr
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and any(not torch.equal(early[k], wa[k]) for k in wa)
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, differ[:5]


def test_resuming_ordered_epochs_is_refused_through_the_cli(shards, tmp_path):
    run_dir = tmp_path / "run"
    ordered = "--data.init_args.resampled=false"
    _run(fit_command(run_dir, shards, 1, ordered, "--trainer.max_steps=3"), tmp_path)
    res = subprocess.run(fit_command(run_dir, shards, 1, ordered, "--trainer.max_steps=6", "--ckpt_path", "last"),
                         capture_output=True, text=True, cwd=tmp_path, env=env(), timeout=600)
    assert res.returncode != 0 and "resampled=false: ordered epochs restart on resume" in res.stderr


def test_a_diverging_dit_stops_keeps_finite_weights_and_resumes_at_a_new_rate(tmp_path, tiny_vae_checkpoint,
                                                                               toy_body_dir):
    """The issue's case: the tiny DiT at lr 1e30 on one process (cpu.yaml) used to exit 0 with NaN weights."""
    run_dir = tmp_path / "run"

    def command(*args):
        return dit_fit_command(run_dir, str(ROOT / "tests/assets/toy_world/train-*.tar"), tiny_vae_checkpoint,
                               toy_body_dir, "--model.init_args.warmup_steps=0", *args)

    res = subprocess.run(command("--model.init_args.optimizer.init_args.lr=1e30", "--trainer.max_steps=12"),
                         capture_output=True, text=True, cwd=tmp_path, env=env(), timeout=600)
    assert res.returncode != 0 and "NonFiniteLossError" in res.stderr and "non-finite losses in a row" in res.stderr
    last = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    res = _run(command("--model.init_args.optimizer.init_args.lr=1e-9", f"--trainer.max_steps={last['global_step'] + 1}",
                       "--ckpt_path", "last"), tmp_path)
    assert "learning rate 1e-09 from the config replaces the checkpoint's 1e+30" in res.stderr
