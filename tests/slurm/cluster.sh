#!/usr/bin/env bash
# A throw-away two-node SLURM cluster on this one machine, for tests/test_slurm.py and for trying the
# batch scripts by hand:
#
#   bash tests/slurm/cluster.sh up      # install (if missing) and start munged, slurmctld, slurmd n1 + n2
#   export SLURM_CONF=/tmp/zerokit-slurm/slurm.conf   # then sbatch/squeue/scontrol talk to it
#   bash tests/slurm/cluster.sh down    # stop the daemons (by their pid files), delete the state
#
# Needs root and apt (Debian 12 / Ubuntu). Nothing outside $ZEROKIT_SLURM_DIR (default /tmp/zerokit-slurm)
# is touched except one /etc/hosts line ("n1 n2", so the node names resolve) and the apt packages.
#
# How: Debian's slurmd is built with MULTIPLE_SLURMD, so two slurmd daemons (`slurmd -N n1`, `-N n2`) on
# one host, each on its own port, look like two nodes to slurmctld. Both nodes claim the same 2 CPUs, and a
# fake "gpu:2" GRES (empty files) so --gpus-per-node scripts can be scheduled (there is no device behind it).
# The short timers (sched_interval, MinJobAge, cred_expire) make submits and requeues take seconds.
set -euo pipefail

D=${ZEROKIT_SLURM_DIR:-/tmp/zerokit-slurm}
HOSTS_MARK="# zerokit test cluster (tests/slurm/cluster.sh)"

die() { echo "cluster.sh: $*" >&2; exit 1; }

install_if_missing() {
  local missing=0 cmd
  for cmd in slurmctld slurmd sbatch munged; do command -v "$cmd" >/dev/null || missing=1; done
  [ "$missing" = 0 ] && return 0
  command -v apt-get >/dev/null || die "slurmctld/slurmd/sbatch/munged missing and no apt-get to install them"
  echo "cluster.sh: installing slurmctld slurmd slurm-client munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Keep the packages from starting their own system daemons (we start ours below): a policy-rc.d that
  # says no, unless the machine already has one (containers usually do).
  local policy=/usr/sbin/policy-rc.d made=0
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; made=1; fi
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null || {
    [ "$made" = 1 ] && rm -f "$policy"; die "apt-get install failed"; }
  [ "$made" = 1 ] && rm -f "$policy"
  return 0
}

stop_daemons() {  # stop_daemons PIDFILE...: TERM them all, wait up to 10 s, KILL what is left
  local f pid pids=() i
  for f in "$@"; do
    pid=$(cat "$f" 2>/dev/null || true)
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && pids+=("$pid")
    rm -f "$f"
  done
  [ ${#pids[@]} = 0 ] && return 0
  for i in $(seq 50); do
    kill -0 "${pids[@]}" 2>/dev/null || return 0  # kill -0 succeeds while any of them is alive
    sleep 0.2
  done
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
}

down() {
  [ -d "$D" ] || return 0
  # slurmd first (they report to slurmctld), munged last (everyone authenticates through it).
  stop_daemons "$D/n1/slurmd.pid" "$D/n2/slurmd.pid" "$D/slurmctld.pid"
  stop_daemons "$D/munge/munged.pid"
  # Rewrite in place (not sed -i): /etc/hosts is often a bind mount that cannot be replaced by rename.
  if grep -qF "$HOSTS_MARK" /etc/hosts; then
    grep -vF "$HOSTS_MARK" /etc/hosts > "$D/hosts.new" || true
    cat "$D/hosts.new" > /etc/hosts
  fi
  rm -rf "$D"
}

write_conf() {
  local host=$1
  cat > "$D/slurm.conf" <<EOF
ClusterName=zerokit-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may start again once its old credential expired (default 120 s).
AuthInfo=socket=$D/munge/munge.socket,cred_expire=10
StateSaveLocation=$D/ctld
SlurmdSpoolDir=$D/%n
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/%n/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
# No cgroups in containers: track processes by parentage, no CPU binding, no accounting daemon.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Finished jobs leave scontrol show job after 10 s (default 300), so ids and nodes free up fast.
MinJobAge=10
KillWait=10
ReturnToService=2
GresTypes=gpu
NodeName=n[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=17001-17002 CPUs=2 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
  # slurmd drops GPUs without a device file, so point at two empty files: schedulable, nothing behind them.
  touch "$D/fakegpu0" "$D/fakegpu1"
  echo "Name=gpu File=$D/fakegpu[0-1]" > "$D/gres.conf"
}

up() {
  [ "$(id -u)" = 0 ] || die "run as root (it starts munged and slurmd and installs packages)"
  install_if_missing
  down  # a previous cluster from the same state dir would hold the ports
  local host
  host=$(hostname -s)
  mkdir -p "$D"/{ctld,n1,n2,log,munge}
  chmod 755 "$D"  # munged (user munge) must reach its socket inside
  chown munge:munge "$D/munge"
  chmod 755 "$D/munge"  # munged wants the socket dir readable by all

  # munge: our own key and socket, so the system's munge (if any) is left alone.
  runuser -u munge -- mungekey --create --keyfile="$D/munge/munge.key"
  runuser -u munge -- munged --key-file="$D/munge/munge.key" --socket="$D/munge/munge.socket" \
    --pid-file="$D/munge/munged.pid" --log-file="$D/munge/munged.log" --seed-file="$D/munge/munged.seed"

  if ! getent hosts n1 >/dev/null || ! getent hosts n2 >/dev/null; then
    echo "127.0.0.1 n1 n2 $HOSTS_MARK" >> /etc/hosts
  fi

  write_conf "$host"
  export SLURM_CONF=$D/slurm.conf
  slurmctld -c   # -c: start clean, no saved jobs from an earlier cluster
  slurmd -N n1
  slurmd -N n2

  local i
  for i in $(seq 60); do
    if [ "$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -c idle)" = 2 ]; then
      echo "cluster.sh: up (export SLURM_CONF=$SLURM_CONF)"
      return 0
    fi
    sleep 0.5
  done
  sinfo -N || true
  tail -n 20 "$D"/log/*.log >&2 || true
  die "nodes n1, n2 did not become idle in 30 s (logs above, in $D/log)"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: bash tests/slurm/cluster.sh up|down   (state in \$ZEROKIT_SLURM_DIR, default /tmp/zerokit-slurm)" >&2; exit 2 ;;
esac
