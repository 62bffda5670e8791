#!/usr/bin/env bash
# A real Slurm cluster of emulated nodes on this one machine, for tests and for trying the sbatch templates.
#
#   scripts/slurm/local_cluster.sh up       # install slurm-wlm + munge if missing, start munged, slurmctld, N slurmd
#   scripts/slurm/local_cluster.sh status   # what runs, the nodes and the queue
#   scripts/slurm/local_cluster.sh down     # cancel jobs, stop what `up` started, undo /etc/hosts (idempotent)
#   eval "$(scripts/slurm/local_cluster.sh env)"   # point sinfo/sbatch/... at this cluster (SLURM_CONF)
#   scripts/slurm/local_cluster.sh conf     # the path of its slurm.conf
#
# Settings (environment): SLURM_LOCAL_DIR scratch dir (/tmp/prolong_lit-slurm), SLURM_LOCAL_NODES (2),
# SLURM_LOCAL_CPUS CPUs per emulated node (2). Needs root (apt, /etc/hosts, munge). Debian's slurm-wlm allows
# several slurmd on one host; every node is 127.0.0.1 and shares the filesystem. Not emulated: GPUs, cgroups,
# accounting. The configuration never touches /etc/slurm: commands find it through SLURM_CONF.
# Recipe and gotchas: the project's notes on a local Slurm (slurm.md).
set -euo pipefail

SCRATCH=${SLURM_LOCAL_DIR:-/tmp/prolong_lit-slurm}
NODES=${SLURM_LOCAL_NODES:-2}
CPUS=${SLURM_LOCAL_CPUS:-2}
CONF=$SCRATCH/slurm.conf
HOSTS_TAG="# prolong_lit local slurm"
export SLURM_CONF=$CONF

say() { echo "local_cluster: $*" >&2; }
node_names() { for ((i = 1; i <= NODES; i++)); do echo "n$i"; done; }
# alive = exists and is no zombie (a container's init may never reap a daemon that died)
pid_alive() {
    [[ -f $1 ]] || return 1
    local stat
    stat=$(cat "/proc/$(cat "$1")/stat" 2>/dev/null) || return 1
    [[ ${stat##*) } != Z* ]]
}
# `scontrol`/`sinfo` retry ~9 s against a stopped controller, so liveness comes from the pid file.
controller_up() { pid_alive "$SCRATCH/slurmctld.pid"; }

install_packages() {
    # absolute paths: the daemons live in /usr/sbin, which a non-login shell's PATH may lack
    local missing=()
    for cmd in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/sbin/munged; do
        [[ -x $cmd ]] || missing+=("$(basename "$cmd")")
    done
    [[ ${#missing[@]} -eq 0 ]] && return
    say "installing slurm-wlm and munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return  # a munged runs: the host's (used, never stopped) or ours from an earlier `up` (`down` stops it)
    fi
    [[ -f /etc/munge/munge.key ]] || /usr/sbin/mungekey --create
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    /usr/sbin/runuser -u munge -- /usr/sbin/munged
    touch "$SCRATCH/started-munge"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    say "munged does not answer"; exit 1
}

add_hosts() {
    # MASTER_ADDR and Lightning take the first name of SLURM_NODELIST, so node names must resolve.
    local name
    for name in $(node_names); do
        getent hosts "$name" >/dev/null || echo "127.0.0.1 $name $HOSTS_TAG" >>/etc/hosts
    done
}

remove_hosts() {
    grep -qF "$HOSTS_TAG" /etc/hosts || return 0
    # rewrite in place: /etc/hosts is often a bind mount that cannot be replaced by a rename (sed -i)
    local kept
    kept=$(grep -vF "$HOSTS_TAG" /etc/hosts)
    printf '%s\n' "$kept" >/etc/hosts
}

write_conf() {
    local host name port=17001
    host=$(hostname -s)
    cat >"$CONF" <<EOF
ClusterName=prolong-lit-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job becomes eligible after cred_expire seconds (default 120)
AuthInfo=cred_expire=10
StateSaveLocation=$SCRATCH/state
SlurmdSpoolDir=$SCRATCH/spool/%n
SlurmctldPidFile=$SCRATCH/slurmctld.pid
SlurmdPidFile=$SCRATCH/slurmd-%n.pid
SlurmctldLogFile=$SCRATCH/log/slurmctld.log
SlurmdLogFile=$SCRATCH/log/slurmd-%n.log
SlurmctldPort=6817
# no cgroups in a container: track processes through /proc, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# trust CPUs= below even where it exceeds the real core count
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
EOF
    for name in $(node_names); do
        echo "NodeName=$name NodeHostname=localhost NodeAddr=127.0.0.1 Port=$port CPUs=$CPUS RealMemory=1000 State=UNKNOWN" >>"$CONF"
        port=$((port + 1))
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO" >>"$CONF"
}

idle_nodes() { sinfo -h -t idle -o %D 2>/dev/null | awk '{n += $1} END {print n + 0}'; }

cmd_up() {
    if controller_up; then
        say "already up ($CONF)"
        return
    fi
    [[ $(id -u) -eq 0 ]] || { say "needs root (apt-get, /etc/hosts, munge)"; exit 1; }
    install_packages
    local file
    for file in "$SCRATCH"/slurmd-*.pid; do  # nodes left by a controller that died: they hold the node ports
        pid_alive "$file" && kill -9 "$(cat "$file")" 2>/dev/null || true
    done
    rm -rf "$SCRATCH/state" "$SCRATCH/spool" "$SCRATCH/log"
    mkdir -p "$SCRATCH/state" "$SCRATCH/log"
    for name in $(node_names); do mkdir -p "$SCRATCH/spool/$name"; done
    start_munge
    add_hosts
    write_conf
    /usr/sbin/slurmctld -c -f "$CONF"
    for name in $(node_names); do /usr/sbin/slurmd -f "$CONF" -N "$name"; done
    for _ in $(seq 150); do
        if [[ $(idle_nodes) -ge $NODES ]]; then
            say "up: $NODES nodes x $CPUS CPUs, SLURM_CONF=$CONF"
            return
        fi
        sleep 0.2
    done
    say "nodes did not become idle within 30 s; logs in $SCRATCH/log"
    sinfo >&2 || true
    exit 1
}

wait_gone() {  # pid files... : wait up to 15 s for their processes to end, then kill what is left
    local file _
    for _ in $(seq 75); do
        local alive=0
        for file in "$@"; do pid_alive "$file" && alive=1; done
        [[ $alive -eq 0 ]] && return
        sleep 0.2
    done
    for file in "$@"; do
        if pid_alive "$file"; then
            say "killing $(basename "$file" .pid) ($(cat "$file"))"
            kill -9 "$(cat "$file")" 2>/dev/null || true
        fi
    done
}

cmd_down() {
    if controller_up; then
        scancel --user="$(id -un)" 2>/dev/null || true
        for _ in $(seq 75); do
            [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.2
        done
        scontrol shutdown >/dev/null 2>&1 || true  # stops slurmctld and every slurmd
    fi
    # slurmd pid files exist only for nodes that were started: also catches a half-finished `up`
    wait_gone "$SCRATCH"/slurmctld.pid "$SCRATCH"/slurmd-*.pid
    rm -f "$SCRATCH"/slurmctld.pid "$SCRATCH"/slurmd-*.pid
    if [[ -f $SCRATCH/started-munge ]]; then
        /usr/sbin/munged --stop >/dev/null 2>&1 || true
        rm -f "$SCRATCH/started-munge"
    fi
    remove_hosts
    say "down (logs kept in $SCRATCH/log)"
}

cmd_status() {
    if ! controller_up; then
        echo "down"
        return 3
    fi
    echo "up: SLURM_CONF=$CONF"
    sinfo
    squeue
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    conf) echo "$CONF" ;;
    *) echo "usage: $0 up|down|status|env|conf" >&2; exit 2 ;;
esac
