#!/usr/bin/env bash
# Single-node SLURM cluster on this machine, for real end-to-end tests of sweeps.
#
# Usage: launch/local_slurm.sh start|stop|status
#
#   start   install missing Debian packages, then bring up munged, MariaDB, slurmdbd,
#           slurmctld and slurmd with all state in one folder, and wait for the node
#           to be idle. When the cluster is already up, only a changed slurm.conf (say a
#           new NCSWEEP_SLURM_MAX_ARRAY_SIZE) is applied, by `scontrol reconfigure`. The last line of
#           stdout is `export SLURM_CONF=...`, so a caller can run
#               eval "$(launch/local_slurm.sh start | tail -1)"
#           The same line is written to <state>/env.sh. Progress goes to stderr.
#   stop    requeue running jobs (cancel those that cannot be requeued), then stop
#           the daemons started by this script and any job steps they left behind.
#           Keeps the state folder: a later start keeps queued jobs and job ids.
#   status  show which daemons are up, then sinfo and squeue. Exit 0 when all
#           daemons are up and the node is idle or busy, 1 otherwise.
#
# Environment:
#   NCSWEEP_SLURM_DIR       state folder (default: <repo>/.slurm)
#   NCSWEEP_SLURM_CLUSTER   cluster name (default: ncsweep)
#   NCSWEEP_SLURM_TIMEOUT   seconds to wait for each daemon / the idle node (default: 60)
#   NCSWEEP_SLURM_MAX_ARRAY_SIZE  MaxArraySize, tasks per job array (default: unset, SLURM's
#                           1001); a start without it restores the default
#
# Needs root (SlurmUser=root) and, for the first start, apt access to Debian's
# packages. Works without systemd, cgroups or a terminal; every wait is bounded.
set -euo pipefail

# ---------------------------------------------------------------- settings
PROG=local_slurm.sh
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_IN="${NCSWEEP_SLURM_DIR:-$REPO/.slurm}"
CLUSTER="${NCSWEEP_SLURM_CLUSTER:-ncsweep}"
TIMEOUT="${NCSWEEP_SLURM_TIMEOUT:-60}"
MAX_ARRAY_SIZE="${NCSWEEP_SLURM_MAX_ARRAY_SIZE:-}"
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
# Commands that must exist when the packages came from somewhere other than dpkg.
COMMANDS=(munged mungekey slurmctld slurmd sbatch sacct slurmdbd mariadbd
    mariadb-install-db mariadb mariadb-admin)
# Daemons in start order; each has <state>/run/NAME.pid and <state>/log/NAME.log.
DAEMONS=(munged mariadb slurmdbd slurmctld slurmd)
# Process name the kernel records (comm), to tell our daemon from a reused pid.
declare -A COMM=([munged]=munged [mariadb]=mariadbd [slurmdbd]=slurmdbd
    [slurmctld]=slurmctld [slurmd]=slurmd)
# Ports: variable, owning daemon, first candidate.
PORTS=(DB_PORT:mariadb:13306 DBD_PORT:slurmdbd:6819 CTLD_PORT:slurmctld:6817
    SLURMD_PORT:slurmd:6818)
# Job states (squeue -t) that stop must requeue.
ACTIVE_JOBS=RUNNING,SUSPENDED,CONFIGURING

export DEBIAN_FRONTEND=noninteractive
# The daemons live in sbin folders, which a non-login PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

# ---------------------------------------------------------------- helpers
log() { printf '%s: %s\n' "$PROG" "$*" >&2; }

# die MESSAGE [LOGFILE]: print the message and the tail of the log, exit 1.
die() {
    log "ERROR: $1"
    if [[ -n "${2:-}" && -f "$2" ]]; then
        log "last lines of $2:"
        tail -n 25 "$2" | sed 's/^/    /' >&2
    fi
    exit 1
}

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}" >&2; }

need_root() { [[ $EUID -eq 0 ]] || die "$1"; }

# wait_until TIMEOUT COMMAND...: run COMMAND every 0.25 s until it succeeds.
wait_until() {
    local limit=$1 start=$SECONDS
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS - start < limit)) || return 1
        sleep 0.25
    done
}

# ask COMMAND...: a SLURM client command, bounded in time.
ask() { timeout 15 "$@"; }

# ---------------------------------------------------------------- state folder
resolve_state() {
    mkdir -p "$STATE_IN"
    STATE="$(cd "$STATE_IN" && pwd)"
    if [[ "$STATE" =~ [[:space:]] ]]; then
        die "the state folder '$STATE' contains whitespace; slurm.conf cannot express it (set NCSWEEP_SLURM_DIR)"
    fi
    ETC="$STATE/etc"
    RUN="$STATE/run"
    LOGS="$STATE/log"
    MUNGE_DIR="$STATE/munge"
    MUNGE_KEY="$MUNGE_DIR/munge.key"
    MUNGE_SOCKET="$MUNGE_DIR/munge.socket.2"
    DB_DIR="$STATE/mysql"
    DB_DATA="$DB_DIR/data"
    DB_SOCKET="$DB_DIR/mysqld.sock"
    CTLD_SPOOL="$STATE/spool/slurmctld"
    SLURMD_SPOOL="$STATE/spool/slurmd"
    CONF="$ETC/slurm.conf"
    DBD_CONF="$ETC/slurmdbd.conf"
    PORTS_FILE="$ETC/ports.env"
    NODE="$(hostname -s)"
    export SLURM_CONF="$CONF"
}

# Serialise start and stop on the state folder (fd 9, which daemons must not inherit).
lock_state() {
    exec 9>"$STATE/.lock"
    flock -w 300 9 || die "another start/stop holds $STATE/.lock"
}

# ---------------------------------------------------------------- processes
pidfile() { echo "$RUN/$1.pid"; }
logfile() { echo "$LOGS/$1.log"; }

# True while pid $1 exists and is not a zombie (pid 1 here may reap daemons late).
proc_alive() {
    local st
    kill -0 "$1" 2>/dev/null || return 1
    st="$(sed -n 's/^[0-9]* (.*) \([A-Za-z]\) .*/\1/p' "/proc/$1/stat" 2>/dev/null)"
    [[ -n "$st" && "$st" != Z && "$st" != X ]]
}

proc_gone() { ! proc_alive "$1"; }

# Prints the pid of daemon $1 when it runs, else nothing (and returns 1).
daemon_pid() {
    local pf pid
    pf="$(pidfile "$1")"
    [[ -s "$pf" ]] || return 1
    pid="$(tr -dc '0-9' <"$pf")"
    [[ -n "$pid" ]] && proc_alive "$pid" || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" == "${COMM[$1]}" ]] || return 1
    echo "$pid"
}

is_up() { daemon_pid "$1" >/dev/null; }

# descendants PID...: every process below the given ones (one snapshot of /proc).
descendants() {
    # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces or parentheses.
    { cat /proc/[0-9]*/stat 2>/dev/null || true; } |
        sed -n 's/^\([0-9]*\) (.*) [A-Za-z] \([0-9]*\) .*/\1 \2/p' | awk -v roots="$*" '
        BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) want[r[i]] = 1 }
        { parent[$1] = $2 }
        END {
            do {
                added = 0
                for (c in parent) if (!(c in want) && (parent[c] in want)) { want[c] = 1; added = 1; print c }
            } while (added)
        }'
}

# ---------------------------------------------------------------- packages
pkg_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

ensure_packages() {
    local missing=() p created_policy=0 rc=0
    if ! command -v dpkg-query >/dev/null; then
        for p in "${COMMANDS[@]}"; do command -v "$p" >/dev/null || missing+=("$p"); done
        ((${#missing[@]} == 0)) && return 0
        die "not a Debian machine and these commands are missing: ${missing[*]}"
    fi
    for p in "${PACKAGES[@]}"; do pkg_installed "$p" || missing+=("$p"); done
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null || die "packages missing (${missing[*]}) and apt-get is not available"
    log "installing ${missing[*]} (apt-get update first)"
    # Keep package scripts from starting system-wide daemons: this script runs its own.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    {
        apt-get -q -o DPkg::Lock::Timeout=120 update ||
            log "apt-get update reported errors; trying the install anyway"
        apt-get -q -y -o DPkg::Lock::Timeout=120 install --no-install-recommends "${missing[@]}"
    } >&2 || rc=$?
    ((created_policy)) && rm -f /usr/sbin/policy-rc.d
    ((rc == 0)) || die "apt-get install ${missing[*]} failed (exit $rc)"
    for p in "${missing[@]}"; do pkg_installed "$p" || die "package $p is still not installed"; done
}

# ---------------------------------------------------------------- ports
port_free() {
    if command -v ss >/dev/null; then
        [[ -z "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]]
    elif (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
        return 1
    fi
}

# pick_port FIRST [TAKEN...]: first free port from FIRST not in TAKEN.
pick_port() {
    local p=$1
    shift
    for ((; p < 65000; p++)); do
        [[ " $* " == *" $p "* ]] && continue
        port_free "$p" && echo "$p" && return 0
    done
    die "no free TCP port found"
}

# Ports are chosen once and kept in ports.env; a port is chosen again only when the
# daemon that owns it is down and something else now listens there.
load_ports() {
    local spec var daemon first port taken=() vars=()
    for spec in "${PORTS[@]}"; do vars+=("${spec%%:*}"); done
    for var in "${vars[@]}"; do printf -v "$var" %s ""; done
    # shellcheck disable=SC1090
    [[ -f "$PORTS_FILE" ]] && source "$PORTS_FILE"
    for spec in "${PORTS[@]}"; do
        IFS=: read -r var daemon first <<<"$spec"
        port=${!var}
        if [[ -z "$port" ]] || { ! is_up "$daemon" && ! port_free "$port"; }; then
            port="$(pick_port "$first" "${taken[@]}")"
            printf -v "$var" %s "$port"
        fi
        taken+=("$port")
    done
    for var in "${vars[@]}"; do printf '%s=%s\n' "$var" "${!var}"; done >"$PORTS_FILE.tmp"
    mv -f "$PORTS_FILE.tmp" "$PORTS_FILE"
}

# ---------------------------------------------------------------- config files
# write_if_changed FILE MODE: stdin to FILE when its content differs; FILE gets MODE.
# CHANGED lists the files it rewrote.
CHANGED=()
write_if_changed() {
    local f=$1 mode=$2 tmp
    tmp="$(mktemp "$f.XXXXXX")"
    cat >"$tmp"
    if [[ -f "$f" ]] && cmp -s "$tmp" "$f"; then
        rm -f "$tmp"
    else
        mv -f "$tmp" "$f"
        CHANGED+=("$f")
    fi
    chmod "$mode" "$f"
}

# Refuse an option the controller would not start with, before anything changes.
check_options() {
    [[ -z "$MAX_ARRAY_SIZE" ]] || { [[ "$MAX_ARRAY_SIZE" =~ ^[0-9]+$ ]] &&
        ((MAX_ARRAY_SIZE <= 4000001)); } ||
        die "NCSWEEP_SLURM_MAX_ARRAY_SIZE='$MAX_ARRAY_SIZE': expected an integer 0..4000001"
}

# The slurm.conf lines for the options set in the environment (none by default).
option_lines() { [[ -z "$MAX_ARRAY_SIZE" ]] || echo "MaxArraySize=$MAX_ARRAY_SIZE"; }

# The CPUs this process may run on. GNU nproc also honours OMP_NUM_THREADS and OMP_THREAD_LIMIT
# (a test runner sets them to 1), which must not shrink the node.
machine_cpus() { env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc; }

write_configs() {
    local mem_mb margin real_mb
    mem_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))
    margin=$((mem_mb / 20 < 256 ? 256 : mem_mb / 20))
    real_mb=$((mem_mb - margin < 256 ? 256 : mem_mb - margin))
    if [[ ! -s "$DB_DIR/slurm.pass" ]]; then
        (umask 077 && head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$DB_DIR/slurm.pass")
    fi
    DB_PASS="$(cat "$DB_DIR/slurm.pass")"

    write_if_changed "$CONF" 644 < <(
        cat <<EOF
# Generated by launch/local_slurm.sh; edits are overwritten on the next start.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=$(logfile slurmctld)
SlurmdLogFile=$(logfile slurmd)
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=2
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
KillWait=5
InactiveLimit=0
MinJobAge=300
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# The controller's connection to slurmdbd ignores AuthInfo=socket= and needs this.
AccountingStoragePass=$MUNGE_SOCKET
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$(machine_cpus) RealMemory=$real_mb State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
        option_lines
    )

    write_if_changed "$DBD_CONF" 600 <<EOF
# Generated by launch/local_slurm.sh; edits are overwritten on the next start.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$(pidfile slurmdbd)
LogFile=$(logfile slurmdbd)
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    chown root:root "$DBD_CONF"
}

# ---------------------------------------------------------------- daemons
# spawn NAME COMMAND...: run COMMAND detached (new session, no stdin, output to NAME's
# log) so that `start | tail -1` never waits on a daemon holding the pipe. It runs from
# the state folder, which lets `stop` recognise the job steps it leaves, and without fd 9.
spawn() {
    local logf
    logf="$(logfile "$1")"
    shift
    (cd "$STATE" && exec setsid "$@" </dev/null >>"$logf" 2>&1 9>&-) &
}

# await NAME COMMAND...: wait until COMMAND succeeds, else fail with NAME's log.
await() {
    local name=$1
    shift
    wait_until "$TIMEOUT" "$@" || die "$name did not come up within ${TIMEOUT}s" "$(logfile "$name")"
}

munge_works() { is_up munged && munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET"; }
db_sql() { mariadb --no-defaults --protocol=socket --socket="$DB_SOCKET" -uroot -N -B; }
db_ping() { mariadb-admin --no-defaults --protocol=socket --socket="$DB_SOCKET" -uroot ping; }
sacctmgr_q() { timeout 20 sacctmgr "$@"; }
dbd_clusters() { sacctmgr_q -n -P show cluster format=cluster; }
ctld_answers() { ask scontrol ping | grep -q 'is UP'; }

start_munged() {
    if ! is_up munged; then
        if [[ ! -s "$MUNGE_KEY" ]]; then
            log "creating a private munge key"
            if command -v mungekey >/dev/null; then
                mungekey -c -k "$MUNGE_KEY" >&2
            else
                dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
            fi
        fi
        chmod 600 "$MUNGE_KEY"
        rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
        log "starting munged"
        spawn munged munged --force --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEY" \
            --pid-file="$(pidfile munged)" --log-file="$(logfile munged)" \
            --seed-file="$MUNGE_DIR/munged.seed"
    fi
    await munged munge_works
}

start_mariadb() {
    if ! is_up mariadb; then
        if [[ ! -d "$DB_DATA/mysql" ]]; then
            log "initialising MariaDB in $DB_DATA"
            rm -rf "$DB_DATA"
            mkdir -p "$DB_DATA"
            mariadb-install-db --no-defaults --user=root --datadir="$DB_DATA" \
                --auth-root-authentication-method=socket --skip-test-db \
                >>"$(logfile mariadb)" 2>&1 || die "mariadb-install-db failed" "$(logfile mariadb)"
        fi
        rm -f "$DB_SOCKET"
        log "starting MariaDB on 127.0.0.1:$DB_PORT"
        spawn mariadb mariadbd --no-defaults --user=root --datadir="$DB_DATA" \
            --socket="$DB_SOCKET" --port="$DB_PORT" --bind-address=127.0.0.1 \
            --skip-name-resolve --pid-file="$(pidfile mariadb)" --log-error="$(logfile mariadb)" \
            --innodb-buffer-pool-size=512M --innodb-lock-wait-timeout=900 \
            --innodb-flush-log-at-trx-commit=2 --max-connections=100
    fi
    await mariadb db_ping
    local host
    {
        echo "CREATE DATABASE IF NOT EXISTS slurm_acct_db;"
        for host in 127.0.0.1 localhost; do
            echo "CREATE USER IF NOT EXISTS 'slurm'@'$host' IDENTIFIED BY '$DB_PASS';"
            echo "ALTER USER 'slurm'@'$host' IDENTIFIED BY '$DB_PASS';"
            echo "GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'$host';"
        done
        echo "FLUSH PRIVILEGES;"
    } | db_sql >&2 || die "could not create the slurm_acct_db database and user" "$(logfile mariadb)"
}

start_slurmdbd() {
    if ! is_up slurmdbd; then
        log "starting slurmdbd on 127.0.0.1:$DBD_PORT"
        spawn slurmdbd slurmdbd
    fi
    await slurmdbd dbd_clusters
    if ! dbd_clusters 2>/dev/null | grep -qx "$CLUSTER"; then
        log "registering cluster $CLUSTER in the accounting database"
        sacctmgr_q -i add cluster "$CLUSTER" >&2 || die "sacctmgr add cluster failed" "$(logfile slurmdbd)"
    fi
    # Make sure the invoking user has an association (root gets one with the cluster).
    local user
    user="$(id -un)"
    if ! sacctmgr_q -n -P show assoc cluster="$CLUSTER" user="$user" format=user 2>/dev/null |
        grep -qx "$user"; then
        log "adding an association for user $user"
        sacctmgr_q -i add user "$user" account=root cluster="$CLUSTER" >&2 ||
            die "sacctmgr add user $user failed" "$(logfile slurmdbd)"
    fi
}

start_slurmctld() {
    if ! is_up slurmctld; then
        local args=()
        # -c only on the very first start: afterwards job ids must keep counting up.
        [[ -e "$STATE/.slurmctld-initialised" ]] || args+=(-c)
        log "starting slurmctld${args[*]:+ ${args[*]}} on 127.0.0.1:$CTLD_PORT"
        spawn slurmctld slurmctld "${args[@]}" -f "$CONF"
    fi
    await slurmctld ctld_answers
    touch "$STATE/.slurmctld-initialised"
}

start_slurmd() {
    if ! is_up slurmd; then
        log "starting slurmd for node $NODE"
        spawn slurmd slurmd -f "$CONF"
    fi
    await slurmd is_up slurmd
}

# ---------------------------------------------------------------- node state
# Node state without the trailing flags (*, ~, #, ...), e.g. idle, mixed, down, drained.
node_state() { ask sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -1 || true; }

# True for the node states in which the node runs jobs.
ready_state() { case "$1" in idle | mixed | allocated | completing) return 0 ;; *) return 1 ;; esac; }

# Wait for the node to run jobs, resuming it once if it is drained.
wait_node_ready() {
    local start=$SECONDS s resumed=0
    while ((SECONDS - start < TIMEOUT)); do
        s="$(node_state)"
        ready_state "$s" && return 0
        if [[ "$s" == @(drained|draining|drain) ]] && ((!resumed)); then
            log "node $NODE is $s ($(ask sinfo -h -N -n "$NODE" -o %E 2>/dev/null || true)); resuming it"
            ask scontrol update nodename="$NODE" state=resume >&2 || true
            resumed=1
        fi
        sleep 0.25
    done
    log "node $NODE is '${s:-unknown}' after ${TIMEOUT}s"
    ask sinfo -N -l >&2 || true
    die "the node did not become idle" "$(logfile slurmd)"
}

healthy() {
    local d
    for d in "${DAEMONS[@]}"; do is_up "$d" || return 1; done
    ready_state "$(node_state)"
}

# Apply a rewritten slurm.conf to the running daemons and wait until the controller has it.
reconfigure() {
    local want=${MAX_ARRAY_SIZE:-1001}
    ask scontrol reconfigure >/dev/null || die "scontrol reconfigure failed"
    wait_until "$TIMEOUT" config_has MaxArraySize "$want" ||
        die "the controller did not take MaxArraySize=$want within ${TIMEOUT}s (see $(logfile slurmctld))"
    log "cluster '$CLUSTER' reconfigured from $CONF (MaxArraySize $want)"
}

# config_has KEY VALUE: whether `scontrol show config` shows KEY = VALUE.
config_has() { ask scontrol show config 2>/dev/null | grep -Eq "^$1 += $2\$"; }

# ---------------------------------------------------------------- start
cmd_start() {
    need_root "start needs root (the cluster runs with SlurmUser=root and installs packages)"
    command -v flock >/dev/null || die "flock (util-linux) is required"
    check_options
    resolve_state
    lock_state
    local t0=$SECONDS s d
    ensure_packages
    mkdir -p "$ETC" "$RUN" "$LOGS" "$MUNGE_DIR" "$DB_DIR" "$CTLD_SPOOL" "$SLURMD_SPOOL"
    chmod 755 "$STATE" "$MUNGE_DIR" "$ETC"
    chmod 700 "$DB_DIR"
    if [[ -f "$CONF" ]] && healthy; then
        load_ports
        write_configs
        if [[ " ${CHANGED[*]} " == *" $CONF "* ]]; then
            reconfigure
        else
            log "cluster '$CLUSTER' is already running (state in $STATE); nothing to do"
        fi
    else
        for s in "$MUNGE_SOCKET" "$DB_SOCKET"; do
            ((${#s} < 100)) || die "socket path too long for a unix socket: $s (set NCSWEEP_SLURM_DIR to a shorter folder)"
        done
        load_ports
        write_configs
        for d in "${DAEMONS[@]}"; do "start_$d"; done
        wait_node_ready
        log "cluster '$CLUSTER' is up: node $NODE $(node_state) ($((SECONDS - t0))s; state in $STATE)"
    fi
    printf 'export SLURM_CONF=%s\n' "$CONF" | tee "$STATE/env.sh"
}

# ---------------------------------------------------------------- stop
# Job steps left by our slurmd: slurmstepd processes that inherited its working
# folder (slurmd runs in the state folder; slurmstepd rewrites its environment).
leftover_steps() {
    local p cwd
    for p in /proc/[0-9]*; do
        [[ "$(cat "$p/comm" 2>/dev/null)" == slurmstepd ]] || continue
        cwd="$(readlink "$p/cwd" 2>/dev/null || true)"
        [[ "$cwd" == "$STATE" || "$cwd" == "$STATE"/* ]] && echo "${p#/proc/}"
    done
    return 0
}

# End the job steps our slurmd left behind, with all their processes.
end_leftover_steps() {
    local all=() p
    mapfile -t all < <(leftover_steps)
    ((${#all[@]})) || return 0
    mapfile -t -O "${#all[@]}" all < <(descendants "${all[@]}")
    log "ending ${#all[@]} leftover job-step process(es)"
    kill -TERM "${all[@]}" 2>/dev/null || true
    for p in "${all[@]}"; do
        wait_until 5 proc_gone "$p" || kill -KILL "$p" 2>/dev/null || true
    done
}

# stop_daemons NAME...: SIGTERM to all of them at once, then wait for each.
stop_daemons() {
    local d pid limit
    declare -A pids=()
    for d in "$@"; do
        if pid="$(daemon_pid "$d")"; then
            log "stopping $d (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids[$d]=$pid
        else
            log "$d is not running"
        fi
    done
    for d in "$@"; do
        [[ -n "${pids[$d]:-}" ]] || continue
        limit=20
        [[ "$d" == mariadb ]] && limit=60
        if ! wait_until "$limit" proc_gone "${pids[$d]}"; then
            log "$d did not exit within ${limit}s; killing it"
            kill -KILL "${pids[$d]}" 2>/dev/null || true
            wait_until 10 proc_gone "${pids[$d]}" || true
        fi
    done
    for d in "$@"; do rm -f "$(pidfile "$d")"; done
}

# job_ids STATES: ids of the jobs in those states.
job_ids() { ask squeue -h -t "$1" -o %i 2>/dev/null || true; }
no_active_jobs() { [[ -z "$(job_ids "$ACTIVE_JOBS,COMPLETING")" ]]; }

# Requeue running jobs (cancel those that cannot be requeued) while slurmctld and
# slurmd can still end them properly; they run again after the next start.
requeue_running_jobs() {
    is_up slurmctld && [[ -f "$CONF" ]] || return 0
    local ids id
    ids="$(job_ids "$ACTIVE_JOBS")"
    [[ -n "$ids" ]] || return 0
    log "requeueing running job(s): ${ids//$'\n'/ }"
    for id in $ids; do
        ask scontrol requeue "$id" 2>/dev/null || ask scancel "$id" || true
    done
    wait_until 30 no_active_jobs || log "some jobs were still running after 30s"
}

cmd_stop() {
    need_root "stop needs root"
    if [[ ! -d "$STATE_IN" ]]; then
        log "no cluster state in $STATE_IN; nothing to stop"
        return 0
    fi
    resolve_state
    lock_state
    if is_up slurmd; then requeue_running_jobs; fi
    # slurmctld sends its last records to slurmdbd, which needs MariaDB; munged last.
    stop_daemons slurmd slurmctld
    end_leftover_steps
    stop_daemons slurmdbd
    stop_daemons mariadb munged
    rm -f "$MUNGE_SOCKET" "$DB_SOCKET"
    log "stopped (state kept in $STATE)"
}

# ---------------------------------------------------------------- status
cmd_status() {
    if [[ ! -d "$STATE_IN" ]]; then
        echo "no cluster state in $STATE_IN (never started)"
        return 1
    fi
    resolve_state
    local d pid ok=0 s
    for d in "${DAEMONS[@]}"; do
        if pid="$(daemon_pid "$d")"; then
            printf '%-10s up (pid %s)\n' "$d" "$pid"
        else
            printf '%-10s down\n' "$d"
            ok=1
        fi
    done
    if [[ -f "$CONF" ]] && is_up slurmctld; then
        echo
        ask sinfo || ok=1
        echo
        ask squeue || ok=1
        s="$(node_state)"
        if ! ready_state "$s"; then
            echo "node $NODE is '${s:-unknown}'"
            ok=1
        fi
    else
        ok=1
    fi
    echo
    echo "SLURM_CONF=$CONF"
    return "$ok"
}

# ---------------------------------------------------------------- main
case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    -h | --help | help) usage ;;
    *)
        usage
        exit 2
        ;;
esac
