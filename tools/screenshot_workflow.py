#!/usr/bin/env python3
"""Screenshot one of the pack's workflows in the real ComfyUI frontend (headless Chromium).

Optional, local only. Starts a ComfyUI work tree on the CPU (loopback, a throw-away
--base-directory with this pack linked into custom_nodes and the tiny reference model laid out
as in tools/run_comfy_workflows.sh), opens its frontend in headless Chromium driven by
playwright-core, loads the workflow with app.loadGraphData, optionally queues it and waits for
it to finish (so the Save Image node shows its output), frames the whole graph and saves a PNG.

    tools/screenshot_workflow.py [--workflow workflows/vd_text_to_image.json]
        [--out docs/workflow_text_to_image.png] [--no-run] [--size 1400x800]

Needs: Debian's chromium (apt-get install chromium) and playwright-core from npm in a folder
given by --node-modules / $PLAYWRIGHT_NODE_MODULES (e.g. `cd /tmp/shot && \
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install playwright-core`, then /tmp/shot/node_modules).
ComfyUI: --comfy / $COMFYUI_DIR [/tmp/ComfyUI], its python --python / $COMFY_PYTHON
[/tmp/venv-comfy/bin/python]. vd_text_to_image as shipped (50 steps, 512×512, batch 2) takes
about 8 minutes on a 2-core CPU with the tiny model.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

PACK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DRIVER = r"""
const { chromium } = require('playwright-core');
const fs = require('fs');
const path = require('path');
(async () => {
  const [url, wfPath, outPath, run, width, height, chromiumPath, profile] = process.argv.slice(2);
  const browser = await chromium.launchPersistentContext(profile, {
    executablePath: chromiumPath, headless: true,
    viewport: { width: +width, height: +height },
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update', '--disable-sync'] });
  const page = browser.pages()[0] || await browser.newPage();
  page.on('console', m => { if (m.type() === 'error' && !/404/.test(m.text())) console.log('console:', m.text()); });
  await page.goto(url, { waitUntil: 'networkidle' });
  await page.waitForFunction(() => window.app && window.app.graph, null, { timeout: 120000 });
  await page.waitForTimeout(2000);
  const wf = JSON.parse(fs.readFileSync(wfPath, 'utf8'));
  const name = path.basename(wfPath);
  await page.evaluate(async ([wf, name]) => { await window.app.loadGraphData(wf, true, true, name); }, [wf, name]);
  await page.waitForTimeout(1000);
  // close the empty default tab
  console.log('tabs:', await page.evaluate(async (name) => {
    try {
      const ws = window.app.extensionManager.workflow;
      for (const w of [...ws.openWorkflows]) if (!w.path.endsWith(name)) await ws.closeWorkflow(w);
      return ws.openWorkflows.map(w => w.path).join(', ');
    } catch (e) { return 'not closed: ' + e; }
  }, name));
  // frame all nodes in the free area (right of the side bar, below the tabs), with a margin
  const fit = () => page.evaluate(() => {
    const app = window.app, ds = app.canvas.ds;
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of app.graph._nodes) {
      const b = n.getBounding();
      x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]);
      x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]);
    }
    const r = app.canvas.canvas.getBoundingClientRect();
    const area = { left: 60 - r.left, top: 95 - r.top,
                   right: window.innerWidth - 20 - r.left, bottom: window.innerHeight - 20 - r.top };
    const scale = Math.min((area.right - area.left) / (x1 - x0), (area.bottom - area.top) / (y1 - y0), 1);
    ds.scale = scale;
    ds.offset[0] = (area.left + area.right) / 2 / scale - (x0 + x1) / 2;
    ds.offset[1] = (area.top + area.bottom) / 2 / scale - (y0 + y1) / 2;
    app.canvas.setDirty(true, true);
    return { scale, box: [x0, y0, x1, y1] };
  }).then(r => console.log('fit:', JSON.stringify(r)));
  await fit();
  if (run === 'run') {
    await page.evaluate(() => {
      window.__done = null;
      window.app.api.addEventListener('execution_success', () => { window.__done = 'ok'; });
      window.app.api.addEventListener('execution_error', (e) => { window.__done = 'error: ' + JSON.stringify(e.detail).slice(0, 800); });
    });
    await page.evaluate(() => window.app.queuePrompt(0));
    const t0 = Date.now();
    await page.waitForFunction(() => window.__done, null, { timeout: 3600000, polling: 1000 });
    const done = await page.evaluate(() => window.__done);
    console.log('run:', done, ((Date.now() - t0) / 1000).toFixed(1) + ' s');
    if (done !== 'ok') process.exitCode = 1;
    await page.waitForTimeout(2000);
    await fit();
  }
  await page.waitForTimeout(1000);
  await page.screenshot({ path: outPath });
  await browser.close();
})().catch(e => { console.error(e); process.exit(1); });
"""

# frontend settings for a clean picture: no template browser, minimap, canvas stats, low-detail mode
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 1,
    "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1,
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workflow", default=os.path.join(PACK, "workflows", "vd_text_to_image.json"))
    ap.add_argument("--out", default=os.path.join(PACK, "docs", "workflow_text_to_image.png"))
    ap.add_argument("--no-run", action="store_true", help="screenshot the loaded graph without running it")
    ap.add_argument("--size", default="1400x800")
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_DIR", "/tmp/ComfyUI"))
    ap.add_argument("--python", default=os.environ.get("COMFY_PYTHON", "/tmp/venv-comfy/bin/python"))
    ap.add_argument("--reference", default=os.environ.get("VD_REFERENCE_DIR", os.path.join(PACK, "..", "shared", "vd_reference")))
    ap.add_argument("--node-modules", default=os.environ.get("PLAYWRIGHT_NODE_MODULES", "/tmp/shot/node_modules"))
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    width, height = args.size.lower().split("x")

    for path, what in ((os.path.join(args.comfy, "main.py"), "ComfyUI (--comfy)"),
                       (args.python, "ComfyUI's python (--python)"),
                       (os.path.join(args.node_modules, "playwright-core"), "playwright-core (--node-modules)"),
                       (args.chromium, "chromium (--chromium)")):
        if not os.path.exists(path):
            sys.exit(f"not found: {what}: {path}")

    work = tempfile.mkdtemp(prefix="vd_screenshot_")
    proc = None
    try:
        # models: the tiny reference model in the released layout (as tools/run_comfy_workflows.sh)
        tiny = os.path.join(args.reference, "tiny_release")
        models = os.path.join(work, "models")
        os.makedirs(os.path.join(models, "versatile_diffusion"))
        os.makedirs(os.path.join(models, "clip_vision"))
        for f in os.listdir(tiny):
            if f.endswith(".pth"):
                shutil.copy(os.path.join(tiny, f), os.path.join(models, "versatile_diffusion"))
        shutil.copytree(os.path.join(tiny, "clip-vit-large-patch14"), os.path.join(models, "clip_vision", "clip-vit-large-patch14"))
        shutil.copytree(os.path.join(tiny, "optimus_tokenizers"), os.path.join(models, "versatile_diffusion", "optimus_tokenizers"))
        base = os.path.join(work, "base")
        for sub in ("custom_nodes", "input", "output", "temp", "user/default"):
            os.makedirs(os.path.join(base, sub))
        os.symlink(PACK, os.path.join(base, "custom_nodes", "vdpack"))
        example = os.path.join(args.comfy, "input", "example.png")
        if os.path.isfile(example):
            shutil.copy(example, os.path.join(base, "input"))
        with open(os.path.join(base, "user", "default", "comfy.settings.json"), "w") as f:
            json.dump(SETTINGS, f)
        yaml = os.path.join(base, "extra_model_paths.yaml")
        with open(yaml, "w") as f:
            f.write(f"screenshot:\n    base_path: {json.dumps(models)}\n"
                    "    versatile_diffusion: versatile_diffusion\n    clip_vision: clip_vision\n")

        port = free_port()
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
        log = open(os.path.join(work, "server.log"), "wb")
        proc = subprocess.Popen(
            [args.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
             "--base-directory", base, "--database-url", "sqlite:///:memory:", "--disable-auto-launch",
             "--disable-api-nodes", "--extra-model-paths-config", yaml],
            cwd=args.comfy, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                sys.exit(f"ComfyUI exited during start-up; log: {log.name}")
            try:
                with urllib.request.urlopen(url + "/system_stats", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                sys.exit("ComfyUI did not start in 300 s")
            time.sleep(1)
        print(f"ComfyUI at {url}")

        driver = os.path.join(work, "driver.js")
        with open(driver, "w") as f:
            f.write(DRIVER)
        out = os.path.abspath(args.out)
        rc = subprocess.call(
            ["node", driver, url, os.path.abspath(args.workflow), out, "no" if args.no_run else "run",
             width, height, args.chromium, os.path.join(work, "profile")],
            env=dict(os.environ, NODE_PATH=args.node_modules))
        if rc:
            with open(log.name, "rb") as f:
                sys.stderr.write(f.read()[-3000:].decode(errors="replace"))
            sys.exit(f"screenshot failed (node exit {rc})")
        print(f"saved {out}")
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
