#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for CI's `pytest -m slurm` (docs/sweeps.md, "SLURM").
# Installs slurm-wlm and munge where missing (apt-get, as root), starts munged, writes /etc/slurm/slurm.conf with
# this host as the only node (CPUs = nproc, memory from /proc/meminfo; a conf this script did not write is kept),
# then starts slurmctld and slurmd and waits for the node to answer `sinfo` and `srun hostname`.
# A cluster that already answers is left as it is. Exits 0 with the cluster up; otherwise prints exactly one
# "skipped: no SLURM" line and exits 1. The details of the attempts go to build/slurm.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
mkdir -p build
LOG=$PWD/build/slurm.log
: > "$LOG"
CONF=/etc/slurm/slurm.conf
MARK="# written by workflow/slurm/local-cluster.sh"

answers() { timeout 10 sinfo -h -o "%t" 2>>"$LOG" | grep -Eq '^(idle|mix|alloc)'; }

skip() {
  echo "$1" >>"$LOG"
  echo "skipped: no SLURM"
  exit 1
}

up() {
  timeout 60 srun -N1 -n1 -t 1 hostname >>"$LOG" 2>&1 || return 1
  echo "SLURM up: $(sinfo -h -o '%P %D nodes, %c CPUs, %m MB' | head -1)" >>"$LOG"
}

if command -v sinfo >/dev/null 2>&1 && answers; then
  up && exit 0
fi
[ "$(id -u)" -eq 0 ] || skip "not root: cannot install or start SLURM here"

if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm munge; } \
    >>"$LOG" 2>&1 || skip "apt-get install slurm-wlm munge failed"
fi

# munge: a key, then the daemon (as the munge user where it exists)
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  { mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
    || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1; } >>"$LOG" 2>&1
fi
owner=root
id munge >/dev/null 2>&1 && owner=munge
chown -R "$owner": /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key
if ! munge -n 2>>"$LOG" | unmunge >>"$LOG" 2>&1; then
  if [ "$owner" = munge ]; then
    runuser -u munge -- munged >>"$LOG" 2>&1 || skip "munged did not start"
  else
    munged --force >>"$LOG" 2>&1 || skip "munged did not start"
  fi
  for _ in $(seq 10); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 1; done
  munge -n 2>>"$LOG" | unmunge >>"$LOG" 2>&1 || skip "munge does not answer"
fi

# slurm.conf: this host, all its CPUs (as nproc counts them) and most of its memory
host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 95 / 100 ))
if [ -f "$CONF" ] && ! head -1 "$CONF" | grep -qF "$MARK"; then
  echo "$CONF was not written by this script: kept as it is" >>"$LOG"
else
  mkdir -p /etc/slurm
  cat > "$CONF" <<CONFEOF
$MARK
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONFEOF
fi
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm

pgrep -x slurmctld >/dev/null || slurmctld >>"$LOG" 2>&1 || skip "slurmctld did not start (/var/log/slurm/slurmctld.log)"
pgrep -x slurmd >/dev/null || slurmd >>"$LOG" 2>&1 || skip "slurmd did not start (/var/log/slurm/slurmd.log)"
for _ in $(seq 30); do
  answers && break
  sleep 1
done
# a node left DOWN or DRAINED by an earlier start comes back
if ! answers; then
  scontrol update nodename="$host" state=resume >>"$LOG" 2>&1
  sleep 2
fi
answers || skip "the node does not answer sinfo (/var/log/slurm/slurmctld.log, slurmd.log)"
up || skip "srun hostname did not run"
exit 0
