# Shared by the scripts of security/: process cleanup, bounded runs, verdict lines.
# Sourced after the script sets OUT (its output folder); defines WORK (a temp folder the
# script may set, removed on exit), PIDS, run, pass/fail/warn/note/step/die and the
# PASSED/FAILED/WARNED counters.
# shellcheck shell=bash

STARTED=$SECONDS

WORK=""
PIDS=()
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [[ -n "$WORK" ]]; then rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# run SECS CMD...: CMD under timeout, in the background while this shell waits, so that a
# signal reaches the trap at once and the cleanup ends CMD (timeout passes it on to its
# process group).
run() {
  local secs="$1" pid rc=0
  shift
  timeout "$secs" "$@" &
  pid=$!
  PIDS+=("$pid")
  wait "$pid" || rc=$?
  local p keep=()
  for p in "${PIDS[@]}"; do [[ "$p" == "$pid" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
  return "$rc"
}

PASSED=0
FAILED=0
WARNED=0
pass() {
  printf 'PASS  %s\n' "$*" | tee -a "$OUT/verdicts.txt"
  PASSED=$((PASSED + 1))
}
fail() {
  printf 'FAIL  %s\n' "$*" | tee -a "$OUT/verdicts.txt"
  FAILED=$((FAILED + 1))
}
warn() {
  printf 'WARN  %s\n' "$*" | tee -a "$OUT/verdicts.txt"
  WARNED=$((WARNED + 1))
}
note() { printf 'NOTE  %s\n' "$*" | tee -a "$OUT/verdicts.txt"; }
step() { printf '\n== %s (%ds)\n' "$*" "$((SECONDS - STARTED))"; }
die() {
  fail "$*"
  exit 1
}
