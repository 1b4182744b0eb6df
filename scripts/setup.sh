#!/usr/bin/env bash
# Create .venv (if missing) and install bregtop_dist with its test (which includes the jobs'
# dependencies: datasets, tokenizers, accelerate, transformers, deepspeed) and benchmark extras.
# torch is pinned to the CPU build first, so nothing later pulls CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv 2>/dev/null || true
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,bench]"
