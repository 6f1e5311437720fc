#!/usr/bin/env bash
# The README's main job: set-up (idempotent) + the CPU demo.
# Usage: bash tools/run_demo.sh [OUT [DEMO ARGS...]]   e.g. bash tools/run_demo.sh demo_out --seed 7
# (OUT defaults to demo_out; the arguments after it go to `python -m megatron_ease.demo`.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/setup_env.sh
exec .venv/bin/python -m megatron_ease.demo --out "${1:-demo_out}" "${@:2}"
