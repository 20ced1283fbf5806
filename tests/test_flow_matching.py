"""Rectified flow: interpolation, schedules, Euler exactness, guidance, and a tiny learnable 2-D check."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from isa4d.diffusion.flow import FlowMatching, interpolate, velocity_target
from isa4d.diffusion.sampling import euler_sample, guidance, guidance_multi
from isa4d.diffusion.schedules import (logit_normal, sampling_timesteps, shift_for_tokens, shift_time,
                                       uniform)


def test_interpolate_endpoints_broadcast_and_target():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    assert torch.equal(interpolate(x0, eps, torch.zeros(3)), x0)
    assert torch.equal(interpolate(x0, eps, torch.ones(3)), eps)
    t = torch.tensor([0.0, 0.25, 1.0])
    x_t = interpolate(x0, eps, t)
    assert x_t.shape == x0.shape
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * eps[1])
    torch.testing.assert_close(velocity_target(x0, eps), x0 - eps)


def test_logit_normal_and_uniform():
    g = torch.Generator().manual_seed(0)
    t = logit_normal(20000, mean=0.5, std=1.0, generator=g)
    assert t.shape == (20000,) and (t > 0).all() and (t < 1).all()
    assert abs(t.median().item() - 1 / (1 + math.exp(-0.5))) < 0.02
    u = uniform(1000, generator=g)
    assert (u >= 0).all() and (u < 1).all()
    # Same generator state, same draw: the samplers are pure functions of the generator.
    assert torch.equal(logit_normal(8, generator=torch.Generator().manual_seed(1)),
                       logit_normal(8, generator=torch.Generator().manual_seed(1)))


def test_shift_time():
    t = torch.linspace(0, 1, 101)
    for shift in (0.5, 1.0, 3.0):
        s = shift_time(t, shift)
        assert (s[1:] > s[:-1]).all()
        assert s[0].item() == 0.0 and s[-1].item() == pytest.approx(1.0)
    torch.testing.assert_close(shift_time(t, 1.0), t)
    assert (shift_time(t[1:-1], 3.0) > t[1:-1]).all()  # toward noise
    g = torch.Generator().manual_seed(0)
    assert shift_time(logit_normal(5000, generator=g), 3.0).mean() > 0.6
    with pytest.raises(ValueError):
        shift_time(t, 0.0)


def test_shift_for_tokens_sqrt_rule():
    assert shift_for_tokens(256) == pytest.approx(1.0)
    assert shift_for_tokens(1024) == pytest.approx(2.0)
    assert shift_for_tokens(4096) == pytest.approx(3.0)  # capped at SD3's shipped value
    assert shift_for_tokens(4096, max_shift=None) == pytest.approx(4.0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sampling_timesteps(shift):
    ts = sampling_timesteps(10, shift=shift)
    assert ts.shape == (11,)
    assert ts[0].item() == pytest.approx(1.0) and ts[-1].item() == 0.0
    assert (ts[1:] < ts[:-1]).all()


@pytest.mark.parametrize("num_steps", [1, 3, 17])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_is_exact_for_an_oracle(num_steps, shift):
    """Straight paths: a network that knows x0 sends noise to x0 in any number of Euler steps."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 2, 3, 5, generator=g), torch.randn(4, 2, 3, 5, generator=g)

    def oracle(x_t, t):
        tb = t.reshape(-1, 1, 1, 1)
        eps_est = (x_t - (1 - tb) * x0) / tb
        return x0 - eps_est

    seen = []
    out = euler_sample(oracle, eps, sampling_timesteps(num_steps, shift), callback=lambda i, t, x: seen.append(i))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    assert seen == list(range(num_steps))


def test_guidance():
    g = torch.Generator().manual_seed(0)
    vc, vu, v2 = (torch.randn(2, 3, generator=g) for _ in range(3))
    torch.testing.assert_close(guidance(vc, vu, 1.0), vc)
    torch.testing.assert_close(guidance(vc, vu, 0.0), vu)
    torch.testing.assert_close(guidance_multi(vu, [vc], [4.5]), guidance(vc, vu, 4.5))
    torch.testing.assert_close(guidance_multi(vu, [vc, v2], [2.0, 3.0]), vu + 2 * (vc - vu) + 3 * (v2 - vu))
    with pytest.raises(ValueError):
        guidance_multi(vu, [vc, v2], [1.0])


def test_loss_mask_weight_and_logs():
    x0 = torch.randn(3, 4)
    net = lambda x_t, t, offset: torch.zeros_like(x_t) + offset  # noqa: E731
    fm = FlowMatching(time_sampler="uniform")
    loss, logs = fm.loss(net, x0, {"offset": 0.0}, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    t = torch.rand(3, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    torch.testing.assert_close(logs["t"], t)
    torch.testing.assert_close(loss, ((x0 - eps) ** 2).mean())
    mask = torch.tensor([[1.0], [0.0], [1.0]])
    weight = torch.tensor([2.0, 5.0, 1.0])
    loss_m, _ = fm.loss(net, x0, {"offset": 0.0}, generator=torch.Generator().manual_seed(0), weight=weight,
                        mask=mask)
    err = (x0 - eps) ** 2
    torch.testing.assert_close(loss_m, (2 * err[0].sum() + err[2].sum()) / 8)
    with pytest.raises(ValueError):
        FlowMatching(time_sampler="cosine")


class _ToyMLP(nn.Module):
    def __init__(self, width: int = 128):
        super().__init__()
        self.freqs = torch.arange(1, 9, dtype=torch.float32) * math.pi
        self.net = nn.Sequential(nn.Linear(2 + 16, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 2))

    def forward(self, x_t, t):
        tf = t[:, None] * self.freqs  # (b, 8)
        return self.net(torch.cat([x_t, tf.sin(), tf.cos()], dim=-1))  # (b, 2)


def test_flow_matching_learns_two_blobs():
    torch.manual_seed(0)
    centres = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])
    g = torch.Generator().manual_seed(0)

    def data(n):
        return centres[torch.randint(0, 2, (n,), generator=g)] + 0.1 * torch.randn(n, 2, generator=g)

    net, fm = _ToyMLP(), FlowMatching()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        loss, _ = fm.loss(net, data(256), {}, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-30:]) / 30 < 0.6 * sum(losses[:30]) / 30

    net.eval()
    samples = euler_sample(net, torch.randn(1000, 2, generator=g), sampling_timesteps(20))
    assert samples.mean(0).sub(centres.mean(0)).abs().max() < 0.4
    near = torch.cdist(samples, centres).min(dim=1).values < 0.5
    assert near.float().mean() > 0.8
