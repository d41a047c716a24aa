"""A real ComfyUI frontend in headless Chromium, driven with the standard library only.

* :class:`ComfyProcess` starts a ComfyUI work tree on the CPU (loopback, a throw-away
  ``--base-directory`` with this pack linked into ``custom_nodes``, a models folder registered
  through ``extra_model_paths.yaml`` — every sub-folder under its own name, as the shared
  harness does) and stops it by its own pid.
* :class:`Browser` talks to Debian's ``chromedriver`` over the W3C WebDriver HTTP API (new
  session, navigate, execute script, screenshot): no playwright, no selenium.
* :func:`tiny_models` lays out the tiny reference release (``$VD_REFERENCE_DIR/tiny_release``) as
  a user's ``models/`` folder, with symbolic links.

Used by ``tools/check_frontend.py`` and ``tests/test_frontend.py``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

PACK = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)
# Frontend settings for an unattended session: no template browser on first start, no minimap,
# canvas statistics or zoom buttons in the pictures, full detail even when zoomed out.
FRONTEND_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.Graph.CanvasMenu": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 1,
    "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1,
}


class FrontendError(RuntimeError):
    """A step of the browser session failed; the message says which and why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, body=None, method: str | None = None, timeout: float = 60.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read().decode() or "null")
    except urllib.error.HTTPError as e:
        raw = e.read().decode(errors="replace")
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw


def _wait_until(ready, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise FrontendError(f"{what} exited with code {proc.returncode} while starting:\n{tail}")
        try:
            if ready():
                return
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            raise FrontendError(f"{what} not ready after {timeout:.0f} s")
        time.sleep(0.3)


def _stop(proc: subprocess.Popen | None) -> None:
    """Stop one process we started (its own session: SIGTERM to the group, then SIGKILL)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def tiny_models(reference: Path, dest: Path) -> Path:
    """``dest`` as a user's models folder holding the tiny release: the three ``.pth`` files and
    the Optimus tokenizers in ``versatile_diffusion/``, the CLIP folder in ``clip_vision/``."""
    tiny = Path(reference) / "tiny_release"
    if not tiny.is_dir():
        raise FrontendError(f"no tiny release at {tiny} (set VD_REFERENCE_DIR)")
    vd, clip = dest / "versatile_diffusion", dest / "clip_vision"
    vd.mkdir(parents=True)
    clip.mkdir(parents=True)
    for f in tiny.glob("*.pth"):
        (vd / f.name).symlink_to(f)
    (vd / "optimus_tokenizers").symlink_to(tiny / "optimus_tokenizers", target_is_directory=True)
    (clip / "clip-vit-large-patch14").symlink_to(tiny / "clip-vit-large-patch14", target_is_directory=True)
    return dest


class ComfyProcess:
    """ComfyUI serving this pack and ``models_dir`` on 127.0.0.1 (``with ComfyProcess(...) as c:``)."""

    def __init__(self, comfy_dir: Path, python: str, models_dir: Path, workdir: Path, input_files=()):
        self.comfy_dir, self.python, self.models_dir = Path(comfy_dir), python, Path(models_dir)
        self.base_dir = Path(workdir) / "comfy_base"
        self.log_path = Path(workdir) / "comfy_server.log"
        self.input_files = list(input_files)
        self.proc = None
        self.url = ""

    def __enter__(self) -> ComfyProcess:
        base = self.base_dir
        for sub in ("custom_nodes", "input", "output", "temp", "user/default"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        (base / "custom_nodes" / PACK.name).symlink_to(PACK, target_is_directory=True)
        for f in self.input_files:
            shutil.copy(f, base / "input")
        (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(FRONTEND_SETTINGS))
        yaml = base / "extra_model_paths.yaml"
        folders = sorted(p.name for p in self.models_dir.iterdir() if p.is_dir())
        yaml.write_text("frontend_check:\n    base_path: " + json.dumps(str(self.models_dir)) + "\n"
                        + "".join(f"    {name}: {name}\n" for name in folders))
        port = free_port()
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                 "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
                 "--disable-auto-launch", "--disable-api-nodes", "--extra-model-paths-config", str(yaml)],
                cwd=self.comfy_dir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"
        try:
            _wait_until(lambda: _request(self.url + "/system_stats", timeout=3)[0] == 200, 300, "ComfyUI",
                        self.proc, self.log_path)
        except BaseException:
            _stop(self.proc)
            raise
        return self

    def get(self, path: str, timeout: float = 120.0):
        status, body = _request(self.url + path, timeout=timeout)
        if status != 200:
            raise FrontendError(f"GET {path}: HTTP {status}")
        return body

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __exit__(self, *exc) -> None:
        _stop(self.proc)


class Browser:
    """One headless Chromium session through chromedriver's W3C HTTP API."""

    def __init__(self, chromium: str, chromedriver: str, workdir: Path, size=(1280, 960)):
        self.chromium, self.chromedriver = chromium, chromedriver
        self.workdir, self.size = Path(workdir), size
        self.proc = None
        self.session = ""

    def __enter__(self) -> Browser:
        port = free_port()
        log = self.workdir / "chromedriver.log"
        with open(log, "wb") as f:
            self.proc = subprocess.Popen([self.chromedriver, f"--port={port}"], stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.driver = f"http://127.0.0.1:{port}"
        try:
            _wait_until(lambda: _request(self.driver + "/status", timeout=3)[1]["value"]["ready"], 60,
                        "chromedriver", self.proc, log)
            profile = tempfile.mkdtemp(prefix="profile_", dir=self.workdir)
            args = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={self.size[0]},{self.size[1]}"]
            status, body = _request(self.driver + "/session", {"capabilities": {"alwaysMatch": {
                "browserName": "chrome", "goog:chromeOptions": {"binary": self.chromium, "args": args}}}})
            if status != 200:
                raise FrontendError(f"chromedriver could not start Chromium: {body}")
            self.session = body["value"]["sessionId"]
            self._call("POST", "/timeouts", {"script": 600_000, "pageLoad": 120_000})
        except BaseException:
            _stop(self.proc)
            raise
        return self

    def _call(self, method: str, path: str, body=None, timeout: float = 660.0):
        status, reply = _request(f"{self.driver}/session/{self.session}{path}", body if body is not None else
                                 ({} if method == "POST" else None), method=method, timeout=timeout)
        if status != 200:
            value = reply.get("value", reply) if isinstance(reply, dict) else reply
            message = value.get("message", value) if isinstance(value, dict) else value
            raise FrontendError(f"WebDriver {method} {path}: {str(message)[:2000]}")
        return reply["value"]

    def open(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    def js(self, script: str, *args):
        """Run ``script`` (a function body that sees ``args``) and return its value."""
        return self._call("POST", "/execute/sync", {"script": "const args = Array.from(arguments);\n" + script,
                                                    "args": list(args)})

    def js_async(self, script: str, *args):
        """Run an async function body that sees ``args``: its resolved value is returned (errors raise)."""
        wrapper = ("const done = arguments[arguments.length - 1];"
                   f"(async (...args) => {{ {script} }})(...Array.from(arguments).slice(0, -1))"
                   ".then(v => done({ok: v}), e => done({error: String(e && e.stack || e)}));")
        result = self._call("POST", "/execute/async", {"script": wrapper, "args": list(args)})
        if "error" in result:
            raise FrontendError(f"in the page: {result['error'][:2000]}")
        return result.get("ok")

    def wait_for(self, expression: str, timeout: float, what: str):
        """Poll a JS expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            # A page object (the canvas, the graph) cannot travel back: it counts as true.
            value = self.js(f"let v; try {{ v = {expression}; }} catch (e) {{ return null; }}"
                            "try { JSON.stringify(v); return v; } catch (e) { return true; }")
            if value:
                return value
            if time.monotonic() > deadline:
                raise FrontendError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.5)

    def screenshot_png(self) -> bytes:
        return base64.b64decode(self._call("GET", "/screenshot"))

    def __exit__(self, *exc) -> None:
        try:
            if self.session:
                _request(f"{self.driver}/session/{self.session}", method="DELETE", timeout=30)
        except OSError:
            pass
        _stop(self.proc)
