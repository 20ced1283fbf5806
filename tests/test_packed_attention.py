"""Packed short self-attention: g consecutive sequences of L tokens attended as one of g·L under a block-diagonal
mask give exactly what attending each alone gives, forward and backward, eager and compiled."""

from __future__ import annotations

import shutil

import pytest
import torch

from isa4d.models.dit import attention as attn_mod
from isa4d.models.dit.attention import (SHORT_SEQUENCE, SelfAttention, block_diagonal_mask, grid_positions,
                                        pack_group, rope_frequencies)

DIM, HEADS, L = 64, 4, 9


@pytest.mark.parametrize("args, g", [
    ((6144, 9, 128), 12),  # 6144 = 2^11·3: 14 and 13 do not divide it
    ((512, 9, 128), 8),
    ((7, 9, 128), 7),  # all of the batch in one sequence
    ((13, 9, 64), 1),  # 13 is prime and 13·9 > 64
    ((1, 9, 128), 1),
    ((24, 9, 27), 3),
    ((64, SHORT_SEQUENCE + 1, 128), 1),  # long sequences: SDPA's tiles are not wasted
    ((6144, 9, 0), 1),  # packing off
    ((6144, 9, 8), 1),  # not even one sequence fits the target
])
def test_pack_group(args, g):
    assert pack_group(*args) == g


def test_block_diagonal_mask():
    mask = block_diagonal_mask(3, 2)
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], torch.block_diag(*[torch.ones(2, 2, dtype=torch.bool)] * 3))


def _module(dtype=torch.float64) -> tuple[SelfAttention, torch.Tensor]:
    torch.manual_seed(0)
    module = SelfAttention(DIM, HEADS, qk_norm=True).to(dtype)
    with torch.no_grad():  # non-trivial norm gains, so their gradients differ from one
        for norm in (module.q_norm, module.k_norm):
            norm.weight.copy_(1 + 0.3 * torch.randn_like(norm.weight))
    rope = rope_frequencies(grid_positions(L), (DIM // HEADS,))  # (L, Dh/2): the temporal rope of the model
    return module, rope


def _run(module: SelfAttention, x: torch.Tensor, rope: torch.Tensor, pack_length: int, fn=None):
    """Output and the gradients w.r.t. x and every parameter, packing at `pack_length`."""
    module.pack_length = pack_length
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = (module if fn is None else fn)(x, rope)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in module.parameters()]


def _record_attention(monkeypatch) -> list:
    """Wrap `attention` to record the (q, k, v, mask) it receives."""
    calls, inner = [], attn_mod.attention

    def spy(q, k, v, mask=None, packed=False):
        assert packed == (mask is not None and mask.shape[:2] == (1, 1))  # the packed kernel order, only packed
        calls.append((q, k, v, mask))
        return inner(q, k, v, mask, packed)
    monkeypatch.setattr(attn_mod, "attention", spy)
    return calls


@pytest.mark.parametrize("B, target, g", [(24, 128, 12), (24, 40, 4), (13, 64, 1)])
def test_packed_equals_unpacked_forward_and_backward(monkeypatch, B, target, g):
    module, rope = _module()
    x = torch.randn(B, L, DIM, dtype=torch.float64)
    calls = _record_attention(monkeypatch)
    qkv = []
    module.qkv.register_forward_hook(lambda m, i, o: qkv.append(o))
    packed = _run(module, x, rope, target)
    q, k, v, mask = calls[-1]
    if g > 1:  # the packed path was taken: g sequences per row under the block-diagonal mask
        assert q.shape == k.shape == v.shape == (B // g, HEADS, g * L, DIM // HEADS)
        assert torch.equal(mask, block_diagonal_mask(g, L))
        assert v.untyped_storage().data_ptr() == qkv[-1].untyped_storage().data_ptr()  # v: a view, no copy
    else:
        assert q.shape == (B, HEADS, L, DIM // HEADS) and mask is None
    plain = _run(module, x, rope, 0)
    assert calls[-1][0].shape == (B, HEADS, L, DIM // HEADS) and calls[-1][3] is None
    for a, b in zip(packed, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_packing_without_the_mask_would_differ(monkeypatch):
    """The comparison above can fail: packed sequences attending across each other give another output."""
    module, rope = _module()
    x = torch.randn(24, L, DIM, dtype=torch.float64)
    inner = attn_mod.attention
    monkeypatch.setattr(attn_mod, "attention", lambda q, k, v, mask=None, packed=False: inner(q, k, v, None))
    leaky = _run(module, x, rope, 128)
    monkeypatch.undo()
    assert not torch.allclose(leaky[0], _run(module, x, rope, 0)[0], atol=1e-3)


def test_a_mask_or_the_module_setting_turns_packing_off(monkeypatch):
    module, rope = _module()
    x = torch.randn(24, L, DIM, dtype=torch.float64)
    calls = _record_attention(monkeypatch)
    mask = torch.ones(24, 1, L, L, dtype=torch.bool)
    module(x, rope, mask)
    assert calls[-1][0].shape[0] == 24 and calls[-1][3] is mask
    monkeypatch.setattr(attn_mod, "PACK_LENGTH", 0)
    module(x, rope)
    assert calls[-1][0].shape[0] == 24 and calls[-1][3] is None
    monkeypatch.setattr(attn_mod, "PACK_LENGTH", 36)
    module(x, rope)  # pack_length None: the module's PACK_LENGTH, read per call, from PACK_MIN_SEQUENCES on
    assert calls[-1][0].shape[0] == 24
    monkeypatch.setattr(attn_mod, "PACK_MIN_SEQUENCES", 24)
    module(x, rope)
    assert calls[-1][0].shape[0] == 6
    module(x[:23], rope)  # fewer sequences than the minimum: unpacked
    assert calls[-1][0].shape[0] == 23 and calls[-1][3] is None


@pytest.mark.parametrize("backend", [
    "aot_eager",  # the traced graph (one whole graph: no data-dependent branch) and its autograd, in a second
    pytest.param("inductor", marks=[pytest.mark.slow, pytest.mark.skipif(
        shutil.which("c++") is None, reason="Inductor on CPU needs a C++ compiler")]),  # ~8 s of C++ compiles
])
@pytest.mark.timeout(120)
def test_packed_under_torch_compile(backend):
    """Compiled (whole graph), packed equals unpacked, forward and backward. Both compiled: traced, `apply_rope`
    takes its real-product form, which rounds differently from the eager complex multiply (fp32 angles)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # graphs of earlier tests count otherwise
    module, rope = _module()
    x = torch.randn(24, L, DIM, dtype=torch.float64)
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    packed = _run(module, x, rope, 128, compiled)
    plain = _run(module, x, rope, 0, compiled)  # `pack_length` is guarded: a second graph
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    for a, b in zip(packed, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.timeout(120)
def test_kernel_preference_is_traced_by_torch_compile(monkeypatch):
    """A compiled block picks its SDPA kernel per shape as eager does: `sdpa_kernel` with a priority, inside the
    traced code, stays one whole graph, restores the global kernel order afterwards and changes no result. CPU has
    none of the fused kernels, so a preference is forced here; the H100 profile shows the kernels it picks
    (docs/benchmarks.md)."""
    from torch.nn.attention import SDPBackend

    read_while_tracing = []

    def prefer(q, k, mask, packed=False):
        read_while_tracing.append(torch.compiler.is_compiling())
        return [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]

    monkeypatch.setattr(attn_mod, "_kernel_preference", prefer)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    order = torch._C._get_sdp_priority_order()
    module, rope = _module()
    x = torch.randn(24, L, DIM, dtype=torch.float64)
    eager = _run(module, x, rope, 128)
    compiled = _run(module, x, rope, 128, torch.compile(module, backend="aot_eager", fullgraph=True))
    assert read_while_tracing == [False, True]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert torch._C._get_sdp_priority_order() == order
    for a, b in zip(compiled, eager, strict=True):  # traced rope: real products, fp32 angles round differently
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_kernel_preference_is_the_same_when_compiling(monkeypatch):
    """The per-shape kernel order holds under torch.compile too (it once returned None there, so compiled steps ran
    PyTorch's default order: cuDNN for the short temporal attentions, slower there on the H100)."""
    from types import SimpleNamespace

    from torch.nn.attention import SDPBackend

    cuda = lambda *shape: SimpleNamespace(device=torch.device("cuda"), shape=shape)  # noqa: E731: no GPU needed
    cases = [(cuda(18, 12, 256, 64), cuda(18, 12, 3073, 64), torch.ones(1, dtype=torch.bool), False),  # ISA
             (cuda(512, 12, 9, 64), cuda(512, 12, 9, 64), None, False),  # temporal, 9 keys
             (cuda(512, 12, 64, 64), cuda(512, 12, 64, 64), torch.ones(1, dtype=torch.bool), True)]  # packed
    eager = [attn_mod._kernel_preference(*case) for case in cases]
    assert eager[0][0] == SDPBackend.CUDNN_ATTENTION and eager[1][0] == eager[2][0] == SDPBackend.EFFICIENT_ATTENTION
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert [attn_mod._kernel_preference(*case) for case in cases] == eager
