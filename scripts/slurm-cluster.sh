#!/usr/bin/env bash
# A real one-node Slurm cluster on this host, for the tests marked `slurm`.
#   scripts/slurm-cluster.sh up     install (apt-get, as root) and start munge, slurmctld, slurmd
#   scripts/slurm-cluster.sh down   stop them (`down --if-started`: only if `up` started them)
#   scripts/slurm-cluster.sh status is it up?
# `up` is idempotent: a cluster that answers is left alone, and a slurm.conf this script did not
# write is never touched. Not root or no apt-get: says so and exits 0 (the slurm tests then skip
# and say why).
set -euo pipefail

CONF_DIR=/etc/slurm
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm
HOST=$(hostname -s)
MARK=/run/instar-slurm-cluster.started

is_up() { command -v sinfo >/dev/null && timeout 10 sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; }

install() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "note: slurm is not installed and this is not root with apt-get; the slurm tests will skip"; exit 0
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
  local cpus mem
  cpus=$(nproc)
  mem=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
  if [ -f "$CONF_DIR/slurm.conf" ] && ! grep -q '^ClusterName=instar-test$' "$CONF_DIR/slurm.conf"; then
    echo "$CONF_DIR/slurm.conf was not written by $0; leaving this host's Slurm alone" >&2; exit 1
  fi
  mkdir -p "$CONF_DIR" "$STATE" "$SPOOL" "$LOGS"
  # OverSubscribe lets sibling stages (and a 2-rank stage) share the node's few cores; the short
  # cred_expire makes a requeued job eligible again after seconds instead of Slurm's 120.
  cat > "$CONF_DIR/slurm.conf" <<CONF
ClusterName=instar-test
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_min_interval=100000
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobRequeue=1
KillWait=10
MinJobAge=3600
ReturnToService=2
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
}

start() {
  if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge 2>/dev/null || true
    [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none;
                                     chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
    su -s /bin/sh munge -c /usr/sbin/munged
  fi
  pgrep -x slurmctld >/dev/null || slurmctld
  pgrep -x slurmd >/dev/null || slurmd
  touch "$MARK"
  for _ in $(seq 1 60); do
    if is_up; then echo "slurm is up: $(sinfo -h -o '%P %D %T %c' | head -n 1)"; return 0; fi
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  echo "slurm did not come up; see $LOGS/" >&2
  tail -n 20 "$LOGS/slurmctld.log" "$LOGS/slurmd.log" >&2 || true
  exit 1
}

stop() {
  if [ "${1:-}" = --if-started ] && [ ! -f "$MARK" ]; then return 0; fi
  rm -f "$MARK"
  for daemon in slurmd slurmctld; do
    pid=$(pgrep -x "$daemon" || true)
    [ -n "$pid" ] && kill $pid
  done
  echo "slurm stopped"
}

case "${1:-}" in
  up) if is_up; then echo "slurm is already up"; exit 0; fi; install; write_conf; start ;;
  down) stop "${2:-}" ;;
  status) if is_up; then echo up; else echo down; exit 1; fi ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
