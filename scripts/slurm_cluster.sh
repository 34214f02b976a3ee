#!/usr/bin/env bash
# A real one-node Slurm on this machine, for the tests and CI (Debian/Ubuntu packages, root, no systemd needed).
#
#   scripts/slurm_cluster.sh up      install (once) and start munged, slurmctld, slurmd; wait until the node is idle
#   scripts/slurm_cluster.sh down    stop the three daemons (by pid, found with pgrep -x)
#   scripts/slurm_cluster.sh status  say which daemons run and what sinfo says
#
# `up` is idempotent: daemons already running are left alone, and so is their slurm.conf. It installs
# slurmctld slurmd slurm-client munge (8 packages, ~3 MB, ~12 s); the slurm-wlm metapackage would pull 43
# (hdf5, rrd, ipmi, rocm plugins). After the install a start takes ~1-2 s. Why each setting: comments in write_conf.
#
# Exit codes: 0 done; 3 this machine cannot host the cluster (not root, or the packages cannot be installed:
# the tests skip on that, and only on that); 1 anything else (the message says which step failed).
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)
SLURM_CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
MUNGE_KEY=${MUNGE_KEY:-/etc/munge/munge.key}
UP_TIMEOUT_S=${SLURM_UP_TIMEOUT_S:-30}
DOWN_TIMEOUT_S=${SLURM_DOWN_TIMEOUT_S:-15}
MARKER="# written by cbs scripts/slurm_cluster.sh"
export SLURM_CONF

die() { echo "slurm_cluster: error: $*" >&2; exit 1; }
cannot_host() { echo "slurm_cluster: cannot host a cluster here: $*" >&2; exit 3; }
say() { echo "slurm_cluster: $*" >&2; }

have_packages() {
  local p
  for p in "${PACKAGES[@]}"; do
    [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] || return 1
  done
}

apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
}

install_packages() {
  have_packages && return 0
  [[ $(id -u) == 0 ]] || cannot_host "the packages ${PACKAGES[*]} are missing and installing them needs root"
  command -v apt-get >/dev/null || cannot_host "the packages ${PACKAGES[*]} are missing and there is no apt-get"
  say "installing ${PACKAGES[*]}"
  # The packages' postinst would start the daemons through their init scripts; this script starts them
  # itself (with its own slurm.conf), so forbid that while installing, the way Debian's docker images do.
  local policy=/usr/sbin/policy-rc.d added_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added_policy=1
  fi
  local ok=0
  if apt_install >/tmp/slurm_cluster_apt.log 2>&1; then
    ok=1
  else  # the package lists may be missing or stale (a fresh image): refresh them once and retry
    say "apt-get install failed; running apt-get update and retrying (log: /tmp/slurm_cluster_apt.log)"
    if apt-get update -q >>/tmp/slurm_cluster_apt.log 2>&1 && apt_install >>/tmp/slurm_cluster_apt.log 2>&1; then
      ok=1
    fi
  fi
  [[ $added_policy == 1 ]] && rm -f "$policy"
  if [[ $ok != 1 ]]; then
    tail -n 5 /tmp/slurm_cluster_apt.log >&2 || true
    cannot_host "apt-get could not install ${PACKAGES[*]} (full log: /tmp/slurm_cluster_apt.log)"
  fi
}

start_munge() {
  if [[ ! -s $MUNGE_KEY ]]; then  # the package's postinst usually made one
    mungekey -c -k "$MUNGE_KEY" || die "mungekey -c -k $MUNGE_KEY failed"
  fi
  { chown munge:munge "$MUNGE_KEY" && chmod 400 "$MUNGE_KEY"; } || die "cannot set owner/mode of $MUNGE_KEY"
  { mkdir -p /run/munge && chown munge:munge /run/munge; } || die "cannot create /run/munge"
  if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged || die "munged did not start (see /var/log/munge/munged.log)"
  fi
  munge -n | unmunge | grep -q 'STATUS: *Success' \
    || die "munge -n | unmunge does not say STATUS: Success (see /var/log/munge/munged.log)"
}

write_conf() {
  local host cpus mem_kib mem_mib
  host=$(hostname -s) || die "hostname -s failed"
  cpus=$(nproc)
  mem_kib=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)
  [[ -n $mem_kib ]] || die "no MemAvailable in /proc/meminfo"
  # below what slurmd measures, or the node registers as drained (Low RealMemory)
  mem_mib=$((mem_kib * 9 / 10 / 1024))
  if [[ -e $SLURM_CONF ]] && ! grep -qF "$MARKER" "$SLURM_CONF"; then
    die "$SLURM_CONF exists and was not written by this script: refusing to replace a real cluster's config"
  fi
  mkdir -p "$(dirname "$SLURM_CONF")" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm \
    || die "cannot create Slurm's spool and log directories"
  cat >"$SLURM_CONF.tmp" <<EOF
$MARKER: a one-node test cluster
ClusterName=cbs
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# no cgroup plugins: containers lack cgroup delegation
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
# finished jobs stay visible to scontrol show job for an hour (there is no sacct without slurmdbd)
MinJobAge=3600
# without it jobs start only on a 3 s grid
SchedulerParameters=batch_sched_delay=0
# a job whose afterok dependency failed is cancelled instead of pending forever
DependencyParameters=kill_invalid_depend
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mib State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$SLURM_CONF.tmp" "$SLURM_CONF" || die "cannot write $SLURM_CONF"
}

node_state() { sinfo -h -o %T 2>/dev/null | head -n 1 || true; }

up() {
  install_packages
  [[ $(id -u) == 0 ]] || cannot_host "starting slurmctld, slurmd and munged needs root"
  start_munge
  if pgrep -x slurmctld >/dev/null; then
    say "slurmctld already runs: leaving it and $SLURM_CONF as they are"
  else
    write_conf
    slurmctld || die "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
  fi
  if ! pgrep -x slurmd >/dev/null; then
    slurmd || die "slurmd did not start (see /var/log/slurm/slurmd.log)"
  fi
  local state deadline=$((SECONDS + UP_TIMEOUT_S))
  while :; do
    state=$(node_state)
    case $state in
      idle | mixed | allocated | completing) break ;;
    esac
    if ((SECONDS >= deadline)); then
      sinfo -h -o '%N %T %E' >&2 || true
      tail -n 5 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
      die "the node is not idle after ${UP_TIMEOUT_S}s (state: '${state:-no answer from slurmctld}')"
    fi
    sleep 0.2
  done
  say "up: node $(hostname -s) is $state ($(nproc) CPUs)"
}

down() {
  local name pids all="" deadline
  for name in slurmd slurmctld munged; do
    pids=$(pgrep -x "$name" || true)
    [[ -z $pids ]] && continue
    # shellcheck disable=SC2086  # one pid per word; a daemonising parent may be gone already
    kill $pids 2>/dev/null || true
    all+=" $name"
  done
  # each takes ~2 s to exit; signalled together they are gone in ~2 s in all
  deadline=$((SECONDS + DOWN_TIMEOUT_S))
  for name in $all; do
    while pgrep -x "$name" >/dev/null; do
      ((SECONDS < deadline)) \
        || die "$name (pids $(pgrep -x "$name" | tr '\n' ' ')) still runs ${DOWN_TIMEOUT_S}s after SIGTERM"
      sleep 0.1
    done
  done
  say "down${all:+ (stopped$all)}"
}

status() {
  local name rc=0
  for name in munged slurmctld slurmd; do
    if pgrep -x "$name" >/dev/null; then echo "$name: running (pid $(pgrep -x "$name" | tr '\n' ' '))"
    else echo "$name: stopped"; rc=1; fi
  done
  echo "node: $(node_state)"
  return $rc
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 {up|down|status}" >&2; exit 2 ;;
esac
