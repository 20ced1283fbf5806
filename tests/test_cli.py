"""The isa4d command: configs parse through LightningCLI, stacked -c files interpolate, a fit runs on shards."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from isa4d.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml"))


def _args(cli_shards, tmp_path, *extra):
    shards = f"{cli_shards}/markers-*.tar"
    return [
        "-c", str(ROOT / "tests/configs/probe.yaml"),
        "-c", str(ROOT / "configs/data/toy.yaml"),
        "-c", str(ROOT / "configs/trainer/cpu_debug.yaml"),
        f"--data.init_args.train_urls={shards}", f"--data.init_args.val_urls={shards}",
        "--data.init_args.num_workers=0",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}/runs",
        *extra,
    ]


def test_configs_are_listed():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in CONFIGS}
    assert {"data/toy.yaml", "trainer/cpu_debug.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_config_parses(config, cli_shards, tmp_path, tiny_vae_checkpoint, toy_body_dir):
    """Each YAML under configs/ parses through the real CLI together with the probe model and the debug trainer."""
    extra = ["--model.init_args.loss.perceptual=0"] if "vae" in config.parts else []  # no LPIPS weights in CI
    if "dit" in config.parts:  # a stand-in stage 1 and the toy body; GPU-sized networks built at a CPU width
        extra += [f"--model.init_args.vae_checkpoint={tiny_vae_checkpoint}",
                  f"--model.init_args.body_model_dir={toy_body_dir}",
                  "--model.init_args.network.init_args.hidden_size=64",
                  "--model.init_args.network.init_args.num_heads=4",
                  "--model.init_args.network.init_args.depth=2",
                  "--model.init_args.network.init_args.num_points=64"]
    if "sample" in config.parts:  # isa4d sample's inputs, taken from a committed toy shard
        from data_prep.sample_inputs import write_sample_inputs

        clip = tmp_path / "clip"
        people = [str(clip / p) for p in write_sample_inputs(str(ROOT / "tests/assets/toy_world/val-000000.tar"), 0,
                                                             clip)["people"]]
        extra += [f"--data.init_args.motions=[{', '.join(people)}]", f"--data.init_args.ref={clip}/ref.png",
                  f"--data.init_args.ref_camera={clip}/ref.npz", f"--data.init_args.body_model_dir={toy_body_dir}",
                  "--data.init_args.num_frames=13", f"--model.init_args.vae_checkpoint={tiny_vae_checkpoint}",
                  f"--model.init_args.body_model_dir={toy_body_dir}", f"--trainer.default_root_dir={tmp_path}"]
        cli = run_cli(["-c", str(ROOT / "configs/dit/tiny.yaml"), "-c", str(config),
                       "-c", str(ROOT / "configs/trainer/cpu_debug.yaml"), *extra], run=False)
        assert cli.datamodule.request().batch.video.shape[1] == 13  # the committed clips' 13 frames; tests run it
        return
    trainer = (yaml.safe_load(config.read_text()) or {}).get("trainer") or {}
    if trainer.get("accelerator") == "gpu" and not torch.cuda.is_available():  # GPU configs parse; CPU stands in
        extra += ["--trainer.accelerator=cpu", "--trainer.precision=32-true"]
    overlay = ["-c", str(ROOT / "configs/dit/tiny.yaml")] if "ablation" in config.parts else []  # on a preset
    cli = run_cli([*_args(cli_shards, tmp_path), *overlay, "-c", str(config), *extra], run=False)
    assert cli.datamodule is not None and cli.trainer is not None


def test_later_files_flow_into_earlier_interpolations(cli_shards, tmp_path):
    """omegaconf+: the probe's num_frames interpolates the data's first bucket, and overriding that bucket in a later
    -c file or on the command line changes it (plain omegaconf would resolve the first file alone and fail)."""
    cli = run_cli([*_args(cli_shards, tmp_path)], run=False)
    assert cli.model.num_frames == 17
    override = tmp_path / "short.yaml"
    override.write_text(yaml.safe_dump({"data": {"init_args": {"buckets": [
        {"height": 48, "width": 48, "num_frames": 5, "batch_size": 2}]}}}))
    cli = run_cli([*_args(cli_shards, tmp_path), "-c", str(override)], run=False)
    assert cli.model.num_frames == 5
    buckets = '[{"height": 32, "width": 32, "num_frames": 7, "batch_size": 2}]'
    cli = run_cli([*_args(cli_shards, tmp_path), f"--data.init_args.buckets={buckets}"], run=False)
    assert cli.model.num_frames == 7 and cli.datamodule.buckets[0].height == 32


def test_fit_runs_through_the_cli_and_learns(cli_shards, tmp_path):
    """A real fit through the CLI on marker shards: batches arrive normalised, loss falls, validation visits every
    clip, the resolved config is saved beside the logs, and the loader health is logged."""
    cli = run_cli(["fit", *_args(cli_shards, tmp_path, "--trainer.max_steps=40", "--trainer.val_check_interval=40",
                                 "--trainer.limit_val_batches=null", "--model.init_args.lr=0.5")])
    metrics = cli.trainer.logged_metrics
    assert cli.trainer.global_step == 40
    losses = cli.model.losses
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:3]) / 3, losses
    assert "data/seen" in metrics and metrics["data/skipped_fraction"] == 0
    from probe_module import BatchProbe  # noqa: F401  (the class CLI instantiated)

    assert sorted(cli.model.seen_keys) == sorted(set(cli.model.seen_keys)) and len(cli.model.seen_keys) == 8
    saved = list(Path(tmp_path).rglob("config.yaml"))
    assert saved, "the resolved config is saved with the run"
    assert yaml.safe_load(saved[0].read_text())["model"]["init_args"]["num_frames"] == 17


def test_console_script_data_inspect(cli_shards, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "isa4d.cli", "data", "inspect", f"{cli_shards}/markers-*.tar"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "valid: 8" in ok.stdout and "invalid: 0" in ok.stdout
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar at all" * 100)
    res = subprocess.run([sys.executable, "-m", "isa4d.cli", "data", "inspect", str(bad)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "shard_error" in res.stdout
    usage = subprocess.run([sys.executable, "-m", "isa4d.cli", "data", "frobnicate"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2


# ------------------------------------------------------------------------------------------ a CLI that lists itself
LISTED = ("fit", "validate", "test", "sample", "data inspect", "export", "version")


def test_help_lists_every_command_and_each_one_answers_help(capsys):
    from isa4d import __version__
    from isa4d.cli import main

    for args in (["--help"], []):
        assert main(args) == 0
        out = capsys.readouterr().out
        assert [c for c in LISTED if re.search(rf"^  {c}\s+\w", out, re.M)] == list(LISTED), out
    assert main(["version"]) == 0 and main(["--version"]) == 0
    one, two = capsys.readouterr().out.splitlines()
    assert one == two and one.startswith(f"isa4d {__version__} (torch ")
    for command in LISTED[:-1]:  # every listed command exists: its --help exits 0 with its own usage line
        with pytest.raises(SystemExit) as e:
            main([*command.split(), "--help"])
        assert e.value.code == 0
        assert f"usage: isa4d {command}" in capsys.readouterr().out, command


def test_sample_help_is_clean(capsys):
    from isa4d.cli import SAMPLE_DESCRIPTION, main

    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit):
        warnings.simplefilter("always")
        main(["sample", "--help"])
    out = capsys.readouterr()
    assert out.out.startswith("usage: isa4d sample ") and SAMPLE_DESCRIPTION[:40] in " ".join(out.out.split())
    assert out.err == "" and not [w for w in caught if "sys.argv" in str(w.message)]


# ------------------------------------------------------------------------------------------- one-line everyday errors
STAGE = ["-c", str(ROOT / "configs/vae/tiny.yaml"), "-c", str(ROOT / "configs/data/toy.yaml"),
         "-c", str(ROOT / "configs/trainer/cpu_debug.yaml")]
BAD_INPUTS = {  # args, what the one line must name
    "wrong option": (["fit", *STAGE, "--trainer.max_stepz=3"],
                     "unknown option --trainer.max_stepz (did you mean --trainer.max_steps?)"),
    "wrong nested option": (["fit", *STAGE, "--model.init_args.loss.perceptul=0"],
                            "--model.init_args.loss.perceptul (did you mean --model.init_args.loss.perceptual?)"),
    "wrong type": (["fit", *STAGE, "--trainer.max_steps=many"], "--trainer.max_steps: expected int, got 'many'"),
    "wrong nested type": (["fit", *STAGE, "--model.init_args.loss.perceptual=lots"],
                          "--model.init_args.loss.perceptual: expected float"),
    "missing config": (["fit", "-c", "configs/vae/nope.yaml"], "configs/vae/nope.yaml"),
    "missing data glob": (["fit", *STAGE, "--data.init_args.train_urls=nope/*.tar",
                           "--model.init_args.loss.perceptual=0"], "data.train_urls: no shard URLs in 'nope/*.tar'"),
    "missing checkpoint": (["export", "--ckpt_path", "nope/last.ckpt", "--out", "w.safetensors"], "nope/last.ckpt"),
    "inspect missing glob": (["data", "inspect", "nope/*.tar"], "nope/*.tar"),
    "unknown command": (["trian"], "unknown command 'trian'"),
    "model preset alone": (["fit", "-c", "configs/dit/tiny.yaml"], "no data config: add one after the model preset, "
                                                                    "e.g. -c configs/data/toy.yaml"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda c: c.replace(" ", "_"))
def test_everyday_bad_input_is_one_line_naming_the_thing(case, capsys, monkeypatch, tmp_path):
    from isa4d.cli import main

    monkeypatch.delenv("ISA4D_DEBUG", raising=False)
    monkeypatch.chdir(ROOT)
    args, named = BAD_INPUTS[case]
    args = [a.replace("w.safetensors", str(tmp_path / "w.safetensors")) for a in args]
    assert main([*args, f"--trainer.default_root_dir={tmp_path}"] if args[0] == "fit" else args) != 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("Seed set to")]
    assert len(err) == 1 and err[0].startswith("isa4d: error: ") and named in err[0], err


def test_debug_shows_the_traceback(monkeypatch):
    from isa4d.cli import UsageError, main

    monkeypatch.delenv("ISA4D_DEBUG", raising=False)
    with pytest.raises(UsageError, match="max_stepz"):
        main(["fit", *STAGE, "--trainer.max_stepz=3", "--debug"])
    monkeypatch.setenv("ISA4D_DEBUG", "1")
    with pytest.raises(ValueError, match="no shard URLs"):
        main(["data", "inspect", "nope/*.tar"])


def test_export_takes_ckpt_path_and_out_and_still_the_old_positional_form(tmp_path, capsys):
    from safetensors.torch import load_file

    from isa4d.cli import main

    weights = {"net.weight": torch.arange(6.0).reshape(2, 3), "net.bias": torch.ones(2)}
    torch.save({"state_dict": weights, "global_step": 3}, tmp_path / "a.ckpt")
    assert main(["export", "--ckpt_path", str(tmp_path / "a.ckpt"), "--out", str(tmp_path / "new.safetensors")]) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert main(["export", str(tmp_path / "a.ckpt"), str(tmp_path / "old.safetensors")]) == 0
    assert "`export CKPT OUT` is deprecated" in capsys.readouterr().err
    for name in ("new", "old"):
        out = load_file(tmp_path / f"{name}.safetensors")
        assert out.keys() == weights.keys() and all(torch.equal(out[k], v) for k, v in weights.items())


# --------------------------------------------------------------------------------------- quiet logs, progress in logs
def test_a_fit_in_a_log_has_start_progress_and_end_lines_and_no_upstream_noise(cli_shards, tmp_path):
    env = {**os.environ, "ISA4D_PROGRESS_SECONDS": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), str(ROOT)])}
    env.pop("ISA4D_DEBUG", None)
    args = _args(cli_shards, tmp_path, "--trainer.max_steps=4", "--trainer.val_check_interval=4")
    res = subprocess.run([sys.executable, "-m", "isa4d.cli", "fit", *args], capture_output=True, text=True, timeout=300,
                         env=env, cwd=tmp_path)  # stdout is a pipe: not a terminal
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert re.search(r"^isa4d fit: BatchProbe, \d+ parameters \| data train .*markers-\*\.tar.* \| cpu x1, 32-true "
                     r"\| .*logs ", res.stdout, re.M), log
    steps = re.findall(r"^fit  (\d)/4 steps \(\d+%\)  elapsed \d+:\d\d  ETA \d+:\d\d", res.stderr, re.M)
    assert steps[:4] == ["1", "2", "3", "4"], log
    assert re.search(r"^isa4d fit done: 4 steps in \d+:\d\d \| ", res.stdout, re.M), log
    for noise in ("Tip:", "LeafSpec", "GPU available", "\r"):
        assert noise not in log, noise


@pytest.fixture(scope="module")
def cli_shards(tmp_path_factory):
    """Marker shards whose aspect ratios all fit the toy data config's 64x64 buckets."""
    from data_prep.synthetic_shards import write_shards

    out = tmp_path_factory.mktemp("cli_markers")
    write_shards(out, shards=2, per_shard=4, seed=3, sizes=((64, 64), (64, 80)), frames=(20, 30))
    return out
