"""``python -m vd_core``: every flow on the release-layout miniature, outputs, errors, Ctrl-C, and
the download plan (the network is never used: the hub client is replaced)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TEST_SIDE
from vd_core import cli, download
from vd_core.errors import CheckpointError
from vd_core.flows import SamplingOptions, text_to_image
from vd_core.models import load_models

FAST = ["--steps", "4", "--width", str(TEST_SIDE), "--height", str(TEST_SIDE)]


@pytest.fixture(scope="module")
def images(release_dir) -> dict:
    folder = release_dir / "expected"
    return {"square": folder / "image_0.png", "wide": folder / "image_1.png",
            "prompts": json.loads((folder / "clip.json").read_text())["prompts"]}


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_text_to_image_writes_pngs_equal_to_the_python_api(release_dir, images, tmp_path):
    out = tmp_path / "car.png"
    assert run("text-to-image", "--models", release_dir, "--prompt", images["prompts"][0], "-n", "2", "--seed", "0",
               "--out", out, *FAST) == 0
    written = [read_png(tmp_path / f"car_{i}.png") for i in range(2)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["car_0.png", "car_1.png"]  # no temporary left
    models = load_models(release_dir, flows=("text_to_image",))
    result = text_to_image(models, images["prompts"][0], width=TEST_SIDE, height=TEST_SIDE, n=2, options=SamplingOptions(steps=4, seed=0))
    for i, png in enumerate(written):
        expected = (result.images[i].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        assert np.abs(png.astype(int) - expected.astype(int)).max() <= 1


def test_compile_flag_wraps_the_diffuser_and_gives_the_same_images(release_dir, images, tmp_path, monkeypatch):
    """--compile through a tracing backend that runs eager kernels (Inductor would compile C++ for
    minutes): the flow goes through torch.compile's graph and writes what the plain run writes."""
    from vd_core import acceleration

    wrapped = []
    original = acceleration.accelerate_diffuser

    def accelerate(diffuser, **options):
        assert options["compile"] and not options["cuda_graphs"]  # --fast asks for graphs only on a GPU
        assert options["cache_dir"] == tmp_path / "cache"
        wrapped.append(original(diffuser, **{**options, "compile_backend": "aot_eager"}))
        return wrapped[-1]

    monkeypatch.setattr(acceleration, "accelerate_diffuser", accelerate)
    # Compiling must leave these process settings alone; restore them after the test in any case.
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", inductor_config.fx_graph_cache)
    monkeypatch.setattr(functorch_config, "enable_autograd_cache", functorch_config.enable_autograd_cache)
    common = ["--models", release_dir, "--prompt", images["prompts"][0], "-n", "1", "--seed", "3", *FAST]
    assert run("text-to-image", *common, "--out", tmp_path / "plain.png") == 0
    assert run("text-to-image", *common, "--fast", "--compile", "--compile-cache", tmp_path / "cache",
               "--out", tmp_path / "fast.png") == 0
    assert len(wrapped) == 1
    difference = np.abs(read_png(tmp_path / "fast.png").astype(int) - read_png(tmp_path / "plain.png").astype(int))
    assert difference.max() <= 1  # float rounding can move a value across a uint8 boundary


@pytest.mark.parametrize(
    "command, extra, outputs",
    [
        ("image-variation", ["--image", "square", "--fidelity", "0.5", "--focus", "0.3", "-n", "1"], ["v.png"]),
        ("dual-context", ["--image", "square", "--prompt", "a red car", "--text-strength", "0.4", "-n", "1"], ["v.png"]),
        ("edit-image", ["--image", "square", "--positive", "a tall castle", "--negative", "a house", "-n", "1"], ["v.png"]),
        ("multi-context", ["--image", "square,mask=mask,weight=0.8,focus=0.2", "--image", "wide", "-n", "2"],
         ["v_0.png", "v_1.png"]),
    ],
)
def test_image_flows(command, extra, outputs, release_dir, images, tmp_path):
    mask = tmp_path / "mask.png"
    Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1)), "L").save(mask)
    paths = {"square": str(images["square"]), "wide": str(images["wide"]), "mask": str(mask)}
    args = [a.replace("square", paths["square"]).replace("wide", paths["wide"]).replace("mask=mask", f"mask={mask}")
            for a in extra]
    assert run(command, "--models", release_dir, "--out", tmp_path / "v.png", *args, *FAST) == 0
    for name in outputs:
        assert read_png(tmp_path / name).shape == (64, 64, 3)


@pytest.mark.parametrize("command, source", [("image-to-text", "--image"), ("text-variation", "--prompt")])
def test_text_flows_write_one_sentence_per_line(command, source, release_dir, images, tmp_path, capsys):
    value = images["wide"] if source == "--image" else "a red car"
    out = tmp_path / "captions.txt"
    assert run(command, "--models", release_dir, source, value, "-n", "3", "--steps", "4", "--out", out) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    assert capsys.readouterr().out.splitlines() == lines


def test_init_image_and_k_sampler(release_dir, images, tmp_path):
    out = tmp_path / "x.png"
    assert run("text-to-image", "--models", release_dir, "--prompt", "a red car", "-n", "1", "--sampler", "dpmpp_2m",
               "--scheduler", "karras", "--init-image", images["wide"], "--denoise", "0.5", "--steps", "4",
               "--out", out) == 0
    height, width = read_png(images["wide"]).shape[:2]
    assert read_png(out).shape == (height // 8 * 8, width // 8 * 8, 3)  # the init image's size, cut to multiples of 8


def test_errors_are_one_clear_line(release_dir, tmp_path, capsys):
    assert run("text-to-image", "--models", tmp_path, "--prompt", "a car", "--out", tmp_path / "x.png") == cli.EXIT_ERROR
    message = capsys.readouterr().err
    assert message.startswith("error:") and "vd-four-flow-v1-0-fp16.pth" in message and "download" in message
    assert run("text-to-image", "--models", release_dir, "--prompt", "a car", "--width", "65", "--steps", "2",
               "--out", tmp_path / "x.png") == cli.EXIT_ERROR
    assert "multiple of 8" in capsys.readouterr().err
    assert run("image-variation", "--models", release_dir, "--image", tmp_path / "missing.png") == cli.EXIT_ERROR
    assert "cannot read image" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_ctrl_c_cancels_between_steps_and_writes_nothing(release_dir, tmp_path, monkeypatch, capsys):
    def progress(step, total, x, x0):
        if step == 1:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C delivers; the CLI's handler asks to stop

    monkeypatch.setattr(cli, "report_progress", progress)
    previous = signal.getsignal(signal.SIGINT)
    status = run("text-to-image", "--models", release_dir, "--prompt", "a car", "--out", tmp_path / "x.png", *FAST)
    assert status == cli.EXIT_CANCELLED
    assert "cancelled" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGINT) is previous


def test_interrupted_write_leaves_no_file(tmp_path):
    targets = [tmp_path / "a.png", tmp_path / "b.png"]

    def write(paths):
        Path(paths[0]).write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cli.write_atomically(targets, write)
    assert list(tmp_path.iterdir()) == []


def test_help_lists_every_flow():
    result = subprocess.run([sys.executable, "-m", "vd_core", "--help"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0
    for command in [*cli.COMMANDS, "download"]:
        assert command in result.stdout


def test_parse_slot_rejects_unknown_options(images):
    with pytest.raises(ValueError, match="PATH"):
        cli.parse_slot(f"{images['square']},strength=2")


# ---------------------------------------------------------------------------------------------
# download: the plan and the file handling, with the hub client replaced (never the network).


class FakeHub:
    """Stands in for huggingface_hub: file sizes and downloads from a dict of contents."""

    def __init__(self, contents: dict):
        self.contents = contents
        self.fetched = []

    def api(self):
        hub = self

        class Api:
            def get_paths_info(self, repo, paths):
                return [SimpleNamespace(path=p, size=len(hub.contents[(repo, p)])) for p in paths if (repo, p) in hub.contents]

        return Api()

    def hf_hub_download(self, repo, filename, local_dir):
        self.fetched.append((repo, filename))
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.contents[(repo, filename)])
        return str(path)


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    items = download.plan_downloads()
    hub = FakeHub({(i.repo, i.filename): f"{i.repo}/{i.filename}".encode() for i in items})
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.hf_hub_download)
    return hub


def test_download_plan_matches_what_load_models_reads():
    plan = {(i.repo, i.filename): i.destination for i in download.plan_downloads()}
    assert plan[("shi-labs/versatile-diffusion", "pretrained_pth/vd-four-flow-v1-0-fp16.pth")] == "vd-four-flow-v1-0-fp16.pth"
    assert plan[("shi-labs/versatile-diffusion", "pretrained_pth/kl-f8.pth")] == "kl-f8.pth"
    assert plan[("shi-labs/versatile-diffusion", "pretrained_pth/optimus-vae.pth")] == "optimus-vae.pth"
    assert plan[("openai/clip-vit-large-patch14", "model.safetensors")] == "clip-vit-large-patch14/model.safetensors"
    assert plan[("openai-community/gpt2", "merges.txt")] == "optimus_tokenizers/gpt2/merges.txt"
    fp32 = [i.destination for i in download.plan_downloads(fp32=True, parts=frozenset({"diffuser"}))]
    assert fp32 == ["vd-four-flow-v1-0.pth"]


def test_download_fetches_missing_files_and_keeps_complete_ones(fake_hub, tmp_path):
    (tmp_path / "kl-f8.pth").write_bytes(b"shi-labs/versatile-diffusion/pretrained_pth/kl-f8.pth")  # complete
    assert cli.main(["download", "--models", str(tmp_path), "--dry-run"]) == 0
    assert fake_hub.fetched == []
    assert cli.main(["download", "--models", str(tmp_path)]) == 0
    assert ("shi-labs/versatile-diffusion", "pretrained_pth/kl-f8.pth") not in fake_hub.fetched
    assert (tmp_path / "vd-four-flow-v1-0-fp16.pth").read_bytes().endswith(b"fp16.pth")
    assert (tmp_path / "clip-vit-large-patch14" / "config.json").is_file()
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".vd-download")]


def test_download_rejects_a_size_mismatch(fake_hub, tmp_path, monkeypatch):
    item = download.plan_downloads(parts=frozenset({"image_vae"}))[0]
    monkeypatch.setattr(download, "hub_sizes", lambda items: {item: 999})
    with pytest.raises(CheckpointError, match="999"):
        download.download(tmp_path, [item])
    assert not (tmp_path / "kl-f8.pth").exists()


def test_download_names_a_file_missing_on_the_hub(fake_hub, tmp_path):
    del fake_hub.contents[("shi-labs/versatile-diffusion", "pretrained_pth/optimus-vae.pth")]
    assert cli.main(["download", "--models", str(tmp_path)]) == cli.EXIT_ERROR
    assert not (tmp_path / "optimus-vae.pth").exists()
