"""Stage 1 of isa4d: the causal 3D-convolution video VAE with the image-decoding regulariser (paper §4)."""

from isa4d.models.vae.autoencoder import (
    CausalVideoVAE,
    Decoder,
    DiagonalGaussian,
    Encoder,
    estimate_latent_stats,
    latent_moments,
    stats_from_moments,
)
from isa4d.models.vae.blocks import Downsample, FrameGroupNorm, ResnetBlock3D, SpatialAttention, Upsample
from isa4d.models.vae.causal_conv import CausalConv3d, reset_cache, streaming
from isa4d.models.vae.image_decoder import ImageDecoder
from isa4d.models.vae.inflate import inflate_image_vae, load_image_vae_weights, read_image_vae
from isa4d.models.vae.io import load_vae
from isa4d.models.vae.tiling import run_chunked, run_tiled

__all__ = [
    "CausalConv3d",
    "CausalVideoVAE",
    "Decoder",
    "DiagonalGaussian",
    "Downsample",
    "Encoder",
    "FrameGroupNorm",
    "ImageDecoder",
    "ResnetBlock3D",
    "SpatialAttention",
    "Upsample",
    "estimate_latent_stats",
    "inflate_image_vae",
    "load_image_vae_weights",
    "load_vae",
    "read_image_vae",
    "reset_cache",
    "run_chunked",
    "run_tiled",
    "streaming",
]
