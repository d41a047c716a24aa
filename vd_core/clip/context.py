"""VD's context encoders: CLIP ViT-L/14 text and image contexts (algorithm.md §5).

The official model holds two full ``transformers.CLIPModel`` copies of openai/clip-vit-large-patch14
and uses the text tower of one (``ctx.text``) and the vision tower of the other (``ctx.image``).
:class:`CLIPContextEncoder` holds only those two towers and their projection heads, under
transformers' ``CLIPModel`` key names, built from configs derived from the weights' shapes —
never downloaded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn as nn

from .preprocess import CLIPImagePreprocessing, check_images, check_masks, mask_token_weights, preprocess_images
from ..errors import CheckpointError, MissingPartError, VDInputError

log = logging.getLogger(__name__)

class CLIPContextEncoder(nn.Module):
    """CLIP text and/or vision tower turning prompts and images into VD context tokens (algorithm.md §5).

    Either tower may be absent (``text_config`` or ``vision_config`` is ``None``). Submodules and
    ``state_dict`` keys follow transformers' ``CLIPModel``: ``text_model.*``, ``text_projection``,
    ``vision_model.*``, ``visual_projection``.

    Args:
        text_config: transformers ``CLIPTextConfig`` of the text tower, or ``None``.
        vision_config: transformers ``CLIPVisionConfig`` of the vision tower, or ``None``.
        projection_dim: context width D (768 for ViT-L/14).
        tokenizer: a CLIP tokenizer (see :func:`vd_core.clip.load_clip_tokenizer`) for
            :meth:`encode_text`; ``None`` allows :meth:`encode_text_ids` only. Any object works that
            has ``eos_token_id``, ``pad_token_id`` and ``__call__(prompts, add_special_tokens=True,
            verbose=False) -> {"input_ids": [[BOS, …, EOS], …]}`` (unpadded, untruncated rows).
        preprocessing: image preprocessing settings; default OpenAI CLIP's at the tower's size.
    """

    def __init__(self, text_config=None, vision_config=None, projection_dim: int = 768, *,
                 tokenizer=None, preprocessing: CLIPImagePreprocessing | None = None):
        super().__init__()
        from transformers import CLIPTextModel, CLIPVisionModel

        if text_config is None and vision_config is None:
            raise ValueError("a CLIPContextEncoder needs a text tower, a vision tower or both")
        self.text_model = self.text_projection = self.vision_model = self.visual_projection = None
        # transformers 4.x wraps the tower as `.text_model`/`.vision_model`; 5.x models are the tower.
        if text_config is not None:
            self.text_model = _tower(CLIPTextModel(text_config), "text_model")
            self.text_projection = nn.Linear(text_config.hidden_size, projection_dim, bias=False)
        if vision_config is not None:
            self.vision_model = _tower(CLIPVisionModel(vision_config), "vision_model")
            self.visual_projection = nn.Linear(vision_config.hidden_size, projection_dim, bias=False)
            preprocessing = preprocessing or CLIPImagePreprocessing.openai(vision_config.image_size)
            if preprocessing.crop_size != vision_config.image_size:
                raise CheckpointError(
                    f"the CLIP preprocessing crops images to {preprocessing.crop_size} px but the vision tower "
                    f"takes {vision_config.image_size} px: preprocessor_config.json does not belong to this model"
                )
        self.tokenizer = tokenizer
        self.preprocessing = preprocessing

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def context_dim(self) -> int:
        """D, the width of every context token."""
        head = self.text_projection if self.text_projection is not None else self.visual_projection
        return head.out_features

    @property
    def max_length(self) -> int:
        """Number of text tokens (77): the text tower's position count."""
        return self._require("text", "text contexts").embeddings.position_embedding.num_embeddings

    def tokenize(self, prompts: Sequence[str] | str) -> torch.Tensor:
        """Prompts → token ids ``(B, max_length)`` int64, as the official encoder tokenises (algorithm.md §5.1).

        ``<|startoftext|>``, the BPE tokens, ``<|endoftext|>``, then padding with the tokenizer's pad
        id (``<|endoftext|>`` 49407 for OpenAI's). A prompt longer than ``max_length`` tokens is cut
        to ``max_length − 1`` tokens plus ``<|endoftext|>``, with a logged warning. ``""`` gives
        ``[BOS, EOS, pad, …]``. A single string counts as one prompt.

        Raises:
            MissingPartError: the encoder has no tokenizer.
            VDInputError: an empty list, or an entry that is not a string.
        """
        if self.tokenizer is None:
            raise MissingPartError(
                "this CLIP context encoder has no tokenizer: load it with load_clip(path, tokenizer='auto') "
                "or pass tokenizer=load_clip_tokenizer([...]); encode_text_ids works without one"
            )
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise VDInputError(f"prompts must be a non-empty list of strings, got {prompts!r:.200}")
        length, eos = self.max_length, self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        rows = self.tokenizer(prompts, add_special_tokens=True, verbose=False)["input_ids"]
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        for i, row in enumerate(rows):
            if len(row) > length:
                log.warning("prompt %d has %d CLIP tokens; only the first %d are used: %r", i, len(row), length,
                            prompts[i][:80])
                row = row[:length - 1] + [eos]
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return ids

    def encode_text(self, prompts: Sequence[str] | str) -> torch.Tensor:
        """Prompts → text context ``(B, max_length, D)`` (algorithm.md §5.1); see :meth:`tokenize`."""
        return self.encode_text_ids(self.tokenize(prompts))

    @torch.no_grad()
    def encode_text_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, max_length)`` (or one row) → text context ``(B, max_length, D)`` (algorithm.md §5.1).

        Every token of the final-LayerNorm output goes through ``text_projection``; the result is
        divided by the norm of the projected pooled token, the one at ``argmax(ids)`` (the first
        ``<|endoftext|>``, the largest id). Only that token ends up unit-norm.

        Raises:
            MissingPartError: no text tower. VDInputError: not integer ids of that shape and vocabulary.
        """
        text_model = self._require("text", "text contexts")
        vocab = text_model.embeddings.token_embedding.num_embeddings
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise VDInputError(f"token ids must be an integer tensor (B, {self.max_length})")
        ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
        if ids.dim() != 2 or ids.shape[1] != self.max_length or ids.shape[0] == 0:
            raise VDInputError(f"token ids must have shape (B, {self.max_length}), got {tuple(ids.shape)}")
        if ids.min() < 0 or ids.max() >= vocab:
            raise VDInputError(f"token ids must be in [0, {vocab}), got [{ids.min().item()}, {ids.max().item()}]")
        ids = ids.to(device=self.device, dtype=torch.long)
        tokens = self.text_projection(text_model(input_ids=ids).last_hidden_state)
        pooled = tokens[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)]
        return tokens / pooled.norm(dim=-1)[:, None, None]

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Images → image context ``(B, 1 + patches, D)`` = ``(B, 257, 768)`` for ViT-L/14 (algorithm.md §5.2–5.3).

        Args:
            images: ``(B, C, H, W)`` or ``(C, H, W)`` float in ``[0, 1]``, any size; C = 3, 4 (alpha
                dropped) or 1 (replicated). Preprocessed exactly as the official code does:
                ``trunc(x·255)``, PIL bicubic resize of the shorter side, centre crop, mean/std; the
                pixels are then cast to the model's dtype.
            masks: ``None`` or ``(B|1, 1, H', W')`` in ``[0, 1]``, 1 = keep. Each vision token is
                weighted by the mean of the mask over its patch (the class token by the mean of the
                whole mask) before ``pre_layrnorm`` and again on the output. The mask is resized to
                the tower's input size from its own resolution, not resized and cropped like the
                image, so for non-square images it does not line up with the crop (as in the
                official code). All-ones masks give exactly the unmasked context.

        Returns:
            ``post_layernorm`` on all tokens, ``visual_projection``, divided by the class token's norm.

        Raises:
            MissingPartError: no vision tower. VDInputError: see
            :func:`~vd_core.clip.preprocess.check_images` and :func:`~vd_core.clip.preprocess.check_masks`.
        """
        vision_model = self._require("vision", "image contexts")
        images = check_images(images)
        weights = None
        if masks is not None:
            embeddings = vision_model.embeddings
            weights = mask_token_weights(check_masks(masks, images.shape[0]), embeddings.image_size,
                                         embeddings.patch_size)
        pixels = preprocess_images(images, self.preprocessing)
        hidden = vision_model.embeddings(pixels.to(device=self.device, dtype=self.dtype))
        if weights is not None:
            weights = weights.to(device=self.device, dtype=self.dtype)
            hidden = hidden * weights  # algorithm.md §5.3 step 4: after the position embeddings
        hidden = vision_model.encoder(inputs_embeds=vision_model.pre_layrnorm(hidden)).last_hidden_state
        tokens = self.visual_projection(vision_model.post_layernorm(hidden))
        tokens = tokens / tokens[:, :1].norm(dim=-1, keepdim=True)
        return tokens if weights is None else tokens * weights

    def _require(self, kind: str, purpose: str) -> nn.Module:
        tower = self.text_model if kind == "text" else self.vision_model
        if tower is None:
            raise MissingPartError(
                f"{purpose} need the CLIP {kind} tower, which was not loaded: load CLIP with "
                f"towers=('text', 'vision') from a file that has both"
            )
        return tower


def _tower(model: nn.Module, name: str) -> nn.Module:
    return getattr(model, name, model)
