"""Golden outputs of the tiny ISA-DiT stack, recorded before the top-floor redesign (issue: one clear top floor) so
that refactors can prove the behaviour unchanged (tests/test_golden.py).

Run from the repository root:  PYTHONPATH=src:tests:. python tests/assets/golden/make_dit_golden.py
It writes dit_golden.pt beside itself: a fixed-seed network forward (with and without dropped conditions and with
padded people), the loss of one fixed-seed training step through DiTModule, and a short guided sample (plain and
in temporal windows), all on the CPU in one thread so the float arithmetic is reproducible.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[3]
OUT = Path(__file__).resolve().parent / "dit_golden.pt"


def tiny_net(**kw):
    from isa4d.models.dit import ISADiT

    args = dict(latent_channels=8, hidden_size=32, depth=2, num_heads=2, patch_size=1, mlp_ratio=2.0,
                frames_per_latent=4, num_points=6, max_people=3, point_freqs=3, ispe_freqs=3)
    torch.manual_seed(0)
    net = ISADiT(**{**args, **kw})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero gates and output, so every path reaches the output
        for m in net.modules():
            if hasattr(m, "adaLN_modulation"):
                lin = m.adaLN_modulation[-1]
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.05)
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.3)
        net.final_layer.linear.weight.copy_(torch.randn(net.final_layer.linear.weight.shape, generator=g) * 0.1)
    return net


def random_condition_fields(B=2, P=2, T=3, V=6, h=4, w=4, C=8, F=4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    valid = torch.rand(B, P, T, V, generator=g) > 0.2
    return dict(points_world=r(B, P, T, F, V, 3), points_ndc=torch.rand(B, P, T, V, 3, generator=g) * 2 - 1,
                points_valid=valid, person_mask=torch.tensor([[True, True], [True, False]]),
                plucker=r(B, T, 6 * F, h, w), ref_latent=r(B, C, h, w),
                ref_points_ndc=torch.rand(B, P, V, 2, generator=g) * 2 - 1,
                ref_points_valid=torch.ones(B, P, V, dtype=torch.bool), background=r(B, C, T, h, w))


def tiny_module(body_dir: Path):
    from isa4d.models.dit import ISADiT
    from isa4d.models.vae import CausalVideoVAE
    from isa4d.training.dit_module import DiTModule

    args = yaml.safe_load((ROOT / "configs/vae/tiny.yaml").read_text())["model"]["init_args"]["vae"]["init_args"]
    torch.manual_seed(0)
    vae = CausalVideoVAE(**args)
    torch.manual_seed(0)
    net = ISADiT(latent_channels=16, hidden_size=64, depth=2, num_heads=4, patch_size=1, mlp_ratio=2.0,
                 num_points=32, point_freqs=4, ispe_freqs=4,
                 condition_dropout={"ref": 0.3, "pose": 0.3, "camera": 0.3, "background": 0.3})
    return DiTModule(net, vae=vae, body_model_dir=str(body_dir), sample_steps=3)


def record() -> dict[str, torch.Tensor]:
    from conftest import toy_world_batch
    from data_prep.make_toy_body import write_toy_body
    from isa4d.inference.generate import generate
    from isa4d.models.dit import DiTConditions

    torch.set_num_threads(1)
    out = {}
    # 1. the network alone
    net = tiny_net().eval()
    cond = DiTConditions(**random_condition_fields())
    x, t = torch.randn(2, 8, 3, 4, 4, generator=torch.Generator().manual_seed(3)), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        out["forward"] = net(x, t, cond)
        out["forward_drop"] = net(x, t, cond, force_drop={"pose": True, "ref": torch.tensor([True, False])})
        out["forward_padded"] = net(x, t, cond.pad_people(3))
        net.train()
        out["forward_train_dropout"] = net(x, t, cond, generator=torch.Generator().manual_seed(4))
    # 2. one training step's loss and 3. samples, through the module on the committed toy world
    with tempfile.TemporaryDirectory() as body_dir:
        write_toy_body(Path(body_dir))
        module = tiny_module(Path(body_dir))
        batch = toy_world_batch("val", 32, 32, 9, 2)
        module.train()
        torch.manual_seed(5)
        out["train_loss"] = module.training_step(batch, 0).detach()
        module.eval()
        x0, cond, points = module.encode(batch)
        out["x0"], out["points"] = x0, points
        latent = module.sample(cond, x0.shape, torch.Generator().manual_seed(6), guidance={"pose": 2.0, "ref": 1.5})
        out["sample_latent"] = latent
        out["sample_video"] = module.decode(latent)
        video, _ = generate(module, batch, steps=3, guidance={"pose": 1.5}, seed=7, window=2, overlap=1)
        out["generate_windows"] = video
    return out


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT)]
    torch.save(record(), OUT)
    print(f"wrote {OUT}")
