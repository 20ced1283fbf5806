"""EMA callback: hand-computed average, validation on EMA weights, checkpoint resume, manual optimisation."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from isa4d.training.ema import EMA

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")


class Tiny(L.LightningModule):
    """A linear regressor; `frozen` must stay out of the shadow, `val_weights` records what validation saw."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 2)
        self.frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
        self.val_weights: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        self.val_weights.append(self.net.weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TwoOptimizers(L.LightningModule):
    """Manual optimisation like VAEModule: a wrapped generator step, then a raw (uncounted) disc step."""

    def __init__(self, wrapped_second_step: bool):
        super().__init__()
        self.gen, self.disc = torch.nn.Linear(4, 2), torch.nn.Linear(2, 1)
        self.wrapped_second_step = wrapped_second_step
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_g, opt_d = self.optimizers()
        opt_g.zero_grad()
        self.manual_backward(torch.nn.functional.mse_loss(self.gen(x), y))
        opt_g.step()
        opt_d.zero_grad()
        self.manual_backward(self.disc(self.gen(x).detach()).pow(2).mean())
        opt_d.step() if self.wrapped_second_step else opt_d.optimizer.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.gen.parameters(), lr=0.1), torch.optim.SGD(self.disc.parameters(), lr=0.1)


class Snapshots(L.Callback):
    """global_step and a copy of the weights (of submodule `attr`, if given) after each training batch."""

    def __init__(self, attr: str | None = None):
        self.attr, self.steps, self.weights = attr, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        module = pl_module if self.attr is None else getattr(pl_module, self.attr)
        self.steps.append(trainer.global_step)
        self.weights.append({k: v.detach().clone() for k, v in module.named_parameters()})


def loader(batches: int = 3) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4 * batches, 4, generator=g), torch.randn(4 * batches, 2, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def trainer(tmp_path, callbacks, checkpoint: bool = False, **kw) -> L.Trainer:
    kw = {"max_steps": 6, "num_sanity_val_steps": 0, "limit_val_batches": 0, **kw}
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=checkpoint,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                     callbacks=callbacks, **kw)


def reference_ema(initial, snapshots: Snapshots, decay, every_n_steps=1, start_step=0):
    """The average by hand from the weights after each global step, warm-up min(decay, (1 + n) / (10 + n))."""
    shadow, n = {k: v.clone() for k, v in initial.items()}, 0
    for step, weights in zip(snapshots.steps, snapshots.weights):
        if step < start_step:
            shadow = {k: weights[k].clone() for k in shadow}
        elif step % every_n_steps == 0:
            d = min(decay, (1 + n) / (10 + n))
            shadow = {k: d * shadow[k] + (1 - d) * weights[k] for k in shadow}
            n += 1
    return shadow, n


@pytest.mark.parametrize("every_n_steps,start_step", [(1, 0), (2, 3)])
def test_shadow_matches_a_hand_computed_ema(tmp_path, every_n_steps, start_step):
    torch.manual_seed(0)
    module = Tiny()
    initial = {f"net.{k}": v.detach().clone() for k, v in module.net.named_parameters()}
    ema, snaps = EMA(decay=0.8, every_n_steps=every_n_steps, start_step=start_step), Snapshots()
    trainer(tmp_path, [ema, snaps], max_steps=7, max_epochs=-1).fit(module, loader())
    assert snaps.steps == list(range(1, 8))
    assert set(ema.shadow) == {"net.weight", "net.bias"}  # trainable parameters only
    expected, n = reference_ema(initial, snaps, 0.8, every_n_steps, start_step)
    assert ema.num_updates == n > 0
    for k in expected:
        assert ema.shadow[k].dtype == torch.float32
        torch.testing.assert_close(ema.shadow[k], expected[k])


def test_validation_sees_ema_weights_and_training_resumes_on_its_own(tmp_path):
    def run(validate_with_ema):
        torch.manual_seed(0)
        module, ema = Tiny(), EMA(decay=0.9, validate_with_ema=validate_with_ema)
        param = module.net.weight
        t = trainer(tmp_path, [ema], max_steps=-1, max_epochs=2, limit_val_batches=1)
        t.fit(module, loader(), loader(1))
        assert module.net.weight is param and param.requires_grad
        return module, ema

    module, ema = run(True)
    plain, _ = run(False)
    # Both validations (after epochs 1 and 2) saw the EMA; training went on from, and ends on, its weights.
    assert len(module.val_weights) == 2
    shadow = ema.shadow["net.weight"]
    torch.testing.assert_close(module.val_weights[-1], shadow)
    assert not torch.allclose(module.net.weight, shadow)
    torch.testing.assert_close(plain.val_weights[-1], plain.net.weight)
    torch.testing.assert_close(module.net.weight, plain.net.weight)
    weight = module.net.weight.detach().clone()
    with ema.swapped(module):
        torch.testing.assert_close(module.net.weight, shadow)
    torch.testing.assert_close(module.net.weight, weight)


def test_checkpoint_round_trip_continues_the_same_average(tmp_path):
    def run(ema, epochs, root, ckpt_path=None):
        torch.manual_seed(0)
        module = Tiny()
        t = trainer(tmp_path / root, [ema], checkpoint=True, max_steps=-1, max_epochs=epochs)
        t.fit(module, loader(), ckpt_path=ckpt_path)
        return t

    straight = EMA(decay=0.7)
    run(straight, 2, "straight")
    first = EMA(decay=0.7)
    ckpt = run(first, 1, "split").checkpoint_callback.best_model_path

    fresh = EMA(decay=0.7)
    fresh.load_state_dict(torch.load(ckpt, weights_only=False)["callbacks"][fresh.state_key])
    assert fresh.num_updates == first.num_updates == 3 and fresh.last_step == 3
    for k, v in first.shadow.items():
        torch.testing.assert_close(fresh.shadow[k], v)

    resumed = EMA(decay=0.7)
    run(resumed, 2, "split", ckpt_path=ckpt)
    assert resumed.num_updates == straight.num_updates == 6
    for k, v in straight.shadow.items():
        torch.testing.assert_close(resumed.shadow[k], v)


@pytest.mark.parametrize("wrapped_second_step", [False, True])
def test_manual_optimisation_updates_once_per_advance_of_global_step(tmp_path, wrapped_second_step):
    torch.manual_seed(0)
    module = TwoOptimizers(wrapped_second_step)
    initial = {k: v.detach().clone() for k, v in module.gen.named_parameters()}
    ema, snaps = EMA(decay=0.9, submodule="gen"), Snapshots("gen")
    trainer(tmp_path, [ema, snaps], max_steps=-1, max_epochs=1).fit(module, loader())
    # Lightning counts every wrapped optimizer's step in global_step: 2 per batch when both are wrapped.
    assert snaps.steps == ([2, 4, 6] if wrapped_second_step else [1, 2, 3])
    assert set(ema.shadow) == {"weight", "bias"} and ema.num_updates == 3
    expected, _ = reference_ema(initial, snaps, 0.9, every_n_steps=1)
    for k in expected:
        torch.testing.assert_close(ema.shadow[k], expected[k])


def test_hooks_without_a_trainer_loop_skip_batches_that_did_not_step():
    """Gradient accumulation: on_train_batch_end fires on every batch, the EMA only after optimizer steps."""
    module = torch.nn.Linear(2, 2)
    ema = EMA(decay=0.5)

    class FakeTrainer:
        global_step = 0

    t = FakeTrainer()
    ema.on_train_start(t, module)
    for step in (0, 1, 1, 2, 2):
        t.global_step = step
        ema.on_train_batch_end(t, module, None, None, 0)
    assert ema.num_updates == 2 and ema.last_step == 2
