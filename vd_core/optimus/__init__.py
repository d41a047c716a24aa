"""Optimus text VAE (algorithm.md §6.2): BERT encoder, GPT-2 decoder with latent injection, tokenizers."""

from .text_vae import OptimusVAE, load_optimus

__all__ = ["OptimusVAE", "load_optimus"]
