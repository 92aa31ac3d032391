#!/usr/bin/env bash
# One prepared GPU check (< 8 minutes on an H100 or H200): GLM-4-9B shape, random bf16 weights.
# Usage on the device machine, from the repo root:  bash bench/gpu.sh      (CPU smoke run: bash bench/gpu.sh --smoke)
# The output also goes to $OUT/gpu.txt when OUT is set (the device tool brings that folder back).
set -euo pipefail
cd "$(dirname "$0")/.."
# The GPU image has its own CUDA PyTorch (and safetensors, tiktoken, tqdm: all glm4 needs) and no network: use
# it as is. Elsewhere use (or make) the project's venv; bench/gpu.py imports glm4 from this checkout either way.
if python3 -c "import sys, torch, safetensors, tiktoken, tqdm; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  PY=python3
else
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q torch==2.13.0 \
      && .venv/bin/pip install -q -e .
  fi
  PY=.venv/bin/python
fi
LOG=${OUT:-/tmp}/gpu.txt
if [ "${1:-}" = "--smoke" ]; then
  $PY bench/gpu.py --smoke 2>&1 | tee "$LOG"
  exit "${PIPESTATUS[0]}"
fi
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  PYTHONUNBUFFERED=1 timeout 420 $PY bench/gpu.py --tp 1
  NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
  if [ "$NGPU" -ge 2 ]; then
    PYTHONUNBUFFERED=1 timeout 150 $PY bench/gpu.py --tp 2 --concurrency 64
  fi
} 2>&1 | tee "$LOG"
