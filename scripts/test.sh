#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint, and run the test suite. pytest's "no tests" (exit 5) fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check bregtop_dist launch tests triton_kernels scripts
.venv/bin/mypy bregtop_dist
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
