#!/usr/bin/env bash
# Fuzzes ZTP for a bounded time per target (see fuzz/README.md).
#
#   bash fuzz/run.sh                  every target, FUZZ_SECONDS each
#   bash fuzz/run.sh sni framed       a subset
#
# Environment:
#   FUZZ_SECONDS    time per target, in seconds (default 60)
#   FUZZ_SANITIZER  none or address (default none: the project's crates forbid unsafe
#                   code; `address` also checks the dependencies' unsafe code, at half
#                   the speed and with a full rebuild)
#   FUZZ_TIMEOUT    seconds one input may take before it counts as a hang (default 10)
#   FUZZ_ARGS       more libFuzzer options, e.g. "-jobs=2 -workers=2"
#
# First replays every seed and every saved crash on stable Rust (`cargo test`), then
# fuzzes each target. Every new crash is copied into fuzz/regressions/TARGET/, so that
# the replay keeps testing it. Exits 1 if a replay failed or any target crashed.
#
# cargo fuzz instruments the build with nightly-only compiler flags: RUSTC_BOOTSTRAP=1
# is exported for the fuzzing step of this script only, never for a project build.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

all=(snapshot_yaml snapshot_proto framed sni identity rest_bodies keyless_frame)
if (($#)); then
  targets=("$@")
else
  targets=("${all[@]}")
fi
for t in "${targets[@]}"; do
  case " ${all[*]} " in
    *" $t "*) ;;
    *) echo "run.sh: unknown target '$t' (known: ${all[*]})" >&2; exit 2 ;;
  esac
done

seconds="${FUZZ_SECONDS:-60}"
sanitizer="${FUZZ_SANITIZER:-none}"
hang="${FUZZ_TIMEOUT:-10}"
read -r -a extra <<< "${FUZZ_ARGS:-}"
failed=0

# 1. Seeds and saved crashes, replayed on stable Rust.
echo "== replaying seeds and regressions: ${targets[*]} (cargo test, stable)"
if ! env -u RUSTC_BOOTSTRAP cargo test --quiet --no-default-features \
    --test regressions -- --exact "${targets[@]}"; then
  echo "!! a seed or a saved regression fails (panics above); fuzzing anyway" >&2
  failed=1
fi

# 2. cargo fuzz.
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
export RUST_BACKTRACE=1     # a panic's backtrace in the log
export RUST_LIB_BACKTRACE=0 # but none for cargo fuzz's own error message
build=(--sanitizer "$sanitizer" --debug-assertions)
if [ "$sanitizer" != none ]; then
  # Its own build folder, so that switching back and forth does not rebuild everything.
  build+=(--target-dir "$here/target/sanitizer-$sanitizer")
fi
echo "== building the fuzz targets (sanitizer: $sanitizer)"
cargo fuzz build "${build[@]}"

# The REST target's sled store lives under TMPDIR: on tmpfs its flushes cost nothing.
if [ -d /dev/shm ] && [ -w /dev/shm ]; then tmp_root=/dev/shm; else tmp_root="$here/target"; fi
tmp="$(mktemp -d "$tmp_root/ztp-fuzz.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

if [ "$sanitizer" = none ]; then logs="$here/target/fuzz-logs"; else logs="$here/target/sanitizer-$sanitizer/fuzz-logs"; fi
mkdir -p "$logs"
final_stat() { # final_stat NAME LOG: the last value libFuzzer printed for stat::NAME
  { grep -o "stat::$1: *[0-9]*" "$2" || true; } | tail -n 1 | grep -o '[0-9]*$' || echo "-"
}
last() { # last PATTERN LOG: the last match of PATTERN
  { grep -o "$1" "$2" || true; } | tail -n 1
}
rows=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t" "regressions/$t"
  opts=(-max_total_time="$seconds" -rss_limit_mb=2048 -timeout="$hang" -print_final_stats=1)
  if [ -f "dicts/$t.dict" ]; then opts+=(-dict="$here/dicts/$t.dict"); fi
  log="$logs/$t.log"
  echo "== fuzzing $t for ${seconds}s (log: $log)"
  status=0
  TMPDIR="$tmp" cargo fuzz run "${build[@]}" "$t" "$here/corpus/$t" "$here/seeds/$t" \
    -- "${opts[@]}" ${extra[@]+"${extra[@]}"} >"$log" 2>&1 || status=$?

  result=ok
  if [ "$status" -ne 0 ]; then
    result="FAILED (exit $status)"
    failed=1
    echo "!! $t failed; from its log ($log):" >&2
    if grep -q "panicked at" "$log"; then
      # The panic, its backtrace's first frames, and libFuzzer's account of the input.
      sed -n '/panicked at/,$p' "$log" | head -n 40 >&2
      echo "   ..." >&2
      grep -E "^(SUMMARY|MS:|artifact_prefix|Base64)" "$log" >&2 || true
    else
      tail -n 40 "$log" >&2
    fi
    artifacts=$({ grep -o 'Test unit written to .*' "$log" || true; } | sed 's/^Test unit written to //')
    for a in $artifacts; do
      [ -f "$a" ] || a="$here/$a"
      [ -f "$a" ] || continue
      cp "$a" "regressions/$t/"
      echo "!! $t: crash input $a" >&2
      echo "!!   kept as fuzz/regressions/$t/$(basename "$a")" >&2
      echo "!!   hex: $(od -An -v -tx1 "$a" | tr -d ' \n' | head -c 2000)" >&2
      echo "!!   replay: cargo test --manifest-path fuzz/Cargo.toml --no-default-features --test regressions -- --exact $t" >&2
    done
  fi
  rows+=("$(printf '%-15s %-18s %12s %8s %6s %7s %-14s %8s' "$t" "$result" \
    "$(final_stat number_of_executed_units "$log")" "$(final_stat average_exec_per_sec "$log")" \
    "$(last 'cov: [0-9]*' "$log" | grep -o '[0-9]*$' || echo -)" \
    "$(last 'ft: [0-9]*' "$log" | grep -o '[0-9]*$' || echo -)" \
    "$(last 'corp: [0-9]*/[0-9]*[a-zA-Z]*' "$log" | sed 's/^corp: //' || echo -)" \
    "$(final_stat peak_rss_mb "$log")")")
done

echo
echo "== summary (${seconds}s per target; logs in $logs)"
printf '%-15s %-18s %12s %8s %6s %7s %-14s %8s\n' target result execs exec/s cov ft corpus rss_mb
printf '%s\n' "${rows[@]}"
if [ "$failed" -ne 0 ]; then
  echo "FAILED: see the crashes above; each is kept in fuzz/regressions/" >&2
  exit 1
fi
echo "ok: no crash found"
