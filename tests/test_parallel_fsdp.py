"""FSDP2 on 2 CPU processes (gloo) through the real `isa4d fit`: the tiny VAE with its discriminators and EMA,
sharded checkpoints, an exact mid-stream resume, resharding 2 -> 1 and 1 -> 2, and `isa4d export`.

Run A trains 6 steps straight; run B trains 4, stops, and resumes to 6 with `--ckpt_path last`. Both see a NaN
batch on rank 1 at data step 1 (skipped on both ranks, so the data position runs one batch ahead of
global_step), the GAN switches on at step 2, validation runs in between, 2 loader workers per rank and a stream
segment of 3 steps make the resume replay part of a segment.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from resume_helpers import ROOT, callbacks_yaml, fit_command, meta, run, shard_writers

POISON = {"class_path": "resume_helpers.PoisonBatches", "init_args": {"steps": [1], "rank": 1}}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from data_prep.synthetic_shards import write_shards

    out = tmp_path_factory.mktemp("fsdp_shards")
    write_shards(out, shards=2, per_shard=4, seed=3, sizes=((64, 64), (64, 80)), frames=(20, 30))
    return f"{out}/markers-*.tar"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shards):
    """(A: 6 steps straight, B: 4 steps + resume to 6), each a run folder."""
    tmp = tmp_path_factory.mktemp("fsdp_runs")
    cbs = callbacks_yaml(tmp / "callbacks.yaml", extra=[POISON])
    a, b = tmp / "A", tmp / "B"
    makefile = ["--trainer.callbacks+=isa4d.training.checkpoint.AtomicCheckpoint",  # as `make train-vae` adds
                f"--trainer.callbacks.dirpath={a}/checkpoints", "--trainer.callbacks.save_last=true"]
    for run_dir, steps, extra in ((a, 6, makefile), (b, 4, []), (b, 6, ["--ckpt_path", "last"])):
        res = run(fit_command(run_dir, shards, cbs, f"--trainer.max_steps={steps}", *extra), cwd=tmp)
        assert res.returncode == 0, res.stderr[-6000:]
    return a, b


def _weights(checkpoint, ema=False):
    from isa4d.training.export import read_weights

    weights, _ = read_weights(checkpoint, ema)
    return weights


def test_two_process_fsdp_fit_writes_sharded_checkpoints(runs):
    a, _ = runs
    ckpts = a / "checkpoints"
    last = ckpts / "last.ckpt"
    assert last.is_symlink() and last.resolve().parent.name == ".store"
    assert shard_writers(last) == [0, 1]
    names = sorted(p.name for p in ckpts.iterdir() if p.name != ".store")
    # the best, `last`, the last 2 every step, and the Makefile's callback's checkpoint of the last validation
    assert names[0].startswith("best-step=") and names[1:] == ["epoch=0-step=5.ckpt", "last.ckpt",
                                                                "step=00000005.ckpt", "step=00000006.ckpt"], names
    assert len(list((ckpts / ".store").iterdir())) == 5  # replaced and rotated checkpoints were deleted
    assert not [p for p in (ckpts / ".store").iterdir() if p.name.endswith(".partial")]
    m = meta(last)
    assert m["global_step"] == 6
    assert m["ShardDataModule"]["next_step"] == 7  # 7 batches for 6 steps: the NaN one was skipped
    guard = next(v for k, v in m["callbacks"].items() if k.startswith("NonFiniteGuard"))
    assert guard == {"consecutive": 0, "total": 1}
    rng = next(v for k, v in m["callbacks"].items() if k.startswith("TrainingRNG"))
    assert len(rng["per_rank"]) == 2 and not torch.equal(rng["per_rank"][0]["torch"], rng["per_rank"][1]["torch"])
    ema = next(v for k, v in m["callbacks"].items() if k.startswith("EMA"))
    assert ema["num_updates"] == 6 and all("__isa4d_dtensor__" in v for v in ema["shadow"].values())
    weights = _weights(last)
    assert any(k.startswith("disc_3d.") for k in weights) and all(torch.isfinite(v).all() for v in weights.values())


def test_resume_mid_stream_is_bitwise_exact(runs):
    a, b = runs
    for ema in (False, True):
        wa, wb = _weights(a / "checkpoints/last.ckpt", ema), _weights(b / "checkpoints/last.ckpt", ema)
        assert wa.keys() == wb.keys()
        differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert not differ, (ema, differ[:5])
    ma, mb = meta(a / "checkpoints/last.ckpt"), meta(b / "checkpoints/last.ckpt")
    assert ma["global_step"] == mb["global_step"] == 6
    first = _weights(b / "checkpoints/step=00000005.ckpt")
    assert any(not torch.equal(first[k], wa[k]) for k in wa), "the comparison must see training happen"


def test_two_processes_resume_on_one(runs, shards, tmp_path):
    """Resharding: B's 2-process checkpoint (model, both optimisers, EMA shadow) continues on 1 process."""
    _, b = runs
    c = tmp_path / "C"
    shutil.copytree(b, c, symlinks=True)
    res = run(fit_command(c, shards, callbacks_yaml(tmp_path / "cb.yaml"), "--trainer.devices=1",
                          "--trainer.max_steps=7", "--ckpt_path", "last"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-6000:]
    assert "RNG states are for 2 ranks, this run has 1" in res.stderr
    m = meta(c / "checkpoints/last.ckpt")
    assert m["global_step"] == 7 and len(next(v for k, v in m["callbacks"].items()
                                              if k.startswith("TrainingRNG"))["per_rank"]) == 1
    assert shard_writers(c / "checkpoints/last.ckpt") == [0]


@pytest.mark.slow
def test_one_process_resumes_on_two(shards, tmp_path):
    d = tmp_path / "D"
    cbs = callbacks_yaml(tmp_path / "cb.yaml")
    for args in (["--trainer.devices=1", "--trainer.max_steps=2"], ["--trainer.max_steps=3", "--ckpt_path", "last"]):
        res = run(fit_command(d, shards, cbs, *args), cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-6000:]
    last = d / "checkpoints/last.ckpt"
    assert meta(last)["global_step"] == 3 and shard_writers(last) == [0, 1]


def test_export_consolidates_a_sharded_checkpoint(runs, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from isa4d.cli import main

    a, _ = runs
    out = tmp_path / "vae_ema.safetensors"
    assert main(["export", str(a / "checkpoints/last.ckpt"), str(out), "--ema", "--submodule", "vae"]) == 0
    tensors = load_file(out)
    ema = {k.removeprefix("vae."): v for k, v in _weights(a / "checkpoints/last.ckpt", ema=True).items()
           if k.startswith("vae.")}
    assert tensors.keys() == ema.keys() and all(torch.equal(tensors[k], ema[k]) for k in ema)
    with safe_open(str(out), "pt") as f:
        info = f.metadata()
    assert info["ema"] == "true" and info["global_step"] == "6" and '"latent_channels": 16' in info["vae_config"]
    from isa4d.models.vae import load_vae  # stage 2 rebuilds the VAE from the export and its config

    vae = load_vae(out, config=json.loads(info["vae_config"]))
    assert torch.equal(vae.decoder.conv_out.weight, ema["decoder.conv_out.weight"])
    raw = tmp_path / "raw.safetensors"
    assert main(["export", str(a / "checkpoints/last.ckpt"), str(raw)]) == 0
    assert any(k.startswith("disc_2d.") for k in load_file(raw))
    isa4d = ROOT / ".venv/bin/isa4d"
    missing = run([str(isa4d) if isa4d.exists() else "isa4d", "export", str(tmp_path / "nope.ckpt"), str(raw)],
                  cwd=tmp_path)
    assert missing.returncode == 1 and "checkpoint not found" in missing.stderr and "nope.ckpt" in missing.stderr


@pytest.mark.slow
def test_single_device_checkpoint_resumes_under_fsdp(shards, tmp_path):
    """A one-process run's single-file checkpoint (both optimisers, EMA) continues sharded on 2 processes."""
    e = tmp_path / "E"
    cbs = callbacks_yaml(tmp_path / "cb.yaml")
    single = ["--trainer.strategy=auto", "--trainer.devices=1", "--trainer.max_steps=3"]
    for args in (single, ["--trainer.max_steps=4", "--ckpt_path", "last"]):
        res = run(fit_command(e, shards, cbs, *args), cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-6000:]
    last = e / "checkpoints/last.ckpt"
    assert last.is_symlink() and meta(last)["global_step"] == 4
