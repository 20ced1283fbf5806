"""Test-only callbacks and launchers for the FSDP, resume and fault tests (imported by their subprocesses)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import yaml

ROOT = Path(__file__).resolve().parents[1]
BUCKET = '[{"height": 32, "width": 32, "num_frames": 5, "batch_size": 2}]'


class PoisonBatches(L.Callback):
    """NaN video in the batches of the given data steps (on one rank, or all), to inject non-finite losses."""

    def __init__(self, steps: list[int], rank: int | None = None):
        self.steps, self.rank = set(steps), rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch.stats.get("step") in self.steps and self.rank in (None, trainer.global_rank):
            batch.video.fill_(math.nan)


class StepMarker(L.Callback):
    """Rank 0 writes the global step to `path` after each training batch (tests wait on it)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.is_global_zero:
            Path(self.path).write_text(str(trainer.global_step))


def callbacks_yaml(path: Path, *, every: int = 1, extra: list[dict] | None = None, ema: bool = True,
                   requeue: bool = False) -> Path:
    """A trainer config with isa4d's checkpoint/fault callbacks (checkpoints every `every` steps) plus `extra`."""
    callbacks = [
        {"class_path": "isa4d.training.checkpoint.AtomicCheckpoint",
         "init_args": {"monitor": "step", "mode": "max", "save_top_k": 2, "every_n_train_steps": every,
                       "save_last": True, "filename": "{step:08d}"}},
        {"class_path": "isa4d.training.checkpoint.AtomicCheckpoint",
         "init_args": {"monitor": "model", "save_top_k": 1, "save_last": False, "filename": "best-{step:08d}"}},
        {"class_path": "isa4d.training.rng.TrainingRNG"},
        {"class_path": "isa4d.training.faults.NonFiniteGuard", "init_args": {"max_consecutive": 3}},
        {"class_path": "isa4d.training.faults.Preemption", "init_args": {"requeue": requeue}},
    ]
    if ema:
        callbacks.append({"class_path": "isa4d.training.ema.EMA", "init_args": {"decay": 0.9, "submodule": "vae"}})
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks + (extra or [])}}))
    return path


def fit_command(run_dir: Path, shards: str, callbacks: Path, *args: str, entry: list[str] | None = None) -> list[str]:
    """`isa4d fit` of the tiny VAE with cpu_fsdp (2 processes) on 32x32x5 clips, GAN on from step 2."""
    return [
        *(entry or [str(Path(sys.executable).with_name("isa4d"))]), "fit",
        "-c", str(ROOT / "configs/vae/tiny.yaml"), "-c", str(ROOT / "configs/data/toy.yaml"),
        "-c", str(ROOT / "configs/trainer/cpu_fsdp.yaml"), "-c", str(callbacks),
        f"--data.init_args.train_urls={shards}", f"--data.init_args.val_urls={shards}",
        f"--data.init_args.buckets={BUCKET}", "--data.init_args.num_workers=2", "--data.init_args.segment_steps=3",
        "--model.init_args.loss.gan_start_step=2", "--trainer.val_check_interval=3",
        f"--trainer.default_root_dir={run_dir}", f"--trainer.logger.init_args.save_dir={run_dir}", *args,
    ]


def dit_fit_command(run_dir: Path, shards: str, callbacks: Path, vae_checkpoint: Path, body_dir: Path,
                    *args: str) -> list[str]:
    """`isa4d fit` of the tiny DiT on a frozen tiny VAE with cpu_fsdp (2 processes) on 32x32x5 toy-world clips."""
    return [
        str(Path(sys.executable).with_name("isa4d")), "fit",
        "-c", str(ROOT / "configs/dit/tiny.yaml"), "-c", str(ROOT / "configs/data/toy.yaml"),
        "-c", str(ROOT / "configs/trainer/cpu_fsdp.yaml"), "-c", str(callbacks),
        f"--data.init_args.train_urls={shards}", f"--data.init_args.val_urls={shards}",
        f"--data.init_args.buckets={BUCKET}", "--data.init_args.num_workers=2", "--data.init_args.segment_steps=3",
        f"--model.init_args.vae_checkpoint={vae_checkpoint}", f"--model.init_args.body_model_dir={body_dir}",
        "--model.init_args.evaluation.init_args.metrics=[psnr,ssim]", "--model.init_args.sample_steps=2",
        "--trainer.val_check_interval=3", "--trainer.limit_val_batches=2",
        f"--trainer.default_root_dir={run_dir}", f"--trainer.logger.init_args.save_dir={run_dir}", *args,
    ]


def env() -> dict[str, str]:
    path = [str(ROOT), str(ROOT / "src"), str(ROOT / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}


def run(cmd: list[str], cwd: Path, timeout: int = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**env(), **kw.pop("env", {})},
                          cwd=cwd, **kw)


def start(cmd: list[str], cwd: Path, **extra_env: str) -> subprocess.Popen:
    """A fit in its own session, so the test can signal or kill its whole process group (ranks, loader workers)."""
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                            env={**env(), **extra_env}, start_new_session=True)


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def meta(checkpoint: Path) -> dict:
    """meta.pt of a sharded checkpoint (everything but model and optimiser states)."""
    import torch

    return torch.load(checkpoint / "meta.pt", map_location="cpu", weights_only=True)


def shard_writers(checkpoint: Path) -> list[int]:
    """The ranks that wrote shard files into a DCP checkpoint folder (`__<rank>_<file>.distcp`; several files per
    rank when it writes with several threads)."""
    return sorted({int(p.name.split("_")[2]) for p in checkpoint.glob("*.distcp")})


def dumps(obj) -> str:
    return json.dumps(obj, default=str)
