#!/usr/bin/env bash
# One prepared GPU check (< 8 minutes on an H200): GLM-4-9B shape, random bf16 weights.
# Usage on the device machine, from the repo root:  bash bench/gpu.sh      (CPU smoke run: bash bench/gpu.sh --smoke)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  $PY -m venv .venv && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q -e .
fi
if [ "${1:-}" = "--smoke" ]; then
  exec .venv/bin/python bench/gpu.py --smoke
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 300 .venv/bin/python bench/gpu.py --tp 1
NGPU=$(.venv/bin/python -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -ge 2 ]; then
  timeout 150 .venv/bin/python bench/gpu.py --tp 2 --concurrency 64
fi
