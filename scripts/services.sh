#!/usr/bin/env bash
# Starts, stops and reports the real services the tests talk to, on 127.0.0.1 only.
#
#   scripts/services.sh start|stop|status NAME
#
# Idempotent: installs what is missing (apt-get, as root), reuses what already runs.
# Run state lives in .services/NAME (git-ignored). Known services: (none yet; MQTT, Kafka,
# Prometheus, Alertmanager and Ceph come with their connectors).
set -euo pipefail
cd "$(dirname "$0")/.."
action=${1:-}
name=${2:-}
state=$(pwd)/.services

usage() { echo "usage: $0 start|stop|status NAME" >&2; exit 2; }
[ -n "$action" ] && [ -n "$name" ] || usage

case "$name" in
  *)
    echo "unknown service: $name" >&2
    exit 2
    ;;
esac
