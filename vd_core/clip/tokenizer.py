"""Finding the CLIP BPE tokenizer (algorithm.md §5.1) without ever downloading it.

VD's text contexts use the tokenizer of ``openai/clip-vit-large-patch14``: lower-cased byte-level
BPE, ``<|startoftext|>`` 49406, ``<|endoftext|>`` 49407 (also the padding token). Its two files,
``vocab.json`` and ``merges.txt``, ship with the Hugging Face model folder and with ComfyUI
(``comfy/sd1_tokenizer``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import CheckpointError, TokenizerNotFoundError

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("vocab.json", "merges.txt")
HF_REPO_ID = "openai/clip-vit-large-patch14"


def load_clip_tokenizer(search_dirs: Sequence[str | os.PathLike | None]):
    """Load the CLIP tokenizer from the first place that has ``vocab.json`` and ``merges.txt``.

    Look-up order:

    1. each folder of ``search_dirs``, in the order given (entries that are ``None`` or not
       folders are skipped) — callers pass the CLIP model folder itself, then a folder the user
       configured, then ComfyUI's bundled ``comfy/sd1_tokenizer``;
    2. the local Hugging Face cache (``$HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``)
       for ``openai/clip-vit-large-patch14``, read offline: nothing is ever downloaded.

    Returns:
        a transformers ``CLIPTokenizerFast`` built from those files; its ``pad_token_id`` and
        ``eos_token_id`` are both ``<|endoftext|>`` for the OpenAI files.

    Raises:
        TokenizerNotFoundError: no location has both files; the message lists the places searched
            and where to put the files.
        CheckpointError: the files were found but could not be read.
    """
    if isinstance(search_dirs, (str, os.PathLike)):
        search_dirs = [search_dirs]
    searched = []
    for entry in search_dirs:
        if entry is None:
            continue
        folder = Path(entry)
        searched.append(str(folder))
        if all((folder / name).is_file() for name in TOKENIZER_FILES):
            return _load(folder)
    cached = _hf_cache_folder()
    if cached is not None:
        return _load(cached)
    first = searched[0] if searched else "the CLIP model folder"
    raise TokenizerNotFoundError(
        f"CLIP tokenizer files {' and '.join(TOKENIZER_FILES)} were not found. Searched: "
        f"{', '.join(searched) or '(no folders given)'}, and the Hugging Face cache ({_hf_cache_dir()}) for "
        f"{HF_REPO_ID}. "
        f"Copy both files from https://huggingface.co/{HF_REPO_ID} (or from ComfyUI's "
        f"comfy/sd1_tokenizer folder) into {first}."
    )


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _hf_cache_folder() -> Path | None:
    """The cached snapshot folder of ``openai/clip-vit-large-patch14`` holding both files, if any."""
    from huggingface_hub import try_to_load_from_cache

    paths = [try_to_load_from_cache(HF_REPO_ID, name, cache_dir=_hf_cache_dir()) for name in TOKENIZER_FILES]
    # Anything but a str means "not cached" (None, or a marker for a known-missing file).
    if not all(isinstance(p, str) for p in paths):
        return None
    folders = {Path(p).parent for p in paths}
    return folders.pop() if len(folders) == 1 else None


def _load(folder: Path):
    from transformers import CLIPTokenizerFast

    log.info("loading the CLIP tokenizer from %s", folder)
    try:
        return CLIPTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # the tokenizers library raises bare Exception for malformed files
        raise CheckpointError(
            f"the CLIP tokenizer files in {folder} could not be read ({exc}); replace vocab.json and "
            f"merges.txt with the ones from https://huggingface.co/{HF_REPO_ID}."
        ) from exc
