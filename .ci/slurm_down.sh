#!/usr/bin/env bash
# Stop the test cluster started by .ci/slurm_up.sh: slurmd, slurmctld, then munged, each by the pid
# recorded in $DIST_LLM_SLURM_DIR (a munged we did not start is left running). Logs stay for CI artifacts.
set -uo pipefail

DIR="${DIST_LLM_SLURM_DIR:-/tmp/dist_llm_slurm}"

stop() {  # stop NAME: SIGTERM the pid in $DIR/NAME.pid, wait up to 10 s, then SIGKILL
    local file="$DIR/$1.pid" pid
    [[ -f "$file" ]] || return 0
    pid="$(cat "$file")"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        echo "slurm_down: stopped $1 (pid $pid)" >&2
    fi
    rm -f "$file"
}

stop slurmd       # first the node daemon (it kills its job steps on the way out)
stop slurmctld    # then the controller
stop munged       # only present when slurm_up.sh started it
rm -f "$DIR/env.sh"
