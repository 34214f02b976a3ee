#!/usr/bin/env bash
# Two "hosts" on this machine, for multi-node tests: network namespaces joined by a veth pair.
#
#   scripts/netns_hosts.sh up            cbs-n0 (10.77.0.1) and cbs-n1 (10.77.0.2), loopback up in each, names in
#                                        /etc/netns/<ns>/hosts (`ip netns exec` mounts it as the host's /etc/hosts)
#   scripts/netns_hosts.sh down          delete both (the veth pair goes with them) and their /etc/netns files
#   scripts/netns_hosts.sh status        say whether they are up
#   scripts/netns_hosts.sh exec N CMD... run CMD as host N: in cbs-nN, under its own hostname cbs-nN (a UTS
#                                        namespace), so the name a process finds for itself resolves to its link
#
# Why the hostname: torchrun's rendezvous and gloo find a process's own address from its hostname, as on real
# nodes; with the machine's shared hostname both "hosts" would announce one address. The processes share this
# machine's CPUs, file system and /dev/shm: only the network is split, which is what a multi-node launch crosses.
#
# `up` is idempotent: namespaces already up are left alone; half-made ones are made again. It installs iproute2
# (apt) if `ip` is missing. Exit codes: 0 done; 3 this machine cannot host them (not root, no iproute2 and no way
# to install it, or the kernel refuses network namespaces: tests skip on that, and only on that); 1 any other
# failure; 2 usage.
set -euo pipefail

HOSTS=(cbs-n0 cbs-n1)
ADDRS=(10.77.0.1 10.77.0.2)
VETH=(cbs-v0 cbs-v1)

die() { echo "netns_hosts: error: $*" >&2; exit 1; }
cannot_host() { echo "netns_hosts: cannot make network namespaces here: $*" >&2; exit 3; }
say() { echo "netns_hosts: $*" >&2; }

need_tools() {
  [[ $(id -u) == 0 ]] || cannot_host "network namespaces need root (or CAP_NET_ADMIN and CAP_SYS_ADMIN)"
  command -v unshare >/dev/null || cannot_host "no unshare (util-linux)"
  command -v ip >/dev/null && return 0
  command -v apt-get >/dev/null || cannot_host "no ip (iproute2) and no apt-get to install it"
  say "installing iproute2"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends iproute2 \
    >/tmp/netns_hosts_apt.log 2>&1; then
    # the package lists may be missing or stale (a fresh image): refresh them once and retry
    apt-get update -q >>/tmp/netns_hosts_apt.log 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends iproute2 \
      >>/tmp/netns_hosts_apt.log 2>&1 || cannot_host "apt-get could not install iproute2 (log: /tmp/netns_hosts_apt.log)"
  fi
}

is_up() {  # both namespaces exist and each has its address on its end of the link
  local i addrs
  for i in 0 1; do
    # into a variable, not a pipe into grep -q: that can end `ip` with SIGPIPE, a failure under pipefail
    addrs=$(ip -n "${HOSTS[i]}" -o addr show dev "${VETH[i]}" 2>/dev/null) || return 1
    [[ $addrs == *" ${ADDRS[i]}/"* ]] || return 1
  done
}

down() {
  local ns
  for ns in "${HOSTS[@]}"; do
    if [[ -e /run/netns/$ns ]]; then ip netns del "$ns" || die "ip netns del $ns failed"; fi
    rm -rf "/etc/netns/$ns"
  done
  rmdir /etc/netns 2>/dev/null || true  # only if empty: another tool may keep files there
  # a veth left in the root namespace by a half-made `up`
  ip link del "${VETH[0]}" 2>/dev/null || true
}

up() {
  need_tools
  if is_up; then
    say "up already: ${HOSTS[0]} ${ADDRS[0]}, ${HOSTS[1]} ${ADDRS[1]}"
    return 0
  fi
  down
  ip netns add "${HOSTS[0]}" 2>/tmp/netns_hosts_err.log \
    || cannot_host "ip netns add refused: $(cat /tmp/netns_hosts_err.log)"
  ip netns add "${HOSTS[1]}" || die "ip netns add ${HOSTS[1]} failed"
  ip link add "${VETH[0]}" type veth peer name "${VETH[1]}" || die "cannot make the veth pair ${VETH[*]}"
  local i
  for i in 0 1; do
    ip link set "${VETH[i]}" netns "${HOSTS[i]}" || die "cannot move ${VETH[i]} into ${HOSTS[i]}"
    ip -n "${HOSTS[i]}" addr add "${ADDRS[i]}/24" dev "${VETH[i]}" || die "cannot give ${VETH[i]} ${ADDRS[i]}"
    ip -n "${HOSTS[i]}" link set lo up || die "cannot bring up lo in ${HOSTS[i]}"
    ip -n "${HOSTS[i]}" link set "${VETH[i]}" up || die "cannot bring up ${VETH[i]}"
    mkdir -p "/etc/netns/${HOSTS[i]}"
    printf '127.0.0.1 localhost\n%s %s\n%s %s\n' "${ADDRS[0]}" "${HOSTS[0]}" "${ADDRS[1]}" "${HOSTS[1]}" \
      >"/etc/netns/${HOSTS[i]}/hosts"
  done
  say "up: ${HOSTS[0]} ${ADDRS[0]} <-> ${HOSTS[1]} ${ADDRS[1]} (veth ${VETH[*]})"
}

run_as() {  # N CMD...
  local n=${1:-}
  shift || true
  [[ $n == 0 || $n == 1 ]] && (($# > 0)) || { echo "usage: $0 exec {0|1} CMD..." >&2; exit 2; }
  is_up || die "the namespaces are not up: run \`$0 up\` first"
  # shellcheck disable=SC2016  # $0 and $@ belong to the sh inside the namespace
  exec ip netns exec "${HOSTS[n]}" unshare --uts sh -c 'hostname "$0" && exec "$@"' "${HOSTS[n]}" "$@"
}

case ${1:-} in
  up) up ;;
  down) down; say "down" ;;
  status) if is_up; then echo "up: ${HOSTS[0]} ${ADDRS[0]}, ${HOSTS[1]} ${ADDRS[1]}"; else echo "down"; exit 1; fi ;;
  exec) shift; run_as "$@" ;;
  *) echo "usage: $0 {up|down|status|exec N CMD...}" >&2; exit 2 ;;
esac
