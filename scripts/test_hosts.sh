#!/usr/bin/env bash
# Two "hosts" on this machine for the multi-host launch tests (as root): network namespaces mch1 and mch2 joined
# by a bridge (10.77.0.1 and 10.77.0.2, the launching side 10.77.0.254), each running its own sshd that accepts
# a key made for the test. Traffic stays on that bridge.
#   scripts/test_hosts.sh start DIR   installs Debian's openssh-server and pdsh if missing; writes DIR/ssh/config
#                                     (use with PDSH_SSH_ARGS_APPEND="-F DIR/ssh/config") and DIR/hostfile
#   scripts/test_hosts.sh stop DIR
set -euo pipefail
cmd=${1:?usage: test_hosts.sh start|stop DIR}
dir=$(mkdir -p "${2:?usage: test_hosts.sh start|stop DIR}" && cd "$2" && pwd)
HOSTS=(1 2)

stop() {
  for i in "${HOSTS[@]}"; do
    if [[ -f "$dir/ssh/sshd-$i.pid" ]]; then kill "$(cat "$dir/ssh/sshd-$i.pid")" 2>/dev/null || true; fi
    ip netns del "mch$i" 2>/dev/null || true
    ip link del "mcv$i" 2>/dev/null || true
  done
  ip link del mcbr0 2>/dev/null || true
}

if [[ $cmd == stop ]]; then stop; exit 0; fi
if [[ $(id -u) -ne 0 ]]; then echo "test_hosts.sh: error: needs root (network namespaces, sshd)" >&2; exit 2; fi
if [[ ! -x /usr/sbin/sshd ]] || ! command -v pdsh >/dev/null || ! command -v ssh-keygen >/dev/null \
    || ! command -v ip >/dev/null; then
  packages=(openssh-server openssh-client pdsh iproute2)
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}" >/dev/null; }
fi
stop  # a previous run's leftovers
ip link add mcbr0 type bridge
ip addr add 10.77.0.254/24 dev mcbr0
ip link set mcbr0 up
for i in "${HOSTS[@]}"; do
  ip netns add "mch$i"
  ip link add "mcv$i" type veth peer name eth0 netns "mch$i"
  ip link set "mcv$i" master mcbr0 up
  ip netns exec "mch$i" ip addr add "10.77.0.$i/24" dev eth0
  ip netns exec "mch$i" ip link set eth0 up
  ip netns exec "mch$i" ip link set lo up
done
mkdir -p "$dir/ssh" /run/sshd
rm -f "$dir/ssh/id" "$dir/ssh/id.pub" "$dir/ssh/hostkey" "$dir/ssh/hostkey.pub"
ssh-keygen -q -t ed25519 -N "" -f "$dir/ssh/id"
ssh-keygen -q -t ed25519 -N "" -f "$dir/ssh/hostkey"
cp "$dir/ssh/id.pub" "$dir/ssh/authorized_keys"
chmod 600 "$dir/ssh/authorized_keys"
for i in "${HOSTS[@]}"; do
  cat > "$dir/ssh/sshd_config.$i" <<CONF
ListenAddress 10.77.0.$i
Port 22
HostKey $dir/ssh/hostkey
PermitRootLogin prohibit-password
AuthorizedKeysFile $dir/ssh/authorized_keys
PasswordAuthentication no
StrictModes no
UsePAM no
PidFile $dir/ssh/sshd-$i.pid
CONF
  ip netns exec "mch$i" /usr/sbin/sshd -f "$dir/ssh/sshd_config.$i"
done
cat > "$dir/ssh/config" <<CONF
Host 10.77.0.*
  IdentityFile $dir/ssh/id
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
CONF
printf '10.77.0.1 slots=1\n10.77.0.2 slots=1\n' > "$dir/hostfile"
for i in "${HOSTS[@]}"; do
  for _ in $(seq 40); do
    if ssh -F "$dir/ssh/config" -o ConnectTimeout=2 "10.77.0.$i" true 2>/dev/null; then continue 2; fi
    sleep 0.25
  done
  echo "test_hosts.sh: error: no ssh to 10.77.0.$i" >&2
  stop
  exit 1
done
echo "test_hosts.sh: hosts 10.77.0.1 and 10.77.0.2 up (ssh config $dir/ssh/config, hostfile $dir/hostfile)"
