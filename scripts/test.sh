#!/usr/bin/env bash
# The test suite, on the CPU: kernels through Triton's interpreter, ranks under mpirun with gloo.
# GPU tests skip without a GPU; Slurm tests skip unless a Slurm is up (.ci/slurm_up.sh starts one).
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"
cd "$ROOT"
ruff check dist_llm tests benchmarks
python -m pytest -q -ra "$@"
