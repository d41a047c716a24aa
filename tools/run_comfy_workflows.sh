#!/usr/bin/env bash
# Run every workflow in workflows/ on a real, headless ComfyUI (CPU), with the shared harness.
#
# Local, by hand (CI runs the same checks at small sizes through tests/test_workflows_in_comfyui.py,
# see .ci/run): it runs the in-ComfyUI tests of tests/test_comfy_bridge.py, then proves that the pack
# imports in ComfyUI, that the workflows validate against the live /object_info, and that each one
# executes end to end, at the workflows' own sizes unless --quick.
#
#   tools/run_comfy_workflows.sh [--quick] [workflows/NAME.json ...]
#
#   --quick   run each workflow with at most 4 steps, 64×64 images and batch 1 (the graphs and
#             every other value unchanged): minutes instead of an hour on a 2-core CPU.
#
# Environment (defaults in brackets):
#   HARNESS        the harness folder [../shared/comfy_harness]
#   COMFYUI_DIR    a ComfyUI work tree [/tmp/ComfyUI]; exported from the bare git snapshot
#                  $COMFYUI_GIT when missing (harness README, "Set-up")
#   COMFY_PYTHON   ComfyUI's python [/tmp/venv-comfy/bin/python]; the venv is built as the harness
#                  README says when missing (torch 2.14.1 from local disk; takes a while)
#   VD_MODELS      a models folder (versatile_diffusion/, clip_vision/ …) [a temp folder filled
#                  with $VD_REFERENCE_DIR/tiny_release, the tiny model in the released layout]
#   OUT            where results go, one folder per workflow [/tmp/vd_comfy_runs]
#   TIMEOUT        seconds per workflow [1800]
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=$PWD
HARNESS=${HARNESS:-$PACK/../shared/comfy_harness}
COMFYUI_DIR=${COMFYUI_DIR:-/tmp/ComfyUI}
export COMFY_PYTHON=${COMFY_PYTHON:-/tmp/venv-comfy/bin/python}
REFERENCE=${VD_REFERENCE_DIR:-$PACK/../shared/vd_reference}
OUT=${OUT:-/tmp/vd_comfy_runs}
TIMEOUT=${TIMEOUT:-1800}

QUICK=0
WORKFLOWS=()
for arg in "$@"; do
  case $arg in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) WORKFLOWS+=("$arg") ;;
  esac
done
[ ${#WORKFLOWS[@]} -gt 0 ] || WORKFLOWS=(workflows/*.json)

[ -f "$HARNESS/run_workflow.py" ] || { echo "harness not found at $HARNESS (set HARNESS)" >&2; exit 2; }

# --- ComfyUI work tree and its venv (harness README, "Set-up") ---
if [ ! -f "$COMFYUI_DIR/main.py" ]; then
  [ -n "${COMFYUI_GIT:-}" ] || { echo "no ComfyUI at $COMFYUI_DIR: set COMFYUI_DIR, or COMFYUI_GIT to a bare git snapshot of Comfy-Org/ComfyUI" >&2; exit 2; }
  mkdir -p "$COMFYUI_DIR"
  # one blob of the snapshot may be missing; excluded so that the export does not stop
  git -C "$COMFYUI_GIT" archive HEAD -- . ':(exclude)comfy/text_encoders/llama_tokenizer/tokenizer.json' | tar -x -C "$COMFYUI_DIR"
fi
if [ ! -x "$COMFY_PYTHON" ]; then
  venv=$(dirname "$(dirname "$COMFY_PYTHON")")
  python3 -m venv "$venv"
  "$COMFY_PYTHON" -m pip install --quiet torch==2.14.1 torchvision==0.29.1
  grep -v -E '^(torch|torchvision|torchaudio)\s*$' "$COMFYUI_DIR/requirements.txt" > "$venv/comfy-reqs.txt"
  "$COMFY_PYTHON" -m pip install --quiet -r "$venv/comfy-reqs.txt" requests
  "$COMFY_PYTHON" -m pip install --quiet -r "$PACK/requirements.txt" pytest
fi

# --- the bridge and the KSampler path inside ComfyUI (tests/test_comfy_bridge.py, last part) ---
VD_COMFYUI_DIR=$COMFYUI_DIR VD_REFERENCE_DIR=$REFERENCE "$COMFY_PYTHON" -m pytest -q -p no:cacheprovider \
  tests/test_comfy_bridge.py -k inside_comfyui

# --- models and input images ---
WORK=$(mktemp -d /tmp/vd_comfy_XXXXXX)
trap 'rm -rf "$WORK"' EXIT
if [ -z "${VD_MODELS:-}" ]; then
  tiny=$REFERENCE/tiny_release
  [ -f "$tiny/vd-four-flow-v1-0-fp16.pth" ] || { echo "no models: set VD_MODELS or VD_REFERENCE_DIR" >&2; exit 2; }
  VD_MODELS=$WORK/models
  mkdir -p "$VD_MODELS/versatile_diffusion" "$VD_MODELS/clip_vision"
  cp "$tiny"/*.pth "$VD_MODELS/versatile_diffusion/"
  cp -r "$tiny/clip-vit-large-patch14" "$VD_MODELS/clip_vision/"
  cp -r "$tiny/optimus_tokenizers" "$VD_MODELS/versatile_diffusion/"  # where the VD Loader looks for them
fi
mkdir -p "$WORK/input"
cp "$COMFYUI_DIR/input/example.png" "$WORK/input/"  # the image the workflows load, as ComfyUI ships it

# --- validation against the live node specs ---
mkdir -p "$OUT"
python3 "$HARNESS/check_workflows.py" --comfy "$COMFYUI_DIR" --pack "$PACK" --models "$VD_MODELS" \
  --allow-input-mismatch --save-object-info "$OUT/object_info.json" --quiet

# --- quick copies: API format with few steps and small images ---
if [ "$QUICK" = 1 ]; then
  mkdir -p "$WORK/quick"
  python3 - "$HARNESS" "$OUT/object_info.json" "$WORK/quick" "${WORKFLOWS[@]}" <<'PY'
import json, os, sys
sys.path.insert(0, sys.argv[1])
from comfy_common import ui_to_api, workflow_format
object_info = json.load(open(sys.argv[2]))
LIMITS = {"steps": 4, "width": 64, "height": 64, "batch_size": 1}
for path in sys.argv[4:]:
    workflow = json.load(open(path))
    prompt = ui_to_api(workflow, object_info)[0] if workflow_format(workflow) == "ui" else workflow
    for node in prompt.values():
        for name, limit in LIMITS.items():
            if isinstance(node["inputs"].get(name), int):
                node["inputs"][name] = min(node["inputs"][name], limit)
    json.dump(prompt, open(os.path.join(sys.argv[3], os.path.basename(path)), "w"), indent=1)
PY
fi

# --- run ---
failed=()
for workflow in "${WORKFLOWS[@]}"; do
  name=$(basename "$workflow" .json)
  file=$workflow
  [ "$QUICK" = 1 ] && file=$WORK/quick/$name.json
  echo "=== $name"
  if python3 "$HARNESS/run_workflow.py" --comfy "$COMFYUI_DIR" --pack "$PACK" --models "$VD_MODELS" \
      --input "$WORK/input" --workflow "$file" --out "$OUT/$name" --timeout "$TIMEOUT" \
      --comfy-arg=--preview-method --comfy-arg=latent2rgb; then
    :
  else
    failed+=("$name")
  fi
done
echo "${#WORKFLOWS[@]} workflows, ${#failed[@]} failed${failed:+: ${failed[*]}}; results in $OUT"
[ ${#failed[@]} -eq 0 ]
