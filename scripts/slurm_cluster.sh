#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the project's tests of slurm/*.sbatch (as root):
#   scripts/slurm_cluster.sh start DIR [CPUS]   installs Debian's munge/slurmctld/slurmd if missing, writes
#                                               DIR/slurm.conf, starts munged (if not running), slurmctld, slurmd
#   scripts/slurm_cluster.sh stop DIR           stops the daemons it started
# Then `SLURM_CONF=DIR/slurm.conf sbatch ...`. Everything lives under DIR; the node is this host.
set -euo pipefail
cmd=${1:?usage: slurm_cluster.sh start|stop DIR [CPUS]}
dir=$(mkdir -p "${2:?usage: slurm_cluster.sh start|stop DIR [CPUS]}" && cd "$2" && pwd)
cpus=${3:-$(nproc)}

stop() {
  local daemon pid
  for daemon in slurmd slurmctld; do
    [[ -f "$dir/$daemon.pid" ]] || continue
    pid=$(cat "$dir/$daemon.pid")
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done  # gone before the port is reused
    kill -9 "$pid" 2>/dev/null || true
  done
  if [[ -f "$dir/munged.started" ]]; then pkill -x munged 2>/dev/null || true; rm -f "$dir/munged.started"; fi
}

if [[ $cmd == stop ]]; then stop; exit 0; fi
if [[ $(id -u) -ne 0 ]]; then echo "slurm_cluster.sh: error: needs root (munged and slurmd)" >&2; exit 2; fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v sbatch >/dev/null; then
  packages=(slurmctld slurmd slurm-client munge)
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}" >/dev/null; }
fi
mkdir -p "$dir/state" "$dir/spool" "$dir/log"
host=$(hostname)
memory=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
cat > "$dir/slurm.conf" <<CONF
ClusterName=megacoca-test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
KillWait=30
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
if ! pgrep -x munged >/dev/null; then
  mkdir -p /run/munge && chown munge:munge /run/munge
  [[ -f /etc/munge/munge.key ]] || /usr/sbin/mungekey --create >/dev/null 2>&1 || true
  runuser -u munge -- /usr/sbin/munged
  touch "$dir/munged.started"
fi
export SLURM_CONF=$dir/slurm.conf
/usr/sbin/slurmctld -f "$SLURM_CONF"
/usr/sbin/slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
  if sinfo -h -o %t 2>/dev/null | grep -q idle; then echo "slurm_cluster.sh: $host idle ($cpus CPUs), SLURM_CONF=$SLURM_CONF"; exit 0; fi
  sleep 0.5
done
echo "slurm_cluster.sh: error: the node did not come up; see $dir/log" >&2
stop
exit 1
