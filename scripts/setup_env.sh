#!/usr/bin/env bash
# Sourced by demo.sh and test.sh: make .venv (once) with the CPU build of torch and dist_llm[test].
# torch is installed first, by exact version, so that nothing pulls the multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DIST_LLM_VENV:-$ROOT/.venv}"
TORCH_VERSION="${DIST_LLM_TORCH_VERSION:-2.13.0}"
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.dist_llm_ready" ] || [ "$ROOT/pyproject.toml" -nt "$VENV/.dist_llm_ready" ]; then
    echo "setting up $VENV (torch $TORCH_VERSION CPU build + dist_llm[test]) ..."
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip 2>/dev/null || true
    "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION"
    "$VENV/bin/python" -m pip install -q -e "$ROOT[test]"
    touch "$VENV/.dist_llm_ready"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PYTHONUNBUFFERED=1
