#!/usr/bin/env bash
# Run HERE (a machine with PyPI) before a GPU loan: downloads into the git-ignored .whl/ the
# Python 3.12 wheels the lent GPU machine lacks (it has torch, triton, transformers, tokenizers,
# safetensors, pillow, psutil, matplotlib, numpy, pyyaml, packaging, but no registry).
# benchmarks/gpu_suite.sh installs them from there into /tmp/site when megatron-core is not
# importable. megatron-core needs only torch, numpy and packaging, webdataset numpy, pyyaml and
# braceexpand: all there or fetched here. Carry .whl with the run (all stages fit one call):
#
#   bash benchmarks/gpu_wheels.sh
#   device run  carry=[".whl"]  timeout_s=600  command="bash benchmarks/gpu_suite.sh \$OUT"
set -euo pipefail
cd "$(dirname "$0")/.."
pip=${PIP:-.venv/bin/pip}
version() {  # the version constraints.txt pins, so the GPU runs the code CI tests
    local pinned
    pinned=$(sed -n "s/^$1==//p" constraints.txt)
    [ -n "$pinned" ] || { echo "constraints.txt pins no $1" >&2; exit 1; }
    echo "$pinned"
}
megatron_core=$(version megatron-core)
webdataset=$(version webdataset)
mkdir -p .whl
# Older versions of these would be installed beside the new ones, and two of one stop pip.
rm -f .whl/megatron_core-*.whl .whl/webdataset-*.whl .whl/braceexpand-*.whl
"$pip" download --dest .whl --python-version 3.12 --only-binary=:all: --no-deps \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
    "megatron-core==$megatron_core" "webdataset==$webdataset" braceexpand==0.1.7
ls -l .whl
