#!/usr/bin/env bash
# Install nanopost and its test extras into the active Python environment.
# CPU users get torch 2.13.0's CPU build first (no multi-GB CUDA download); a torch that is already installed
# (e.g. a GPU user's CUDA build) is kept, since pyproject.toml only asks for torch>=2.4.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
  # PyTorch's CPU wheel index first; where it cannot be reached (a mirror-only network), fail fast and take
  # torch==2.13.0 from the configured package index instead.
  python -m pip install -q --retries 0 --timeout 15 "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
    || python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[test]"
