#!/usr/bin/env bash
# Install the Debian packages named on the command line that are not installed yet.
#
#   bash tests/slurm/apt_install.sh slurmctld slurmd slurm-client munge
#
# Exit 77 (the "skip" status of automake and friends) with a reason on stderr when it cannot
# (not root, no apt-get); any other non-zero status is a real failure. The package lists are
# refreshed only when the first install attempt fails, which keeps a warm CI image fast.
set -euo pipefail

missing=()
for pkg in "$@"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "cannot install ${missing[*]}: not root (run the tests as root, or install them)" >&2
  exit 77
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "cannot install ${missing[*]}: apt-get not found (Debian/Ubuntu only; install them)" >&2
  exit 77
fi

export DEBIAN_FRONTEND=noninteractive
install=(apt-get install -y -qq --no-install-recommends "${missing[@]}")
echo "[apt_install] installing ${missing[*]}" >&2
if ! "${install[@]}" >/dev/null 2>&1; then
  apt-get update -qq
  "${install[@]}" >/dev/null
fi
