#!/usr/bin/env bash
# The GPU checks and figures of benchmarks/README.md, in stages that each fit a 10-minute slot.
#
#   bash benchmarks/gpu_suite.sh OUT [STAGE ...]      # no STAGE = all, in this order:
#     tests     CUDA tests: compiled Triton slice vs float64 (3 dtypes, several tiles), bit-identical
#               reruns, no host sync in the slice, the torch slice on CUDA          (~1-2 min)
#     slice     one EASE layer's slice at Qwen2.5-VL-7B attention sizes, torch vs Triton,
#               then the Triton tile sweep (8 processes)                            (~2-3 min)
#     overhead  train step of the 7B language model (28 layers, bf16, SDPA core) with EASE on 4
#               layers, Triton slice, against EASE off                              (~1.5-3 min)
#     rollout   rollout engine vs HF generate on the small model                    (~1.5-3 min)
#
# Times are estimates for one H200 (none of this has run there yet); every stage prints the
# seconds each command took. All four stages should fit one 10-minute device call; a machine
# stays warm only ~30 s after a call, so one call with all stages costs less than two. Each
# command is stopped after its own limit (LIMIT below): a hang ends that command, not the run,
# but the limits add up to more than one call's 10 minutes, so a hang early (tests, slice) can
# still leave later stages to the call's own limit: then rerun just those stages.
#
# OUT gets at most five files, what a device call brings back: OUT/versions.log and
# OUT/STAGE.log per stage run (the tile sweep appends to slice.log). The exit status is non-zero
# if any command failed. Needs a CUDA GPU with torch, triton, transformers and megatron-core
# importable (PYTHON picks the interpreter, default python3). Where megatron-core is missing (the
# lent GPU machine has no registry), the wheels that benchmarks/gpu_wheels.sh put in .whl/ are
# installed into /tmp/site.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_suite.sh OUT [tests|slice|overhead|rollout ...]}
shift
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests slice overhead rollout)
for stage in "${stages[@]}"; do  # a typo fails now, before minutes of device time are spent
    case $stage in
        tests | slice | overhead | rollout) ;;
        *)
            echo "unknown stage '$stage' (tests, slice, overhead, rollout)" >&2
            exit 2 ;;
    esac
done
python=${PYTHON:-python3}
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2  # absolute: OUT may be relative to the caller
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1
if ! "$python" -c "import megatron.core" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "megatron-core is not importable and .whl/ holds no wheels: run" \
             "benchmarks/gpu_wheels.sh where PyPI is reachable and carry .whl" >&2
        exit 2
    fi
    # --upgrade: a second call on a still-warm machine finds /tmp/site filled already
    "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! "$python" - <<'PY' 2>&1 | tee "$out/versions.log"; then
import megatron.core, torch, transformers, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0)
      if torch.cuda.is_available() else "NO CUDA")
print("megatron-core", megatron.core.__version__, "transformers", transformers.__version__,
      "triton", triton.__version__)
if not torch.cuda.is_available():  # else the CUDA tests would all be skipped, and pass
    raise SystemExit("torch sees no CUDA device")
PY
    echo "the check above failed: no stage can run" >&2
    exit 2
fi
status=0

run() {  # run STAGE LIMIT CMD...: append the output to OUT/STAGE.log, stop CMD after LIMIT
    local log=$out/$1.log limit=$2 start=$SECONDS
    shift 2
    echo "== $(date -u +%T) $*" | tee -a "$log"
    timeout --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "== exit $rc after $((SECONDS - start)) s" | tee -a "$log"
    if [ "$rc" -ne 0 ]; then
        [ "$rc" -eq 124 ] && echo "!! stopped at its limit of $limit" | tee -a "$log"
        status=1
    fi
}

slice_7b=(--device cuda --dtype bfloat16 --heads 28 --key-heads 4 --head-dim 128
          --response-rows 1024)
for stage in "${stages[@]}"; do
    : >"$out/$stage.log"
    case $stage in
        tests)
            run tests 5m "$python" -m pytest -q -p no:cacheprovider -k cuda \
                tests/unit/test_ease_triton.py tests/unit/test_ease_attention.py ;;
        slice)
            run slice 4m "$python" -m benchmarks.ease_slice "${slice_7b[@]}" \
                --seq-lens 2048 4096 8192 --impl both
            for blocks in "64 32" "64 128" "128 64" "128 128"; do
                for warps in 4 8; do
                    # One process per tile: a tile that does not fit (or faults) ends only its own.
                    # shellcheck disable=SC2086  # the two block sizes are two arguments
                    run slice 2m "$python" -m benchmarks.ease_slice \
                        "${slice_7b[@]}" --seq-lens 4096 8192 --impl triton \
                        --triton-blocks $blocks --triton-num-warps "$warps" --repeats 3
                done
            done ;;
        overhead)
            run overhead 6m "$python" -m benchmarks.ease_overhead --device cuda --dtype bf16 \
                --preset qwen2.5-7b --core-attention sdpa --optimizer sgd --seq-lens 2048 4096 \
                --slice-impl triton --variants off ease ;;
        rollout)
            run rollout 6m "$python" -m benchmarks.rollout --device cuda --models small \
                --workloads 16x1:32-64 64x1:32-64 16x8:512-1024 ;;
    esac
done
echo "== done: $(date -u +%T), ${SECONDS} s in all, status $status"
exit $status
