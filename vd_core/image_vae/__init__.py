"""The kl-f8 image VAE (docs/algorithm.md §6.1): model, blocks and loading."""

from .model import LATENT_SCALE, ImageVAE, ImageVAEConfig, load_image_vae

__all__ = ["LATENT_SCALE", "ImageVAE", "ImageVAEConfig", "load_image_vae"]
