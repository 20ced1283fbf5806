"""Sliding temporal windows: window placement, blend weights, the blended net_fn against nets whose windowed answer
is known, the sampler through it, and the per-window conditions."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from isa4d.diffusion.sampling import euler_sample, heun_sample
from isa4d.diffusion.schedules import sampling_timesteps
from isa4d.diffusion.windows import (RAMPS, blend_weights, sliding_window,
                                     window_starts)
from isa4d.models.dit import DiTConditions, ISADiT

C, F = 3, 4  # latent channels, video frames per latent frame


def plain(net):
    """A whole-sequence net(x, t) as a net_window that ignores where its window lies."""
    return lambda x, t, start, stop: net(x, t)


def framewise(x, t, start, stop):
    """A velocity computed frame by frame from x, t and the frame's absolute index (so misplaced windows show)."""
    index = torch.arange(start, stop, dtype=x.dtype)[:, None, None]  # (e − s, 1, 1)
    return torch.sin(x + index) * (1 + t[:, None, None, None, None]) - 0.1 * index * x


def random_conditions(B=2, P=2, T=7, V=5, h=4, w=6, seed=0, background=True) -> DiTConditions:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    b = lambda *s: torch.rand(*s, generator=g) > 0.3  # noqa: E731
    return DiTConditions(
        points_world=r(B, P, T, F, V, 3),
        points_ndc=r(B, P, T, V, 3),
        points_valid=b(B, P, T, V),
        person_mask=b(B, P),
        plucker=r(B, T, 6 * F, h, w),
        ref_latent=r(B, C, h, w),
        ref_points_ndc=r(B, P, V, 2),
        ref_points_valid=b(B, P, V),
        background=r(B, C, T, h, w) if background else None,
        ref_features=r(B, 3, 8),
    )


# ------------------------------------------------------------------------------------------------ placement

def test_window_starts_cover_overlap_and_spread_evenly():
    for length in range(1, 40):
        for window in range(1, 12):
            for overlap in range(window):
                starts = window_starts(length, window, overlap)
                stops = [min(s + window, length) for s in starts]
                case = (length, window, overlap, starts)
                assert starts[0] == 0 and stops[-1] == length, case
                if length <= window:
                    assert starts == [0], case
                    continue
                assert all(e - s == window for s, e in zip(starts, stops)), case  # every window full size
                assert stops[-1] == starts[-1] + window, case  # the last aligned to the end
                strides = [b - a for a, b in zip(starts[:-1], starts[1:])]
                assert min(strides) >= 1 and max(strides) <= window - overlap, case  # overlap >= `overlap`
                assert max(strides) - min(strides) <= 1, case  # evenly spread
                # the fewest windows: one fewer could not cover the length with that overlap
                assert (len(starts) - 2) * (window - overlap) + window < length, case


def test_window_starts_examples():
    assert window_starts(5, 8, 2) == [0]
    assert window_starts(8, 8, 2) == [0]
    assert window_starts(9, 8, 2) == [0, 1]
    assert window_starts(14, 8, 2) == [0, 6]
    assert window_starts(20, 8, 2) == [0, 6, 12]
    assert window_starts(21, 8, 2) == [0, 4, 8, 13]
    assert window_starts(4, 1, 0) == [0, 1, 2, 3]


@pytest.mark.parametrize("args, match", [
    ((10, 4, 4), "overlap"), ((10, 4, 5), "overlap"), ((10, 4, -1), "overlap"), ((10, 0, 0), "window"),
    ((10, -2, 0), "window"), ((0, 4, 1), "length"), ((3, 4, 4), "overlap"),
])
def test_window_starts_errors(args, match):
    with pytest.raises(ValueError, match=match):
        window_starts(*args)


# -------------------------------------------------------------------------------------------------- weights

@pytest.mark.parametrize("ramp", RAMPS)
def test_blend_weights_ramp_and_positive_sum(ramp):
    pairwise = 0
    for length, window, overlap in [(30, 8, 3), (31, 8, 1), (29, 7, 6), (40, 5, 4), (9, 8, 0), (6, 8, 2),
                                    (12, 4, 2), (50, 13, 4)]:  # 9, 8, 0: touching windows, no overlap
        starts = window_starts(length, window, overlap)
        w = blend_weights(length, window, starts, ramp)
        case = (length, window, overlap, starts)
        assert w.shape == (len(starts), length) and w.dtype == torch.float64, case
        assert (w.sum(0) > 0).all(), case
        assert w[0, 0] == 1 and w[-1, -1] == 1, case  # the sequence's own ends are not down-weighted
        two_way = all(c >= a + window for a, c in zip(starts[:-2], starts[2:]))  # at most 2 windows per frame
        pairwise += two_way
        for k, s in enumerate(starts):
            e = min(s + window, length)
            assert (w[k, :s] == 0).all() and (w[k, e:] == 0).all(), case
            assert (w[k, s:e] > 0).all() and (w[k, s:e] <= 1).all(), case
            if two_way and k + 1 < len(starts):  # strictly down across the overlap with the next, which ramps up
                nxt = starts[k + 1]
                assert (w[k, nxt:e].diff() < 0).all() and (w[k + 1, nxt:e].diff() > 0).all(), case
        if two_way:  # the weights alone are a partition of unity
            torch.testing.assert_close(w.sum(0), torch.ones(length, dtype=torch.float64))
    assert pairwise >= 5


def test_blend_weights_values():
    """Two windows of 6 frames overlapping by 3, by hand: linear quarters, cosine sin²(π·i/8)."""
    lin = blend_weights(9, 6, [0, 3], "linear")
    torch.testing.assert_close(lin, torch.tensor([[1, 1, 1, .75, .5, .25, 0, 0, 0],
                                                  [0, 0, 0, .25, .5, .75, 1, 1, 1]], dtype=torch.float64))
    cos = blend_weights(9, 6, [0, 3], "cosine")
    up = torch.sin(torch.pi / 8 * torch.arange(1, 4, dtype=torch.float64)) ** 2
    torch.testing.assert_close(cos[1, 3:6], up)
    torch.testing.assert_close(cos[0, 3:6], up.flip(0))
    assert cos[1, 3] < lin[1, 3]  # cosine gives a window's leading frame less weight
    assert torch.equal(blend_weights(5, 8, [0], "cosine"), torch.ones(1, 5, dtype=torch.float64))


@pytest.mark.parametrize("args, match", [
    ((10, 4, [0, 3, 6], "smooth"), "ramp"), ((10, 4, [1, 3, 6], "ramp"), "start at latent frame 0"),
    ((10, 4, [0, 5, 6], "linear"), "no frame is left out"), ((10, 4, [0, 3, 3, 6], "linear"), "increase"),
    ((10, 4, [0, 3], "linear"), "must end"), ((10, 4, [0, 3, 6, 10], "linear"), "must end"),
    ((10, 4, [], "linear"), "start at latent frame 0"), ((10, 0, [0], "linear"), ">= 1"),
])
def test_blend_weights_errors(args, match):
    length, window, starts, ramp = args
    with pytest.raises(ValueError, match=match):
        blend_weights(length, window, starts, "linear" if ramp == "ramp" else ramp)


# ------------------------------------------------------------------------------------------------- blending

def test_one_window_is_the_plain_net_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, C, 6, 4, 5, generator=g), torch.rand(2, generator=g)
    weight = torch.randn(C, C, generator=g)

    def net(x, t):  # mixes channels and frames, so nothing but the identical call reproduces it
        return torch.einsum("dc,bcthw->bdthw", weight, x).cumsum(2) * t[:, None, None, None, None]

    for window in (6, 9):
        net_fn = sliding_window(plain(net), 6, window, 2)
        assert torch.equal(net_fn(x, t), net(x, t))
        timesteps = sampling_timesteps(5, shift=3.0)
        for sample in (euler_sample, heun_sample):
            assert torch.equal(sample(net_fn, x, timesteps), sample(net, x, timesteps))


@pytest.mark.parametrize("ramp", RAMPS)
@pytest.mark.parametrize("length, window, overlap", [(20, 6, 2), (21, 8, 5), (13, 4, 1), (17, 5, 0)])
def test_identical_window_predictions_blend_to_themselves(length, window, overlap, ramp):
    """Windows that agree on their shared frames give back that prediction: the weights are a partition of unity."""
    v = torch.randn(2, C, length, 3, 4, generator=torch.Generator().manual_seed(0))
    net_fn = sliding_window(lambda x, t, s, e: v[:, :, s:e], length, window, overlap, ramp)
    torch.testing.assert_close(net_fn(torch.zeros_like(v), torch.rand(2)), v, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ramp", RAMPS)
def test_framewise_net_is_unchanged_by_windows(ramp):
    """A net that acts on each frame alone gives the same velocity, and the same samples, windowed or not."""
    g = torch.Generator().manual_seed(0)
    length = 23
    x, t = torch.randn(2, C, length, 3, 4, generator=g), torch.rand(2, generator=g)
    whole = framewise(x, t, 0, length)
    timesteps = sampling_timesteps(6)
    for window, overlap in [(5, 2), (8, 3), (4, 0), (7, 6)]:
        net_fn = sliding_window(framewise, length, window, overlap, ramp)
        torch.testing.assert_close(net_fn(x, t), whole, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(euler_sample(net_fn, x, timesteps),
                                   euler_sample(lambda x, t: framewise(x, t, 0, length), x, timesteps),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ramp", RAMPS)
def test_window_constants_blend_without_a_seam(ramp):
    """Each window predicts its own constant (its start): the blend keeps each constant where one window covers a
    frame and ramps monotonically across each overlap, never jumping by a whole step between windows."""
    length, window, overlap = 30, 8, 3
    starts = window_starts(length, window, overlap)
    net_fn = sliding_window(lambda x, t, s, e: torch.full_like(x, float(s)), length, window, overlap, ramp)
    v = net_fn(torch.zeros(1, 1, length, 1, 1), torch.ones(1))[0, 0, :, 0, 0].double()  # (T,)
    for k, s in enumerate(starts):
        lo = starts[k - 1] + window if k > 0 else 0
        hi = starts[k + 1] if k + 1 < len(starts) else length
        assert (v[lo:hi] == s).all()  # frames of one window only
        if k + 1 < len(starts):
            nxt = starts[k + 1]
            ramp_part = v[nxt - 1:s + window + 1]  # the overlap with one frame of each side
            assert (ramp_part.diff() > 0).all()
            assert ramp_part.diff().max() < nxt - s  # a hard switch would jump by the whole difference
    assert (v.diff() >= 0).all()


def test_blend_is_the_weighted_mean_of_window_predictions():
    """Against a by-hand blend: the windows' own noise-like predictions, weighted and normalised per frame."""
    length, window, overlap = 15, 6, 2
    starts = window_starts(length, window, overlap)
    g = torch.Generator().manual_seed(0)
    preds = {s: torch.randn(1, 2, window, 2, 2, generator=g) for s in starts}
    w = blend_weights(length, window, starts, "linear").float()
    expect = torch.zeros(1, 2, length, 2, 2)
    for k, s in enumerate(starts):
        expect[:, :, s:s + window] += w[k, s:s + window, None, None] * preds[s]
    expect /= w.sum(0)[:, None, None]
    got = sliding_window(lambda x, t, s, e: preds[s], length, window, overlap, "linear")(
        torch.zeros(1, 2, length, 2, 2), torch.ones(1))
    torch.testing.assert_close(got, expect)


def test_blend_keeps_the_velocity_dtype():
    net_fn = sliding_window(lambda x, t, s, e: x * (s + 1), 10, 4, 1)
    x = torch.randn(1, 2, 10, 2, 2).to(torch.bfloat16)
    assert net_fn(x, torch.ones(1)).dtype == torch.bfloat16


def test_sliding_window_errors():
    net_fn = sliding_window(lambda x, t, s, e: x, 10, 4, 1)
    with pytest.raises(ValueError, match="built for 10 latent frames"):
        net_fn(torch.zeros(1, 2, 9, 2, 2), torch.ones(1))
    bad = sliding_window(lambda x, t, s, e: x[:, :, :-1], 10, 4, 1)
    with pytest.raises(ValueError, match="net_window returned"):
        bad(torch.zeros(1, 2, 10, 2, 2), torch.ones(1))
    with pytest.raises(ValueError, match="overlap"):
        sliding_window(lambda x, t, s, e: x, 10, 4, 4)
    with pytest.raises(ValueError, match="ramp"):
        sliding_window(lambda x, t, s, e: x, 10, 4, 1, ramp="hann")


# ----------------------------------------------------------------------------------------------- conditions

@pytest.mark.parametrize("background", [True, False])
def test_slice_conditions_matches_manual_slicing(background):
    cond = random_conditions(background=background)
    part = cond.slice(2, 5)
    assert torch.equal(part.points_world, cond.points_world[:, :, 2:5])
    assert torch.equal(part.points_ndc, cond.points_ndc[:, :, 2:5])
    assert torch.equal(part.points_valid, cond.points_valid[:, :, 2:5])
    assert torch.equal(part.plucker, cond.plucker[:, 2:5])
    if background:
        assert torch.equal(part.background, cond.background[:, :, 2:5])
    else:
        assert part.background is None
    for name in ("person_mask", "ref_latent", "ref_points_ndc", "ref_points_valid", "ref_features"):
        assert getattr(part, name) is getattr(cond, name)
    assert torch.equal(cond.slice(0, 7).plucker, cond.plucker)
    assert cond.slice(6, 7).points_world.shape[2] == 1


def test_every_field_declares_its_time_axis():
    """Each field's declared latent-time axis holds T, and slicing keeps exactly the fields without one whole."""
    T = 7
    cond = random_conditions(T=T)
    part = cond.slice(1, 3)
    for name, meta in DiTConditions.spec().items():
        value = getattr(cond, name)
        if value is None:
            continue
        if meta.time_axis is None:
            assert getattr(part, name) is value, name
        else:
            assert value.shape[meta.time_axis] == T and getattr(part, name).shape[meta.time_axis] == 2, name


def test_slice_conditions_errors():
    cond = random_conditions(T=7)
    for start, stop in [(3, 3), (5, 2), (-1, 3), (0, 8)]:
        with pytest.raises(ValueError, match="not a non-empty range"):
            cond.slice(start, stop)
    with pytest.raises(ValueError, match="plucker has 6 latent frames"):
        dataclasses.replace(cond, plucker=cond.plucker[:, :6]).slice(0, 3)


def test_isadit_through_windows():
    """The tiny ISA-DiT on sliced conditions: one window is the plain network; with several, a frame that only one
    window covers gets exactly that window's velocity."""
    torch.manual_seed(0)
    net = ISADiT(latent_channels=C, hidden_size=32, depth=1, num_heads=2, patch_size=1, mlp_ratio=2.0,
                 frames_per_latent=F, num_points=5, max_people=2, point_freqs=3, ispe_freqs=3).eval()
    with torch.no_grad():  # adaLN-zero starts every block as the identity with a zero output: open the gates
        for m in net.modules():
            if hasattr(m, "adaLN_modulation"):
                m.adaLN_modulation[-1].weight.normal_(0, 0.05)
                m.adaLN_modulation[-1].bias.normal_(0, 0.3)
        net.final_layer.linear.weight.normal_(0, 0.1)
    T = 7
    cond = random_conditions(T=T, h=4, w=4)
    cond = dataclasses.replace(cond, ref_features=None)
    x, t = torch.randn(2, C, T, 4, 4), torch.rand(2)

    def net_window(x, t, start, stop):
        return net(x, t, cond=cond.slice(start, stop))

    with torch.no_grad():
        assert torch.equal(sliding_window(net_window, T, 8, 2)(x, t), net(x, t, cond=cond))
        v = sliding_window(net_window, T, 4, 1)(x, t)  # windows [0, 4) and [3, 7)
        torch.testing.assert_close(v[:, :, :3], net_window(x[:, :, :4], t, 0, 4)[:, :, :3], rtol=0, atol=0)
        torch.testing.assert_close(v[:, :, 4:], net_window(x[:, :, 3:], t, 3, 7)[:, :, 1:], rtol=0, atol=0)
        assert not torch.allclose(v, net(x, t, cond=cond))  # the network mixes frames: windows do differ
