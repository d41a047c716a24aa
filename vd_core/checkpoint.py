"""Safe reading of model files into flat state dicts, and strict loading of them.

Every loader in vd_core reads files through :func:`read_state_dict`, so that no pickle is ever
executed (``torch.load(weights_only=True)`` or safetensors) and every broken file gets the same
clear error; :func:`load_exactly` gives every loader the same strict, named-keys loading.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import CheckpointError

log = logging.getLogger(__name__)

# Containers some training scripts wrap their weights in; unwrapped when they are the only payload.
_WRAPPER_KEYS = ("state_dict", "model", "module", "params")


def read_state_dict(path: str | os.PathLike, *, what: str = "model file", mmap: bool = False) -> dict[str, torch.Tensor]:
    """Read ``path`` (``.safetensors``, or a ``torch.save`` file of plain tensors) into a flat dict.

    Tensors keep their stored dtype and live on the CPU in memory of their own: nothing stays
    memory-mapped to the user's file, so a file replaced or truncated after loading cannot kill
    the process (SIGBUS). ``mmap=True`` leaves the tensors mapped, for callers that copy the ones
    they keep at once (the diffuser loader: loading a few parts of a 5 GB file then needs RAM for
    those parts only).

    Raises:
        CheckpointError: the file is missing, a directory, unreadable (permissions), empty,
            truncated/corrupt or not a model file, holds objects other than tensors (a pickle that
            would need code to load), or holds no tensors at all. The message names ``what`` and
            the path, and never suggests loading unsafely.
    """
    path = Path(path)
    _check_readable_file(path, what)
    if path.suffix.lower() in (".safetensors", ".sft"):
        state = _read_safetensors(path, what, mmap)
    else:
        state = _read_torch_file(path, what, mmap)
    return _flatten_tensors(state, path, what)


def _check_readable_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder, not a file; choose the model file inside it.")
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is not a regular file; choose the model file itself.")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise CheckpointError(
            f"{what} {path} cannot be read: permission denied. Give your user read access (e.g. chmod a+r)."
        ) from None
    except OSError as exc:
        raise CheckpointError(f"{what} {path} cannot be opened: {exc.strerror or exc}.") from None
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes): the download did not finish; download it again.")


def _read_safetensors(path: Path, what: str, mmap: bool) -> dict:
    from safetensors.torch import load_file

    try:
        mapped = load_file(str(path), device="cpu")  # memory-mapped by safetensors
        if mmap:
            return mapped
        return {name: mapped.pop(name).clone() for name in list(mapped)}
    except Exception as exc:  # safetensors raises its own SafetensorError and OSError variants
        raise CheckpointError(
            f"{what} {path} is not a readable .safetensors file ({exc}); it is probably truncated or "
            "corrupt: download it again."
        ) from exc


# torch's UnpicklingError text names an unsupported global when the pickle refers to code; any
# other failure (random or damaged bytes) is a broken file. Only the cause is passed on: torch's
# hint to retry unsafely is not.
_UNSAFE_MARK = "Unsupported global:"


def _read_torch_file(path: Path, what: str, mmap: bool) -> object:
    use_mmap = mmap and zipfile.is_zipfile(path)  # mmap needs the zip format (torch >= 1.6 files)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if _UNSAFE_MARK in text:
            cause = text[text.index(_UNSAFE_MARK):].split(" was not")[0].split("\n")[0]
            raise CheckpointError(
                f"{what} {path} contains Python objects other than tensors ({cause}); loading them would run "
                "code from the file, so it was not loaded. Use a file of plain tensors or a .safetensors file."
            ) from None
        raise CheckpointError(
            f"{what} {path} is not a PyTorch checkpoint of tensors: its contents cannot be read (damaged, "
            "truncated or another kind of file); download it again."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile,
            IndexError, KeyError, TypeError, AttributeError, MemoryError) as exc:  # random bytes break torch's unpickler anywhere
        raise CheckpointError(
            f"{what} {path} could not be read as a PyTorch checkpoint ({_first_line(exc)}); "
            "it is probably truncated or corrupt, or not a model file: download it again."
        ) from exc


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip() and "weights_only" not in line]
    return lines[0].strip() if lines else type(exc).__name__


def _flatten_tensors(state: object, path: Path, what: str) -> dict[str, torch.Tensor]:
    if isinstance(state, Mapping):
        for key in _WRAPPER_KEYS:
            inner = state.get(key)
            if isinstance(inner, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
                log.debug("unwrapping %r from %s", key, path)
                state = inner
                break
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{what} {path} holds a {type(state).__name__}, not a dictionary of tensors.")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{what} {path} holds no tensors; it is not a model file.")
    skipped = [k for k in state if k not in tensors]
    if skipped:
        log.debug("%s: ignoring %d non-tensor entries such as %s", path, len(skipped), skipped[:3])
    return tensors


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix`` with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def describe_keys(keys, limit: int = 4) -> str:
    """A short, readable sample of key names for error messages: ``'a', 'b', … (+12 more)``."""
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", … (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_same_keys(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, expected: str,
                    fix: str) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly ``model``'s keys: ``"<source> does
    not match <expected>: missing keys …; unexpected keys …. <fix>"``."""
    wanted = set(model.state_dict())
    missing, unexpected = wanted - state.keys(), state.keys() - wanted
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match {expected}: missing keys {describe_keys(missing) or 'none'}; "
            f"unexpected keys {describe_keys(unexpected) or 'none'}. {fix}"
        )


def load_exactly(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, expected: str,
                 fix: str) -> None:
    """Load ``state`` into ``model`` strictly, taking its tensors as they are (``assign``, so a model
    built on the ``meta`` device gets real weights without a copy).

    Raises:
        CheckpointError: other keys (see :func:`check_same_keys`) or shapes that do not fit.
    """
    check_same_keys(model, state, source, expected, fix)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # shape mismatches between tensors of the same file
        raise CheckpointError(f"{source} has inconsistent tensor shapes: {str(exc).splitlines()[-1].strip()}") from exc
