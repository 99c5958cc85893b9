#!/usr/bin/env bash
# CI's container test: start a Docker daemon if one can be started here, build the step image without a
# registry (make image-offline) and run the workflow in it (pytest -m docker).
# Prints exactly one "skipped: no Docker daemon" line (and exits 0) where no daemon can be started;
# the details of the attempts go to build/dockerd.log.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
LOG=build/dockerd.log
: > "$LOG"

daemon_up() { timeout 10 docker info >/dev/null 2>&1; }

start_daemon() {
  daemon_up && return 0
  if ! command -v dockerd >/dev/null 2>&1; then
    { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y docker.io; } >>"$LOG" 2>&1 || return 1
  fi
  command -v debootstrap >/dev/null 2>&1 \
    || DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap >>"$LOG" 2>&1 || return 1
  # overlay2 first; vfs where the kernel or the filesystem refuses overlay (slower: a full copy per container)
  for driver in overlay2 vfs; do
    dockerd --storage-driver="$driver" --iptables=false --bridge=none >>"$LOG" 2>&1 &
    echo $! > build/dockerd.pid
    for _ in $(seq 30); do
      daemon_up && { echo "dockerd up with storage driver $driver" >>"$LOG"; return 0; }
      kill -0 "$(cat build/dockerd.pid)" 2>/dev/null || break
      sleep 1
    done
    kill "$(cat build/dockerd.pid)" 2>/dev/null; wait "$(cat build/dockerd.pid)" 2>/dev/null
  done
  return 1
}

if ! start_daemon; then
  echo "skipped: no Docker daemon"
  exit 0
fi

start=$(date +%s)
rc=0
make image-offline || rc=$?
if [ "$rc" -eq 0 ]; then
  built=$(date +%s)
  MADMINER_SWEEPER_DOCKER_TEST=1 pytest -m docker -q -p no:cacheprovider || rc=$?
  echo "container test: image built in $((built - start)) s, workflow run in $(( $(date +%s) - built )) s"
fi
if [ -f build/dockerd.pid ]; then
  kill "$(cat build/dockerd.pid)" 2>/dev/null
fi
exit "$rc"
