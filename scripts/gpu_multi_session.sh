#!/usr/bin/env bash
# One call on a multi-GPU machine (the Multi-GPU issue): NCCL correctness against tp=1, the all-reduce
# sweep, and the scaling sweep with dummy weights; results in $OUT.   run: bash scripts/gpu_multi_session.sh
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
TAIL=10 step nccl_tests 240 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py -k nccl
grep -h "largest first-step\|diverged" "$OUT/nccl_tests.log"
TAIL=14 step comm 90 "${MPI[@]}" -n "$N" python3 benchmarks/bench_comm.py --output_dir "$OUT/comm"
TAIL=20 step scaling_7b 300 python3 benchmarks/bench_scaling.py --output_dir "$OUT/scaling_7b" --model llama-2-7b \
    --batch_sizes 1 64
if [ "$N" -ge 4 ]; then
    TAIL=20 step scaling_70b 300 python3 benchmarks/bench_scaling.py --output_dir "$OUT/scaling_70b" \
        --model llama-2-70b --configs 2x1 4x1 8x1 4x2 --batch_sizes 1 64
fi
rm -rf "$OUT"/*/engines 2>/dev/null
echo done
