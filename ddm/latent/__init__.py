"""Latent space: the VAE that encodes images for the experts and decodes their samples (plain PyTorch)."""

from ddm.latent.vae import LatentCodec

__all__ = ["LatentCodec"]
