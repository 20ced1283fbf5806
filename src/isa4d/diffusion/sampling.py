"""Sampling for rectified flow: classifier-free guidance and the plain Euler ODE loop (flux's `denoise`).

Guidance follows Ho & Salimans 2022 on the velocity; the multi-condition form is the compositional sum of
Liu et al. 2022 ("Compositional Visual Generation with Composable Diffusion Models"), which lets the reference
image and the pose carry separate scales (paper silent; PAPER.md §5.1 [INF]).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch


def guidance(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """v_uncond + scale·(v_cond − v_uncond): scale 1 is the conditional model, 0 the unconditional one."""
    return v_uncond + scale * (v_cond - v_uncond)


def guidance_multi(v_uncond: torch.Tensor, v_conds: Sequence[torch.Tensor],
                   scales: Sequence[float]) -> torch.Tensor:
    """Compositional guidance v_uncond + Σ_i s_i·(v_i − v_uncond); one condition reduces to `guidance`.

    Each v_i is the prediction with condition i alone (or a nested set of conditions, as in InstructPix2Pix);
    summing the differences treats the conditions as independent factors of the conditional density.
    """
    if len(v_conds) != len(scales):
        raise ValueError(f"got {len(v_conds)} conditional predictions but {len(scales)} scales")
    out = v_uncond
    for v, s in zip(v_conds, scales):
        out = out + s * (v - v_uncond)
    return out


@torch.no_grad()
def euler_sample(net_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                 timesteps: torch.Tensor,
                 callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Integrate the flow ODE from t = timesteps[0] (1, noise) to timesteps[-1] (0, data) with Euler steps.

    Derivation: x_t = (1 − t)·x0 + t·ε gives dx_t/dt = ε − x0 = −v, with v = x0 − ε what the network predicts.
    An Euler step from t to t_next is x_{t_next} = x_t + (t_next − t)·(−v) = x_t + (t − t_next)·v; since t
    decreases, each step moves along +v, toward the data. The paths are straight, so an exact v gives the exact
    x0 in any number of steps.

    `net_fn(x, t)` takes t of shape (B,) and wraps conditioning and guidance; `callback(i, t_next, x)` sees each
    step's result.
    """
    x = noise
    for i, (t_cur, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        v = net_fn(x, t_cur.expand(x.shape[0]).to(x.device))  # t: (B,)
        x = x + (t_cur - t_next).to(x.dtype) * v
        if callback is not None:
            callback(i, t_next, x)
    return x


@torch.no_grad()
def heun_sample(net_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                timesteps: torch.Tensor,
                callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Heun's second-order method on the same ODE (Karras et al. 2022, Alg. 1): an Euler predictor, then the
    average of the velocities at both ends; the last step to t = 0 is plain Euler. Two network calls per step."""
    x = noise
    for i, (t_cur, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        dt = (t_cur - t_next).to(x.dtype)
        v = net_fn(x, t_cur.expand(x.shape[0]).to(x.device))
        x_pred = x + dt * v
        if t_next > 0:
            v_next = net_fn(x_pred, t_next.expand(x.shape[0]).to(x.device))
            x = x + dt * 0.5 * (v + v_next)
        else:
            x = x_pred
        if callback is not None:
            callback(i, t_next, x)
    return x


SAMPLERS = {"euler": euler_sample, "heun": heun_sample}


def condition_guidance(net: Callable[..., torch.Tensor], scales: Mapping[str, float],
                       **kwargs) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`net_fn(x, t)` for the samplers with one guidance scale per condition (paper silent; PAPER.md §5.1 [INF]).

    `net(x, t, force_drop=..., **kwargs)` must accept `force_drop`, a map from condition names to True (dropped).
    With guided conditions S = scales.keys(), the unconditional prediction drops all of S and prediction i keeps
    only condition i of S (conditions outside S are always kept); they combine by `guidance_multi`. No scales:
    the plain conditional prediction. One condition at scale 1 equals the conditional prediction exactly.
    """
    names = list(scales)

    def net_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not names:
            return net(x, t, **kwargs)
        v_uncond = net(x, t, force_drop={n: True for n in names}, **kwargs)
        v_conds = [net(x, t, force_drop={m: True for m in names if m != n}, **kwargs) for n in names]
        return guidance_multi(v_uncond, v_conds, [scales[n] for n in names])

    return net_fn
