#!/usr/bin/env bash
# Runs the whole test suite on a fresh Debian machine: installs what the tests need, starts
# the real services they talk to (scripts/services.sh), runs the checks, stops the services.
#
#   scripts/test.sh            # everything
#   scripts/test.sh --quick    # skip fmt/clippy/doc checks (inner loop)
#
# Data for the benchmark-based tests is read from $TIDEWATCH_DATA (default ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

quick=0
[ "${1:-}" = "--quick" ] && quick=1

export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
# Where cargo puts what it builds (CARGO_TARGET_DIR when set, relative to the checkout or not).
target_dir=${CARGO_TARGET_DIR:-target}
case "$target_dir" in /*) ;; *) target_dir=$root/$target_dir ;; esac
tidewatch=$target_dir/debug/tidewatch
export TIDEWATCH_DATA=${TIDEWATCH_DATA:-$root/../shared/data}

# Each step's header says when it starts (minutes:seconds since the script started), so a
# run's log shows where its time went.
step() { printf '\n==> [%d:%02d] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust (rustup, stable >= 1.89)" >&2; exit 1; }

# Build dependencies of librdkafka (bundled by the rdkafka crate, built from source with
# gcc and make: no cmake): pkg-config, zlib and OpenSSL headers; and what tests/netns.rs uses
# (ip netns, curl). Installed once, as root.
step "build and test dependencies (librdkafka, iproute2, curl)"
missing=()
for package in pkg-config zlib1g-dev libssl-dev iproute2 curl; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# The Python side: training/train.py and the ONNX Runtime library the engine loads
# (onnxruntime's wheel ships libonnxruntime.so). Reinstalled only when requirements change.
step "python environment (.venv)"
scripts/python-env.sh

services=()
cleanup() {
  for service in "${services[@]}"; do
    scripts/services.sh stop "$service" || true
  done
}
trap cleanup EXIT

# Services the integration tests need (each issue adds its own), started through
# scripts/services.sh. TIDEWATCH_TEST_SERVICES overrides the list (empty: start none).
# A service that was already running is reused and left running afterwards.
for service in ${TIDEWATCH_TEST_SERVICES-mosquitto prometheus alertmanager kafka ceph}; do
  step "starting $service"
  if scripts/services.sh status "$service" >/dev/null 2>&1; then
    scripts/services.sh start "$service"
  else
    scripts/services.sh start "$service"
    services+=("$service")
  fi
done

if [ "$quick" -eq 0 ]; then
  step "cargo fmt --check"
  cargo fmt --all -- --check
  step "cargo clippy -D warnings"
  cargo clippy --workspace --all-targets -- -D warnings
fi

step "build"
cargo build --workspace --bins --examples

step "tests"
cargo test --workspace --all-targets --no-fail-fast

if [ "$quick" -eq 0 ]; then
  step "doc tests"
  cargo test --workspace --doc
  step "docs build without warnings"
  RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
fi

step "python tests (training)"
.venv/bin/python -m pytest -q -p no:cacheprovider training

step "the issue checks, as a user runs them"
"$tidewatch" validate pipelines/*.toml
"$tidewatch" test pipelines/*.toml
for broken in broken downstream_errors unknown_port; do
  if "$tidewatch" validate "tests/fixtures/invalid/$broken.toml" 2>/dev/null; then
    echo "validate accepted a broken pipeline ($broken.toml)" >&2
    exit 1
  fi
done

step "kubernetes manifests (k8s/overlays: kustomize, kubernetes-validate --strict)"
TIDEWATCH_BIN="$tidewatch" scripts/k8s-validate.sh

# Last of the cargo steps: they rebuild $tidewatch without the default features: the edge
# image's set (the Containerfile's FEATURES for k8s/overlays/edge), then the smallest one.
step "edge build: --no-default-features --features mqtt,kafka,tract"
cargo build --no-default-features --features mqtt,kafka,tract
cargo clippy --no-default-features --features mqtt,kafka,tract -- -D warnings
"$tidewatch" validate pipelines/edge.toml pipelines/edge-mqtt.toml k8s/overlays/edge/pipeline.toml
step "edge build: --no-default-features --features mqtt,tract"
cargo build --no-default-features --features mqtt,tract
cargo clippy --no-default-features --features mqtt,tract -- -D warnings
"$tidewatch" validate pipelines/edge-mqtt.toml

# cargo-fuzz targets of fuzz/ (its own workspace, nightly only), 60 s each, one per core at a
# time: about 3 minutes on 2 cores
# plus the fuzz crate's build (several minutes from scratch). Skipped, with a line saying
# so, when the nightly toolchain is absent. TIDEWATCH_FUZZ_SECONDS sets the time per target.
step "fuzzing: scripts/fuzz.sh ${TIDEWATCH_FUZZ_SECONDS:-60} (nightly only)"
scripts/fuzz.sh "${TIDEWATCH_FUZZ_SECONDS:-60}"

step "shipped monitoring config (promtool, amtool)"
for tool in promtool amtool; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "$tool not found: scripts/services.sh start prometheus|alertmanager installs it" >&2
    exit 1
  }
done
promtool check rules k8s/monitoring/prometheus-rules.yml
promtool test rules k8s/monitoring/tests/rule-tests.yml
promtool check config k8s/monitoring/prometheus.yml
amtool check-config k8s/monitoring/alertmanager.yml
python3 -m json.tool k8s/monitoring/grafana-dashboard.json >/dev/null

echo
echo "all checks passed in $((SECONDS / 60)) min $((SECONDS % 60)) s"
