"""Checks that need a CUDA GPU (skipped elsewhere): the VAE and the batch path on the device in bf16, the SDPA kernel
a compiled ISA-DiT picks, and its blocks replayed as CUDA graphs."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]


def _tiny_vae():
    from isa4d.models.vae import CausalVideoVAE

    return CausalVideoVAE(base_channels=16, channel_mults=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8,
                          image_decoder_channels=(16, 16))


@pytest.fixture
def no_tf32():
    """Exact fp32 on the GPU: TF32 convolutions round differently for different chunk shapes."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_vae_chunked_equals_unchunked_on_cuda(no_tf32):
    torch.manual_seed(0)
    vae = _tiny_vae().cuda().eval()
    x = torch.rand(1, 3, 17, 64, 64, device="cuda") * 2 - 1
    with torch.no_grad():
        whole = vae.encode(x).mode()
        chunked = vae.encode(x, chunk_frames=8).mode()
        torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(vae.decode(whole, chunk_frames=8), vae.decode(whole), atol=1e-4, rtol=1e-4)


def test_vae_bf16_autocast_trains():
    torch.manual_seed(0)
    vae = _tiny_vae().cuda()
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    x = torch.nn.functional.avg_pool3d(torch.rand(1, 3, 5, 32, 32, device="cuda") * 2 - 1, (1, 5, 5), 1, (0, 2, 2))
    losses = []
    for _ in range(40):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            recon, post = vae(x)
            loss = (recon.float() - x).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.6 * losses[0]


def test_batch_pins_moves_and_normalises_on_cuda():
    from isa4d.data.buckets import Bucket
    from isa4d.data.dataset import ClipDataset

    ds = ClipDataset(str(ROOT / "tests/assets/toy_world/val-000000.tar"), [Bucket(32, 32, 5, 1)], train=False)
    batch = next(iter(ds)).pin_memory().to("cuda", non_blocking=True).normalize()
    assert batch.video.is_cuda and batch.video.dtype == torch.float32
    assert -1 <= batch.video.min() and batch.video.max() <= 1
    assert batch.smpl.transl.is_cuda and batch.K.is_cuda


def test_compiled_masked_attention_runs_on_cudnn_and_equals_eager():
    """Under torch.compile the masked ISA attention takes the cuDNN kernel (`_kernel_preference`, now also traced;
    4x faster than the memory-efficient one at the ISA's shape) and gives eager's result."""
    from torch.profiler import ProfilerActivity, profile

    from isa4d.models.dit.attention import CrossAttention

    torch.manual_seed(0)
    attn = CrossAttention(256, 4).cuda()
    x, ctx = torch.randn(6, 64, 256, device="cuda"), torch.randn(6, 301, 256, device="cuda")
    mask = torch.rand(6, 301, device="cuda") > 0.3
    compiled = torch.compile(attn, fullgraph=True)

    def run(fn):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(x, ctx, mask)
        out.float().square().sum().backward()
        grads = [p.grad.clone() for p in attn.parameters()]
        attn.zero_grad(set_to_none=True)
        return out.float(), grads

    eager = run(attn)
    run(compiled)  # compile outside the profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        traced = run(compiled)
        torch.cuda.synchronize()
    names = [e.key.lower() for e in prof.key_averages()]
    assert any("sdpa" in n or "cudnn" in n for n in names), names
    assert not any("fmha" in n for n in names), names
    torch.testing.assert_close(traced[0], eager[0], atol=2e-2, rtol=2e-2)
    for a, b in zip(traced[1], eager[1], strict=True):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


def test_dit_trains_the_same_replayed_as_cuda_graphs():
    """parallel.cuda_graphs: blocks compiled in mode "reduce-overhead" really replay CUDA graphs (none skipped) and
    train as the plainly compiled blocks do."""
    from test_dit_model import C, random_conditions, randomize_gates, tiny_net
    from torch.profiler import ProfilerActivity, profile

    from isa4d.diffusion.flow import FlowMatching
    from isa4d.parallel import ParallelConfig
    from isa4d.parallel.fsdp import checkpoint_and_compile

    def train(cuda_graphs: bool) -> tuple[list[float], bool]:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        torch.manual_seed(0)
        net = randomize_gates(tiny_net(hidden_size=64, num_heads=4)).cuda()
        config = ParallelConfig(compile=True, cuda_graphs=cuda_graphs)  # the trainer's compile options
        checkpoint_and_compile(net.fsdp_units(), compile=True, compile_options=config.compile_options)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        cond = random_conditions().to("cuda")
        x0 = torch.randn(2, C, 2, 4, 4, device="cuda")
        losses = []
        for i in range(6):
            torch.compiler.cudagraph_mark_step_begin()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) if i == 5 else nullcontext() as prof:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss, _ = FlowMatching().loss(net, x0, {"cond": cond},
                                                  generator=torch.Generator("cuda").manual_seed(i))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            losses.append(loss.item())
        launched = any("cudaGraphLaunch" in e.key for e in prof.key_averages())
        assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0
        return losses, launched

    plain, plain_launched = train(False)
    graphs, graphs_launched = train(True)
    assert graphs_launched and not plain_launched
    torch.testing.assert_close(torch.tensor(graphs), torch.tensor(plain), rtol=2e-2, atol=1e-3)
