"""Loading VD's CLIP context encoder from the files users have (algorithm.md §5).

A Hugging Face folder (openai/clip-vit-large-patch14), a single full ``CLIPModel`` weights file, a
VD all-in-one checkpoint, or a state dict already in memory (ComfyUI's ``CLIP_VISION`` weights).
Sizes come from the tensor shapes; only head counts, activation and LayerNorm epsilon come from a
config when one is given.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..checkpoint import describe_keys, load_exactly, read_state_dict, strip_prefix
from .context import CLIPContextEncoder
from .preprocess import CLIPImagePreprocessing
from ..errors import CheckpointError

log = logging.getLogger(__name__)

# Per tower: the transformer's key prefix and the projection head's module name (CLIPModel naming).
TOWER_KEYS = {"text": ("text_model.", "text_projection"), "vision": ("vision_model.", "visual_projection")}
# VD all-in-one checkpoints: the text tower of ctx.text and the vision tower of ctx.image (algorithm.md §1).
VD_PREFIXES = {"text": "ctx.text.model.", "vision": "ctx.image.model."}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
FULL_CLIP_HINT = (
    "VD needs the full OpenAI CLIP ViT-L/14 with both projection heads (text_projection and "
    "visual_projection): the Hugging Face folder openai/clip-vit-large-patch14 (config.json, "
    "model.safetensors, vocab.json, merges.txt) or its model.safetensors alone. Put it into the VD "
    "model folder as clip-vit-large-patch14/ (ComfyUI: models/clip_vision/, models/clip/ or "
    "models/versatile_diffusion/). A Stable Diffusion 1.x text encoder does not work: it has no "
    "text_projection."
)


def load_clip(path: str | os.PathLike, tokenizer="auto", dtype: torch.dtype | None = None, device="cpu",
              towers: Sequence[str] = ("text", "vision"), config: Mapping | None = None) -> CLIPContextEncoder:
    """Load VD's CLIP context encoder.

    Args:
        path: a Hugging Face folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``,
            optional ``preprocessor_config.json`` and tokenizer files), or a single
            ``.safetensors``/``.pth`` file of a ``CLIPModel`` (``text_model.*``, ``vision_model.*``,
            ``text_projection.weight``, ``visual_projection.weight``; ``logit_scale`` and
            ``position_ids`` are ignored) or of a VD all-in-one checkpoint (towers read from
            ``ctx.text.model.`` and ``ctx.image.model.``; the file's other parts are ignored).
        tokenizer: ``"auto"`` (look up ``vocab.json``/``merges.txt`` next to the weights, then in the
            Hugging Face cache, see :func:`~vd_core.clip.load_clip_tokenizer`), a
            tokenizer object, or ``None`` (only :meth:`~CLIPContextEncoder.encode_text_ids`).
            Unused without the text tower.
        dtype: compute dtype; ``None`` keeps the file's. device: where the weights go.
        towers: which towers to load, ``"text"`` and/or ``"vision"``.
        config: a ``CLIPConfig``-style dict overriding ``config.json`` (head counts, activation,
            LayerNorm epsilon). Sizes always come from the tensor shapes; without any config the
            heads are taken 64 wide (ViT-L/14: text 12, vision 16).

    Raises:
        CheckpointError: missing/unreadable files, a requested tower or projection head absent
            (e.g. a Stable Diffusion text encoder, which has no ``text_projection``), unknown keys.
        TokenizerNotFoundError: ``tokenizer="auto"`` found no tokenizer files.
    """
    path = Path(path)
    towers = tuple(towers)
    if not towers or not set(towers) <= {"text", "vision"}:
        raise ValueError(f"towers must name 'text' and/or 'vision', got {towers!r}")
    folder = path if path.is_dir() else path.parent
    weights = _weights_file(path) if path.is_dir() else path
    if config is None and (folder / "config.json").is_file():  # a folder's, or the one beside a single file
        config = _read_json(folder / "config.json")
    source = f"CLIP file {weights}"
    # mapped, and only the towers kept are copied out of the file (never left mapped: SIGBUS)
    found = _split_towers(read_state_dict(weights, what="CLIP model file", mmap=True), source)
    selected = {}
    for kind in towers:
        if kind not in found:
            raise CheckpointError(
                f"{source} has no CLIP {kind} tower (no {TOWER_KEYS[kind][0]}* keys; it holds "
                f"{', '.join(found) or 'no'} tower). Load only the towers it has with towers=(...), or use a "
                f"file with both. {FULL_CLIP_HINT}"
            )
        selected[kind] = {k: v.clone() for k, v in _check_projection(found[kind], kind, source).items()}
    del found
    if isinstance(tokenizer, str):
        if tokenizer != "auto":
            raise ValueError(f"tokenizer must be 'auto', None or a tokenizer object, got {tokenizer!r}")
        from .tokenizer import load_clip_tokenizer

        tokenizer = load_clip_tokenizer([folder]) if "text" in selected else None
    preprocessing = None
    if "vision" in selected and path.is_dir() and (path / "preprocessor_config.json").is_file():
        preprocessing = CLIPImagePreprocessing.from_file(path / "preprocessor_config.json")
    encoder = _build(selected, config, source, tokenizer=tokenizer, preprocessing=preprocessing, dtype=dtype,
                     device=device)
    log.info("loaded CLIP %s from %s (%s)", "+".join(selected), weights, encoder.dtype)
    return encoder


def encoder_from_state_dict(state_dict: Mapping[str, torch.Tensor], config: Mapping | None = None, *,
                            tokenizer=None, preprocessing: CLIPImagePreprocessing | None = None,
                            dtype: torch.dtype | None = None, device=None) -> CLIPContextEncoder:
    """:meth:`CLIPContextEncoder.from_state_dict` (documented there)."""
    source = "the CLIP state dict"
    towers = _split_towers(state_dict, source)
    for kind in towers:
        _check_projection(towers[kind], kind, source)
    copied = {kind: {k: v.detach().clone() for k, v in sd.items()} for kind, sd in towers.items()}
    return _build(copied, config, source, tokenizer=tokenizer, preprocessing=preprocessing, dtype=dtype,
                  device=device)


def _weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"CLIP folder {folder} has neither {' nor '.join(WEIGHT_FILES)}. {FULL_CLIP_HINT}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable JSON file ({exc}); download it again.") from exc


def _split_towers(state_dict: Mapping[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """The present towers' weights under ``CLIPContextEncoder`` key names: ``{"text": …, "vision": …}``."""
    if any(k.startswith(tuple(VD_PREFIXES.values())) for k in state_dict):
        # A VD all-in-one file: everything outside the two used towers belongs to other parts.
        parts = {kind: strip_prefix(state_dict, prefix) for kind, prefix in VD_PREFIXES.items()}
    else:
        tolerated = ("logit_scale",)
        unknown = [k for k in state_dict
                   if not k.startswith(("text_model.", "vision_model.", "text_projection.", "visual_projection."))
                   and k not in tolerated]
        if unknown:
            raise CheckpointError(
                f"{source} is not a transformers CLIPModel: unexpected keys {describe_keys(unknown)}; expected "
                f"text_model.*, vision_model.*, text_projection.weight, visual_projection.weight (or VD's "
                f"ctx.text.model.* / ctx.image.model.*). {FULL_CLIP_HINT}"
            )
        parts = {"text": dict(state_dict), "vision": dict(state_dict)}
    towers = {}
    for kind, (prefix, head) in TOWER_KEYS.items():
        # position_ids are non-persistent in current transformers: the module rebuilds them.
        sd = {k: v for k, v in parts[kind].items()
              if k.startswith((prefix, head + ".")) and not k.endswith("position_ids")}
        if any(k.startswith(prefix) for k in sd):
            towers[kind] = sd
    return towers


def _check_projection(tower: dict[str, torch.Tensor], kind: str, source: str) -> dict[str, torch.Tensor]:
    head = TOWER_KEYS[kind][1] + ".weight"
    if head not in tower:
        raise CheckpointError(f"{source} has a CLIP {kind} tower but no {head} (projection head). {FULL_CLIP_HINT}")
    return tower


def _shape(sd: Mapping[str, torch.Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"{source} lacks {key!r}; it holds {describe_keys(sd)}. {FULL_CLIP_HINT}")
    return tuple(sd[key].shape)


def _tower_settings(config: Mapping | None, kind: str, width: int, source: str) -> dict:
    """Heads, activation and LayerNorm epsilon of one tower from a ``CLIPConfig``-style dict."""
    config = config or {}
    # Recent transformers read text_config/vision_config, 4.24 the *_dict copies; real files have both.
    settings = config.get(f"{kind}_config") or config.get(f"{kind}_config_dict") or {}
    if settings.get("hidden_size", width) != width:
        raise CheckpointError(
            f"the CLIP config says the {kind} tower is {settings['hidden_size']} wide but {source} holds a "
            f"{width}-wide one: config.json does not belong to these weights"
        )
    heads = settings.get("num_attention_heads")
    if heads is None:
        if width % 64:
            raise CheckpointError(
                f"cannot tell the attention heads of the {width}-wide CLIP {kind} tower of {source}: put its "
                "config.json next to it or pass config={...}"
            )
        heads = width // 64  # ViT-L/14: text 768 → 12, vision 1024 → 16
    if width % heads:
        raise CheckpointError(f"{heads} attention heads do not divide the CLIP {kind} width {width} ({source})")
    return {"num_attention_heads": heads, "hidden_act": settings.get("hidden_act", "quick_gelu"),
            "layer_norm_eps": settings.get("layer_norm_eps", 1e-5)}


def _layer_count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
    indices = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def _text_config(sd, config, source):
    from transformers import CLIPTextConfig

    vocab, width = _shape(sd, "text_model.embeddings.token_embedding.weight", source)
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=width,
        intermediate_size=_shape(sd, "text_model.encoder.layers.0.mlp.fc1.weight", source)[0],
        num_hidden_layers=_layer_count(sd, "text_model."),
        max_position_embeddings=_shape(sd, "text_model.embeddings.position_embedding.weight", source)[0],
        projection_dim=_shape(sd, "text_projection.weight", source)[0],
        # transformers 4.24's ids (the real config.json's); only transformers' own pooled output reads
        # them, and with eos 2 it pools at argmax(ids) as VD does. VD pools by itself anyway.
        bos_token_id=0, pad_token_id=1, eos_token_id=2,
        **_tower_settings(config, "text", width, source),
    )


def _vision_config(sd, config, source):
    from transformers import CLIPVisionConfig

    width, channels, patch, _ = _shape(sd, "vision_model.embeddings.patch_embedding.weight", source)
    positions = _shape(sd, "vision_model.embeddings.position_embedding.weight", source)[0]
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1:
        raise CheckpointError(f"{source}: {positions} vision positions are not a square grid plus a class token")
    return CLIPVisionConfig(
        hidden_size=width, num_channels=channels, patch_size=patch, image_size=grid * patch,
        intermediate_size=_shape(sd, "vision_model.encoder.layers.0.mlp.fc1.weight", source)[0],
        num_hidden_layers=_layer_count(sd, "vision_model."),
        projection_dim=_shape(sd, "visual_projection.weight", source)[0],
        **_tower_settings(config, "vision", width, source),
    )


def _build(towers: dict[str, dict[str, torch.Tensor]], config, source: str, *, tokenizer, preprocessing,
           dtype, device) -> CLIPContextEncoder:
    """Build on the meta device (no random init of 400 M weights), then adopt the tensors strictly."""
    text_config = _text_config(towers["text"], config, source) if "text" in towers else None
    vision_config = _vision_config(towers["vision"], config, source) if "vision" in towers else None
    dims = {c.projection_dim for c in (text_config, vision_config) if c is not None}
    if len(dims) != 1:
        raise CheckpointError(f"{source}: the text and vision projections have different widths {sorted(dims)}")
    state = {k: v for sd in towers.values() for k, v in sd.items()}
    with torch.device("meta"):
        encoder = CLIPContextEncoder(text_config, vision_config, dims.pop(), tokenizer=tokenizer,
                                     preprocessing=preprocessing)
    load_exactly(encoder, state, str(source), "the CLIP its own shapes describe",
                 "It is incomplete or not a CLIP ViT model.")
    floats = {v.dtype for v in state.values() if v.is_floating_point()}
    stored = floats.pop() if len(floats) == 1 else torch.float32
    _rebuild_position_ids(encoder, next(iter(state.values())).device)
    encoder.to(device=device, dtype=dtype or stored)
    return encoder.eval().requires_grad_(False)


def _rebuild_position_ids(encoder: CLIPContextEncoder, device: torch.device) -> None:
    """Give the non-persistent ``position_ids`` buffers (still on meta) their values ``0…N−1``."""
    for name, buffer in list(encoder.named_buffers()):
        if not buffer.is_meta:
            continue
        owner_name, _, leaf = name.rpartition(".")
        if leaf != "position_ids":
            raise RuntimeError(f"transformers added an unknown non-persistent buffer {name}; update vd_core/clip/context.py")
        positions = torch.arange(buffer.shape[-1], device=device).expand(buffer.shape)
        encoder.get_submodule(owner_name).register_buffer(leaf, positions, persistent=False)
