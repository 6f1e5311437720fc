#!/usr/bin/env bash
# Run HERE (a machine with PyPI) before a GPU loan: downloads into the git-ignored .whl/ the
# Python 3.12 wheels the lent GPU machine lacks (it has torch, triton, transformers, tokenizers,
# safetensors, pillow, psutil, matplotlib, but no registry). benchmarks/gpu_suite.sh installs
# them from there into /tmp/site when megatron-core is not importable. Carry .whl with the run:
#
#   bash benchmarks/gpu_wheels.sh
#   device run  carry=[".whl"]  command="bash benchmarks/gpu_suite.sh \$OUT tests slice"
set -euo pipefail
cd "$(dirname "$0")/.."
pip=${PIP:-.venv/bin/pip}
version() {  # the version constraints.txt pins, so the GPU runs the code CI tests
    sed -n "s/^$1==//p" constraints.txt
}
mkdir -p .whl
"$pip" download --dest .whl --python-version 3.12 --only-binary=:all: --no-deps \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
    "megatron-core==$(version megatron-core)" "webdataset==$(version webdataset)" braceexpand
ls -l .whl
