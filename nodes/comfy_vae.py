"""A core ComfyUI ``VAE`` from VD's kl-f8 image VAE file, so VAE Decode/Encode (tiled too), previews and
every latent tool serve VD's image flows. Outside ComfyUI the nodes get a `PlainVAE` instead.
"""

from __future__ import annotations

import torch

from ..vd_core.checkpoint import check_same_keys, load_exactly
from . import comfy_bridge as bridge


def _comfy_vae_config(config) -> dict:
    """ComfyUI's AutoencoderKL config for vd_core's `ImageVAEConfig` (sizes read off the shapes;
    ComfyUI's own detection assumes the full-size widths, which the tiny test model lacks)."""
    resolution = 256  # ComfyUI places attention by resolution: level i runs at 256 / 2^i
    ddconfig = {
        "double_z": True, "z_channels": config.z_channels, "resolution": resolution,
        "in_channels": config.in_channels, "out_ch": config.out_channels, "ch": config.ch,
        "ch_mult": list(config.ch_mult), "num_res_blocks": config.num_res_blocks,
        "attn_resolutions": [resolution // 2**i for i in config.attn_levels], "dropout": 0.0,
    }
    return {"params": {"embed_dim": config.embed_dim, "ddconfig": ddconfig}}


def core_vae(image_vae_state_dict: dict[str, torch.Tensor]) -> object:
    """A VAE for core VAE Decode/Encode (tiled too) from a kl-f8 state dict in LDM key format
    (``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``, no prefix: ``kl-f8.pth``
    or ``ImageVAE.state_dict()``). Outside ComfyUI, a `PlainVAE`.

    Raises:
        CheckpointError: not a kl-f8 VAE state dict (names a few missing/unexpected keys).
    """
    from ..vd_core.image_vae import ImageVAE, ImageVAEConfig
    from .comfy_images import PlainVAE

    sd = dict(image_vae_state_dict)
    config = ImageVAEConfig.from_state_dict(sd, "the image VAE weights")
    if bridge.comfy_available():
        import comfy.sd

        vae = comfy.sd.VAE(sd=sd, config=_comfy_vae_config(config))
        model = vae.first_stage_model
        vae.downscale_ratio = vae.upscale_ratio = config.downsampling_factor
    else:
        with torch.device("meta"):  # no random init: every weight comes from ``sd``
            model = ImageVAE(config)
        vae = PlainVAE(model)
    what = ("the image VAE weights", "a kl-f8 VAE of their own sizes",
            "Choose kl-f8.pth or a Stable Diffusion 1.x VAE.")
    if isinstance(vae, PlainVAE):
        load_exactly(model, sd, *what)
        model.eval().requires_grad_(False)
    else:  # ComfyUI has loaded the weights non-strictly (it only logs missing keys): compare them here
        check_same_keys(model, sd, *what)
    return vae
