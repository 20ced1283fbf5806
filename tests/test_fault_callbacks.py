"""The fault and resume callbacks on a tiny regression model, in process (fast): Preemption with loader workers
that receive the signal, the learning rate of the config on resume, non-finite weights never checkpointed, a
validation step's checkpoint written after the validation, orphaned checkpoints removed, a dangling `last` link
and ordered epochs refused."""

from __future__ import annotations

import os
import signal

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from isa4d.training.checkpoint import STORE, AtomicCheckpoint
from isa4d.training.faults import (PREEMPTED_EXIT_CODE, LearningRateFromConfig, NonFiniteGuard, NonFiniteLossError,
                                   Preempted, Preemption)
from isa4d.training.rng import TrainingRNG


class Stream(IterableDataset):
    """Endless (x, y) pairs; worker 0 sends `signum` to itself and to the main process at its item `at`, as a
    signal to the whole process group would reach both."""

    def __init__(self, signum: int | None = None, at: int = 3):
        self.signum, self.at = signum, at

    def __iter__(self):
        info = get_worker_info()
        g = torch.Generator().manual_seed(0 if info is None else info.id)
        for i in range(10_000):
            if self.signum is not None and i == self.at and (info is None or info.id == 0):
                os.kill(os.getpid(), self.signum)
                if info is not None:
                    os.kill(os.getppid(), self.signum)
            x = torch.randn(4, 2, generator=g)
            yield x, x.sum(1, keepdim=True)


class Regressor(L.LightningModule):
    def __init__(self, lr: float = 0.1, warmup: int = 0):
        super().__init__()
        self.net = torch.nn.Linear(2, 1)
        self.register_buffer("stat", torch.zeros(()))
        self.lr, self.warmup = lr, warmup
        self.lrs: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        self.stat.fill_(float(self.global_step))  # state a validation sets (the VAE's latent statistics)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        if not self.warmup:
            return opt
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / self.warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class BlowUp(L.Callback):
    """From step `at` on, the weights overflow after the optimizer step (finite loss and gradients before it)."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.at:  # runs before the checkpoint callbacks (Lightning puts them last)
            with torch.no_grad():
                pl_module.net.weight.fill_(float("inf"))


def _trainer(tmp_path, max_steps, callbacks, **kw) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu", **kw)


def _ckpt(every: int = 1) -> AtomicCheckpoint:
    return AtomicCheckpoint(monitor="step", mode="max", save_top_k=2, every_n_train_steps=every, save_last=True,
                            filename="{step:08d}")


def _loader(signum=None, workers=0) -> DataLoader:
    return DataLoader(Stream(signum), batch_size=None, num_workers=workers)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_to_workers_and_main_saves_last_and_exits_75(tmp_path, signum):
    before = signal.getsignal(signum)
    trainer = _trainer(tmp_path, 1000, [Preemption(requeue=False), _ckpt(every=1000)])
    with pytest.raises(Preempted) as e:
        trainer.fit(Regressor(), _loader(signum, workers=2))
    assert e.value.code == PREEMPTED_EXIT_CODE and signum.name in str(e.value)
    step = torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)["global_step"]
    assert 1 <= step < 100 and step == trainer.global_step  # workers survived: no "DataLoader worker killed"
    assert signal.getsignal(signum) == before


def test_the_config_learning_rate_replaces_the_checkpoints_on_resume(tmp_path):
    ckpt = tmp_path / "checkpoints/last.ckpt"
    _trainer(tmp_path, 2, [LearningRateFromConfig(), _ckpt()]).fit(Regressor(lr=0.1, warmup=4), _loader())
    straight = Regressor(lr=0.1, warmup=4)
    _trainer(tmp_path / "s", 4, [LearningRateFromConfig()]).fit(straight, _loader())
    same = Regressor(lr=0.1, warmup=4)  # the config's own rate: resumes exactly
    _trainer(tmp_path, 4, [LearningRateFromConfig()]).fit(same, _loader(), ckpt_path=ckpt)
    assert same.lrs == straight.lrs[2:]
    lower = Regressor(lr=0.001, warmup=4)
    _trainer(tmp_path, 4, [LearningRateFromConfig()]).fit(lower, _loader(), ckpt_path=ckpt)
    assert lower.lrs == pytest.approx([0.001 * 3 / 4, 0.001])  # the new rate, at the schedule's position
    without = Regressor(lr=0.001, warmup=4)  # Lightning alone keeps the checkpoint's
    _trainer(tmp_path, 4, []).fit(without, _loader(), ckpt_path=ckpt)
    assert without.lrs == pytest.approx([0.1 * 3 / 4, 0.1])


def test_nonfinite_weights_are_never_checkpointed(tmp_path):
    with pytest.raises(NonFiniteLossError, match="weights are not finite at step 3.*checkpoint not written"):
        _trainer(tmp_path, 10, [BlowUp(3), NonFiniteGuard(), _ckpt()]).fit(Regressor(), _loader())
    last = torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == 2 and all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_a_validation_steps_checkpoint_holds_the_validation_state(tmp_path):
    """Checkpoints and validation every 2 steps: each checkpoint holds what its step's validation set."""
    trainer = _trainer(tmp_path, 4, [_ckpt(every=2)], val_check_interval=2, check_val_every_n_epoch=None,
                       limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(Regressor(), _loader(), _loader())
    for name, step in (("step=00000002.ckpt", 2), ("step=00000004.ckpt", 4), ("last.ckpt", 4)):
        ckpt = torch.load(tmp_path / "checkpoints" / name, weights_only=True)
        assert ckpt["global_step"] == step and ckpt["state_dict"]["stat"].item() == step, name


def test_resume_removes_checkpoints_of_later_steps_and_refuses_a_dangling_last(tmp_path):
    import shutil

    folder = tmp_path / "checkpoints"
    _trainer(tmp_path, 3, [_ckpt()]).fit(Regressor(), _loader())
    shutil.copy(folder / "step=00000002.ckpt", folder / "last.ckpt")  # killed after step 3's top-k, before `last`
    _trainer(tmp_path, 3, [_ckpt()]).fit(Regressor(), _loader(), ckpt_path="last")
    names = sorted(p.name for p in folder.iterdir() if p.name != STORE)
    assert names == ["last.ckpt", "step=00000002.ckpt", "step=00000003.ckpt"], names  # no step=00000003-v1
    assert torch.load(folder / "step=00000003.ckpt", weights_only=True)["global_step"] == 3

    (folder / STORE).mkdir(exist_ok=True)
    (folder / "last.ckpt").unlink()
    (folder / "last.ckpt").symlink_to(f"{STORE}/last.gone.ckpt")  # copied without its target
    with pytest.raises(FileNotFoundError, match=r"last\.ckpt is a link to .*last\.gone\.ckpt, which does not exist"):
        _trainer(tmp_path, 4, [_ckpt()]).fit(Regressor(), _loader(), ckpt_path="last")


class Ordered(L.LightningDataModule):
    resampled = False

    def train_dataloader(self):
        return _loader()


def test_resuming_ordered_epochs_is_refused(tmp_path):
    _trainer(tmp_path, 2, [TrainingRNG(), _ckpt()]).fit(Regressor(), datamodule=Ordered())
    with pytest.raises(ValueError, match="resampled=false: ordered epochs restart on resume"):
        _trainer(tmp_path, 4, [TrainingRNG(), _ckpt()]).fit(Regressor(), datamodule=Ordered(), ckpt_path="last")


def test_hparams_yaml_holds_the_run_config(tmp_path):
    import yaml
    from lightning.pytorch.loggers import TensorBoardLogger

    from isa4d.training.callbacks import ConfigHparams

    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    config = {"model": {"class_path": "Regressor", "init_args": {"lr": 0.1}}, "trainer": {"max_steps": 2}}
    (tmp_path / "run/version_0").mkdir(parents=True)
    (tmp_path / "run/version_0/config.yaml").write_text(yaml.safe_dump(config))  # as LightningCLI saves it
    L.Trainer(max_steps=2, callbacks=[ConfigHparams()], logger=logger, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False).fit(Regressor(), _loader())
    assert yaml.safe_load((tmp_path / "run/version_0/hparams.yaml").read_text()) == config
