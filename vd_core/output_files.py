"""The command line's output files: nothing the user made is lost, and a bad path fails before the
(slow) sampling run.

Rules (one place; ``docs/cli.md`` says the same to users):

* an input file is never an output, even with ``--overwrite``;
* an existing output (each ``name_0.png`` … of a batch too) is refused unless ``--overwrite``;
* the extension names the format written (``.png``, ``.jpg``/``.jpeg``, ``.webp``; ``.txt`` for text);
  any other extension is refused;
* before the models are loaded, every output's folder is created if needed, must take a new file
  and have room for the outputs' uncompressed size (:func:`probe_output_folders`); before sampling
  a temporary file is made beside every output and given that size on disk, so a folder path, an
  unwritable folder or a full disk fails before the run;
* results are written to the temporary files and renamed onto the outputs at the end; on any error,
  Ctrl-C or SIGTERM the temporary files are removed and no output is touched.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import VDError, VDInputError
from .image_io import image_format

TEXT_SUFFIX = ".txt"


class Terminated(VDError):
    """SIGTERM arrived; raised so that the ``finally`` clauses clean up, as on Ctrl-C."""


def output_paths(out: Path, count: int) -> list[Path]:
    """``out`` for one result; ``stem_0.suffix`` … for several."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


def check_outputs(targets: Sequence[Path], *, inputs: Sequence[Path] = (), overwrite: bool = False,
                  kind: str = "image") -> None:
    """Raise :class:`VDInputError` unless every target may be written (see the module rules).

    Args:
        kind: ``"image"`` (extension picks the format) or ``"text"`` (``.txt``).
    """
    for target in targets:
        if kind == "text":
            if target.suffix.lower() != TEXT_SUFFIX:
                raise VDInputError(f"output {target}: a text flow writes UTF-8 text; give a {TEXT_SUFFIX} file name")
        else:
            image_format(target)
        for source in inputs:
            if _same_file(target, source):
                raise VDInputError(f"output {target} is the input {source}; choose another --out (inputs are never overwritten)")
        if target.is_dir():
            raise VDInputError(f"output {target} is a folder; give a file name such as {target / ('vd' + target.suffix)}")
        if target.exists() and not overwrite:
            raise VDInputError(f"output {target} already exists; choose another --out, or pass --overwrite to replace it")
        if target.parent.exists() and not target.parent.is_dir():
            raise VDInputError(f"output {target}: {target.parent} is a file, not a folder")


def probe_output_folders(targets: Sequence[Path], need_bytes: int) -> None:
    """Before anything slow: every output folder exists or can be made, takes a new file, and has
    ``need_bytes`` free (the outputs' uncompressed size); else :class:`VDInputError`."""
    folders = {}
    for target in targets:
        folders.setdefault(target.parent, target)
    for folder, target in folders.items():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle, probe = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".partial")
            os.close(handle)
            os.remove(probe)
            free = shutil.disk_usage(folder).free
        except OSError as exc:
            raise _write_error(exc, target) from None
        share = need_bytes * sum(t.parent == folder for t in targets) // max(1, len(targets))
        if free < share:
            raise VDInputError(
                f"cannot write {target}: the outputs need about {share / 2**20:.1f} MiB and the disk of {folder} "
                f"has {free / 2**20:.1f} MiB free; free some space or write elsewhere"
            )


class ReservedOutputs:
    """Temporary files beside the targets, made (and sized) before the run and renamed at the end.

    Use as a context manager around the whole run; :meth:`commit` writes and renames.
    """

    def __init__(self, targets: Sequence[Path], reserve_bytes: int = 0, overwrite: bool = False):
        self.targets = list(targets)
        self.reserve_bytes = reserve_bytes
        self.overwrite = overwrite
        self.temps: list[str] = []

    def __enter__(self) -> "ReservedOutputs":
        try:
            for target in self.targets:
                target.parent.mkdir(parents=True, exist_ok=True)
                handle, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
                self.temps.append(temp)
                try:
                    if self.reserve_bytes and hasattr(os, "posix_fallocate"):
                        os.posix_fallocate(handle, 0, self.reserve_bytes)
                finally:
                    os.close(handle)
        except OSError as exc:
            self._remove()
            raise _write_error(exc, target) from None
        return self

    def commit(self, write: Callable[[list[str]], object]) -> None:
        """``write(temporary paths)``, then rename them onto the targets (refusing any target that
        appeared meanwhile unless overwriting)."""
        try:
            write(self.temps)
        except OSError as exc:
            raise _write_error(exc, self.targets[0]) from None
        for temp, target in zip(self.temps, self.targets):
            if target.exists() and not self.overwrite:
                raise VDInputError(f"output {target} appeared while sampling; nothing was written (pass --overwrite)")
            os.replace(temp, target)

    def __exit__(self, *exc) -> bool:
        self._remove()
        return False

    def _remove(self) -> None:
        for temp in self.temps:
            if os.path.exists(temp):
                os.remove(temp)


class TerminateAsError:
    """While active, SIGTERM raises :class:`Terminated` in the main thread (so temporary files are
    removed as on Ctrl-C) instead of killing the process where it stands."""

    def __enter__(self):
        # signal handlers can only be set from the main thread (main() called elsewhere: no handler)
        self._active = threading.current_thread() is threading.main_thread()
        if self._active:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        signal.signal(signal.SIGTERM, self._previous)
        raise Terminated("terminated (SIGTERM)")

    def __exit__(self, *exc) -> bool:
        if self._active:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def write_atomically(targets: Sequence[Path], write: Callable[[list[str]], object], overwrite: bool = True) -> None:
    """Call ``write`` with temporary paths beside ``targets``, then rename them all onto the targets;
    if ``write`` fails or is interrupted, the temporary files are removed and no target is touched."""
    with ReservedOutputs(targets, overwrite=overwrite) as outputs:
        outputs.commit(write)


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _write_error(exc: OSError, target: Path) -> VDInputError:
    if exc.errno == errno.ENOSPC:
        return VDInputError(f"cannot write {target}: no space left on the disk; free some space or write elsewhere")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return VDInputError(f"cannot write {target}: {exc.strerror} (folder {target.parent}); choose a writable folder")
    return VDInputError(f"cannot write {target}: {exc.strerror or exc}")
