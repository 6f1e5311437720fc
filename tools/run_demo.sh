#!/usr/bin/env bash
# The README's main job: set-up (idempotent) + the CPU demo. Usage: bash tools/run_demo.sh [OUT]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/setup_env.sh
exec .venv/bin/python -m megatron_ease.demo --out "${1:-demo_out}"
