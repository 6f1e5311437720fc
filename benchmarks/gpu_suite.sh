#!/usr/bin/env bash
# The GPU checks and figures of benchmarks/README.md, in stages that each fit a 10-minute slot.
#
#   bash benchmarks/gpu_suite.sh OUT [STAGE ...]      # no STAGE = all, in this order:
#     tests     CUDA tests: compiled Triton slice vs float64 (3 dtypes, several tiles), bit-identical
#               reruns, no host sync in the slice, the torch slice on CUDA          (~2 min)
#     slice     one EASE layer's slice at Qwen2.5-VL-7B attention sizes, torch vs Triton,
#               then the Triton tile sweep                                          (~3 min)
#     overhead  train step of the 7B language model (28 layers, bf16, SDPA core) with EASE on 4
#               layers, Triton slice, against EASE off                              (~4 min)
#     rollout   rollout engine vs HF generate on the small model                    (~5 min)
#
# Each stage's log goes to OUT/STAGE.log; the exit status is non-zero if any stage failed. Needs
# a CUDA GPU with torch, triton, transformers and megatron-core importable (PYTHON picks the
# interpreter, default python3). Where megatron-core is missing (the lent GPU machine has no
# registry), the wheels that benchmarks/gpu_wheels.sh put in .whl/ are installed into /tmp/site.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_suite.sh OUT [tests|slice|overhead|rollout ...]}
shift
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests slice overhead rollout)
python=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ! "$python" -c "import megatron.core" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "megatron-core is not importable and .whl/ holds no wheels: run" \
             "benchmarks/gpu_wheels.sh where PyPI is reachable and carry .whl" >&2
        exit 2
    fi
    "$python" -m pip install --quiet --no-index --no-deps --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$python" - <<'PY' | tee "$out/versions.log"
import megatron.core, torch, transformers, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0)
      if torch.cuda.is_available() else "NO CUDA")
print("megatron-core", megatron.core.__version__, "transformers", transformers.__version__,
      "triton", triton.__version__)
PY
status=0

run() {  # run NAME CMD...: tee the output into OUT/NAME.log, remember a failure, go on
    local name=$1
    shift
    echo "== $name: $*" | tee "$out/$name.log"
    "$@" 2>&1 | tee -a "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        echo "!! $name exited $rc" | tee -a "$out/$name.log"
        status=1
    fi
}

slice_7b=(--device cuda --dtype bfloat16 --heads 28 --key-heads 4 --head-dim 128
          --response-rows 1024)
for stage in "${stages[@]}"; do
    case $stage in
        tests)
            run tests "$python" -m pytest -q -p no:cacheprovider -k cuda \
                tests/unit/test_ease_triton.py tests/unit/test_ease_attention.py ;;
        slice)
            run slice "$python" -m benchmarks.ease_slice "${slice_7b[@]}" \
                --seq-lens 2048 4096 8192 --impl both
            for blocks in "64 32" "64 128" "128 64" "128 128"; do
                for warps in 4 8; do
                    # shellcheck disable=SC2086  # the two block sizes are two arguments
                    run "slice_triton_${blocks// /x}_w$warps" "$python" -m benchmarks.ease_slice \
                        "${slice_7b[@]}" --seq-lens 4096 8192 --impl triton \
                        --triton-blocks $blocks --triton-num-warps "$warps" --repeats 3
                done
            done ;;
        overhead)
            run overhead "$python" -m benchmarks.ease_overhead --device cuda --dtype bf16 \
                --preset qwen2.5-7b --core-attention sdpa --optimizer sgd --seq-lens 2048 4096 \
                --slice-impl triton --variants off ease ;;
        rollout)
            run rollout "$python" -m benchmarks.rollout --device cuda --models small \
                --workloads 16x1:32-64 64x1:32-64 16x8:512-1024 ;;
        *)
            echo "unknown stage '$stage' (tests, slice, overhead, rollout)" >&2
            exit 2 ;;
    esac
done
exit $status
