"""The command line never loses what the user made: inputs are never outputs, existing files are
kept unless --overwrite, the extension is the format, bad output paths fail before sampling, and
SIGTERM (like Ctrl-C) leaves no partial file. Devices and seeds get clear messages."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal

import pytest
from PIL import Image

from vd_core import cli, image_io, models
from vd_core.errors import VDInputError
from vd_core.output_files import ReservedOutputs, output_paths


@pytest.fixture(scope="module")
def setup(release_dir) -> dict:
    folder = release_dir / "expected"
    t2i = json.loads((folder / "ddim.json").read_text())["t2i"]
    prompt = json.loads((folder / "clip.json").read_text())["prompts"][0]
    _, _, h, w = t2i["shape"]
    fast = ["--steps", "2", "--width", str(8 * w), "--height", str(8 * h)]
    return {"models": str(release_dir), "prompt": prompt, "fast": fast, "image": folder / "image_0.png",
            "size": (8 * w, 8 * h)}


def t2i(setup, out, *extra) -> int:
    return cli.main(["text-to-image", "--models", setup["models"], "--prompt", setup["prompt"], *setup["fast"],
                     "--out", str(out), *[str(e) for e in extra]])


@pytest.fixture
def no_sampling(monkeypatch):
    """Fails the test if the models are loaded (i.e. the run got past the output checks)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the models were loaded: the output path was not checked first")

    monkeypatch.setattr(models, "load_models", refuse)


def test_the_input_is_never_overwritten(setup, tmp_path, capsys, no_sampling):
    photo = tmp_path / "photo.png"
    shutil.copy(setup["image"], photo)
    before = photo.read_bytes()
    for extra in ([], ["--overwrite"]):
        code = cli.main(["image-variation", "--models", setup["models"], "--image", str(photo), "-n", "1",
                         *setup["fast"], "--out", str(photo), *extra])
        assert code == cli.EXIT_ERROR and "is the input" in capsys.readouterr().err
    assert photo.read_bytes() == before


def test_existing_outputs_are_kept_unless_overwrite(setup, tmp_path, capsys):
    out = tmp_path / "car.png"
    out.write_bytes(b"the user's file")
    assert t2i(setup, out, "-n", "1") == cli.EXIT_ERROR
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"the user's file"
    # a batch: every name_i file counts
    (tmp_path / "batch_1.png").write_bytes(b"keep")
    assert t2i(setup, tmp_path / "batch.png", "-n", "2") == cli.EXIT_ERROR
    assert "batch_1.png already exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch_1.png", "car.png"]
    # asked for: replaced
    assert t2i(setup, out, "-n", "1", "--overwrite") == 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == setup["size"]


@pytest.mark.parametrize("suffix, file_format", [(".jpg", "JPEG"), (".jpeg", "JPEG"), (".webp", "WEBP"), (".PNG", "PNG")])
def test_the_extension_names_the_format(setup, tmp_path, suffix, file_format):
    out = tmp_path / f"x{suffix}"
    assert t2i(setup, out, "-n", "1") == 0
    with Image.open(out) as image:
        assert image.format == file_format and image.size == setup["size"]


def test_unknown_extensions_and_bad_paths_fail_before_sampling(setup, tmp_path, capsys, no_sampling, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    folder = tmp_path / "folder.png"
    folder.mkdir()
    cases = [(tmp_path / "x.gif", "unknown image extension"), (tmp_path / "x", "unknown image extension"),
             (folder, "is a folder"), (a_file / "x.png", "not a folder")]
    for out, message in cases:
        assert t2i(setup, out, "-n", "1") == cli.EXIT_ERROR, out
        assert message in capsys.readouterr().err
    code = cli.main(["text-variation", "--models", setup["models"], "--prompt", "a car", "--out", str(tmp_path / "t.png")])
    assert code == cli.EXIT_ERROR and ".txt" in capsys.readouterr().err

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    assert t2i(setup, tmp_path / "y.png", "-n", "1") == cli.EXIT_ERROR
    assert "MiB free" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder.png"]  # no partial file left


def test_a_full_disk_at_reservation_leaves_nothing(tmp_path, monkeypatch):
    def full_disk(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full_disk, raising=False)
    targets = output_paths(tmp_path / "x.png", 3)
    with pytest.raises(VDInputError, match="no space left"):
        with ReservedOutputs(targets, reserve_bytes=4096):
            pass
    assert list(tmp_path.iterdir()) == []


def test_sigterm_leaves_no_partial_file(setup, tmp_path, monkeypatch, capsys):
    previous = signal.getsignal(signal.SIGTERM)

    def progress(step, total, x, x0):
        signal.raise_signal(signal.SIGTERM)  # what `kill` delivers while sampling

    monkeypatch.setattr(cli, "report_progress", progress)
    assert t2i(setup, tmp_path / "a.png", "-n", "2") == cli.EXIT_TERMINATED
    assert "terminated" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    def half_written(image, path, file_format=None):  # SIGTERM in the middle of writing the files
        with open(path, "wb") as handle:
            handle.write(b"\x89PNG half")
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(cli, "write_image_file", half_written)
    assert t2i(setup, tmp_path / "b.png", "-n", "2") == cli.EXIT_TERMINATED
    assert list(tmp_path.iterdir()) == []  # neither outputs nor hidden .partial files
    assert signal.getsignal(signal.SIGTERM) is previous


def test_devices_and_seeds_get_clear_messages(setup, tmp_path, capsys, no_sampling):
    for device, message in [("banana", "unknown device"), ("cuda:99", "cuda")]:
        assert t2i(setup, tmp_path / "x.png", "--device", device) == cli.EXIT_ERROR
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and "Traceback" not in err
    for seed in ("-1", str(2**64)):
        assert t2i(setup, tmp_path / "x.png", "--seed", seed) == cli.EXIT_ERROR
        assert "--seed must be in 0" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_top_seed_runs(setup, tmp_path):
    assert t2i(setup, tmp_path / "x.png", "-n", "2", "--seed", str(2**64 - 1), "--per-item-seeds") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_0.png", "x_1.png"]


def test_image_formats_table_matches_pillow():
    for suffix, file_format in image_io.IMAGE_FORMATS.items():
        assert Image.registered_extensions()[suffix] == file_format


def test_a_batch_that_cannot_fit_is_refused_before_any_file(setup, tmp_path, capsys, monkeypatch):
    from vd_core import memory_budget

    width, height = setup["size"]
    one = memory_budget.decode_bytes(1, width, height, vae_channels=128, itemsize=4)
    monkeypatch.setattr(memory_budget, "available_bytes", lambda device: 4 * one)  # pretend: a few images fit
    assert t2i(setup, tmp_path / "many.png", "-n", "10000") == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "10000 image(s)" in err and "at most" in err
    assert list(tmp_path.iterdir()) == []
