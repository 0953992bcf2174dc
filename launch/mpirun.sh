#!/usr/bin/env bash
# Run dist_llm on exactly as many ranks as an engine was built for (one rank per GPU).
#
#   launch/mpirun.sh ENGINE_DIR [-n N] [--hostfile F] [-- ARGS for python -m dist_llm.run]
#
#   launch/mpirun.sh engines/llama-tp8 -- --input_text "Hello" --max_new_tokens 64
#   launch/mpirun.sh engines/llama-tp8-pp2 --hostfile launch/hostfile.example -- --input_text "Hello"
#
# Environment: PYTHON (default: python), DIST_LLM_DRY_RUN=1 prints the mpirun line instead of running it.
# NCCL_DEBUG, NCCL_IB_*, NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME, DIST_LLM_TIMEOUT_S are passed to every rank.
set -euo pipefail                                   # stop at the first failing command or unset variable

usage() {                                           # print the synopsis and exit with the given code
    sed -n '4p' "$0" | sed 's/^#   /usage: /' >&2
    exit "${1:-2}"
}

[[ $# -ge 1 && "$1" != -* ]] || usage 2             # the engine directory comes first
ENGINE_DIR="$1"; shift                              # where engine.json and rank{r}.safetensors live
NP=""                                               # -n: optional, must match the engine
HOSTFILE=""                                         # --hostfile: one line per node, "host slots=8"
while [[ $# -gt 0 ]]; do                            # our options end at "--"
    case "$1" in
        -n|-np|--np) NP="${2:?-n needs a number}"; shift 2 ;;         # number of ranks the caller expects
        --hostfile) HOSTFILE="${2:?--hostfile needs a file}"; shift 2 ;;   # multi-node: which hosts, how many slots each
        -h|--help) usage 0 ;;
        --) shift; break ;;                         # everything after "--" goes to dist_llm.run
        *) echo "launch/mpirun.sh: unknown option '$1' (arguments for dist_llm.run go after --)" >&2; exit 2 ;;
    esac
done
RUN_ARGS=("$@")                                     # forwarded verbatim to python -m dist_llm.run

ENGINE_JSON="$ENGINE_DIR/engine.json"               # the engine records its own mapping
if [[ ! -f "$ENGINE_JSON" ]]; then
    echo "launch/mpirun.sh: $ENGINE_JSON not found; is '$ENGINE_DIR' an engine directory" \
         "(made by python -m dist_llm.build)?" >&2
    exit 2
fi
ENGINE_DIR="$(cd "$ENGINE_DIR" && pwd)"             # absolute: remote ranks start in another directory
PYTHON="${PYTHON:-python}"                          # the interpreter that has dist_llm installed

# world_size = tp_size * pp_size, read from engine.json; a disagreement between the two is an error.
WORLD="$("$PYTHON" -c '
import json, sys
m = json.load(open(sys.argv[1])).get("mapping", {})
tp_pp = m["tp_size"] * m["pp_size"] if "tp_size" in m and "pp_size" in m else None
w = m.get("world_size", tp_pp)
if w is None or (tp_pp is not None and w != tp_pp):
    sys.exit(f"{sys.argv[1]}: bad mapping {m}: need world_size == tp_size * pp_size")
print(w)' "$ENGINE_JSON")" || exit 2

if [[ -n "$NP" && "$NP" != "$WORLD" ]]; then        # an engine shard exists per rank: no more, no fewer
    echo "launch/mpirun.sh: -n $NP does not match the engine's world size $WORLD" \
         "(mapping.world_size in $ENGINE_JSON); rebuild the engine for $NP ranks or drop -n" >&2
    exit 2
fi

MPI_ARGS=(-n "$WORLD")                              # one rank per engine shard (= per GPU)
MPI_ARGS+=(--bind-to none)                          # ranks spawn threads (tokenizer, NCCL): don't pin to one core
# MPI_ARGS+=(--map-by ppr:4:socket --bind-to socket)  # alternative: 4 ranks per socket, bound to it (NUMA-local)
[[ "$(id -u)" == 0 ]] && MPI_ARGS+=(--allow-run-as-root)   # containers often run as root; Open MPI refuses otherwise
if [[ -n "$HOSTFILE" ]]; then
    MPI_ARGS+=(--hostfile "$HOSTFILE")              # several nodes: rank order fills node 1, then node 2, ...
else
    # One host: Open MPI offers one slot per core (or per Slurm task); allow more ranks than that.
    CORES="$(lscpu -p=core 2>/dev/null | grep -v '^#' | sort -u | wc -l || true)"   # physical cores
    SLOTS="${SLURM_NTASKS:-$CORES}"                 # inside a Slurm job the allocation decides
    (( SLOTS < WORLD )) && MPI_ARGS+=(--oversubscribe)
fi
MPI_ARGS+=(-x "NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}")                         # NVLink multicast off (see docs/launch.md)
MPI_ARGS+=(-x "TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}")  # same for torch symm-mem
for var in NCCL_DEBUG NCCL_DEBUG_SUBSYS NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME DIST_LLM_TIMEOUT_S \
           $(compgen -v NCCL_IB_ || true) PATH LD_LIBRARY_PATH PYTHONPATH; do
    [[ -n "${!var:-}" ]] && MPI_ARGS+=(-x "$var")   # pass through what the user set (remote nodes see only -x vars)
done

CMD=(mpirun "${MPI_ARGS[@]}" "$PYTHON" -m dist_llm.run --engine_dir "$ENGINE_DIR" "${RUN_ARGS[@]}")
echo "launch/mpirun.sh: $(printf '%q ' "${CMD[@]}")" >&2   # the exact command, quoted, for the job log
[[ "${DIST_LLM_DRY_RUN:-0}" == 1 ]] && exit 0       # dry run: stop after printing
exec "${CMD[@]}"                                    # mpirun's exit code is ours
