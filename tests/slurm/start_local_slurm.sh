#!/usr/bin/env bash
# A one-node Slurm cluster on localhost for the tests (idempotent; stop with stop_local_slurm.sh).
#
#   sudo bash tests/slurm/start_local_slurm.sh      # then: sbatch / srun / scontrol as usual
#
# Installs Debian's slurmctld, slurmd, slurm-client and munge when missing, writes
# /etc/slurm/slurm.conf (refusing to replace one it did not write) and starts munged, slurmctld
# and slurmd without systemd or cgroups. Exit 77 with a reason when it cannot run here (not root,
# no apt-get, a foreign slurm.conf); any other non-zero status is a failure.
#
# Why each setting:
#   proctrack/linuxproc, task/none   no cgroups or systemd in containers
#   select/cons_tres + CR_Core       cores are the consumable, so 2 tasks fit on 2 cores
#   no accounting                    no slurmdbd; `sbatch --wait`'s exit code is the job's
#   MinJobAge=4                      `sbatch --wait` polls faster (32 s at the default 300)
#   cred_expire=5, sched_interval=1  a requeued job starts again ~6 s later (default 120 s, and
#                                    then up to a 60 s wait for the next scheduling pass)
#   RealMemory below MemTotal        a node configured above its hardware goes INVAL / DRAIN
#   no GresTypes                     `--gpus-per-node=0` is then accepted (GPU-less node)
#   NodeAddr, SlurmctldHost=(127.0.0.1)  no DNS needed for the host name
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

conf=/etc/slurm/slurm.conf
marker="# written by megatron_ease tests/slurm/start_local_slurm.sh"
state_dir=/var/spool/slurmctld
log_dir=/var/log/slurm
run_dir=/run/slurm

log() { echo "[local_slurm] $*" >&2; }
skip() { echo "$*" >&2; exit 77; }

[ "$(id -u)" -eq 0 ] || skip "a local Slurm needs root (munged, slurmd and slurmctld run as system users)"
if [ -e "$conf" ] && ! grep -qF "$marker" "$conf"; then
  skip "$conf exists and was not written by this script: refusing to replace a real Slurm config"
fi
bash "$here/apt_install.sh" slurmctld slurmd slurm-client munge

host=$(hostname -s)
# Not plain nproc: it honours OMP_NUM_THREADS, which the test command sets to 1.
cpus=$(getconf _NPROCESSORS_ONLN)
# Slurm compares RealMemory (MiB) with what slurmd measures; keep 10% below it.
mem_mib=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
new_conf=$(cat <<CONF
$marker
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
AuthInfo=cred_expire=5
StateSaveLocation=$state_dir
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$run_dir/slurmctld.pid
SlurmdPidFile=$run_dir/slurmd.pid
SlurmctldLogFile=$log_dir/slurmctld.log
SlurmdLogFile=$log_dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=4
KillWait=5
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mib State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
)

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if [ "$(cat "$conf" 2>/dev/null)" != "$new_conf" ]; then
  if [ -e "$conf" ]; then
    log "slurm.conf changed: restarting the daemons"
    bash "$here/stop_local_slurm.sh"
  fi
  mkdir -p /etc/slurm
  printf '%s\n' "$new_conf" > "$conf"
fi

# munged must run as the munge user, with its socket directory present.
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    install -d -o munge -g munge -m 0700 /etc/munge
    runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
  fi
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged
fi

install -d -o slurm -g slurm -m 0755 "$state_dir" "$log_dir" "$run_dir"
install -d -m 0755 /var/spool/slurmd
if ! pid_alive "$run_dir/slurmctld.pid"; then
  # -c: forget jobs saved by an earlier controller (a test run killed mid-job leaves them).
  log "starting slurmctld"
  /usr/sbin/slurmctld -c
fi
if ! pid_alive "$run_dir/slurmd.pid"; then
  log "starting slurmd"
  /usr/sbin/slurmd
fi

# Wait for the node to register; a node left DRAIN/DOWN by an earlier run is resumed.
for _ in $(seq 1 60); do
  state=$(sinfo -h -N -n "$host" -o %T 2>/dev/null || true)
  case "$state" in
    idle*|mixed*|allocated*) log "node $host is $state"; exit 0 ;;
    drain*|down*|inval*|fail*) scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
  esac
  sleep 0.5
done
log "node $host did not become idle (state: ${state:-unknown}); see $log_dir/slurmctld.log"
tail -n 20 "$log_dir/slurmctld.log" "$log_dir/slurmd.log" >&2 || true
exit 1
