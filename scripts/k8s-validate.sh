#!/usr/bin/env bash
# Renders the Kubernetes overlays (k8s/overlays/*) and validates them offline, against the
# schemas of current Kubernetes versions, with no cluster.
#
#   scripts/k8s-validate.sh            # check everything (below); exit 0 when all passed
#   scripts/k8s-validate.sh generate   # rewrite the generated files from their sources
#   scripts/k8s-validate.sh env        # print `export PATH=...` for the issue's check:
#       eval "$(scripts/k8s-validate.sh env)"
#       for o in k8s/overlays/*/; do kubectl kustomize "$o" | kubernetes-validate --strict -; done
#
# Tools, installed when missing (idempotent):
#   - a renderer: `kubectl kustomize` (kubectl bundles kustomize), else `kustomize build`,
#     else `go install sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION` into
#     ${TIDEWATCH_CACHE:-~/.cache/tidewatch}/bin (needs Go). Without a real kubectl, a
#     `kubectl` shim that runs `kustomize build` for `kubectl kustomize DIR` is put there,
#     so that the issue's loop runs as written.
#   - .venv-k8s (python3 -m venv): kubernetes-validate (PyPI; it bundles the JSON schemas of
#     Kubernetes 1.25 to 1.37, works offline) and cloudcoil-models-prometheus-operator (the
#     prometheus-operator CRDs as pydantic models) at pinned versions.
#
# What `check` does:
#   1. The generated files are up to date: k8s/base/prometheus-operator/prometheusrule.yaml
#      (the rule groups of k8s/monitoring/prometheus-rules.yml, wrapped in a PrometheusRule:
#      kustomize's generators make only ConfigMaps and Secrets, so it cannot wrap them
#      itself) and k8s/overlays/*/pipeline.toml (copies of pipelines/*.toml: kustomize loads
#      no file from outside an overlay's folder, not even through a symlink).
#   2. Each overlay renders, and its output passes `kubernetes-validate --strict` for every
#      version in $K8S_VERSIONS. kubernetes-validate has no schema for custom resources: it
#      prints "WARN ... Couldn't find schema" and exits 0. Such a warning is accepted for the
#      two prometheus-operator kinds only (they are checked in step 3); for any other kind it
#      fails the check (a mistyped apiVersion of a built-in kind would otherwise pass).
#   3. Checks kubernetes-validate cannot make, on the rendered output: ServiceMonitor and
#      PrometheusRule against the prometheus-operator CRD models (types, and unknown fields
#      as --strict does); the PrometheusRule's groups equal prometheus-rules.yml's;
#      replicas == TIDEWATCH_PROCESSES; a headless Service named as TIDEWATCH_CLUSTER_SERVICE
#      with publishNotReadyAddresses and the cluster port; Parallel pod management; several
#      processes checkpoint to the object store; probes on /readyz and /healthz; a
#      non-root, read-only container; TIDEWATCH_STATE_DIR on the volume; the pipeline
#      ConfigMap holds the overlay's pipeline.toml; no credential as a plain value.
#   4. `promtool check rules` on the rendered rule groups (skipped without promtool).
#   5. `tidewatch validate` on each overlay's pipeline.toml with the overlay's settings
#      (skipped without a built binary: $TIDEWATCH_BIN, target/release or target/debug).
#   6. The issue's loop, as written.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

action=${1:-check}
case "$action" in check|generate|env) ;; *) echo "usage: $0 [check|generate|env]" >&2; exit 2 ;; esac

K8S_VERSIONS=${K8S_VERSIONS:-1.37.0 1.32.0}
KUSTOMIZE_VERSION=${KUSTOMIZE_VERSION:-v5.5.0}
venv=$root/.venv-k8s
cache=${TIDEWATCH_CACHE:-$HOME/.cache/tidewatch}
bin=$cache/bin
# Pinned: what the checks were written against.
requirements="kubernetes-validate==1.37.0
cloudcoil-models-prometheus-operator==0.80.1.0"

rules_source=k8s/monitoring/prometheus-rules.yml
rules_generated=k8s/base/prometheus-operator/prometheusrule.yaml

# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------

# The renderer: sets `render` to a command that takes an overlay folder.
find_renderer() {
  if command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1 \
    && [ "$(command -v kubectl)" != "$bin/kubectl" ]; then
    render=(kubectl kustomize)
    return
  fi
  local kustomize
  kustomize=$(PATH=$bin:$PATH command -v kustomize 2>/dev/null || true)
  if [ -z "$kustomize" ]; then
    if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
      PATH=$PATH:/usr/local/go/bin
    fi
    if ! command -v go >/dev/null 2>&1; then
      echo "no kubectl, no kustomize and no Go to build kustomize: install kubectl (it bundles" >&2
      echo "kustomize) or kustomize, or Go for \`go install sigs.k8s.io/kustomize/kustomize/v5\`" >&2
      exit 1
    fi
    echo "installing kustomize $KUSTOMIZE_VERSION (go install) into $bin" >&2
    mkdir -p "$bin"
    GOBIN=$bin go install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION"
    kustomize=$bin/kustomize
  fi
  render=("$kustomize" build)
  # A kubectl that only knows `kubectl kustomize DIR`, for the issue's loop.
  if ! command -v kubectl >/dev/null 2>&1 || [ "$(command -v kubectl)" = "$bin/kubectl" ]; then
    mkdir -p "$bin"
    cat > "$bin/kubectl" <<EOF
#!/bin/sh
# Written by scripts/k8s-validate.sh where no kubectl is installed: only \`kubectl kustomize DIR\`.
if [ "\$1" = kustomize ]; then shift; exec "$kustomize" build "\$@"; fi
echo "this kubectl is a shim of scripts/k8s-validate.sh: only \\\`kubectl kustomize DIR\\\`" >&2
exit 1
EOF
    chmod 755 "$bin/kubectl"
  fi
}

ensure_venv() {
  local stamp=$venv/.requirements.sha256 want
  want=$(printf '%s\n' "$requirements" | sha256sum | cut -d' ' -f1)
  if [ -x "$venv/bin/kubernetes-validate" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    else
      echo "python3 -m venv is unavailable: install python3-venv" >&2
      exit 1
    fi
  fi
  echo "installing kubernetes-validate into $venv" >&2
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  # shellcheck disable=SC2086 # one requirement per word
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check $requirements
  echo "$want" > "$stamp"
}

# ---------------------------------------------------------------------------------------------
# Generated files
# ---------------------------------------------------------------------------------------------

# The PrometheusRule: the rules file's groups under spec. Written with PyYAML rather than
# by indenting the file's text: kustomize (go-yaml v3) re-encodes a folded scalar (`>-`)
# whose lines are indented further with an extra blank line between them, so the rendered
# rules would differ from the source (harmless for PromQL, but not the same); strings with
# line breaks are therefore written as literal blocks (`|-`), which survive the round trip.
generate_prometheusrule() {
  "$venv/bin/python" - "$rules_source" <<'PY'
import sys

import yaml

source = sys.argv[1]
groups = yaml.safe_load(open(source))["groups"]


class Dumper(yaml.SafeDumper):
    pass


def string(dumper, value):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


Dumper.add_representer(str, string)
print(f"""\
# GENERATED by `scripts/k8s-validate.sh generate` from {source}
# (the one source of the rules: promtool checks and tests it there). Do not edit: edit that
# file and regenerate; `scripts/k8s-validate.sh` fails while the rules rendered from this
# file differ from it. Comments are in the source.""")
resource = {
    "apiVersion": "monitoring.coreos.com/v1",
    "kind": "PrometheusRule",
    "metadata": {"name": "tidewatch", "labels": {"app.kubernetes.io/name": "tidewatch"}},
    "spec": {"groups": groups},
}
sys.stdout.write(yaml.dump(resource, Dumper=Dumper, sort_keys=False, width=100, allow_unicode=True))
PY
}

pipeline_header() {  # SOURCE
  cat <<EOF
# k8s: GENERATED by \`scripts/k8s-validate.sh generate\` from $1 (kustomize reads no file
# k8s: from outside the overlay's folder). Do not edit: edit $1 and regenerate;
# k8s: \`scripts/k8s-validate.sh\` fails while this copy differs. Lines marked \`# k8s:\` are
# k8s: added for Kubernetes; the rest is $1 unchanged.
EOF
}

# The cloud pipeline: pipelines/cloud.toml unchanged (every setting is a variable already).
generate_cloud_pipeline() {
  pipeline_header pipelines/cloud.toml
  cat pipelines/cloud.toml
}

# The edge pipeline: pipelines/edge.toml with checkpoints on the pod's volume, added after
# [pipeline]'s http_address (unless the source has a checkpoint_url of its own).
generate_edge_pipeline() {
  local source=pipelines/edge.toml
  pipeline_header "$source"
  if grep -q '^checkpoint_url' "$source"; then
    cat "$source"
    return
  fi
  awk '
    /^\[/ { table = $0 }
    { print }
    table == "[pipeline]" && /^http_address *=/ && !done {
      print "checkpoint_interval_secs = 2       # k8s: MQTT acks wait for the checkpoint: keep it short"
      print "checkpoint_url = \"${TIDEWATCH_CHECKPOINT_URL:-/var/lib/tidewatch/checkpoints}\"   # k8s: the volume"
      done = 1
    }
    END { if (!done) { print "no http_address in [pipeline]" > "/dev/stderr"; exit 1 } }
  ' "$source"
}

# TARGET GENERATOR pairs.
generated=(
  "$rules_generated" generate_prometheusrule
  k8s/overlays/cloud/pipeline.toml generate_cloud_pipeline
  k8s/overlays/edge/pipeline.toml generate_edge_pipeline
)

ensure_venv
# The issue's check calls `kubernetes-validate` by name: as root, link it onto the PATH (once).
if [ "$(id -u)" = 0 ] && ! command -v kubernetes-validate >/dev/null 2>&1; then
  ln -sf "$venv/bin/kubernetes-validate" /usr/local/bin/kubernetes-validate
fi

if [ "$action" = generate ]; then
  for ((i = 0; i < ${#generated[@]}; i += 2)); do
    target=${generated[i]}
    "${generated[i + 1]}" > "$target.tmp"
    mv "$target.tmp" "$target"
    echo "wrote $target"
  done
  exit 0
fi

find_renderer

if [ "$action" = env ]; then
  echo "export PATH=\"$venv/bin:$bin:\$PATH\""
  exit 0
fi

# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failed=0
step() { printf '\n==> %s\n' "$*"; }
fail() { echo "FAIL: $*"; failed=1; }

step "1. generated files are up to date"
for ((i = 0; i < ${#generated[@]}; i += 2)); do
  target=${generated[i]}
  "${generated[i + 1]}" > "$tmp/generated"
  if diff -u "$target" "$tmp/generated" > "$tmp/diff" 2>&1; then
    echo "ok   $target"
  else
    cat "$tmp/diff"
    fail "$target is stale: run scripts/k8s-validate.sh generate"
  fi
done

overlays=()
for dir in k8s/overlays/*/; do
  overlays+=("$(basename "$dir")")
done

step "2. render (${render[*]}) and kubernetes-validate --strict (Kubernetes $K8S_VERSIONS)"
checks=()
for overlay in "${overlays[@]}"; do
  rendered=$tmp/$overlay.yaml
  if ! "${render[@]}" "k8s/overlays/$overlay" > "$rendered" 2> "$tmp/render.err"; then
    cat "$tmp/render.err"
    fail "$overlay: does not render"
    continue
  fi
  echo "ok   $overlay renders: $(grep -c '^kind:' "$rendered") resources ($(grep '^kind:' "$rendered" | cut -d' ' -f2 | sort | paste -sd' '))"
  checks+=("$overlay" "$rendered" "k8s/overlays/$overlay/pipeline.toml")
  for version in $K8S_VERSIONS; do
    status=0
    "$venv/bin/kubernetes-validate" --strict -k "$version" - < "$rendered" > "$tmp/kv.out" 2>&1 || status=$?
    unexpected=$(grep -v -E '^INFO |^WARN - Couldn.t find schema for kind (ServiceMonitor|PrometheusRule) with api version monitoring\.coreos\.com/v1 ' "$tmp/kv.out" || true)
    if [ "$status" -ne 0 ] || [ -n "$unexpected" ]; then
      cat "$tmp/kv.out"
      fail "$overlay: kubernetes-validate --strict -k $version (exit $status)"
    else
      echo "ok   $overlay: $(grep -c '^INFO ' "$tmp/kv.out") resources valid against Kubernetes $version (strict); $(grep -c '^WARN ' "$tmp/kv.out" || true) custom resources without a schema there (checked below)"
    fi
  done
done

step "3. custom resources and what holds the deployment together"
"$venv/bin/python" - "$rules_source" "$tmp" "${checks[@]}" <<'PY' || failed=1
import sys, types, typing

import pydantic
import yaml
from cloudcoil.models.prometheus_operator import v1 as monitoring

rules_source, tmp, *rest = sys.argv[1:]
rules = yaml.safe_load(open(rules_source))
failures = []


def unknown_fields(value, annotation, path, errors):
    """Fields the model does not know (pydantic ignores them; the API server would not)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return unknown_fields(value, typing.get_args(annotation)[0], path, errors)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if arg is not type(None):
                unknown_fields(value, arg, path, errors)
        return
    if origin is list and isinstance(value, list):
        (item,) = typing.get_args(annotation)
        for i, element in enumerate(value):
            unknown_fields(element, item, f"{path}[{i}]", errors)
        return
    if origin is dict and isinstance(value, dict):
        _, item = typing.get_args(annotation)
        for key, element in value.items():
            unknown_fields(element, item, f"{path}.{key}", errors)
        return
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel) and isinstance(value, dict):
        fields = {(field.alias or name): field for name, field in annotation.model_fields.items()}
        for key, element in value.items():
            if key not in fields:
                errors.append(f"{path}.{key}: unknown field")
            else:
                unknown_fields(element, fields[key].annotation, f"{path}.{key}", errors)


def check(overlay, rendered, pipeline_path):
    def fail(message):
        failures.append(f"{overlay}: {message}")

    docs = [doc for doc in yaml.safe_load_all(open(rendered)) if doc]
    kinds = {}
    for doc in docs:
        kinds.setdefault(doc["kind"], []).append(doc)
    named = lambda kind, name: next((d for d in kinds.get(kind, []) if d["metadata"]["name"] == name), None)

    if "Secret" in kinds:
        fail("renders a Secret: credentials must be created outside the manifests")

    # The prometheus-operator kinds, strictly.
    for kind, model in (("ServiceMonitor", monitoring.ServiceMonitor), ("PrometheusRule", monitoring.PrometheusRule)):
        for doc in kinds.get(kind, []):
            errors = []
            try:
                model.model_validate(doc)
            except pydantic.ValidationError as error:
                errors.append(str(error))
            unknown_fields(doc, model, kind, errors)
            for error in errors:
                fail(f"{kind}/{doc['metadata']['name']}: {error}")
            if not errors:
                print(f"ok   {overlay}: {kind}/{doc['metadata']['name']} valid against the prometheus-operator CRD (strict)")
    for doc in kinds.get("PrometheusRule", []):
        if doc["spec"].get("groups") != rules.get("groups"):
            fail(f"PrometheusRule/{doc['metadata']['name']}: its groups differ from {rules_source}")
        else:
            print(f"ok   {overlay}: PrometheusRule groups == {rules_source} ({len(rules['groups'])} groups)")
        with open(f"{tmp}/{overlay}-rules.yml", "w") as out:
            yaml.safe_dump({"groups": doc["spec"]["groups"]}, out, sort_keys=False)

    sets = kinds.get("StatefulSet", [])
    if len(sets) != 1:
        fail(f"{len(sets)} StatefulSets, expected 1")
        return
    sts = sets[0]
    spec, pod = sts["spec"], sts["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "tidewatch")
    env = {e["name"]: e for e in container.get("env", [])}
    value = lambda name: env.get(name, {}).get("value")

    settings = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        cm = ref and named("ConfigMap", ref["name"])
        if cm is None:
            fail(f"envFrom {source}: no such ConfigMap rendered")
        else:
            settings.update(cm.get("data", {}))
    with open(f"{tmp}/{overlay}.env", "w") as out:
        for key, val in settings.items():
            out.write(f"{key}={val}\n")
        out.write(f"TIDEWATCH_STATE_DIR={value('TIDEWATCH_STATE_DIR')}\n")

    # Cluster wiring.
    replicas = spec.get("replicas", 1)
    processes = int(value("TIDEWATCH_PROCESSES") or 1)
    if replicas != processes:
        fail(f"replicas {replicas} but TIDEWATCH_PROCESSES {processes}: change both together")
    if spec.get("podManagementPolicy") != "Parallel":
        fail("podManagementPolicy must be Parallel (the processes wait for each other)")
    service = named("Service", spec["serviceName"])
    port = int(value("TIDEWATCH_CLUSTER_PORT") or 7400)
    if service is None:
        fail(f"no Service {spec['serviceName']} (the StatefulSet's serviceName)")
    else:
        if service["spec"].get("clusterIP") != "None" or not service["spec"].get("publishNotReadyAddresses"):
            fail(f"Service {spec['serviceName']} must be headless with publishNotReadyAddresses")
        if not any(p["port"] == port and p.get("name") == "cluster" for p in service["spec"]["ports"]):
            fail(f"Service {spec['serviceName']} has no port `cluster` {port}")
    if (value("TIDEWATCH_CLUSTER_SERVICE") or "").split(".")[0] != spec["serviceName"]:
        fail(f"TIDEWATCH_CLUSTER_SERVICE {value('TIDEWATCH_CLUSTER_SERVICE')!r} is not serviceName {spec['serviceName']!r}")
    if not any(p["containerPort"] == port and p.get("name") == "cluster" for p in container["ports"]):
        fail(f"the container has no port `cluster` {port}")
    checkpoint = env.get("TIDEWATCH_CHECKPOINT_URL", {}).get("value") or settings.get("TIDEWATCH_CHECKPOINT_URL", "")
    if processes > 1 and not checkpoint.startswith("s3://"):
        fail(f"{processes} processes checkpoint to {checkpoint!r}: a cluster needs the object store (s3://)")

    # Health, security, volumes.
    if container.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
        fail("readinessProbe must GET /readyz")
    if container.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
        fail("livenessProbe must GET /healthz")
    if not pod.get("securityContext", {}).get("runAsNonRoot"):
        fail("the pod must run as non-root")
    if not container.get("securityContext", {}).get("readOnlyRootFilesystem"):
        fail("the container's root file system must be read-only")
    claims = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    if mounts.get(value("TIDEWATCH_STATE_DIR")) not in claims:
        fail(f"TIDEWATCH_STATE_DIR {value('TIDEWATCH_STATE_DIR')!r} is not a volumeClaimTemplate's mount")
    if not checkpoint.startswith("s3://") and not any(checkpoint.startswith(path + "/") and name in claims for path, name in mounts.items()):
        fail(f"checkpoints {checkpoint!r} are on no persistent volume")

    # The pipeline.
    args = container.get("args", [])
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    config = volumes.get(mounts.get("/etc/tidewatch", ""), {}).get("configMap", {}).get("name")
    cm = config and named("ConfigMap", config)
    if args[:2] != ["run", "/etc/tidewatch/pipeline.toml"] or cm is None:
        fail("expected `run /etc/tidewatch/pipeline.toml` from a ConfigMap mounted at /etc/tidewatch")
    elif cm["data"].get("pipeline.toml") != open(pipeline_path).read():
        fail(f"ConfigMap {config}: pipeline.toml is not {pipeline_path}")
    if "--http-address" not in args or args[args.index("--http-address") + 1] != "0.0.0.0:9898":
        fail("expected --http-address 0.0.0.0:9898")

    # Credentials: from Secrets only.
    secretish = ("SECRET", "PASSWORD", "TOKEN", "ACCESS_KEY")
    for name, entry in env.items():
        if any(word in name for word in secretish) and "value" in entry:
            fail(f"env {name} has a plain value: reference a Secret")
    for name in settings:
        if any(word in name for word in secretish):
            fail(f"settings ConfigMap holds {name}: put it in a Secret")

    print(f"ok   {overlay}: {replicas} replica(s) = TIDEWATCH_PROCESSES, headless Service {spec['serviceName']}:{port}, "
          f"checkpoints {checkpoint}, image {container['image']}")


for overlay, rendered, pipeline in zip(rest[0::3], rest[1::3], rest[2::3]):
    check(overlay, rendered, pipeline)
for failure in failures:
    print(f"FAIL: {failure}")
sys.exit(1 if failures else 0)
PY

step "4. promtool check rules (the rendered PrometheusRule's groups)"
if command -v promtool >/dev/null 2>&1; then
  for overlay in "${overlays[@]}"; do
    [ -f "$tmp/$overlay-rules.yml" ] || continue
    if promtool check rules "$tmp/$overlay-rules.yml" > "$tmp/promtool.out" 2>&1; then
      echo "ok   $overlay: $(grep -o 'SUCCESS: [0-9]* rules found' "$tmp/promtool.out")"
    else
      cat "$tmp/promtool.out"
      fail "$overlay: promtool check rules"
    fi
  done
else
  echo "skipped: no promtool (apt-get install prometheus, or scripts/services.sh start prometheus)"
fi

step "5. tidewatch validate (each overlay's pipeline.toml with its settings)"
tidewatch=${TIDEWATCH_BIN:-}
if [ -z "$tidewatch" ]; then
  for candidate in "${CARGO_TARGET_DIR:-target}/release/tidewatch" "${CARGO_TARGET_DIR:-target}/debug/tidewatch"; do
    if [ -x "$candidate" ]; then tidewatch=$candidate; break; fi
  done
fi
if [ -n "$tidewatch" ]; then
  for overlay in "${overlays[@]}"; do
    [ -f "$tmp/$overlay.env" ] || continue
    # shellcheck disable=SC2046 # KEY=VALUE words, no spaces in them
    if env $(cat "$tmp/$overlay.env") "$tidewatch" validate "k8s/overlays/$overlay/pipeline.toml" > "$tmp/validate.out" 2>&1; then
      echo "ok   $(cat "$tmp/validate.out")"
    else
      cat "$tmp/validate.out"
      fail "$overlay: tidewatch validate"
    fi
  done
else
  echo "skipped: no tidewatch binary (cargo build, or TIDEWATCH_BIN=...)"
fi

step "6. the issue's check, as written"
export PATH=$venv/bin:$bin:$PATH
# Its exit status is the last overlay's (step 2 checks each one, and every version).
# shellcheck disable=SC2016 # printed and run as written
echo '$ for o in k8s/overlays/*/; do kubectl kustomize "$o" | kubernetes-validate --strict -; done'
# shellcheck disable=SC2016
if bash -c 'for o in k8s/overlays/*/; do kubectl kustomize "$o" | kubernetes-validate --strict -; done' > "$tmp/loop.out" 2>&1; then
  sed 's/^/     /' "$tmp/loop.out"
  echo "ok   exit 0"
else
  cat "$tmp/loop.out"
  fail "the issue's loop"
fi

echo
if [ "$failed" -ne 0 ]; then
  echo "k8s-validate: FAILED"
  exit 1
fi
echo "k8s-validate: all checks passed"
