"""Faults: kill -9 in the middle of a save, SIGUSR1 (preemption), non-finite losses, and clear errors for wrong
config keys, missing checkpoints and missing shards. Atomic publication is also tested on its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from resume_helpers import ROOT, callbacks_yaml, fit_command, meta, run, start, wait_for

from isa4d.training.checkpoint import PARTIAL, STORE, clean_store, publish, unpublish

MARKER_CALLBACK = "resume_helpers.StepMarker"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from data_prep.synthetic_shards import write_shards

    out = tmp_path_factory.mktemp("fault_shards")
    write_shards(out, shards=2, per_shard=4, seed=5, sizes=((64, 64), (64, 80)), frames=(20, 30))
    return f"{out}/markers-*.tar"


# --------------------------------------------------------------------------------------------- atomic publish


def test_publish_replaces_files_and_folders_atomically(tmp_path):
    store = tmp_path / STORE
    store.mkdir()
    target = tmp_path / "last.ckpt"
    for version in ("a", "b"):  # folders (sharded checkpoints) are published as links
        staged = store / f"last.{version}.ckpt{PARTIAL}"
        staged.mkdir()
        (staged / "meta.pt").write_text(version)
        publish(staged, target)
        assert target.is_symlink() and (target / "meta.pt").read_text() == version
    assert sorted(p.name for p in store.iterdir()) == ["last.b.ckpt"]  # the replaced folder is gone
    (store / f"last.c.ckpt{PARTIAL}").mkdir()  # what a kill -9 mid-save leaves
    (store / "orphan.ckpt").mkdir()
    clean_store(tmp_path)
    assert sorted(p.name for p in store.iterdir()) == ["last.b.ckpt"] and (target / "meta.pt").read_text() == "b"
    unpublish(target)
    assert not target.exists() and not target.is_symlink() and not list(store.iterdir())
    file_target = tmp_path / "epoch=0.ckpt"
    for content in ("1", "2"):  # single files replace each other
        staged = store / f"epoch=0.{content}.ckpt{PARTIAL}"
        staged.write_text(content)
        publish(staged, file_target)
        assert file_target.read_text() == content and not file_target.is_symlink()


# ----------------------------------------------------------------------------------------------- kill -9, signals


def test_kill_during_save_leaves_the_previous_last_loadable(shards, tmp_path):
    """Checkpoints every step; the 4th write (`last` at step 2) stalls with its shards on disk. kill -9 of the whole
    run leaves `last` at step 1, which resumes."""
    run_dir, cbs = tmp_path / "run", callbacks_yaml(tmp_path / "cb.yaml", ema=False)
    marker = tmp_path / "stalled"
    cmd = fit_command(run_dir, shards, cbs, "--trainer.max_steps=5",
                      entry=[sys.executable, str(ROOT / "tests/stall_save_cli.py")])
    proc = start(cmd, tmp_path, ISA4D_STALL_SAVE="4", ISA4D_STALL_MARKER=str(marker))
    try:
        wait_for(lambda: all(Path(f"{marker}.{r}").exists() for r in (0, 1)), 90, proc, "the stalled save")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    last = run_dir / "checkpoints/last.ckpt"
    assert [p.name for p in (run_dir / "checkpoints" / STORE).iterdir() if p.name.endswith(PARTIAL)]
    assert meta(last)["global_step"] == 1
    res = run(fit_command(run_dir, shards, cbs, "--trainer.max_steps=2", "--ckpt_path", "last"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-6000:]
    assert f"Restoring states from the checkpoint path at {last}" in res.stderr + res.stdout
    assert meta(last)["global_step"] == 2
    assert not [p for p in (run_dir / "checkpoints" / STORE).iterdir() if p.name.endswith(PARTIAL)]


def test_sigusr1_saves_last_requeues_and_exits_75(shards, tmp_path):
    """SIGUSR1 to every process of a running 2-process fit: `last` is saved at the next step on both ranks,
    the job is requeued (a stand-in `scontrol` records the call) and the run exits with status 75 (preempted)."""
    from isa4d.training.faults import PREEMPTED_EXIT_CODE

    run_dir, steps = tmp_path / "run", tmp_path / "steps"
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    cbs = callbacks_yaml(tmp_path / "cb.yaml", every=1000, ema=False, requeue=True,
                         extra=[{"class_path": MARKER_CALLBACK, "init_args": {"path": str(steps)}}])
    proc = start(fit_command(run_dir, shards, cbs, "--trainer.max_steps=10000"), tmp_path,
                 SLURM_JOB_ID="4242", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    try:
        wait_for(lambda: steps.exists() and int(steps.read_text() or 0) >= 2, 90, proc, "two training steps")
        os.killpg(proc.pid, signal.SIGUSR1)  # what SLURM's --signal=USR1@T sends to every task
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-6000:]
    assert "SIGUSR1: saved" in out and "DataLoader worker" not in out
    step = meta(run_dir / "checkpoints/last.ckpt")["global_step"]
    assert 2 <= step < 100 and int(steps.read_text()) == step - 1  # Preemption stops before the marker writes
    assert calls.read_text().split() == ["requeue", "4242"]  # once, from rank 0


# --------------------------------------------------------------------------------------------- non-finite losses


def test_nonfinite_losses_stop_the_run_after_k_and_keep_the_last_good_checkpoint(shards, tmp_path):
    """Single process (the 2-process skip, agreed across ranks, is in test_parallel_fsdp.py): NaN batches from
    data step 2 on; 3 in a row raise, and `last` (a single file here) holds the 2 good steps."""
    from isa4d.cli import run_cli
    from isa4d.training.faults import NonFiniteLossError

    poison = {"class_path": "resume_helpers.PoisonBatches", "init_args": {"steps": list(range(2, 50))}}
    cbs = callbacks_yaml(tmp_path / "cb.yaml", ema=False, extra=[poison])
    args = ["fit", "-c", str(ROOT / "configs/vae/tiny.yaml"), "-c", str(ROOT / "configs/data/toy.yaml"),
            "-c", str(ROOT / "configs/trainer/cpu_debug.yaml"), "-c", str(cbs),
            f"--data.init_args.train_urls={shards}", f"--data.init_args.val_urls={shards}",
            "--data.init_args.num_workers=0",
            '--data.init_args.buckets=[{"height": 32, "width": 32, "num_frames": 5, "batch_size": 2}]',
            "--trainer.max_steps=20", f"--trainer.default_root_dir={tmp_path}/run",
            f"--trainer.logger.init_args.save_dir={tmp_path}/run"]
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row .*last checkpoint is good"):
        run_cli(args)
    last = tmp_path / "run/checkpoints/last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert last.is_file() and ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    from safetensors.torch import load_file

    from isa4d.cli import main

    assert main(["export", str(last), str(tmp_path / "w.safetensors")]) == 0  # a single-file checkpoint too
    exported = load_file(tmp_path / "w.safetensors")
    assert exported.keys() == ckpt["state_dict"].keys()
    assert all(torch.equal(exported[k], v) for k, v in ckpt["state_dict"].items())


# ------------------------------------------------------------------------------------------------- clear errors


def test_wrong_config_key_exits_non_zero_naming_the_key(tmp_path):
    from resume_helpers import env

    cmd = [str(Path(sys.executable).with_name("isa4d")), "fit", "-c", str(ROOT / "configs/vae/tiny.yaml"),
           "-c", str(ROOT / "configs/trainer/cpu_debug.yaml"), "--trainer.max_stepz=3"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env(), cwd=tmp_path)
    assert res.returncode != 0 and "max_stepz" in res.stderr


def test_wrong_nested_key_and_missing_paths_are_named(shards, tmp_path, capsys):
    from isa4d.cli import UsageError, run_cli

    base = ["fit", "-c", str(ROOT / "configs/vae/tiny.yaml"), "-c", str(ROOT / "configs/data/toy.yaml"),
            "-c", str(ROOT / "configs/trainer/cpu_debug.yaml"), "--data.init_args.num_workers=0",
            f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    with pytest.raises(UsageError, match=r"unknown option --model\.init_args\.loss\.l1_weight"):
        run_cli([*base, f"--data.init_args.train_urls={shards}", "--model.init_args.loss.l1_weight=2"])
    with pytest.raises(FileNotFoundError, match=r"data\.train_urls: no shard URLs in .*nothing-\*\.tar"):
        run_cli([*base, f"--data.init_args.train_urls={tmp_path}/nothing-*.tar"])
    with pytest.raises(FileNotFoundError, match=r"data\.val_urls: 1 of 1 shards do not exist.*gone\.tar"):
        run_cli([*base, f"--data.init_args.train_urls={shards}", f"--data.init_args.val_urls={tmp_path}/gone.tar"])
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        run_cli([*base, f"--data.init_args.train_urls={shards}", f"--data.init_args.val_urls={shards}",
                 f"--ckpt_path={tmp_path}/missing.ckpt"])


def test_nonfinite_gradients_are_dropped_under_automatic_optimisation(tmp_path):
    """Automatic optimisation needs no help from the module: the guard drops a step's non-finite gradients."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from isa4d.training.faults import NonFiniteGuard

    class Regressor(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(2, 1)
            self.weights: list[torch.Tensor] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            return loss * float("nan") if batch_idx == 1 else loss

        def on_train_batch_end(self, *args):
            self.weights.append(self.net.weight.detach().clone())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    guard, model = NonFiniteGuard(max_consecutive=2), Regressor()
    data = DataLoader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=2)
    trainer = L.Trainer(max_steps=4, callbacks=[guard], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, data)
    w = model.weights
    assert guard.total == 1 and guard.consecutive == 0
    assert torch.equal(w[1], w[0]) and not torch.equal(w[2], w[1]) and torch.isfinite(w[-1]).all()
