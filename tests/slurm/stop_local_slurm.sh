#!/usr/bin/env bash
# Stop the daemons started by start_local_slurm.sh (by their pid files; idempotent).
# The packages and /etc/slurm/slurm.conf stay, so the next start takes seconds.
set -euo pipefail

stop_pidfile() {
  local name=$1 pidfile=$2 pid
  [ -s "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    echo "[local_slurm] stopping $name (pid $pid)" >&2
    kill "$pid"
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
  fi
  rm -f "$pidfile"
}

stop_pidfile slurmd /run/slurm/slurmd.pid
stop_pidfile slurmctld /run/slurm/slurmctld.pid
stop_pidfile munged /run/munge/munged.pid
