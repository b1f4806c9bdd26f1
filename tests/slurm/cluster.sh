#!/usr/bin/env bash
# Single-node SLURM test cluster for ffsd (slurmctld + slurmd + munged on this machine).
#
#   tests/slurm/cluster.sh up       # install (Debian packages), configure, start; idempotent
#   tests/slurm/cluster.sh down     # stop what `up` started; idempotent
#   tests/slurm/cluster.sh status   # sinfo/squeue; exit 0 only if the cluster is healthy
#   tests/slurm/cluster.sh env      # print `export SLURM_CONF=...` for this cluster
#
# Environment:
#   FFSD_SLURM_DIR        state/spool/log/config directory owned by this script [/tmp/ffsd-slurm]
#   FFSD_SLURM_PARTITION  name of the only partition [debug]
#   FFSD_SLURM_TIMEOUT    seconds `up` waits for the node to become idle [60]
#
# Everything this script writes lives in $FFSD_SLURM_DIR, except: /etc/slurm/slurm.conf (a symlink
# to the generated config, only if no foreign file is there), the munge runtime directories and
# key (the Debian defaults, which every munge client expects) and, if the hostname does not
# resolve, one line in /etc/hosts. No systemd is needed: daemons are started directly.
set -euo pipefail

STATE_DIR=${FFSD_SLURM_DIR:-/tmp/ffsd-slurm}
PARTITION=${FFSD_SLURM_PARTITION:-debug}
TIMEOUT=${FFSD_SLURM_TIMEOUT:-60}
CONF_DIR=$STATE_DIR/etc
CONF=$CONF_DIR/slurm.conf
JOBID_CONF=$CONF_DIR/first_job_id.conf
RUN_DIR=$STATE_DIR/run
LOG_DIR=$STATE_DIR/log
CTLD_STATE=$STATE_DIR/spool/slurmctld
SLURMD_SPOOL=$STATE_DIR/spool/slurmd
CTLD_PID=$RUN_DIR/slurmctld.pid
SLURMD_PID=$RUN_DIR/slurmd.pid
MUNGED_OURS=$RUN_DIR/munged.pid # present only if this script started munged
ETC_CONF=/etc/slurm/slurm.conf
MARKER="# managed by ffsd tests/slurm/cluster.sh"
PACKAGES=(slurmctld slurmd slurm-client munge)

export SLURM_CONF=$CONF

log() { echo "[ffsd-slurm] $*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}

is_root() { [ "$(id -u)" -eq 0 ]; }

node_name() { hostname -s 2>/dev/null || hostname; }

# --- processes -------------------------------------------------------------------------------

# alive PID: the process exists and is not a zombie (killed daemons are reparented to pid 1,
# which may take a while to reap them).
alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

# pid_of FILE: the pid stored in FILE if that process is alive, else nothing.
pid_of() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(tr -dc '0-9' <"$1")
  [ -n "$pid" ] && alive "$pid" && echo "$pid"
}

# is_our_daemon PID NAME: PID runs NAME (slurmctld/slurmd) with our config file.
is_our_daemon() {
  local pid=$1 name=$2 cmd
  [ -r "/proc/$pid/cmdline" ] || return 1
  cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline")
  [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name"* ]] && [[ " $cmd " == *" $CONF "* ]]
}

# our_daemon_pids NAME: every live NAME process started with our config (stale pid files included).
our_daemon_pids() {
  local name=$1 dir pid
  for dir in /proc/[0-9]*; do
    pid=${dir#/proc/}
    is_our_daemon "$pid" "$name" && echo "$pid"
  done
  return 0
}

# stop_pids SIG_WAIT_S PID...: TERM, wait, then KILL.
stop_pids() {
  local wait_s=$1 pid i left
  shift
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null || true
  for ((i = 0; i < wait_s * 10; i++)); do
    left=0
    for pid in "$@"; do alive "$pid" && left=1; done
    [ "$left" -eq 0 ] && return 0
    sleep 0.1
  done
  kill -KILL "$@" 2>/dev/null || true
}

# --- checks --------------------------------------------------------------------------------

munge_ok() { command -v munge >/dev/null && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

# node_state: state of our node as sinfo reports it (idle, mixed, allocated, down*, ...).
node_state() {
  timeout 10 sinfo -h -N -n "$(node_name)" -o %T 2>/dev/null | head -n1
}

healthy() {
  [ -f "$CONF" ] || return 1
  munge_ok || return 1
  local ctld slurmd
  ctld=$(pid_of "$CTLD_PID") || return 1
  slurmd=$(pid_of "$SLURMD_PID") || return 1
  is_our_daemon "$ctld" slurmctld && is_our_daemon "$slurmd" slurmd || return 1
  case "$(node_state)" in
    idle | mixed | allocated | completing) return 0 ;;
    *) return 1 ;;
  esac
}

show_logs() {
  local f
  for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" "$LOG_DIR/slurmctld.stderr" \
    "$LOG_DIR/slurmd.stderr" "$LOG_DIR/munged.stderr" /var/log/munge/munged.log; do
    [ -s "$f" ] || continue
    echo "----- tail -n 25 $f" >&2
    tail -n 25 "$f" >&2 || true
  done
}

# --- setup steps ----------------------------------------------------------------------------

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  is_root || die "packages missing (${missing[*]}) and not root: install them or run as root"
  command -v apt-get >/dev/null || die "packages missing (${missing[*]}) and no apt-get"
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Keep the packages' init scripts from starting daemons with their default config (they would
  # hold the ports): the usual Docker policy-rc.d, only for the install and only if there is none.
  local policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# ffsd tests/slurm/cluster.sh, during apt-get install\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    # shellcheck disable=SC2064
    trap "rm -f '$policy'" EXIT
  fi
  local install=(apt-get install -y --no-install-recommends -o Dpkg::Options::=--force-confold)
  if ! "${install[@]}" "${missing[@]}" >"$LOG_DIR/apt.log" 2>&1; then
    log "apt-get install failed, running apt-get update and retrying"
    apt-get update >>"$LOG_DIR/apt.log" 2>&1 || true
    "${install[@]}" "${missing[@]}" >>"$LOG_DIR/apt.log" 2>&1 ||
      {
        tail -n 30 "$LOG_DIR/apt.log" >&2
        die "apt-get install ${missing[*]} failed"
      }
  fi
  if grep -q "ffsd tests/slurm/cluster.sh" "$policy" 2>/dev/null; then
    rm -f "$policy"
    trap - EXIT
  fi
}

ensure_hostname_resolves() {
  local name
  name=$(node_name)
  getent hosts "$name" >/dev/null 2>&1 && return 0
  log "hostname $name does not resolve: adding it to /etc/hosts"
  grep -qE "^127\.0\.0\.1[[:space:]].*[[:space:]]$name([[:space:]]|$)" /etc/hosts 2>/dev/null ||
    echo "127.0.0.1 $name # added by ffsd tests/slurm/cluster.sh" >>/etc/hosts
}

start_munge() {
  if munge_ok; then return 0; fi
  local user=munge pid
  id munge >/dev/null 2>&1 || user=root
  # Stale state from a previous munged (killed, or a different container): pid file and socket.
  if [ -s /run/munge/munged.pid ] && ! pid_of /run/munge/munged.pid >/dev/null; then
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  fi
  install -d -m 0755 -o "$user" -g "$user" /run/munge
  install -d -m 0700 -o "$user" -g "$user" /var/log/munge /var/lib/munge /etc/munge
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating munge key"
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile=/etc/munge/munge.key
    else
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
  fi
  chown "$user:$user" /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  if [ "$user" = munge ]; then
    runuser -u munge -- munged 9>&- >"$LOG_DIR/munged.stderr" 2>&1 </dev/null ||
      die "munged failed to start: $(cat "$LOG_DIR/munged.stderr")"
  else
    munged --force 9>&- >"$LOG_DIR/munged.stderr" 2>&1 </dev/null ||
      die "munged failed to start: $(cat "$LOG_DIR/munged.stderr")"
  fi
  for _ in $(seq 50); do
    munge_ok && break
    sleep 0.1
  done
  munge_ok || {
    show_logs
    die "munged started but munge -n | unmunge fails"
  }
  pid=$(pid_of /run/munge/munged.pid) && echo "$pid" >"$MUNGED_OURS"
}

# Print "CPUs=.. Boards=.. ... RealMemory=.." for this machine.
node_hardware() {
  local line
  line=$(slurmd -C 2>/dev/null | head -n1 || true)
  if [[ "$line" == NodeName=* && "$line" == *RealMemory=* ]]; then
    echo "${line#NodeName=* }"
  else
    echo "CPUs=$(nproc) RealMemory=$(free -m | awk '/^Mem:/{print $2}')"
  fi
}

write_config() {
  local node tmp
  node=$(node_name)
  tmp=$(mktemp "$CONF_DIR/.slurm.conf.XXXXXX")
  cat >"$tmp" <<EOF
$MARKER
# Single node, no cgroups, no accounting. Regenerated by every \`cluster.sh up\`.
ClusterName=ffsd
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=cred_expire=10
CredType=cred/munge
MailProg=/bin/true
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$CTLD_STATE
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Requeue: batch jobs are requeueable by default (submitit calls \`scontrol requeue\` from inside
# the job when it gets its preemption/timeout signal).
JobRequeue=1
ReturnToService=2
# Reject at submission what this node can never run (e.g. -c 4 on 2 CPUs) instead of pending forever.
EnforcePartLimits=ALL
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=600
MessageTimeout=10
PropagateResourceLimitsExcept=MEMLOCK
# FirstJobId, rewritten at each fresh start (see start_slurm).
Include $JOBID_CONF
NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$node $(node_hardware) State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  [ -s "$JOBID_CONF" ] || echo "FirstJobId=1000" >"$JOBID_CONF"
  if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then
    rm -f "$tmp"
    return 1 # unchanged
  fi
  chmod 0644 "$tmp"
  mv -f "$tmp" "$CONF"
  return 0
}

link_etc_conf() {
  # Make plain `sbatch`/`squeue` (and jobs, Hydra, submitit) find the config without SLURM_CONF.
  is_root || return 0
  mkdir -p /etc/slurm
  if [ -L "$ETC_CONF" ] || [ ! -e "$ETC_CONF" ] || grep -qF "$MARKER" "$ETC_CONF" 2>/dev/null; then
    [ "$(readlink "$ETC_CONF" 2>/dev/null)" = "$CONF" ] || ln -sfn "$CONF" "$ETC_CONF"
  else
    log "$ETC_CONF exists and is not ours: left alone; export SLURM_CONF=$CONF to use this cluster"
  fi
}

start_slurm() {
  local pid
  # Fresh start: drop job/node state and spool of a previous run (possibly another config).
  rm -rf "$CTLD_STATE" "$SLURMD_SPOOL" "$CTLD_PID" "$SLURMD_PID"
  # ...but do not reuse job ids: submitit (and so Hydra) would take the result file of an old
  # job with the same id in a reused folder for the new job's. Ids grow with the clock.
  echo "FirstJobId=$(($(date +%s) % 50000000 + 1000))" >"$JOBID_CONF"
  install -d -m 0755 "$CTLD_STATE" "$SLURMD_SPOOL"
  : >"$LOG_DIR/slurmctld.log"
  : >"$LOG_DIR/slurmd.log"
  # setsid + /dev/null: the daemons must not hold the caller's pipes (pytest's subprocess.run).
  setsid slurmctld -f "$CONF" 9>&- </dev/null >"$LOG_DIR/slurmctld.stderr" 2>&1 ||
    {
      show_logs
      die "slurmctld failed to start"
    }
  for _ in $(seq 100); do
    timeout 5 scontrol ping 2>/dev/null | grep -q "is UP" && break
    sleep 0.2
  done
  setsid slurmd -f "$CONF" -N "$(node_name)" 9>&- </dev/null >"$LOG_DIR/slurmd.stderr" 2>&1 ||
    {
      show_logs
      die "slurmd failed to start"
    }
  local deadline=$((SECONDS + TIMEOUT)) state=""
  while ((SECONDS < deadline)); do
    state=$(node_state || true)
    case "$state" in
      idle | mixed | allocated) break ;;
      down* | drain* | fail* | inval*)
        # e.g. drained for "Low RealMemory" by a stale state: resume it.
        scontrol update nodename="$(node_name)" state=resume >/dev/null 2>&1 || true
        ;;
    esac
    pid_of "$CTLD_PID" >/dev/null || break
    sleep 0.5
  done
  case "$state" in
    idle | mixed | allocated) ;;
    *)
      show_logs
      timeout 10 scontrol show node "$(node_name)" >&2 2>/dev/null || true
      die "node $(node_name) not idle after ${TIMEOUT}s (state: '${state:-none}', slurmctld pid:" \
        "$(pid_of "$CTLD_PID" || echo dead), slurmd pid: $(pid_of "$SLURMD_PID" || echo dead))"
      ;;
  esac
  pid=$(pid_of "$CTLD_PID") && log "slurmctld pid $pid"
  pid=$(pid_of "$SLURMD_PID") && log "slurmd pid $pid"
}

stop_slurm() {
  local ids pids
  # Cancel jobs first so that no slurmstepd or job process outlives the daemons.
  if pid_of "$CTLD_PID" >/dev/null; then
    ids=$(timeout 10 squeue -h -o %A 2>/dev/null || true)
    if [ -n "$ids" ]; then
      # shellcheck disable=SC2086
      timeout 10 scancel $ids 2>/dev/null || true
      for _ in $(seq 30); do
        [ -z "$(timeout 5 squeue -h -t R,CG -o %A 2>/dev/null)" ] && break
        sleep 0.5
      done
    fi
  fi
  mapfile -t pids < <(our_daemon_pids slurmd)
  stop_pids 10 "${pids[@]}"
  mapfile -t pids < <(our_daemon_pids slurmctld)
  stop_pids 10 "${pids[@]}"
  rm -f "$CTLD_PID" "$SLURMD_PID"
}

stop_munge() {
  local pid
  [ -f "$MUNGED_OURS" ] || return 0
  pid=$(pid_of "$MUNGED_OURS") || true
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = munged ]; then
    stop_pids 5 "$pid"
  fi
  rm -f "$MUNGED_OURS"
}

# --- commands -------------------------------------------------------------------------------

# Serialize up/down (two pytest sessions starting at once, say). The daemons must not inherit fd 9.
lock() {
  mkdir -p "$STATE_DIR"
  exec 9>"$STATE_DIR/lock"
  flock -w 300 9 || die "another cluster.sh holds $STATE_DIR/lock"
}

cmd_up() {
  local started=$SECONDS changed=0
  is_root || die "cluster.sh up needs root (it installs packages and runs the daemons as root)"
  lock
  mkdir -p "$CONF_DIR" "$RUN_DIR" "$LOG_DIR"
  install_packages
  ensure_hostname_resolves
  start_munge
  write_config && changed=1
  link_etc_conf
  if [ "$changed" -eq 0 ] && healthy; then
    log "already up ($((SECONDS - started)) s)"
    return 0
  fi
  [ "$changed" -eq 1 ] && log "wrote $CONF"
  stop_slurm # stale or half-dead daemons of a previous run, if any
  start_slurm
  log "up in $((SECONDS - started)) s: partition '$PARTITION', node $(node_name); SLURM_CONF=$CONF"
}

cmd_down() {
  lock
  stop_slurm
  stop_munge
  if [ -L "$ETC_CONF" ] && [ "$(readlink "$ETC_CONF")" = "$CONF" ]; then
    rm -f "$ETC_CONF"
  fi
  log "down"
}

cmd_status() {
  local ctld slurmd
  if [ ! -f "$CONF" ]; then
    echo "no cluster configured at $CONF (run: $0 up)"
    return 1
  fi
  echo "SLURM_CONF=$CONF"
  ctld=$(pid_of "$CTLD_PID") || ctld=""
  slurmd=$(pid_of "$SLURMD_PID") || slurmd=""
  if [ -z "$ctld" ] || [ -z "$slurmd" ] || ! munge_ok; then
    # Do not ask a dead controller (or without munge): sinfo/squeue retry for many seconds.
    echo "NOT running (slurmctld pid: ${ctld:-none}, slurmd pid: ${slurmd:-none}," \
      "munge: $(munge_ok && echo ok || echo broken))"
    return 1
  fi
  timeout 10 sinfo 2>&1 || true
  timeout 10 squeue 2>&1 || true
  if healthy; then
    echo "healthy"
  else
    echo "NOT healthy (node state: '$(node_state || true)'; munge: $(munge_ok && echo ok || echo broken))"
    return 1
  fi
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *)
    echo "usage: $0 up|down|status|env" >&2
    exit 2
    ;;
esac
