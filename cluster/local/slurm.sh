#!/usr/bin/env bash
# A real single-node Slurm on this machine, for the tests and for trying `gdro submit` locally.
#
#   cluster/local/slurm.sh install   apt-get the daemons (Debian/Ubuntu, root): slurmctld slurmd slurm-client munge
#   cluster/local/slurm.sh start     munged + slurmctld + slurmd on 127.0.0.1, one node, partition "debug"; waits
#                                    until the node is idle (idempotent)
#   cluster/local/slurm.sh stop      stops what `start` started, by the pids in its pid files (TERM, then KILL)
#   cluster/local/slurm.sh status    sinfo
#
# Needs root and no systemd. Settings that matter on such a machine (found the hard way): no cgroups
# (proctrack/linuxproc, task/none: with cgroups jobs fail and the node drains), DefMemPerCPU (else one job takes
# all memory and jobs serialise), AuthInfo=cred_expire=10 (else a requeued job waits 120 s before it may start
# again), batch_sched_delay=0, no accounting (so no sacct: poll squeue / scontrol show job instead).
# Everything lives under $GDRO_SLURM_BASE (default /tmp/gdro-slurm); slurm.conf is written to $SLURM_CONF
# (default /etc/slurm/slurm.conf, which the clients read without any variable), and an existing slurm.conf
# that this script did not write is never overwritten.
set -euo pipefail
BASE=${GDRO_SLURM_BASE:-/tmp/gdro-slurm}
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
MARK="# written by gdro cluster/local/slurm.sh"
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then echo "slurm: already installed"; return; fi
  local pkgs="slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends $pkgs >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $pkgs >/dev/null; }
  echo "slurm: installed $pkgs"
}

start() {
  [ "$(id -u)" = 0 ] || { echo "slurm: start needs root" >&2; exit 1; }
  local node; node=$(hostname -s)
  mkdir -p "$BASE"/{state,spool,log,run} "$(dirname "$CONF")"

  # munge: the package made /etc/munge/munge.key; start munged only if no working one runs
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
    chmod 0400 /etc/munge/munge.key; chmod 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged --force   # daemonizes, writes /run/munge/munged.pid
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    cp /run/munge/munged.pid "$BASE/run/munged.pid"  # recorded only when we started it
  fi
  munge -n | unmunge >/dev/null

  # slurm.conf: one node on loopback, its hardware line from slurmd -C. No accounting, so a finished job is
  # known (to scontrol, gdro status) only for MinJobAge: an hour, longer than any test run.
  if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    echo "slurm: $CONF exists and was not written by this script; not touching it (set SLURM_CONF elsewhere)" >&2
    exit 1
  fi
  local hw; hw=$(slurmd -C | head -1 | sed 's/^NodeName=[^ ]* //')
  cat > "$CONF.new" <<CONF
$MARK
ClusterName=gdro-local
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
MinJobAge=3600
KillWait=10
MailProg=/bin/true
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=${node} NodeAddr=127.0.0.1 ${hw} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  if cmp -s "$CONF.new" "$CONF"; then rm -f "$CONF.new"; else
    mv "$CONF.new" "$CONF"; if alive "$BASE/run/slurmctld.pid"; then scontrol reconfigure; fi
  fi

  # the daemons (both daemonize and write their pid files)
  alive "$BASE/run/slurmctld.pid" || slurmctld
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
  alive "$BASE/run/slurmd.pid" || slurmd

  local st=
  for _ in $(seq 300); do
    st=$(sinfo -h -n "$node" -o %t 2>/dev/null || true)
    case "$st" in
      idle|mix|alloc) break;;
      drain*|down*) scontrol update nodename="$node" state=resume 2>/dev/null || true;;
    esac
    sleep 0.2
  done
  if ! [[ "$st" =~ ^(idle|mix|alloc)$ ]]; then
    echo "slurm: node not ready (state '$st')" >&2; sinfo -R >&2 || true
    tail -n 20 "$BASE/log/slurmctld.log" "$BASE/log/slurmd.log" >&2 || true; exit 1
  fi
  echo "slurm: node $node $st; logs in $BASE/log"
}

stop() {
  local d f pid
  for d in slurmd slurmctld munged; do
    f="$BASE/run/$d.pid"; [ -s "$f" ] || continue
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      if kill -0 "$pid" 2>/dev/null; then echo "slurm: $d ($pid) ignored TERM, sending KILL"; kill -KILL "$pid"; fi
      echo "slurm: stopped $d ($pid)"
    fi
    rm -f "$f"
  done
}

case "${1:-}" in
  install) install;;
  start) start;;
  stop) stop;;
  status) sinfo;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2;;
esac
