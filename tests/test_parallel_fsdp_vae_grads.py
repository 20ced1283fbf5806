"""The VAE stage's gradients under FSDP2 on 2 CPU processes equal one process's, GAN terms on (generator with the
adaptive GAN weight, both discriminators), each rank holding half the batch; and no wrapped unit returns a view
(FSDP2's "returned a view tensor" warning). test_parallel.py checks the same model sharded over one rank."""

from __future__ import annotations

import warnings

import pytest
import torch
import yaml
from resume_helpers import ROOT


def _module():
    """VAEModule of configs/vae/tiny.yaml, GAN on from step 0, posterior at its mean (the noise a process draws
    depends on its batch size, which is not what this test is about)."""
    from isa4d.models.vae import CausalVideoVAE
    from isa4d.models.vae.autoencoder import DiagonalGaussian
    from isa4d.models.vae.discriminators import PatchDiscriminator2D, PatchDiscriminator3D
    from isa4d.training.vae_module import VAELossWeights, VAEModule

    DiagonalGaussian.sample = lambda self, generator=None: self.mode()
    args = yaml.safe_load((ROOT / "configs/vae/tiny.yaml").read_text())["model"]["init_args"]
    loss = {**args["loss"], "gan_start_step": 0}
    torch.manual_seed(0)
    return VAEModule(vae=CausalVideoVAE(**args["vae"]["init_args"]),
                     disc_2d=PatchDiscriminator2D(**args["disc_2d"]["init_args"]),
                     disc_3d=PatchDiscriminator3D(**args["disc_3d"]["init_args"]), loss=VAELossWeights(**loss))


def _gradients(module, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Generator-loss gradients of the VAE, discriminator-loss gradients of the discriminators (full tensors)."""
    total, logs, recon = module._reconstruction_losses(x)
    assert logs["gan_weight"] > 0 and logs["gan_g"] != 0
    total.backward()
    full = (lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t)
    grads = {n: full(p.grad) for n, p in module.vae.named_parameters()}
    for disc in (module.disc_2d, module.disc_3d):
        disc.zero_grad(set_to_none=True)
    module._disc_loss(x, recon).backward()
    for prefix, disc in (("disc_2d", module.disc_2d), ("disc_3d", module.disc_3d)):
        grads.update({f"{prefix}.{n}": full(p.grad) for n, p in disc.named_parameters()})
    return grads, logs["gan_weight"].detach()


def _worker(rank: int, tmp: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=2)
    try:
        module = _module()
        module._device_mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
        module.configure_model()
        assert type(module.vae.decoder.conv_out.weight).__name__ == "DTensor"
        x = torch.load(f"{tmp}/x.pt", weights_only=True)[rank::2]  # this rank's half of the global batch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            grads, weight = _gradients(module, x)
        if rank == 0:
            torch.save({"grads": grads, "weight": weight, "warnings": [str(w.message) for w in caught]},
                       f"{tmp}/fsdp.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_vae_gradients_under_two_process_fsdp_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    x = torch.rand(4, 3, 5, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.save(x, tmp_path / "x.pt")
    expected, weight = _gradients(_module(), x)
    mp.start_processes(_worker, args=(str(tmp_path),), nprocs=2, join=True, start_method="spawn")
    got = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    assert not [w for w in got["warnings"] if "returned a view tensor" in w], got["warnings"]
    torch.testing.assert_close(got["weight"], weight, rtol=1e-5, atol=0)
    assert got["grads"].keys() == expected.keys() and any(k.startswith("disc_3d.") for k in expected)
    for name, g in expected.items():  # float rounding of sums in another order: within 1e-5 of each tensor's
        # scale, or 1e-8 for those whose gradient is zero but for rounding (attention's key bias)
        atol = max(1e-5 * g.abs().max().item(), 1e-8)
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=atol, msg=name)
