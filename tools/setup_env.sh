#!/usr/bin/env bash
# Idempotent set-up: creates .venv/ at the repo root and installs megatron_ease with the pinned
# versions of constraints.txt. torch==2.13.0 goes in first, on its own, so that no later
# requirement can pull a multi-GB CUDA build of torch. Re-runs are a no-op unless setup.py or
# constraints.txt changed.
#
# Where pip finds the CPU wheel of torch 2.13.0 locally (this project's machines), plain
# `pip install torch==2.13.0` takes it. Against plain PyPI it takes the CUDA build (several GB,
# pinning another triton than constraints.txt): set TORCH_INDEX_URL to PyTorch's CPU index,
# https://download.pytorch.org/whl/cpu, for a CPU machine elsewhere.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
# venv writes bin/python before ensurepip installs pip: a set-up killed in between (or a
# python3 without ensurepip) left a .venv without pip that no re-run repaired.
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  echo "[setup] creating .venv with $($PYTHON --version 2>&1)" >&2
  "$PYTHON" -m venv --clear .venv
fi
stamp=.venv/.megatron_ease-installed
want=$(cat setup.py constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing torch==2.13.0, then megatron_ease[dev] (constraints.txt)" >&2
  torch_index=()
  [ -n "${TORCH_INDEX_URL:-}" ] && torch_index=(--index-url "$TORCH_INDEX_URL")
  .venv/bin/python -m pip install -q --disable-pip-version-check \
    ${torch_index[@]+"${torch_index[@]}"} torch==2.13.0
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
  echo "$want" > "$stamp"
fi
