"""Model files: loaded weights never die with their file, and every broken file gets a message that
says what is wrong (not "corrupt" for a permission, not "not found" for a folder, no unsafe hint)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT
from vd_core.checkpoint import read_state_dict
from vd_core.errors import CheckpointError

# Loads a file with the loader named, truncates the file in place, then uses every weight.
_TRUNCATE_AFTER_LOAD = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {root!r})
    from vd_core.checkpoint import read_state_dict
    from vd_core.diffuser import load_diffuser
    from vd_core.image_vae import load_image_vae
    kind, path, heads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if kind == "diffuser":
        model = load_diffuser(path, dtype=torch.float16, num_heads=heads)
        tensors = list(model.state_dict().values())
    elif kind == "clip":
        from vd_core.clip import load_clip
        tensors = list(load_clip(path, tokenizer=None, towers=("vision",)).state_dict().values())
        path = os.path.join(path, "model.safetensors")
    elif kind == "vae":
        tensors = list(load_image_vae(path).state_dict().values())
    else:
        tensors = list(read_state_dict(path).values())
    os.truncate(path, 64)
    print(sum(float(t.float().abs().sum()) for t in tensors))
""")


@pytest.mark.parametrize("kind, name", [("diffuser", "vd-four-flow-v1-0-fp16.pth"), ("vae", "kl-f8.pth"),
                                        ("state", "vae.safetensors"), ("clip", "clip-vit-large-patch14")])
def test_weights_survive_their_file_being_truncated(release_dir, tmp_path, kind, name):
    """Truncating a loaded file used to kill the process with SIGBUS (weights still mapped)."""
    target = tmp_path / name
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(read_state_dict(release_dir / "kl-f8.pth"), str(target))
    elif (release_dir / name).is_dir():
        shutil.copytree(release_dir / name, target)
    else:
        shutil.copy(release_dir / name, target)
    script = _TRUNCATE_AFTER_LOAD.format(root=str(ROOT))
    heads = json.loads((release_dir / "expected" / "config.json").read_text())["tiny"]["diffuser_image"]["num_heads"]
    done = subprocess.run([sys.executable, "-c", script, kind, str(target), str(heads)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert float(done.stdout.strip()) > 0


class _Code:
    def __reduce__(self):
        return (print, ("this must never run",))


def _message(path, **kw) -> str:
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(path, what="image VAE file", **kw)
    return str(caught.value)


def test_messages_name_the_real_cause(tmp_path):
    random_bytes = tmp_path / "random.pth"
    for seed in range(64):  # random bytes break torch's unpickler in many ways; each is a damaged file
        random_bytes.write_bytes(random.Random(seed).randbytes(4096))
        text = _message(random_bytes)
        assert "run code" not in text and "Python objects" not in text and "download it again" in text, seed

    unsafe = tmp_path / "unsafe.pth"
    torch.save({"weight": torch.zeros(2), "payload": _Code()}, unsafe)
    text = _message(unsafe)
    assert "run code" in text and "not loaded" in text

    folder = tmp_path / "kl-f8.pth"
    folder.mkdir()
    text = _message(folder)
    assert "is a folder" in text and "not found" not in text

    assert "not found" in _message(tmp_path / "missing.pth")

    for text in (_message(random_bytes), _message(unsafe)):
        assert "weights_only" not in text and "weights_only=False" not in text


def test_unreadable_file_is_not_called_corrupt(release_dir, tmp_path, monkeypatch):
    locked = tmp_path / "kl-f8.pth"
    shutil.copy(release_dir / "kl-f8.pth", locked)
    locked.chmod(0)
    if os.name != "posix" or os.geteuid() == 0:  # root reads anything: make the open fail as it would
        from vd_core import checkpoint

        def denied(path, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(checkpoint, "open", denied, raising=False)
    try:
        text = _message(locked)
    finally:
        locked.chmod(0o600)
    assert "permission denied" in text and "corrupt" not in text
