#!/usr/bin/env bash
# Start a real one-node Slurm (munged + slurmctld + slurmd) on this machine, for tests/test_slurm.py.
#
#   .ci/slurm_up.sh                    # installs slurm-wlm + munge if missing, starts the daemons
#   . /tmp/dist_llm_slurm/env.sh       # exports SLURM_CONF for sbatch/srun/sinfo
#   ...                                # sbatch --wait ..., pytest -m slurm
#   .ci/slurm_down.sh                  # stops what this script started (by recorded pid)
#
# Needs root (Debian/Ubuntu, apt-get). Everything lives in $DIST_LLM_SLURM_DIR (default
# /tmp/dist_llm_slurm): slurm.conf, state, spool, logs, pid files and env.sh.
set -euo pipefail

DIR="${DIST_LLM_SLURM_DIR:-/tmp/dist_llm_slurm}"   # the cluster's whole world
HOST="$(hostname -s)"                              # slurmd finds itself in slurm.conf by this name
TIMEOUT_S="${DIST_LLM_SLURM_TIMEOUT_S:-60}"        # how long to wait for the node to become idle

die() { echo "slurm_up: error: $*" >&2; exit 1; }
alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }   # is the pid in file $1 running?

[[ "$(id -u)" == 0 ]] || die "must run as root (installs packages, starts daemons as SlurmUser=root)"

# Refuse to start a second cluster: its daemons would fight over ports 6817/6818.
running="$(pgrep -x slurmctld 2>/dev/null | tr '\n' ' ' || true)"     # pgrep (procps) may be missing: then
if alive "$DIR/slurmctld.pid" || [[ -n "$running" ]]; then          # only our own pid file is checked
    die "a slurmctld is already running (pid ${running:-$(cat "$DIR/slurmctld.pid")}); run .ci/slurm_down.sh first"
fi

# 1. Packages: Debian's slurm-wlm (22.05 on bookworm) and munge; skipped when already installed.
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive                 # no debconf prompts
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# 2. A fresh directory: old state would resurrect jobs of an earlier run.
rm -rf "$DIR"
mkdir -p "$DIR/state" "$DIR/spool"
chmod 755 "$DIR"

# 3. munge: slurm signs every message with it. The key must be 0400 and owned by the munge user.
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key
    elif command -v create-munge-key >/dev/null; then
        create-munge-key -f
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
fi
chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key && chmod 0755 /run/munge
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    echo "slurm_up: reusing the munged that is already running (slurm_down.sh will leave it alone)"
else
    # munged forks into the background and writes its pid; run it as the munge user, as the service does.
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do [[ -s /run/munge/munged.pid ]] && break; sleep 0.1; done
    cp /run/munge/munged.pid "$DIR/munged.pid"
    munge -n | unmunge >/dev/null || die "munged started but munge/unmunge fails; see /var/log/munge/munged.log"
fi

# 4. slurm.conf: one node, one partition, no cgroups, no accounting, no MPI plugin by default.
CPUS="$(nproc)"
MEM_MB="$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"   # below the real size, else slurmd drains the node
cat > "$DIR/slurm.conf" <<EOF
# Written by .ci/slurm_up.sh: a one-node test cluster.
ClusterName=distllm
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# No cgroups in containers: track processes by parent pid, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# srun starts plain processes; dist_llm discovers ranks from SLURM_* variables (PMIx does not load here).
MpiDefault=none
# A node that was down comes back by itself once slurmd registers.
ReturnToService=2
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmdSpoolDir=$DIR/spool
StateSaveLocation=$DIR/state
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MailProg=/bin/true
# sbatch --wait polls every 2 s while MinJobAge/2 <= 2 (else it backs off to 8 s and 32 s); records stay 5 s.
MinJobAge=5
KillWait=5
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$DIR/slurm.conf"
echo "export SLURM_CONF=$SLURM_CONF" > "$DIR/env.sh"

# 5. The daemons fork into the background and write the pid files named in slurm.conf.
slurmctld -c -f "$SLURM_CONF"    # -c: start with no saved state
slurmd -f "$SLURM_CONF"

# 6. Wait until the node reports idle; on failure show why and stop what we started.
for _ in $(seq "$((TIMEOUT_S * 2))"); do
    state="$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)"
    [[ "$state" == "idle" ]] && break
    sleep 0.5
done
if [[ "${state:-}" != "idle" ]]; then
    echo "slurm_up: error: node $HOST is '${state:-unreachable}', not idle, after ${TIMEOUT_S}s" >&2
    sinfo -R >&2 || true
    for log in slurmctld.log slurmd.log; do
        echo "----- $DIR/$log (last 40 lines)" >&2
        tail -n 40 "$DIR/$log" >&2 || true
    done
    "$(dirname "$0")/slurm_down.sh" >&2 || true
    exit 1
fi

echo "slurm_up: $(sinfo --version) is up: node $HOST idle, $CPUS CPUs, ${MEM_MB} MB" >&2
cat "$DIR/env.sh"          # callers: eval "$(.ci/slurm_up.sh)"  or  . "$DIR/env.sh"
