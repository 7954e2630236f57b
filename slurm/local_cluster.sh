#!/usr/bin/env bash
# A Slurm cluster of one or more nodes on this machine, for tests and for trying `vlp submit`.
#
#   bash slurm/local_cluster.sh install            # apt-get update + install slurm-wlm munge (Debian/Ubuntu)
#   bash slurm/local_cluster.sh start [--nodes N]  # write slurm.conf, start munged, slurmctld and one
#                                                  # slurmd per node; wait until every node is idle
#   bash slurm/local_cluster.sh status             # daemons and `sinfo`
#   bash slurm/local_cluster.sh stop               # stop every daemon this script started (job state is kept)
#
# One node (the default) is this host under its own name. With --nodes N > 1 the nodes are
# vlp-n1 ... vlp-nN: Slurm's multiple-slurmd mode (Debian's slurm-wlm 22.05 is built with it),
# one slurmd per node, each with its own port, spool folder, pid and log file, all on this host
# (NodeHostname) and reached at 127.0.0.1 (NodeAddr). Slurm sees N nodes: it allocates them,
# starts each node's tasks through that node's slurmd (SLURMD_NODENAME names it) and can lose
# one of them. Jobs rendezvous at the first node's NodeAddr, as on a real cluster.
#
# Needs root. Every subcommand is idempotent. No systemd is needed: the daemons are started
# directly and their state lives under $VLP_SLURM_STATE (default /var/spool/vlp-slurm).
# slurm.conf goes to /etc/slurm/slurm.conf so that sbatch/squeue/sinfo find it without SLURM_CONF;
# a slurm.conf this script did not write is never overwritten.
set -euo pipefail

STATE=${VLP_SLURM_STATE:-/var/spool/vlp-slurm}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARKER="# written by vlp slurm/local_cluster.sh"
MUNGE_KEY=/etc/munge/munge.key
MUNGE_RUN=/run/munge
WAIT_S=${VLP_SLURM_WAIT_S:-60}
NODES=1
NODE_PORT0=17000  # slurmd ports with --nodes N > 1: 17001 ... 1700N

log() { echo "[local_cluster] $*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() { [[ $(id -u) -eq 0 ]] || die "run as root (the daemons need it)"; }

need_binaries() {
    local missing=()
    for bin in munged slurmctld slurmd sinfo scontrol; do
        command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
    done
    if ((${#missing[@]})); then
        die "missing ${missing[*]}; run: bash slurm/local_cluster.sh install"
    fi
}

# A daemon is running when its pid file names a live process.
running() {
    local pidfile=$1
    [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

cmd_install() {
    need_root
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        log "slurm-wlm and munge already installed"
        return
    fi
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm munge
}

write_conf() {
    local host cpus hw
    host=$(hostname -s)
    # The node line copies the hardware slurmd sees (sockets/cores/threads), so slurmd never drains
    # the node for a mismatch; memory is left out (jobs here do not request it).
    hw=$(slurmd -C | head -n 1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ RealMemory=[0-9]*//')
    cpus=$(nproc)
    mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" "$STATE/log"
    local node_lines partition_nodes i
    if ((NODES == 1)); then
        node_lines="NodeName=$host NodeAddr=127.0.0.1 $hw State=UNKNOWN"
        partition_nodes=$host
    else
        node_lines=""
        for i in $(seq 1 "$NODES"); do
            node_lines+="NodeName=vlp-n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((NODE_PORT0 + i)) $hw State=UNKNOWN"$'\n'
        done
        node_lines=${node_lines%$'\n'}
        partition_nodes="vlp-n[1-$NODES]"
    fi
    if [[ -f $CONF ]] && ! grep -qxF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to overwrite it"
    fi
    local new
    new=$(cat <<EOF
$MARKER
# $NODES node(s), root-run daemons, no cgroups and no accounting database.
ClusterName=vlp-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job becomes eligible again only after its credential expires (cred_expire + 1 s,
# default 120 s); 10 s keeps requeue tests short here. Real clusters keep the default.
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
# %n is the node name: one spool folder, pid file and log per slurmd (multiple-slurmd mode).
SlurmdSpoolDir=$STATE/d/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# Requeue: allowed by default (a job may still opt out with --no-requeue). "scontrol requeue"
# puts a job back to PENDING, not held (no RequeueExit/RequeueExitHold needed: the trainer
# requeues itself explicitly).
JobRequeue=1
# Keep finished jobs visible to squeue/scontrol for a day (there is no slurmdbd for sacct).
MinJobAge=86400
# Seconds between SIGTERM and SIGKILL when a job is cancelled, requeued or hits its time limit:
# room for a checkpoint.
KillWait=60
# Look at pending jobs every few seconds (defaults 60 s and 30 s) so that a requeued job whose
# begin time has passed starts promptly.
SchedulerParameters=sched_interval=5,bf_interval=5
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmctldTimeout=30
SlurmdTimeout=60
$node_lines
PartitionName=debug Nodes=$partition_nodes Default=YES MaxTime=INFINITE State=UP
EOF
)
    # cpus from nproc must agree with what slurmd -C reports; say so if not (containers with a
    # CPU quota can differ).
    [[ $hw == *"CPUs=$cpus "* ]] || log "note: nproc=$cpus but slurmd -C reports: $hw"
    CONF_CHANGED=0
    if [[ -f $CONF ]] && [[ $(cat "$CONF") == "$new" ]]; then
        return
    fi
    printf '%s\n' "$new" >"$CONF"
    CONF_CHANGED=1
    log "wrote $CONF"
}

start_munge() {
    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating $MUNGE_KEY"
        mkdir -p "$(dirname "$MUNGE_KEY")"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY"
        else
            dd if=/dev/urandom bs=1 count=1024 of="$MUNGE_KEY" status=none
        fi
    fi
    # munged refuses keys and directories other users can read or write.
    chown munge:munge "$MUNGE_KEY" "$(dirname "$MUNGE_KEY")"
    chmod 0400 "$MUNGE_KEY"
    chmod 0700 "$(dirname "$MUNGE_KEY")"
    mkdir -p "$MUNGE_RUN" /var/lib/munge /var/log/munge
    chown munge:munge "$MUNGE_RUN" /var/lib/munge /var/log/munge
    chmod 0755 "$MUNGE_RUN"
    if running "$MUNGE_RUN/munged.pid"; then
        return
    fi
    rm -f "$MUNGE_RUN/munge.socket.2" "$MUNGE_RUN/munge.socket.2.lock"
    runuser -u munge -- munged
    munge -n | unmunge >/dev/null || die "munged started but a credential does not round-trip"
    log "munged up"
}

# The node names of the slurm.conf this script wrote, one a line.
node_names() { sed -n 's/^NodeName=\([^ ]*\) .*/\1/p' "$CONF"; }

start_slurm() {
    if ! running "$STATE/slurmctld.pid"; then
        slurmctld
        log "slurmctld started"
    fi
    local node
    for node in $(node_names); do
        if ! running "$STATE/slurmd-$node.pid"; then
            slurmd -N "$node"
            log "slurmd for node $node started"
        fi
    done
}

node_state() { sinfo -h -n "$1" -N -o '%t' 2>/dev/null | head -n 1; }

wait_idle() {
    local deadline=$((SECONDS + WAIT_S)) node state=""
    for node in $(node_names); do
        while :; do
            state=$(node_state "$node")
            case $state in
                idle | mix | alloc | comp) log "node $node is $state"; break ;;
                drain* | down* | drng*)
                    # A node left down/drained by an earlier run (e.g. the machine rebooted under it).
                    scontrol update NodeName="$node" State=RESUME 2>/dev/null || true ;;
            esac
            if ((SECONDS >= deadline)); then
                log "node $node state after ${WAIT_S}s: '${state:-no answer}'; logs in $STATE/log"
                tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd-$node.log" >&2 || true
                return 1
            fi
            sleep 1
        done
    done
}

cmd_start() {
    need_root
    need_binaries
    write_conf
    start_munge
    if ((CONF_CHANGED)) && any_slurm_running; then
        log "slurm.conf changed: restarting the Slurm daemons"
        stop_slurm
    fi
    start_slurm
    wait_idle
}

stop_pidfile() {
    local name=$1 pidfile=$2
    running "$pidfile" || return 0
    local pid
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do
        kill -0 "$pid" 2>/dev/null || { log "$name stopped"; return 0; }
        sleep 0.5
    done
    kill -9 "$pid" 2>/dev/null || true
    log "$name killed"
}

# Every slurmd pid file this script's configurations name (slurmd.pid: one-node configs
# written before multiple-slurmd support).
slurmd_pidfiles() { compgen -G "$STATE/slurmd*.pid" || true; }

any_slurm_running() {
    local pidfile
    for pidfile in "$STATE/slurmctld.pid" $(slurmd_pidfiles); do
        running "$pidfile" && return 0
    done
    return 1
}

stop_slurm() {
    local pidfile
    for pidfile in $(slurmd_pidfiles); do
        stop_pidfile "$(basename "$pidfile" .pid)" "$pidfile"
        rm -f "$pidfile"
    done
    stop_pidfile slurmctld "$STATE/slurmctld.pid"
}

cmd_stop() {
    need_root
    stop_slurm
    stop_pidfile munged "$MUNGE_RUN/munged.pid"
}

cmd_status() {
    local name pidfile rc=0
    local pairs=("munged:$MUNGE_RUN/munged.pid" "slurmctld:$STATE/slurmctld.pid")
    for node in $(node_names); do pairs+=("slurmd $node:$STATE/slurmd-$node.pid"); done
    for pair in "${pairs[@]}"; do
        name=${pair%%:*}
        pidfile=${pair#*:}
        if running "$pidfile"; then echo "$name: running (pid $(cat "$pidfile"))"; else echo "$name: stopped"; rc=1; fi
    done
    if ((rc == 0)); then sinfo -N -l || rc=1; fi
    return $rc
}

parse_start_args() {
    while (($#)); do
        case $1 in
            --nodes) [[ ${2:-} =~ ^[1-9][0-9]?$ ]] || die "--nodes takes a node count from 1 to 99, got '${2:-}'"
                     NODES=$2; shift 2 ;;
            --nodes=*) parse_start_args --nodes "${1#--nodes=}"; shift ;;
            *) die "start: unknown argument '$1' (usage: start [--nodes N])" ;;
        esac
    done
}

case ${1:-} in
    install) cmd_install ;;
    start) shift; parse_start_args "$@"; cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: bash slurm/local_cluster.sh install|start [--nodes N]|stop|status" >&2; exit 2 ;;
esac
