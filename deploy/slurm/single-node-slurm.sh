#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine (Debian/Ubuntu, as root), to try
# encode.sbatch without a real cluster, e.g. in CI. Not for production.
#
#   sudo deploy/slurm/single-node-slurm.sh --install   # apt-get install slurmctld slurmd munge
#   sudo deploy/slurm/single-node-slurm.sh             # (re)start; prints `sinfo` when ready
#   sbatch --wait --gpus-per-node=0 --mem=4G --cpus-per-task=2 deploy/slurm/encode.sbatch ...
#
# Writes /etc/slurm/slurm.conf only if there is none; state and logs go to $SLURM_TEST_DIR
# (default /tmp/xpbatch-slurm).
set -euo pipefail

state_dir=${SLURM_TEST_DIR:-/tmp/xpbatch-slurm}
conf=/etc/slurm/slurm.conf

if [[ $(id -u) != 0 ]]; then
    echo "run as root: Slurm's daemons and munge need it" >&2
    exit 2
fi
if [[ ${1:-} == --install ]]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        slurmctld slurmd slurm-client munge
fi
for tool in munged slurmctld slurmd sinfo; do
    if ! command -v "$tool" >/dev/null; then
        echo "$tool is missing; run with --install (Debian packages slurmctld slurmd munge)" >&2
        exit 2
    fi
done

host=$(hostname -s)
cpus=$(nproc)
memory_mb=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) * 9 / 10 / 1024))
mkdir -p "$state_dir"/{spool,state,log}
if [[ ! -e $conf ]]; then
    mkdir -p "$(dirname "$conf")"
    cat >"$conf" <<EOF
ClusterName=xpbatch-test
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmctldPidFile=$state_dir/slurmctld.pid
SlurmdPidFile=$state_dir/slurmd.pid
SlurmdSpoolDir=$state_dir/spool
StateSaveLocation=$state_dir/state
SlurmctldLogFile=$state_dir/log/slurmctld.log
SlurmdLogFile=$state_dir/log/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
fi

mkdir -p /run/munge && chown munge:munge /run/munge
pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd

for _ in $(seq 30); do
    if sinfo --noheader --states=idle,mixed 2>/dev/null | grep -q .; then
        sinfo
        exit 0
    fi
    sleep 1
done
echo "Slurm did not come up; see $state_dir/log/" >&2
exit 1
