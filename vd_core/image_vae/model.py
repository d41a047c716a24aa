"""The kl-f8 image VAE of Versatile Diffusion (LDM ``AutoencoderKL``, the SD 1.x VAE; algorithm.md §6.1).

Images ``(B, 3, H, W)`` in [0, 1] ↔ **unscaled** latents ``(B, 4, H/8, W/8)``. The diffusion
space is ``latent × LATENT_SCALE``; that scaling belongs to the flows and samplers, never to this
module (docs/ARCHITECTURE.md, "Image latents").
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint import describe_keys, load_exactly, read_state_dict, strip_prefix
from ..errors import CheckpointError, VDInputError
from .blocks import Decoder, Encoder
from ..memory_budget import decode_batch_size
from ..validation import check_finite, check_image_values, check_result

log = logging.getLogger(__name__)

LATENT_SCALE = 0.18215
"""Multiply an unscaled kl-f8 latent by this to get the diffusion latent (algorithm.md §6.1)."""

# algorithm.md §6.1 / LDM DiagonalGaussianDistribution: the log-variance is clamped before use.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

# Where the VAE sits inside larger files: an all-in-one VD state dict, a full SD checkpoint.
_CONTAINER_PREFIXES = ("vae.image.", "first_stage_model.")


@dataclass(frozen=True)
class ImageVAEConfig:
    """Sizes of an LDM AutoencoderKL; kl-f8 is ``ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2``.

    ``attn_levels`` lists the resolution levels with attention after every ResnetBlock (empty for
    kl-f8, whose only attention is in the middle blocks). ``z_channels`` is the width of the
    encoder/decoder latent, ``embed_dim`` that of the latent after ``quant_conv`` (both 4).
    """

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    embed_dim: int
    attn_levels: tuple[int, ...] = ()
    in_channels: int = 3
    out_channels: int = 3

    @property
    def downsampling_factor(self) -> int:
        """Pixels per latent along each side: 2^(levels − 1) = 8 for kl-f8."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], source: str) -> ImageVAEConfig:
        """Derive every size from the tensor shapes of an un-prefixed VAE state dict."""
        needed = ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_out.weight", "quant_conv.weight")
        missing = [k for k in needed if k not in state]
        if missing:
            raise CheckpointError(
                f"{source} does not look like an LDM image VAE (kl-f8): keys such as {describe_keys(missing)} are "
                f"missing; it holds {describe_keys(state)}. Use the original-format kl-f8.pth (keys 'encoder.*', "
                "'decoder.*', 'quant_conv.*', 'post_quant_conv.*')."
            )
        ch, in_channels = state["encoder.conv_in.weight"].shape[:2]
        level_ids = _indices(state, r"encoder\.down\.(\d+)\.")
        block_ids = _indices(state, r"encoder\.down\.0\.block\.(\d+)\.")
        first_convs = [state.get(f"encoder.down.{i}.block.0.conv1.weight") for i in range(len(level_ids))]
        widths = [None if w is None else int(w.shape[0]) for w in first_convs]
        if not level_ids or any(w is None or w % ch for w in widths):
            raise CheckpointError(
                f"{source}: the encoder levels of this image VAE could not be read from its tensor shapes "
                f"(levels {sorted(level_ids)}, widths {widths}, base width {ch}); the file is not a kl-f8 VAE."
            )
        return cls(
            ch=int(ch),
            ch_mult=tuple(int(w // ch) for w in widths),
            num_res_blocks=len(block_ids),
            z_channels=int(state["encoder.conv_out.weight"].shape[0] // 2),
            embed_dim=int(state["quant_conv.weight"].shape[0] // 2),
            attn_levels=tuple(sorted(_indices(state, r"encoder\.down\.(\d+)\.attn\."))),
            in_channels=int(in_channels),
            out_channels=int(state["decoder.conv_out.weight"].shape[0]),
        )


def _indices(state, pattern: str) -> set[int]:
    regex = re.compile(pattern)
    return {int(m.group(1)) for k in state if (m := regex.match(k))}


class ImageVAE(nn.Module):
    """LDM AutoencoderKL: ``encoder`` → ``quant_conv`` → Gaussian posterior; ``post_quant_conv`` → ``decoder``.

    Inputs are cast to the module's dtype/device (float32, float16 and bfloat16 all work);
    outputs are always float32 on the module's device.
    """

    def __init__(self, config: ImageVAEConfig):
        super().__init__()
        self.config = config
        sizes = dict(ch=config.ch, ch_mult=config.ch_mult, num_res_blocks=config.num_res_blocks,
                     attn_levels=config.attn_levels, z_channels=config.z_channels)
        self.encoder = Encoder(in_channels=config.in_channels, **sizes)
        self.decoder = Decoder(out_channels=config.out_channels, **sizes)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior of images ``(B, 3, H, W)`` in [0, 1] → ``(mean, logvar)``, each ``(B, 4, H/8, W/8)``
        float32, logvar clamped to [−30, 20]. H and W must be multiples of 8 (else VDInputError)."""
        self._check_images(images)
        x = images.to(device=self.device, dtype=self.dtype) * 2 - 1  # the VAE works in [-1, 1] (algorithm.md §6.1)
        moments = check_result(self.quant_conv(self.encoder(x)).float(), "the image VAE's encoding",
                               "the image VAE weights are probably damaged (NaN/inf in the file): download it again")
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] → unscaled latents ``(B, 4, H/8, W/8)`` float32.

        Without a generator: the posterior mean (deterministic). With one: a posterior sample
        ``mean + exp(logvar/2)·n``, ``n ~ N(0, 1)`` drawn in float32 over the whole batch from
        ``generator`` on its own device — the official sample after ``torch.manual_seed(s)``
        equals this with a CPU generator seeded ``s`` (algorithm.md §6.1, §7.4).
        """
        mean, logvar = self.encode_moments(images)
        if generator is None:
            return mean
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32, device=generator.device)
        return mean + torch.exp(0.5 * logvar) * noise.to(mean.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Unscaled latents ``(B, 4, h, w)`` → images ``(B, 3, 8h, 8w)`` float32 in [0, 1]
        (``clamp((y + 1) / 2, 0, 1)`` of the decoder output y).

        Decodes ``batch_size`` latents at a time (None: as many as fit in half the free memory,
        ``memory_budget.decode_batch_size``), so a big batch never needs the whole batch's
        full-resolution activations at once; the images are the same either way.
        """
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != self.config.embed_dim:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise VDInputError(
                f"image VAE decode: latents must be (B, {self.config.embed_dim}, h, w) unscaled kl-f8 latents, "
                f"got shape {shape}; pass an image LATENT, not a text latent or a context."
            )
        check_finite(latents, "image VAE decode: the latents", "they come from a failed sampling run; sample again")
        n, _, h, w = latents.shape
        factor = self.config.downsampling_factor
        if batch_size is None:
            batch_size = decode_batch_size(n, factor * w, factor * h, vae_channels=self.config.ch,
                                           itemsize=torch.empty((), dtype=self.dtype).element_size(), device=self.device)
        chunks = []
        for start in range(0, n, max(1, batch_size)):
            z = self.post_quant_conv(latents[start : start + batch_size].to(device=self.device, dtype=self.dtype))
            chunks.append(((self.decoder(z).float() + 1) / 2).clamp(0, 1))
        images = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        return check_result(images, "the image VAE's decoded images",
                            "the image VAE weights are probably damaged (NaN/inf in the file): download it again")

    def _check_images(self, images: torch.Tensor) -> None:
        factor = self.config.downsampling_factor
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise VDInputError(
                f"image VAE encode: images must be (B, {self.config.in_channels}, H, W) in [0, 1], got shape "
                f"{tuple(getattr(images, 'shape', ()))}; convert grayscale/RGBA images to RGB and put channels first."
            )
        height, width = images.shape[-2:]
        if height % factor or width % factor:
            raise VDInputError(
                f"image VAE encode: image size {width}×{height} (W×H) is not a multiple of {factor}; the VAE maps "
                f"each {factor}×{factor} block of pixels to one latent. Resize or crop the image to a multiple "
                f"of {factor}, e.g. {width - width % factor or factor}×{height - height % factor or factor}."
            )
        check_image_values(images, "image VAE encode: the images")


def load_image_vae(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> ImageVAE:
    """Load a kl-f8 image VAE strictly; sizes come from the tensor shapes.

    Accepted files: the released ``kl-f8.pth`` (plain state dict ``encoder.*``, ``decoder.*``,
    ``quant_conv.*``, ``post_quant_conv.*``), an SD-style VAE ``.safetensors`` with the same keys, a
    full SD checkpoint (its ``first_stage_model.*`` subtree) or an all-in-one VD state dict (its
    ``vae.image.*`` subtree). ``dtype=None`` means float32 (the VAE is small; float32 avoids
    float16 overflow in the decoder). Returns the model in eval mode without gradients.

    Raises:
        CheckpointError: unreadable file; a file of another kind (diffusers-format VAE, VD
            diffuser, Optimus, CLIP — the message names it and where it belongs); missing or
            unexpected keys; inconsistent shapes.
    """
    source = f"image VAE file {path}"
    state = read_state_dict(path, what="image VAE file")
    for prefix in _CONTAINER_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            log.info("%s: using the %r subtree", path, prefix)
            state = strip_prefix(state, prefix)
            break
    foreign = _foreign_file_kind(state)
    if foreign is not None:
        raise CheckpointError(f"{source} is {foreign}")

    config = ImageVAEConfig.from_state_dict(state, source)
    with torch.device("meta"):
        model = ImageVAE(config)
    load_exactly(
        model, state, str(source), f"the kl-f8 VAE layout its shapes describe ({config})",
        "The file must hold exactly one LDM AutoencoderKL state dict (as kl-f8.pth does).",
    )
    log.info("loaded image VAE from %s: %s", path, config)
    return model.to(device=device, dtype=dtype or torch.float32).eval().requires_grad_(False)


def _foreign_file_kind(state: dict[str, torch.Tensor]) -> str | None:
    """A sentence naming the kind of file ``state`` came from when it is not an LDM VAE, else None."""

    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in state)

    if has("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.", "decoder.mid_block."):
        return (
            "a diffusers-format VAE ('encoder.down_blocks.*' keys). Use the original LDM-format kl-f8 VAE "
            "(kl-f8.pth from the Versatile Diffusion release, or an SD 1.x VAE .safetensors with "
            "'encoder.down.*' keys), or convert this one to the original format first."
        )
    if has("diffuser.", "model.diffusion_model."):
        return (
            "a diffusion UNet file (Versatile Diffusion diffuser, e.g. vd-four-flow-v1-0-fp16.pth) without "
            "image-VAE weights. Load it as the diffuser and choose kl-f8.pth as the image VAE."
        )
    if has("decoder.transformer.", "encoder.encoder.layer.", "encoder.embeddings."):
        return (
            "the Optimus text VAE (optimus-vae.pth: BERT encoder + GPT-2 decoder). Load it as the text VAE "
            "(Optimus) and choose kl-f8.pth as the image VAE."
        )
    if has("text_model.", "vision_model."):
        return (
            "a CLIP model (clip-vit-large-patch14/model.safetensors). Load its folder as the CLIP context "
            "encoder and choose kl-f8.pth as the image VAE."
        )
    return None
