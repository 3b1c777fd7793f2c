#!/usr/bin/env bash
# Create .venv and install trickbag with its test tools. Safe to run again (it only installs what is missing).
#
# Why torch is installed first, by itself: an unpinned `pip install torch` on a machine without a GPU pulls a
# multi-GB CUDA build. Where no NVIDIA GPU is visible we ask for the CPU build of torch 2.13.0 explicitly
# (set TRICKBAG_TORCH to choose another spec, e.g. TRICKBAG_TORCH="torch==2.13.0 --index-url <your CPU index>").
# On a GPU machine we leave torch to pip, so the user's CUDA torch (any >=2.3) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "setup: NVIDIA GPU found; installing torch with pip's default (CUDA) build" >&2
        "$VPY" -m pip install -q "torch>=2.3"
    else
        echo "setup: no GPU found; installing the CPU build of torch" >&2
        # shellcheck disable=SC2086
        "$VPY" -m pip install -q ${TRICKBAG_TORCH:-torch==2.13.0}
    fi
fi
"$VPY" -m pip install -q -e ".[dev]"
