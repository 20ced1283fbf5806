"""Throughput logging: FLOPs of the DiT's real step counted on the meta device, and the callback's rates."""

from __future__ import annotations

import time

import pytest
import torch

from isa4d.training.throughput import Throughput


class _Module:
    def __init__(self):
        self.step_counts, self.logged, self.device = None, [], torch.device("cpu")

    def log_dict(self, metrics, **kw):
        self.logged.append(metrics)


class _Trainer:
    log_every_n_steps, global_step = 2, 0


def test_throughput_rates_and_data_wait():
    """Steps of 20 ms compute after 10 ms waits for data: 2 steps per window, rates over the timed steps only."""
    cb, module, trainer = Throughput(peak_tflops=1.0), _Module(), _Trainer()
    cb.on_train_start(trainer, module)
    for step in range(1, 6):
        time.sleep(0.01)  # the loader
        cb.on_train_batch_start(trainer, module, None, 0)
        module.step_counts = {"samples": 4, "tokens": 100, "flops": 2e10}
        time.sleep(0.02)  # the step
        trainer.global_step = step
        cb.on_train_batch_end(trainer, module, None, None, 0)
    assert len(module.logged) == 2  # at steps 2 and 4 (step 1 only starts the clock)
    m = module.logged[-1]
    assert m["perf/steps_per_s"] == pytest.approx(1 / 0.03, rel=0.3)
    assert m["perf/samples_per_s"] == pytest.approx(4 * m["perf/steps_per_s"])
    assert m["perf/tokens_per_s"] == pytest.approx(100 * m["perf/steps_per_s"])
    assert m["perf/tflops"] == pytest.approx(0.02 * m["perf/steps_per_s"])
    assert m["perf/mfu"] == pytest.approx(m["perf/tflops"])
    assert m["perf/data_wait_fraction"] == pytest.approx(1 / 3, abs=0.12)


def test_checkpoint_saves_and_validation_are_neither_steps_nor_data_wait():
    """A 0.2 s save (or validation) between steps of 20 ms with no loader wait leaves rates and the wait untouched."""
    cb, module, trainer = Throughput(peak_tflops=1.0), _Module(), _Trainer()
    cb.on_train_start(trainer, module)
    for step in range(1, 6):
        cb.on_train_batch_start(trainer, module, None, 0)
        module.step_counts = {"samples": 4, "tokens": 100, "flops": 2e10}
        time.sleep(0.02)
        trainer.global_step = step
        cb.on_train_batch_end(trainer, module, None, None, 0)
        if step in (2, 3):
            (cb.on_save_checkpoint(trainer, module, {}) if step == 2 else cb.on_validation_start(trainer, module))
            time.sleep(0.2)
    m = module.logged[-1]  # the window of steps 3 and 4, after both pauses
    assert m["perf/steps_per_s"] == pytest.approx(1 / 0.02, rel=0.3)
    assert m["perf/data_wait_fraction"] < 0.1


def test_dit_step_flops_match_a_count_of_the_real_network(tiny_vae_checkpoint, toy_body_dir):
    """DiTModule.step_flops (a meta-device copy built from the network's config) equals FlopCounterMode around the
    real network's forward + backward on CPU (attention through the math kernel, whose matmuls it counts)."""
    from test_dit_model import random_conditions, replace
    from test_dit_module import tiny_module
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    module = tiny_module(tiny_vae_checkpoint, toy_body_dir)
    cond = replace(random_conditions(V=32), ref_latent=torch.randn(2, 16, 4, 4), background=torch.randn(2, 16, 2, 4, 4))
    x0 = torch.randn(2, 16, 2, 4, 4)
    counted = module.step_flops(x0, cond)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        module.objective.loss(module.network, x0, {"cond": cond})[0].backward()
    assert counted > 0 and counted == pytest.approx(counter.get_total_flops(), rel=1e-6)
    assert module.step_flops(x0, cond) == counted  # cached per shape
    one = replace(random_conditions(B=1, V=32), ref_latent=torch.randn(1, 16, 4, 4),
                  background=torch.randn(1, 16, 2, 4, 4))
    assert module.step_flops(x0[:1], one) == pytest.approx(counted / 2, rel=0.05)  # another shape: half the clips
