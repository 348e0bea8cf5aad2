#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ (libFuzzer) for SECONDS each (default 60), as many at
# a time as the machine has cores (TIDEWATCH_FUZZ_JOBS to choose). Needs the nightly toolchain; installs cargo-fuzz when it is missing.
# Without nightly it says so and exits 0 (the fuzz crate is not part of the workspace build).
#
#   scripts/fuzz.sh            # 60 s per target
#   scripts/fuzz.sh 600        # 10 minutes per target
#   scripts/fuzz.sh 60 codec   # only the named targets
#
# Seeds are read from fuzz/corpus/<target>/ (checked in, never written); what the fuzzer
# finds on the way goes to fuzz/work/<target>/ (ignored by git), and a crashing input to
# fuzz/artifacts/<target>/. A crash makes the script exit 1 after the remaining targets ran.
#
# fuzz/target (about 1.1 GB after a build) is kept between runs for incremental builds;
# TIDEWATCH_FUZZ_CLEAN=1 (the default when CI is set) removes it at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

seconds=${1:-60}
shift || true
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(codec timestamp interpolate pipeline model_json)
case "$seconds" in '' | *[!0-9]*) echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...]" >&2; exit 2 ;; esac

if ! command -v cargo >/dev/null 2>&1; then
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
if ! command -v rustup >/dev/null 2>&1 || ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz: SKIPPED: the nightly toolchain is not installed (rustup toolchain install nightly)"
  exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi

# The fuzz crate's own target folder (never the workspace's: other flags, other toolchain).
export CARGO_TARGET_DIR=$root/fuzz/target
clean=${TIDEWATCH_FUZZ_CLEAN:-${CI:+1}}
cleanup() {
  if [ "${clean:-0}" = 1 ]; then
    rm -rf "$root/fuzz/target"
  else
    echo "fuzz: fuzz/target kept ($(du -sh "$root/fuzz/target" 2>/dev/null | cut -f1)); TIDEWATCH_FUZZ_CLEAN=1 removes it"
  fi
}
trap cleanup EXIT

# Release with debug assertions and overflow checks, no sanitizer: the code under test is safe
# Rust (`unsafe_code = "forbid"`), so AddressSanitizer would find little and cost 2-3x speed;
# a panic (overflow, index, unwrap, failed invariant) is what a crash is here.
flags=(-O --debug-assertions --sanitizer none)
# 0 seconds: replay the seeds once (libFuzzer's -max_total_time=0 means no limit).
if [ "$seconds" -eq 0 ]; then limit=(-runs=0); else limit=(-max_total_time="$seconds"); fi
start=$SECONDS
cargo +nightly fuzz build "${flags[@]}"
echo "fuzz: built in $((SECONDS - start)) s"

# One target per core at a time (TIDEWATCH_FUZZ_JOBS): each still gets SECONDS of a core,
# and the whole run takes a fraction of the time on a machine with more than one.
jobs_max=${TIDEWATCH_FUZZ_JOBS:-$(nproc 2>/dev/null || echo 1)}
case "$jobs_max" in '' | *[!0-9]* | 0) jobs_max=1 ;; esac
run_target() {
  local target=$1 status=0
  # load_str keeps each pipeline's text for the life of the process (spans point into it),
  # so the loader targets grow by what they read: a bounded input size and memory limit.
  nice -n 10 cargo +nightly fuzz run "${flags[@]}" "$target" \
    "$root/fuzz/work/$target" "$root/fuzz/corpus/$target" -- \
    "${limit[@]}" -max_len=16384 -rss_limit_mb=4096 -timeout=10 \
    -print_final_stats=1 2>"fuzz/work/$target.log" || status=$?
  echo "$status" >"fuzz/work/$target.status"
}
for target in "${targets[@]}"; do
  mkdir -p "fuzz/work/$target" "fuzz/artifacts/$target"
  rm -f "fuzz/work/$target.status"
  while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do
    wait -n || true
  done
  echo "fuzz: $target for ${seconds} s"
  run_target "$target" &
done
wait || true

failed=()
for target in "${targets[@]}"; do
  echo -n "fuzz: $target: "
  if [ "$(cat "fuzz/work/$target.status" 2>/dev/null || echo missing)" != 0 ]; then
    failed+=("$target")
    tail -n 60 "fuzz/work/$target.log" >&2
  fi
  grep -E '^(stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb)|^Done ' \
    "fuzz/work/$target.log" | tr '\n' ' ' || true
  echo "corpus: $(find "fuzz/work/$target" -type f | wc -l) files"
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz: CRASHED: ${failed[*]} (inputs in fuzz/artifacts/<target>/; logs in fuzz/work/<target>.log)" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} targets ran ${seconds} s each without a crash"
