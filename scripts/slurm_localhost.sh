#!/usr/bin/env bash
# A real single-node Slurm (Debian's slurm-wlm 22.05 + munge) on localhost, without systemd,
# for the project's Slurm tests (tests/integration/test_slurm_cluster.py) and for trying `megatron-eagle submit`.
#
#   scripts/slurm_localhost.sh start    install if needed, write the config, start munged,
#                                       slurmctld and slurmd, wait until the node answers
#   scripts/slurm_localhost.sh stop     cancel jobs, then stop the daemons by their pidfile PIDs
#   scripts/slurm_localhost.sh status   print sinfo / squeue
#
# Idempotent: `start` on a running cluster only checks readiness; `stop` on a stopped one is a
# no-op. Must run as root. Partitions: `debug` (default) and `high` (preempts `debug` jobs by
# requeueing them, with the --signal notice sent to the job first).
set -euo pipefail

CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
STATE_DIR=/var/lib/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid

log() { echo "slurm_localhost: $*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then log "must run as root"; exit 1; fi
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
     && command -v sinfo >/dev/null; then
    return
  fi
  log "installing slurm-wlm and munge"
  local policy=/usr/sbin/policy-rc.d created=0
  if [ ! -e "$policy" ]; then  # keep package scripts from starting services
    printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"; created=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends slurm-wlm slurm-client munge >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm slurm-client munge >/dev/null
  fi
  if [ "$created" = 1 ]; then rm -f "$policy"; fi
}

alive() {  # alive PIDFILE: the pidfile names a running daemon of that name (not a reused PID)
  local pid name
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  name=$(basename "$1" .pid)
  kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]
}

write_config() {
  mkdir -p "$CONF_DIR" "$LOG_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd"
  local cpus mem
  cpus=$(nproc)
  if [ "$cpus" -lt 2 ]; then cpus=2; fi  # the tests run 2 tasks; oversubscribing one core is fine
  mem=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n1)
  mem=$(( ${mem:-2048} * 95 / 100 ))
  cat > "$CONF_DIR/slurm.conf.new" <<EOF
# Written by scripts/slurm_localhost.sh: one node on loopback, no accounting database.
ClusterName=localhost
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5,sched_interval=10
SlurmdParameters=config_overrides
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
ReturnToService=2
JobFileAppend=1
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
MinJobAge=300
KillWait=30
InactiveLimit=0
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=60
PartitionName=high Nodes=localhost Default=NO MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
  mv "$CONF_DIR/slurm.conf.new" "$CONF_DIR/slurm.conf"
}

start_munge() {
  if alive "$MUNGE_PID"; then return; fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    mungekey --create --keyfile=/etc/munge/munge.key
  fi
  chown munge:munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
  chmod 400 /etc/munge/munge.key
  chmod 755 /run/munge
  runuser -u munge -- munged
  for _ in $(seq 50); do
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
    sleep 0.1
  done
  log "munged did not come up"; exit 1
}

wait_ready() {  # any responding node state counts (idle, mixed, allocated after a restart)
  local state=""
  for _ in $(seq 150); do
    state=$(sinfo -h -n localhost -o %T 2>/dev/null | head -n1 || true)
    case "$state" in
      idle*|mixed*|alloc*|completing*) log "ready (node $state)"; return 0 ;;
      down*|drain*) scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
  done
  log "node not ready (state '${state}'); see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log"
  return 1
}

start() {
  need_root
  install_packages
  if alive "$CTLD_PID" && alive "$SLURMD_PID" && alive "$MUNGE_PID"; then
    wait_ready; return
  fi
  # A half-running cluster (one daemon died) is restarted, not patched up.
  if alive "$CTLD_PID" || alive "$SLURMD_PID"; then stop_daemons; fi
  write_config
  start_munge
  slurmctld -c  # cold start: jobs of an earlier, killed instance are not resurrected (or requeued)
  slurmd -N localhost
  wait_ready
}

stop_pid() {  # stop_pid PIDFILE NAME: TERM, wait up to 15 s, then KILL
  local file=$1 name=$2 pid
  if ! alive "$file"; then rm -f "$file"; return; fi
  pid=$(cat "$file")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 150); do
    if ! kill -0 "$pid" 2>/dev/null; then rm -f "$file"; log "stopped $name ($pid)"; return; fi
    sleep 0.1
  done
  log "$name ($pid) ignored TERM; killing"
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$file"
}

stop_daemons() {
  stop_pid "$SLURMD_PID" slurmd
  stop_pid "$CTLD_PID" slurmctld
}

stop() {
  need_root
  if alive "$CTLD_PID"; then  # cancel jobs first, or their processes outlive slurmd
    local ids
    ids=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    if [ -n "${ids// /}" ]; then
      # shellcheck disable=SC2086
      scancel $ids 2>/dev/null || true
      # shellcheck disable=SC2086
      scancel --full --signal=KILL $ids 2>/dev/null || true
      for _ in $(seq 150); do
        if [ -z "$(squeue -h 2>/dev/null)" ]; then break; fi
        sleep 0.1
      done
    fi
  fi
  stop_daemons
  stop_pid "$MUNGE_PID" munged
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) sinfo; squeue ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
