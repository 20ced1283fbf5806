"""Timestep schedules for rectified flow: pure functions of t or of a generator.

Training draws t from a logit-normal (Esser et al. 2024, SD3, §3.1: it puts more weight on the middle of the path,
where the velocity is hardest to predict) or from a uniform. Both training and sampling can apply SD3's time
shift (Esser et al. 2024, §5.3.2): more tokens carry more redundant signal, so the same noise level destroys less
information and t must be pushed toward the noise end (t = 1) to keep the signal-to-noise ratio comparable.
Convention: t = 0 is data, t = 1 is noise.
"""

from __future__ import annotations

import math

import torch


def logit_normal(n: int, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """(n,) samples of sigmoid(N(mean, std²)) in (0, 1); the median is sigmoid(mean) (SD3's lognorm(m, s))."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))  # (n,)


def uniform(n: int, generator: torch.Generator | None = None,
            device: torch.device | str | None = None) -> torch.Tensor:
    """(n,) samples of U(0, 1): the plain rectified-flow sampler (Liu et al. 2022)."""
    return torch.rand(n, generator=generator, device=device)  # (n,)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's shift t' = shift·t / (1 + (shift − 1)·t): monotone, fixes 0 and 1, shift > 1 moves t toward noise.

    It is the map that scales the signal-to-noise ratio of x_t by 1/shift² (Esser et al. 2024, eq. 23).
    """
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def shift_for_tokens(num_tokens: int, base_tokens: int = 256, base_shift: float = 1.0,
                     max_shift: float | None = 3.0) -> float:
    """SD3's square-root rule: shift = base_shift·sqrt(num_tokens / base_tokens), capped at `max_shift`.

    Why sqrt: an x_t of n tokens averaged over k times as many tokens has its effective SNR scaled by k, and the
    shift scales SNR by 1/shift², so shift = sqrt(k) keeps them matched (Esser et al. 2024, §5.3.2; their base is
    256 tokens, a 256² image). SD3 ships shift 3.0 for 4096 tokens (1024²) rather than the rule's 4.0, chosen by
    human preference; `max_shift=3.0` keeps that cap (pass None to disable it). For video, count all t·h·w tokens.
    """
    if num_tokens <= 0 or base_tokens <= 0:
        raise ValueError(f"token counts must be positive, got {num_tokens} and {base_tokens}")
    shift = base_shift * math.sqrt(num_tokens / base_tokens)
    return shift if max_shift is None else min(shift, max_shift)


def sampling_timesteps(num_steps: int, shift: float = 1.0,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """(num_steps + 1,) times from 1 (noise) down to 0 (data): a uniform grid passed through `shift_time`."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return shift_time(torch.linspace(1.0, 0.0, num_steps + 1, device=device), shift)  # (num_steps + 1,)
