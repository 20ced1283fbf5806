"""Fast inference paths of the causal video VAE: the per-frame GroupNorm on channels-last videos (a view, no
copies), the whole VAE in channels_last_3d, and compiled chunked coding (`CausalVideoVAE.compile_blocks`, bench_vae --compile), each equal to the
plain path."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from isa4d.models.vae import CausalVideoVAE
from isa4d.models.vae import blocks
from isa4d.models.vae.blocks import FrameGroupNorm, depth_to_time, frame_norm, upsample_space
from test_vae_model import TINY, _one_thread  # noqa: F401 (the tiny preset; one CPU thread, an autouse fixture)

CL3 = torch.channels_last_3d


def make_vae(**overrides) -> CausalVideoVAE:
    torch.manual_seed(0)
    return CausalVideoVAE(**{**TINY, **overrides}).eval()


def video(t: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, t, size, size, generator=g) * 2 - 1


def channels_last(vae: CausalVideoVAE) -> list[torch.Tensor]:
    """vae's coder in channels_last_3d, with every conv's output kept channels_last_3d as cuDNN's is (CPU conv3d
    returns the standard layout whatever its operands): the blocks then see channels-last activations as on the
    GPU. Returns the list the inputs of every FrameGroupNorm are recorded into."""
    vae.encoder.to(memory_format=CL3)
    vae.decoder.to(memory_format=CL3)
    for conv in (m for m in vae.modules() if isinstance(m, nn.Conv3d)):
        conv.register_forward_hook(lambda m, args, out: out.contiguous(memory_format=CL3))
    seen = []
    for norm in (m for m in vae.modules() if isinstance(m, FrameGroupNorm)):
        norm.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    return seen


# ------------------------------------------------------------------------------------------- FrameGroupNorm


def _norm_run(norm: FrameGroupNorm, x: torch.Tensor) -> list[torch.Tensor]:
    """Output and the gradients w.r.t. x, weight and bias."""
    x = x.detach().requires_grad_(True)
    norm.zero_grad(set_to_none=True)
    out = norm(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return [out.detach(), x.grad, norm.weight.grad, norm.bias.grad]


@pytest.mark.parametrize("b, t", [(1, 1), (1, 5), (2, 3)])
def test_frame_norm_channels_last_is_a_view_and_equals_standard(monkeypatch, b, t):
    torch.manual_seed(0)
    norm = frame_norm(16, 4).double()
    with torch.no_grad():  # non-trivial affine, so its gradients are non-trivial too
        norm.weight.copy_(1 + 0.3 * torch.randn(16))
        norm.bias.copy_(0.3 * torch.randn(16))
    x = torch.randn(b, 16, t, 6, 5, dtype=torch.float64) * 2 + 1
    calls, inner = [], blocks.group_norm_fp32_stats

    def spy(frames, module):
        calls.append((frames, inner(frames, module)))
        return calls[-1][1]
    monkeypatch.setattr(blocks, "group_norm_fp32_stats", spy)

    plain = _norm_run(norm, x)
    x_cl = x.contiguous(memory_format=CL3)
    fast = _norm_run(norm, x_cl)
    frames, normed = calls[-1]
    # The channels-last path: the frames are x's memory, and the output is the norm's, both channels-last.
    assert frames.shape == (b * t, 16, 6, 5) and frames.data_ptr() == x_cl.data_ptr()
    assert frames.is_contiguous(memory_format=torch.channels_last) and not frames.is_contiguous()
    assert fast[0].is_contiguous(memory_format=CL3) and fast[0].data_ptr() == normed.data_ptr()
    assert fast[1].is_contiguous(memory_format=CL3)  # the input gradient too
    for a, e in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_frame_norm_time_slice_of_channels_last_batch():
    """A time slice of a channels-last batch (b > 1) is not contiguous: one copy, then the channels-last path."""
    norm = frame_norm(16, 4).double()
    x = torch.randn(2, 16, 5, 6, 5, dtype=torch.float64)
    sliced = x.contiguous(memory_format=CL3)[:, :, 1:]
    out = norm(sliced)
    assert out.is_contiguous(memory_format=CL3)
    torch.testing.assert_close(out, norm(x[:, :, 1:].contiguous()), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t", [1, 3])
def test_upsampling_keeps_channels_last(t):
    """upsample_space and depth_to_time give the standard path's values in channels_last_3d (at t = 1 too, where
    a reshape could return a mere view)."""
    x = torch.randn(2, 8, t, 4, 5)
    x_cl = x.contiguous(memory_format=CL3)
    up = upsample_space(x_cl)
    assert up.is_contiguous(memory_format=CL3) and torch.equal(up, upsample_space(x))
    for starts_clip in (False, True):
        d2t = depth_to_time(x_cl, 2, starts_clip)  # (2, 4, 2 t (- 1), 4, 5)
        ref = depth_to_time(x, 2, starts_clip)
        assert torch.equal(d2t, ref)
        assert d2t.stride(1) == 1 and (starts_clip or d2t.is_contiguous(memory_format=CL3))


# ------------------------------------------------------------------------------------------ channels_last_3d


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("upsampler", ["inflated", "factorized"])
def test_vae_channels_last_equals_standard(upsampler, dtype, tol):
    """Equal up to rounding (the convs sum in another order): about 5e-6 in fp32 on outputs of about 2."""
    vae = make_vae(upsampler=upsampler).to(dtype)
    fast = make_vae(upsampler=upsampler).to(dtype)
    seen = channels_last(fast)
    x = video(9).to(dtype)
    with torch.no_grad():
        m = vae.encode(x).mean
        m_cl = fast.encode(x.contiguous(memory_format=CL3)).mean
        torch.testing.assert_close(m_cl, m, rtol=tol, atol=tol)
        z = m.to(dtype)  # the posterior is fp32
        y = vae.decode(z, chunk_frames=4)
        y_cl = fast.decode(z.contiguous(memory_format=CL3), chunk_frames=4)
    torch.testing.assert_close(y_cl, y, rtol=tol, atol=tol)
    assert y_cl.is_contiguous(memory_format=CL3)
    assert seen and all(h.stride(1) == 1 for h in seen)  # every norm took the channels-last path


# ----------------------------------------------------------------------------------------------- compiled


@pytest.fixture
def dynamo_state():
    """A clean Dynamo, and its config (changed by compile_blocks) and caches restored after the test."""
    config = torch._dynamo.config
    keys = ("cache_size_limit", "accumulated_cache_size_limit", "fail_on_cache_limit_hit")
    torch._dynamo.reset()
    with config.patch({k: getattr(config, k) for k in keys if hasattr(config, k)}):
        yield
    torch._dynamo.reset()


def _compiled_equals_eager(backend: str, upsampler: str, encode: bool, cl: bool = False) -> None:
    vae = make_vae(upsampler=upsampler)
    fmt = CL3 if cl else torch.contiguous_format
    if cl:
        channels_last(vae)
    x = video(9).contiguous(memory_format=fmt)
    with torch.no_grad():
        z = vae.encode(x, chunk_frames=4).mode()
        y = vae.decode(z, chunk_frames=4)
        # The last latent frames decoded without the first (no cached past) give other frames: the equality below
        # needs the caches traced.
        assert (vae.decode(z[:, :, 1:])[:, :, -4:] - y[:, :, -4:]).abs().max() > 1e-3
        assert vae.compile_blocks(backend) == 24  # encoder: 4 + 3 + 3, decoder: 8 + 3 + 3
        for _ in range(2):  # compiling, then the cached graphs
            torch.testing.assert_close(vae.decode(z, chunk_frames=4), y, rtol=1e-5, atol=1e-5)
            if encode:
                torch.testing.assert_close(vae.encode(x, chunk_frames=4).mode(), z, rtol=1e-5, atol=1e-5)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] > 0 and not counters["graph_break"]  # compiled, whole blocks


@pytest.mark.parametrize("backend", [
    "aot_eager",  # the traced graphs (caches read and written back) without Inductor's compile time
    pytest.param("inductor", marks=[pytest.mark.slow, pytest.mark.skipif(
        shutil.which("c++") is None, reason="Inductor on CPU needs a C++ compiler")]),  # ~1 min of C++ compiles
])
@pytest.mark.timeout(600)
def test_compiled_chunked_decode_equals_eager(dynamo_state, backend):
    _compiled_equals_eager(backend, "factorized", encode=backend == "inductor")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend, upsampler", [
    ("aot_eager", "inflated"),
    pytest.param("inductor", "factorized", marks=pytest.mark.skipif(
        shutil.which("c++") is None, reason="Inductor on CPU needs a C++ compiler")),
])
def test_compiled_channels_last_coding_equals_eager(dynamo_state, backend, upsampler):
    """bench_vae --compile --channels-last: the blocks traced on channels-last activations (35-85 s)."""
    _compiled_equals_eager(backend, upsampler, encode=True, cl=True)
