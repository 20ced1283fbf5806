"""isa4d.progress and the trainer's console callbacks: progress lines with elapsed time and ETA off a terminal, a
redrawn line on one, and the stage's start and end lines."""

from __future__ import annotations

import io
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from isa4d.progress import Progress, count_tar_samples, format_line, format_seconds, track
from isa4d.training.summary import ConsoleProgressBar, StageSummary


def test_format_line_eta_is_the_rate_so_far_extrapolated():
    # 5 of 20 done in 10 s: 2 s each, 15 left -> 30 s
    line = format_line("fit", 5, 20, 10.0, "steps")
    assert "5/20 steps (25%)" in line and "elapsed 0:10" in line and "ETA 0:30" in line and "0.50 steps/s" in line
    assert "ETA ?" in format_line("fit", 0, 20, 3.0)  # nothing done yet: no rate to extrapolate
    assert format_seconds(3723) == "1:02:03" and format_seconds(65) == "1:05"


def test_lines_off_a_terminal_and_a_redrawn_line_on_one():
    log = io.StringIO()
    with Progress(4, "toy world train", "clips", stream=log, every=0, terminal=False) as bar:
        for _ in range(4):
            bar.update()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert [re.search(r"(\d)/4 clips", ln).group(1) for ln in lines] == ["1", "2", "3", "4", "4"]  # + the final line
    assert all("elapsed" in ln and "ETA" in ln for ln in lines)
    tty = io.StringIO()
    assert list(track(range(3), "cache", stream=tty, terminal=True)) == [0, 1, 2]
    assert tty.getvalue().startswith("\r") and tty.getvalue().endswith("\n") and "3/3 it (100%)" in tty.getvalue()


def test_off_a_terminal_lines_are_spaced_by_the_interval():
    log = io.StringIO()
    with Progress(1000, "inspect", stream=log, every=3600, terminal=False) as bar:
        for _ in range(1000):
            bar.update()
    assert log.getvalue().count("\n") == 1 and "1000/1000" in log.getvalue()  # only the final line within the hour


class _Regressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(2, 1)
        self.frozen = torch.nn.Linear(2, 2).requires_grad_(False)

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/mse", torch.nn.functional.mse_loss(self.net(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1)


def test_trainer_prints_start_progress_and_end_lines(tmp_path):
    out, bar_out = io.StringIO(), io.StringIO()
    data = DataLoader(TensorDataset(torch.randn(16, 2), torch.randn(16, 1)), batch_size=2)
    trainer = L.Trainer(max_steps=6, val_check_interval=3, limit_val_batches=2, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[StageSummary(stream=out), ConsoleProgressBar(stream=bar_out, every=0,
                                                                                terminal=False)])
    trainer.fit(_Regressor(), data, data)
    start, end = out.getvalue().splitlines()
    assert start.startswith("isa4d fit: _Regressor, 9 parameters (3 trained, 6 frozen)") and "cpu x1" in start
    assert re.match(r"isa4d fit done: 6 steps in \d+:\d\d \| val/mse [\d.e-]+ \| no checkpoint written", end), end
    steps = [int(m.group(1)) for m in re.finditer(r"^fit  (\d)/6 steps", bar_out.getvalue(), re.M)]
    assert steps[:6] == [1, 2, 3, 4, 5, 6] and "loss" in bar_out.getvalue()
    assert len(re.findall(r"^validate  1/2 batches", bar_out.getvalue(), re.M)) == 2  # after steps 3 and 6


# ------------------------------------------------------------------------------------- the data tools' progress
ASSET = Path(__file__).resolve().parent / "assets/toy_world"


def test_sample_count_from_tar_headers_matches_reading_the_samples():
    from isa4d.data.shards import expand_urls, iter_samples

    urls = expand_urls(str(ASSET / "*.tar"))
    assert count_tar_samples(urls) == sum(1 for _ in iter_samples(urls, lambda *a: None)) == 4
    assert count_tar_samples(["https://example.org/a.tar"]) is None


def test_inspect_caching_and_toy_world_print_progress_lines_off_a_terminal(tiny_vae_checkpoint, toy_body_dir,
                                                                            tmp_path, capsys, monkeypatch):
    from dataclasses import replace

    from data_prep.cache_latents import cache_latents
    from data_prep.toy_world.world import PRESETS, write_split
    from isa4d.cli import main
    from isa4d.data.buckets import Bucket

    monkeypatch.setenv("ISA4D_PROGRESS_SECONDS", "0")
    assert main(["data", "inspect", str(ASSET / "*.tar")]) == 0
    assert re.search(r"^inspect  4/4 samples \(100%\)  elapsed \d+:\d\d  ETA", capsys.readouterr().err, re.M)
    cache_latents(tiny_vae_checkpoint, str(ASSET / "train-*.tar"), str(tmp_path / "c-%06d.tar"), Bucket(16, 16, 5, 3),
                  passes=2)
    err = capsys.readouterr().err
    assert re.search(r"^cache latents  6/6 clips \(100%\)  elapsed \d+:\d\d  ETA .*pass 2/2", err, re.M), err
    try:
        write_split(tmp_path, "val", replace(PRESETS["tiny"], val_clips=1), 0, toy_body_dir, workers=1)
    except Exception as e:  # pragma: no cover - headless OpenGL missing
        pytest.skip(f"toy world renderer unavailable: {e}")
    assert re.search(r"^toy world val  1/1 clips \(100%\)  elapsed", capsys.readouterr().err, re.M)
