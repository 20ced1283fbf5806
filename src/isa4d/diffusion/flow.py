"""Flow-matching objective for rectified flow (paper §5.1; Liu et al. 2022; Esser et al. 2024, SD3).

The path is the straight line x_t = (1 − t)·x0 + t·ε between data (t = 0) and Gaussian noise (t = 1); the network
regresses the constant velocity target v = x0 − ε, as the paper writes it. The objective only sees a callable
`net(x_t, t, **cond) -> v`, so any network (DiT, a toy MLP) plugs in unchanged (lucidrains' `NanoFlow` pattern).
"""

from __future__ import annotations

from typing import Callable

import torch

from isa4d.diffusion.schedules import logit_normal, shift_time, uniform

TIME_SAMPLERS = ("logit_normal", "uniform")


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) so a per-sample scalar broadcasts over the other dims of `like`."""
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1))).to(like.dtype)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − t)·x0 + t·ε, t of shape (B,) broadcast over the remaining dims of x0."""
    t = _expand(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = x0 − ε, the paper's target; note dx_t/dt = ε − x0 = −v."""
    return x0 - noise


class FlowMatching:
    """Draws t and ε, builds x_t and returns the MSE between `net(x_t, t, **cond)` and x0 − ε.

    `time_sampler` is SD3's logit-normal (default, m = 0, s = 1; paper silent, PAPER.md §5.1 [INF]) or uniform;
    `shift` applies SD3's time shift to the drawn t so training matches a shifted sampling grid.
    """

    def __init__(self, time_sampler: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                 shift: float = 1.0):
        if time_sampler not in TIME_SAMPLERS:
            raise ValueError(f"time_sampler must be one of {TIME_SAMPLERS}, got {time_sampler!r}")
        if logit_std <= 0:
            raise ValueError(f"logit_std must be positive, got {logit_std}")
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self.time_sampler = time_sampler
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.shift = shift

    def sample_t(self, n: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, shift: float | None = None) -> torch.Tensor:
        """(n,) training times in (0, 1), shifted by `shift` (default: the objective's own)."""
        if self.time_sampler == "logit_normal":
            t = logit_normal(n, self.logit_mean, self.logit_std, generator=generator, device=device)
        else:
            t = uniform(n, generator=generator, device=device)
        return shift_time(t, self.shift if shift is None else shift)  # (n,)

    def loss(self, net: Callable[..., torch.Tensor], x0: torch.Tensor, cond: dict | None = None,
             generator: torch.Generator | None = None, weight: torch.Tensor | None = None,
             mask: torch.Tensor | None = None, shift: float | None = None,
             t: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss and logs {"loss", "t"}.

        `shift` overrides the objective's time shift for this batch (resolution-dependent shifts); `t` (B,) fixes
        the times instead of drawing them (deterministic validation losses).

        `weight` (B,) scales each sample's squared error; `mask` (broadcastable to x0, 1 = keep) selects elements.
        The sum is divided by the number of kept elements (not by the weights), so per-sample weights act as loss
        weights rather than being normalised away; with neither given this is the plain mean over all elements.
        """
        b = x0.shape[0]
        if t is None:
            t = self.sample_t(b, generator=generator, device=x0.device, shift=shift)  # (B,)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = interpolate(x0, noise, t)
        v = net(x_t, t, **(cond or {}))
        err = (v.float() - velocity_target(x0, noise).float()) ** 2  # (B, ...)
        if weight is not None:
            err = err * _expand(weight, err)
        if mask is None:
            loss = err.mean()
        else:
            mask = mask.to(err.dtype).expand_as(err)
            loss = (err * mask).sum() / mask.sum().clamp_min(1.0)
        return loss, {"loss": loss.detach(), "t": t.detach()}
