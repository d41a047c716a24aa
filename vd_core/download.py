"""``python -m vd_core download``: fetch the released VD files into one model folder.

Sources (Hugging Face hub):

* ``shi-labs/versatile-diffusion``, folder ``pretrained_pth/``: the diffuser
  ``vd-four-flow-v1-0-fp16.pth`` (or the float32 ``vd-four-flow-v1-0.pth``), ``kl-f8.pth`` and
  ``optimus-vae.pth`` — the files the official README lists for its ``pretrained/`` folder;
* ``openai/clip-vit-large-patch14``: the CLIP folder (config, weights, preprocessing, tokenizer);
* the Optimus tokenizer vocabularies, which the official repository vendors unmodified from
  ``bert-base-cased`` and ``gpt2``: fetched from ``google-bert/bert-base-cased`` and
  ``openai-community/gpt2`` into ``optimus_tokenizers/``.

The layout written is the one :func:`vd_core.models.load_models` reads. ``huggingface_hub`` is
imported only when a download really runs; files already present with the hub's size are kept.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError
from .models import CLIP_FOLDER, DIFFUSER_FP16_NAMES, DIFFUSER_FP32_NAMES, IMAGE_VAE_NAMES, OPTIMUS_NAMES, OPTIMUS_TOKENIZER_FOLDER

log = logging.getLogger(__name__)

VD_REPO = "shi-labs/versatile-diffusion"
CLIP_REPO = "openai/clip-vit-large-patch14"
BERT_REPO = "google-bert/bert-base-cased"
GPT2_REPO = "openai-community/gpt2"
CLIP_FILES = (
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)


@dataclass(frozen=True)
class DownloadItem:
    """One file to fetch: ``repo``/``filename`` on the hub → ``destination`` (relative to the folder)."""

    repo: str
    filename: str
    destination: str


def plan_downloads(fp32: bool = False, parts: frozenset[str] | None = None) -> list[DownloadItem]:
    """The files of a complete model folder.

    Args:
        fp32: fetch the float32 diffuser (about twice the size) instead of the released fp16 one.
        parts: restrict to these parts (``"diffuser"``, ``"image_vae"``, ``"optimus"``,
            ``"clip"``); ``None`` fetches all.
    """
    diffuser = (DIFFUSER_FP32_NAMES if fp32 else DIFFUSER_FP16_NAMES)[1]  # the released .pth names
    by_part = {
        "diffuser": [DownloadItem(VD_REPO, f"pretrained_pth/{diffuser}", diffuser)],
        "image_vae": [DownloadItem(VD_REPO, f"pretrained_pth/{IMAGE_VAE_NAMES[1]}", IMAGE_VAE_NAMES[1])],
        "optimus": [
            DownloadItem(VD_REPO, f"pretrained_pth/{OPTIMUS_NAMES[1]}", OPTIMUS_NAMES[1]),
            DownloadItem(BERT_REPO, "vocab.txt", f"{OPTIMUS_TOKENIZER_FOLDER}/bert-base-cased/vocab.txt"),
            DownloadItem(GPT2_REPO, "vocab.json", f"{OPTIMUS_TOKENIZER_FOLDER}/gpt2/vocab.json"),
            DownloadItem(GPT2_REPO, "merges.txt", f"{OPTIMUS_TOKENIZER_FOLDER}/gpt2/merges.txt"),
        ],
        "clip": [DownloadItem(CLIP_REPO, name, f"{CLIP_FOLDER}/{name}") for name in CLIP_FILES],
    }
    return [item for part, items in by_part.items() if parts is None or part in parts for item in items]


def hub_sizes(items: list[DownloadItem]) -> dict[DownloadItem, int | None]:
    """Size in bytes of every item according to the hub (``None`` when the hub does not say)."""
    from huggingface_hub import HfApi

    api = HfApi()
    sizes: dict[DownloadItem, int | None] = {}
    for repo in sorted({item.repo for item in items}):
        mine = [item for item in items if item.repo == repo]
        found = {info.path: getattr(info, "size", None) for info in api.get_paths_info(repo, [i.filename for i in mine])}
        for item in mine:
            if item.filename not in found:
                raise CheckpointError(
                    f"{repo} has no file {item.filename} on the Hugging Face hub; the release may have moved. "
                    f"Download it by hand from https://huggingface.co/{repo} into the model folder as {item.destination}."
                )
            sizes[item] = found[item.filename]
    return sizes


def download(folder: str | os.PathLike, items: list[DownloadItem], dry_run: bool = False) -> list[Path]:
    """Fetch ``items`` into ``folder`` with progress bars, skipping files already complete.

    Every file is written under a temporary name and renamed when its size matches the hub's, so an
    interrupted download never leaves a file that looks complete.

    Returns:
        The destination paths (all of them, present before or fetched now).

    Raises:
        CheckpointError: a file is not on the hub, the disk is too small, or a downloaded size
            differs from the hub's.
    """
    folder = Path(folder)
    sizes = hub_sizes(items)
    todo = [i for i in items if not _complete(folder / i.destination, sizes[i])]
    need = sum(sizes[i] or 0 for i in todo)
    for item in items:
        state = "fetch" if item in todo else "present"
        log.info("%-7s %s/%s → %s (%s)", state, item.repo, item.filename, folder / item.destination, _human(sizes[item]))
    if dry_run or not todo:
        return [folder / i.destination for i in items]
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise CheckpointError(f"downloading needs {_human(need)} but {folder} has only {_human(free)} free; free some space")
    for item in todo:
        _fetch(folder, item, sizes[item])
    return [folder / i.destination for i in items]


def _fetch(folder: Path, item: DownloadItem, size: int | None) -> None:
    from huggingface_hub import hf_hub_download

    target = folder / item.destination
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".vd-download-") as staging:
        fetched = Path(hf_hub_download(item.repo, item.filename, local_dir=staging))
        got = fetched.stat().st_size
        if size is not None and got != size:
            raise CheckpointError(
                f"{item.repo}/{item.filename}: downloaded {got} bytes but the hub says {size}; run the download again"
            )
        os.replace(fetched, target)
    log.info("saved %s", target)


def _complete(path: Path, size: int | None) -> bool:
    return path.is_file() and (size is None or path.stat().st_size == size)


def _human(size: int | None) -> str:
    if size is None:
        return "size unknown"
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.2f} MB"
