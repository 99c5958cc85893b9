#!/usr/bin/env bash
# CI's container test: start a Docker daemon if one can be started here, build the step image without a
# registry (make image-offline) and run the workflow in it (pytest -m docker).
#
#   bash workflow/ci-docker.sh          both phases, one after the other
#   bash workflow/ci-docker.sh build    the daemon and the image only (.ci/run starts it in the background while the
#                                       other tiers run: it mostly downloads and copies); leaves the daemon running
#   bash workflow/ci-docker.sh test     the workflow in the image built by `build` (says why when that failed)
#
# Prints exactly one "skipped: no Docker daemon" line (and exits 0) where no daemon can be started;
# the details of the attempts go to build/dockerd.log, the build phase's outcome to build/ci-docker.state.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
LOG=build/dockerd.log
STATE=build/ci-docker.state
phase=${1:-all}

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

stop_daemon() {
  if [ -f build/dockerd.pid ]; then
    kill "$(cat build/dockerd.pid)" 2>/dev/null
  fi
}

build() {
  : > "$LOG"
  rm -f "$STATE"
  if ! start_daemon; then
    echo "no-daemon" > "$STATE"
    return 0
  fi
  local start rc=0
  start=$(date +%s)
  make image-offline || rc=$?
  if [ "$rc" -eq 0 ]; then
    echo "built $(( $(date +%s) - start ))" > "$STATE"
  else
    echo "failed $rc" > "$STATE"
  fi
  return "$rc"
}

run_test() {
  local state rc=0 start
  state=$(cat "$STATE" 2>/dev/null || echo "missing")
  case "$state" in
    no-daemon)
      echo "skipped: no Docker daemon"
      return 0 ;;
    built*)
      start=$(date +%s)
      MADMINER_SWEEPER_DOCKER_TEST=1 pytest -m docker -n 0 -q -p no:cacheprovider || rc=$?
      echo "container test: image built in ${state#built } s, workflow run in $(( $(date +%s) - start )) s"
      stop_daemon
      return "$rc" ;;
    *)
      echo "error: the step image was not built ($state); see the build phase's output and $LOG" >&2
      stop_daemon
      return 1 ;;
  esac
}

case "$phase" in
  build) build ;;
  test) run_test ;;
  all) build; run_test ;;
  *) echo "error: unknown phase '$phase'; use build, test or nothing (both)" >&2; exit 2 ;;
esac
