#!/usr/bin/env bash
# The stress run of issue 9: 10,000 idle mTLS connections held on one data plane, then
# two rounds of 10,000 connections of mixed outcomes; descriptors and memory before and
# after. Bounded (a few minutes), loopback only. Arguments go to the `stress` binary
# (see bench/src/stress.rs), e.g. `bash bench/stress.sh --idle 5000 --churn 20000`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p ztp-dataplane -p ztp-bench --bins
# Each process raises its own soft limit to the hard one; this shell too.
ulimit -n "$(ulimit -Hn)"
exec timeout 900 ./target/release/stress "$@"
