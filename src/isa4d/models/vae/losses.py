"""Loss pieces of the VAE objective (paper §4): hinge GAN losses and the adaptive GAN weight."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4) -> torch.Tensor:
    """||grad rec|| / ||grad gan|| at the decoder's last layer (Esser et al., taming transformers), detached.

    Balances the adversarial term against reconstruction regardless of their raw scales. Under data parallelism
    (an initialised process group of more than one rank; `last_layer` whole on every rank, as isa4d's FSDP keeps
    it) both gradients are averaged over the ranks first, so every rank uses the one weight a single process would
    compute from the global batch, rather than a weight of its own from its share of the batch.
    """
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        both = torch.stack([g_rec, g_gan]).float()
        dist.all_reduce(both)  # a sum (gloo has no average); the world size divides out of the ratio
        g_rec, g_gan = both / dist.get_world_size()
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, max_weight).detach()
