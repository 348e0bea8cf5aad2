#!/usr/bin/env bash
# Side by side, on the same input and the same core: tidewatch against Bytewax and against
# hand-written limits (issue #17).
#
#   benches/e2e/run.sh [--quick] [--lines N] [--runs N]
#
# The input is generated once (benches/e2e/gen_input.py: deterministic JSON lines, 1,000
# devices round robin, 8 float features, event time +1 ms per line; 2,000,000 lines, 300,000
# with --quick) and kept in $E2E_WORK (default /tmp/tidewatch-e2e) for the next run.
# Workloads:
#   (a) JSON parse -> normalize -> per-device count window (60 readings, a window every 10)
#       -> mean, std, min, max per feature -> count, through
#       tidewatch  `tidewatch run` (release build), file source -> normalize -> window -> stats
#                  -> blackhole, 1 worker;
#       bytewax    benches/e2e/bytewax_flow.py (PyPI bytewax, in its own venv .venv-bytewax
#                  made here), 1 worker;
#       limit      benches/e2e/src/bin/e2e_limit.rs: one loop over the same bytes, serde_json
#                  (`limit-serde`, the limit of the ratio) and a hand-written flat-object
#                  scanner (`limit-fast`);
#   (b) the same with `autoencoder` (benches/e2e/make_model.py: dense 480-64-16-64-480, 60
#       steps x 8 features, ONNX) on ONNX Runtime instead of `stats`, against the raw batched
#       throughput of the same model in ONNX Runtime on one thread (benches/e2e/ort_limit.py,
#       the same libonnxruntime as tidewatch's, from .venv), as readings/s = windows/s x 10;
#   (c) (a) in tidewatch with 2 workers on 2 cores, against (a) with 1.
# Each single-core side is pinned to core $E2E_CORE (default 1) with taskset, (c) to 0,1. The
# sides run interleaved, $runs times each (3; 1 with --quick); the figures are medians. Rates
# are readings / wall time of the whole process (start-up included), peak RSS is
# /usr/bin/time's maximum resident set size. Before timing, a check run of tidewatch with a
# file sink must give the same windows and statistics as the serde_json loop.
# Prints one line per workload and side, how busy the machine was with other work during the
# runs (it skews every figure: CPU time of the machine minus that of the runs), the ratios, and
# last:
#   ratio tidewatch/bytewax workload-a: X
#   ratio tidewatch/limit workload-a: Y          (limit = the serde_json loop)
#   ratio tidewatch/onnxruntime workload-b: Z
#
# Needs python3 (3.11 for the Bytewax wheel), the repository's .venv (numpy, onnx, onnxruntime:
# scripts/python-env.sh), taskset and GNU time (/usr/bin/time). Builds the release binaries
# (tidewatch, e2e_limit) when missing; set TIDEWATCH_BIN to use another tidewatch binary.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
quick=0
lines=
runs=
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1; shift ;;
    --lines) lines=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    *) echo "usage: $0 [--quick] [--lines N] [--runs N]" >&2; exit 2 ;;
  esac
done
[ -n "$lines" ] || { [ "$quick" = 1 ] && lines=300000 || lines=2000000; }
[ -n "$runs" ] || { [ "$quick" = 1 ] && runs=1 || runs=3; }
core=${E2E_CORE:-1}
work=${E2E_WORK:-${TMPDIR:-/tmp}/tidewatch-e2e}
target=${CARGO_TARGET_DIR:-$root/target}/release
bin=${TIDEWATCH_BIN:-$target/tidewatch}
limit=$target/e2e_limit
mkdir -p "$work"
source benches/lib.sh

for tool in taskset /usr/bin/time; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install util-linux time)" >&2; exit 1; }
done
[ -x .venv/bin/python ] || { echo "missing .venv: run scripts/python-env.sh" >&2; exit 1; }
ort_lib=$(ls .venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* 2>/dev/null | head -n 1)
[ -n "$ort_lib" ] || { echo "no onnxruntime in .venv: run scripts/python-env.sh" >&2; exit 1; }

# --- builds and environments (not timed) ------------------------------------------------------
[ -x "$bin" ] || cargo build --release --bin tidewatch
[ -x "$limit" ] || cargo build --release -p tidewatch-e2e --bin e2e_limit
if ! .venv-bytewax/bin/python -c 'import bytewax' 2>/dev/null; then
  python=$(command -v python3.11 || command -v python3)
  "$python" -m venv .venv-bytewax
  .venv-bytewax/bin/pip install -q 'bytewax==0.21.1'
fi

input=$work/input-$lines.jsonl
if [ ! -s "$input" ]; then
  echo "generating $lines lines into $input ..." >&2
  python3 benches/e2e/gen_input.py "$lines" "$input.tmp" && mv "$input.tmp" "$input"
fi
windows_expected=$(( lines / 1000 >= 60 ? ((lines / 1000 - 60) / 10 + 1) * 1000 : 0 ))
model=$work/model
[ -s "$model/model.json" ] || .venv/bin/python benches/e2e/make_model.py "$model"

# pipeline_toml NAME WORKERS DETECTOR SINK: workload (a) (DETECTOR stats) or (b) (autoencoder)
# with a blackhole sink, or a file sink when SINK names a file.
pipeline_toml() {
  local detector
  if [ "$3" = stats ]; then
    detector=$'type = "stats"'
  else
    detector="type = \"autoencoder\"
model = \"$model\"
backend = \"onnxruntime\"
onnxruntime_library = \"$root/$ort_lib\""
  fi
  cat <<TOML
[pipeline]
name = "$1"
workers = $2
out_of_orderness_ms = 0
http_address = ""

[sources.in]
type = "file"
path = "$input"
spread = true           # (c): the lines are decoded on both workers (no effect on one)

[transforms.readings]
type = "normalize"
inputs = ["in"]
format = "json"
device_field = "device"
timestamp_field = "ts"
timestamp_format = "unix_ms"
features = ["f0", "f1", "f2", "f3", "f4", "f5", "f6", "f7"]

[transforms.windows]
type = "window"
inputs = ["readings"]
size_readings = 60
slide_readings = 10

[transforms.detector]
inputs = ["windows"]
$detector

[sinks.out]
$(if [ -n "${4:-}" ]; then printf 'type = "file"\npath = "%s"' "$4"; else echo 'type = "blackhole"'; fi)
inputs = ["detector", "readings.errors", "windows.late", "in.errors"]
TOML
}
pipeline_toml e2e-a 1 stats > "$work/a.toml"
pipeline_toml e2e-b 1 autoencoder > "$work/b.toml"
pipeline_toml e2e-check 1 stats "$work/check.jsonl" > "$work/check.toml"
for file in a b check; do
  "$bin" validate "$work/$file.toml" >/dev/null
done

# --- check: tidewatch's windows and statistics equal the loop's --------------------------------
rm -f "$work/check.jsonl"
"$bin" --log-level warn run "$work/check.toml" >/dev/null
check=$("$limit" serde "$input")
tw_check=$(python3 - "$work/check.jsonl" <<'PY'
import json, sys
windows, total, other = 0, 0.0, 0
for line in open(sys.argv[1]):
    record = json.loads(line)
    if "values" not in record or "f0_mean" not in record["values"]:
        other += 1
        continue
    windows += 1
    total += sum(v for k, v in record["values"].items() if k.rsplit("_", 1)[-1] in ("mean", "std", "min", "max"))
print(windows, total, other)
PY
)
read -r tw_windows tw_sum tw_other <<< "$tw_check"
loop_windows=$(awk '{ for (i = 1; i < NF; i++) if ($i == "windows") print $(i + 1) }' <<< "$check")
loop_sum=$(awk '{ for (i = 1; i < NF; i++) if ($i == "checksum") print $(i + 1) }' <<< "$check")
echo "check: tidewatch $tw_windows windows (statistics sum $tw_sum, $tw_other other records), serde_json loop $loop_windows (sum $loop_sum), expected $windows_expected"
awk -v a="$tw_sum" -v b="$loop_sum" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d <= 1e-5 * (b < 0 ? -b : b) + 1e-6) }' \
  && [ "$tw_windows" = "$loop_windows" ] && [ "$tw_windows" = "$windows_expected" ] && [ "$tw_other" = 0 ] \
  || { echo "check failed: tidewatch and the loop disagree" >&2; exit 1; }
rm -f "$work/check.jsonl"

# --- the runs ------------------------------------------------------------------------------------
results=$work/results.txt
: > "$results"
busy_start=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 }' /proc/stat)
own_ticks=0
clk=$(getconf CLK_TCK)

# measure SIDE CPUS COMMAND...: runs COMMAND pinned to CPUS; appends "SIDE seconds rss_kb
# own_rate" to the results (own_rate: the readings_per_sec the command printed itself, or -)
# and keeps the command's output in $work/SIDE.out.
measure() {
  local side=$1 cpus=$2 start end rss user sys own
  shift 2
  start=$(now)
  /usr/bin/time -f '%M %U %S' -o "$work/time.txt" taskset -c "$cpus" "$@" > "$work/$side.out" 2> "$work/$side.err" \
    || { echo "$side failed:" >&2; cat "$work/$side.err" >&2; exit 1; }
  end=$(now)
  read -r rss user sys < "$work/time.txt"
  own_ticks=$(calc "$own_ticks + ($user + $sys) * $clk")
  own=$(awk '{ for (i = 1; i < NF; i++) if ($i == "readings_per_sec") print $(i + 1) }' "$work/$side.out")
  echo "$side $(calc "$end - $start") $rss ${own:--}" >> "$results"
}

for run in $(seq "$runs"); do
  echo "run $run of $runs ..." >&2
  measure tidewatch-a "$core" "$bin" --log-level warn run "$work/a.toml"
  measure bytewax-a "$core" .venv-bytewax/bin/python benches/e2e/bytewax_flow.py "$input" "$lines"
  measure limit-serde-a "$core" "$limit" serde "$input"
  measure limit-fast-a "$core" "$limit" fast "$input"
  measure tidewatch-b "$core" "$bin" --log-level warn run "$work/b.toml"
  measure onnxruntime-b "$core" .venv/bin/python benches/e2e/ort_limit.py "$model" "$windows_expected"
  measure tidewatch-c 0,1 "$bin" --log-level warn run "$work/a.toml" --workers 2
done
busy_end=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 }' /proc/stat)

# median SIDE COLUMN: the median of a column (2 = seconds, 3 = rss_kb, 4 = own rate) over the
# side's runs.
median() {
  awk -v side="$1" -v col="$2" '$1 == side { print $col }' "$results" | sort -g \
    | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
# rate SIDE: the median readings/s of the side (onnxruntime-b: its own timing of the model
# runs, as windows/s x 10; the others: readings / wall time).
rate() {
  if [ "$1" = onnxruntime-b ]; then
    median "$1" 4
  else
    calc "$lines / $(median "$1" 2)"
  fi
}
declare -A rates
printf '\ninput: %d lines (%d devices, 8 features), %d windows; %d run(s) per side, medians; core %s\n' \
  "$lines" 1000 "$windows_expected" "$runs" "$core"
line() { # SIDE WORKLOAD LABEL
  rates[$1]=$(rate "$1")
  printf 'workload-%s %-38s %12.0f readings/s  peak RSS %7.1f MB  (%s s)\n' "$2" "$3" "${rates[$1]}" \
    "$(calc "$(median "$1" 3) / 1024")" "$(awk -v s="$1" '$1 == s { printf "%.2f ", $2 }' "$results" | sed 's/ $//')"
}
line tidewatch-a a "tidewatch (1 worker)"
line bytewax-a a "bytewax 0.21.1 (1 worker)"
line limit-serde-a a "limit: serde_json loop"
line limit-fast-a a "limit: hand-written parser loop"
line tidewatch-b b "tidewatch autoencoder (1 worker)"
line onnxruntime-b b "onnxruntime raw, batched (x10 windows)"
line tidewatch-c c "tidewatch (2 workers, 2 cores)"
others=$(calc "(($busy_end - $busy_start) - $own_ticks) / $clk")
printf 'other work on the machine during the runs: %.1f CPU-seconds\n' "$others"
printf 'ratio tidewatch/limit-fast workload-a: %.3f\n' "$(calc "${rates[tidewatch-a]} / ${rates[limit-fast-a]}")"
printf 'ratio tidewatch 2 workers/1 worker workload-c: %.3f\n' "$(calc "${rates[tidewatch-c]} / ${rates[tidewatch-a]}")"
printf 'ratio tidewatch/bytewax workload-a: %.3f\n' "$(calc "${rates[tidewatch-a]} / ${rates[bytewax-a]}")"
printf 'ratio tidewatch/limit workload-a: %.3f\n' "$(calc "${rates[tidewatch-a]} / ${rates[limit-serde-a]}")"
printf 'ratio tidewatch/onnxruntime workload-b: %.3f\n' "$(calc "${rates[tidewatch-b]} / ${rates[onnxruntime-b]}")"
