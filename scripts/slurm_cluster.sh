#!/usr/bin/env bash
# A real SLURM cluster on this machine, for the project's tests of slurm/*.sbatch (as root):
#   scripts/slurm_cluster.sh start DIR [CPUS] [NAME=ADDRESS ...]
#       installs Debian's munge/slurmctld/slurmd if missing, writes DIR/slurm.conf, starts munged (if not
#       running), slurmctld and a slurmd for this host (partition "debug", the default). Each NAME=ADDRESS adds
#       a node: a slurmd started inside the network namespace NAME (made beforehand, e.g. by
#       scripts/test_hosts.sh, whose namespace mch1 has 10.77.0.1), in partition "netns"; the controller then
#       listens on SLURMCTLD_ADDR (default 10.77.0.254, test_hosts.sh's bridge), which those nodes reach.
#   scripts/slurm_cluster.sh stop DIR           stops the daemons it started
# Then `SLURM_CONF=DIR/slurm.conf sbatch ...`. Everything lives under DIR.
set -euo pipefail
cmd=${1:?usage: slurm_cluster.sh start|stop DIR [CPUS]}
dir=$(mkdir -p "${2:?usage: slurm_cluster.sh start|stop DIR [CPUS]}" && cd "$2" && pwd)
cpus=${3:-$(nproc)}
netns_nodes=("${@:4}")

stop() {
  local pidfile pid
  for pidfile in "$dir"/slurmd-*.pid "$dir/slurmctld.pid"; do
    [[ -f "$pidfile" ]] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done  # gone before the port is reused
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
  if [[ -f "$dir/munged.started" ]]; then
    pkill -x munged 2>/dev/null || true
    for _ in $(seq 40); do pgrep -x munged >/dev/null || break; sleep 0.25; done  # gone before a new start looks
    rm -f "$dir/munged.started"
  fi
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
controller=$host
nodes="NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN"
netns_names=()
for node in "${netns_nodes[@]}"; do
  name=${node%%=*}
  if [[ $node != *=* ]] || ! ip netns list | grep -qw "$name"; then
    echo "slurm_cluster.sh: error: '$node' is not NAME=ADDRESS of an existing network namespace" >&2; exit 2
  fi
  controller="$host(${SLURMCTLD_ADDR:-10.77.0.254})"
  nodes+=$'\n'"NodeName=$name NodeAddr=${node#*=} CPUs=$cpus RealMemory=$memory State=UNKNOWN"
  netns_names+=("$name")
done
cat > "$dir/slurm.conf" <<CONF
ClusterName=megacoca-test
SlurmctldHost=$controller
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
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
# keep an ended job's record for an hour (default 300 s), so a slow test still reads how a job ended
MinJobAge=3600
$nodes
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
if [[ ${#netns_names[@]} -gt 0 ]]; then
  echo "PartitionName=netns Nodes=$(IFS=,; echo "${netns_names[*]}") MaxTime=INFINITE State=UP OverSubscribe=FORCE:4" \
    >> "$dir/slurm.conf"
fi
if ! pgrep -x munged >/dev/null; then
  mkdir -p /run/munge && chown munge:munge /run/munge
  [[ -f /etc/munge/munge.key ]] || /usr/sbin/mungekey --create >/dev/null 2>&1 || true
  runuser -u munge -- /usr/sbin/munged
  touch "$dir/munged.started"
fi
for _ in $(seq 40); do [[ -S /run/munge/munge.socket.2 ]] && break; sleep 0.25; done
export SLURM_CONF=$dir/slurm.conf
/usr/sbin/slurmctld -f "$SLURM_CONF"
mkdir -p "$dir/spool/$host"
/usr/sbin/slurmd -f "$SLURM_CONF"
for name in "${netns_names[@]}"; do
  mkdir -p "$dir/spool/$name"
  # nsenter, not `ip netns exec`: only the network namespace changes (ip netns exec remounts /sys, and slurmd
  # then finds no cgroup filesystem)
  if ! nsenter --net="/run/netns/$name" /usr/sbin/slurmd -f "$SLURM_CONF" -N "$name"; then
    echo "slurm_cluster.sh: error: slurmd for node $name did not start; see $dir/log/slurmd-$name.log" >&2
    stop
    exit 1
  fi
done
want=$((1 + ${#netns_names[@]}))
for _ in $(seq 60); do
  if [[ $(sinfo -h -N -o %t 2>/dev/null | grep -c idle) -ge $want ]]; then
    echo "slurm_cluster.sh: $want node(s) idle ($host ${netns_names[*]}; $cpus CPUs each), SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.5
done
echo "slurm_cluster.sh: error: the node did not come up; see $dir/log" >&2
stop
exit 1
