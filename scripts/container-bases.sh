#!/usr/bin/env bash
# Stand-in base images for the Containerfile, for machines that reach no container registry.
#
# THE REAL BUILD PULLS THE OFFICIAL IMAGES. `podman build -f Containerfile .` on a machine with a
# registry takes docker.io/library/rust:1.95-slim-bookworm, python:3.11-slim-bookworm and
# debian:bookworm-slim from Docker Hub; this script is not part of that build and changes
# nothing in the Containerfile. It only exists because the development machine reaches Debian's
# package mirror, PyPI and crates.io but no registry (docker.io cannot be pulled), so that the
# Containerfile can still be built and measured here. Run it as root, once, before
# `podman build`; run it again and it does nothing (it skips every tag that already exists;
# FORCE=1 makes them anew).
#
# It makes, in podman's local storage (no registry, nothing pushed), under the exact names the
# Containerfile's FROM lines use:
#
#   docker.io/library/debian:bookworm-slim
#       `debootstrap --variant=minbase bookworm` from the Debian mirror ($MIRROR, by default the
#       machine's apt mirror http://deb.debian.org/debian), imported with `podman import`, then
#       upgraded from bookworm, bookworm-updates and bookworm-security and trimmed the way the
#       official slim image is (dpkg excludes docs, man pages and locales; apt keeps no lists or
#       caches). It is not byte-for-byte the official image: a minbase debootstrap of the same
#       release, its size within some megabytes of it.
#   docker.io/library/rust:1.95-slim-bookworm
#       the stand-in debian:bookworm-slim with what the official rust slim image installs
#       (ca-certificates, gcc, libc6-dev), its environment (RUSTUP_HOME=/usr/local/rustup,
#       CARGO_HOME=/usr/local/cargo, PATH, RUST_VERSION) and a Rust 1.95.0 toolchain COPIED FROM
#       THIS MACHINE's rustup ($RUST_TOOLCHAIN_DIR, default the host toolchain that reports
#       rustc 1.95.0; its docs left out) with the host's rustup binary as proxy, instead of
#       rustup-init downloading it from static.rust-lang.org.
#   docker.io/library/python:3.11-slim-bookworm
#       the stand-in debian:bookworm-slim with Debian's python3 (3.11.2) and python3-pip, instead
#       of the official image's own CPython 3.11 build under /usr/local. The Containerfile only
#       needs `pip download` and `python3` from it.
#
# TLS through an intercepting egress proxy: where the machine reaches crates.io and PyPI only
# through a proxy whose CA it trusts in its system bundle, cargo and pip in the builder stages
# need that CA too. The script takes the certificates of the host's bundle
# ($HOST_CA_BUNDLE, default /etc/ssl/certs/ca-certificates.crt) that are not Debian's
# (/usr/share/ca-certificates), i.e. the machine's local additions, and adds them to the rust and
# python stand-ins only (/usr/local/share/ca-certificates, update-ca-certificates). The debian
# stand-in, and so the runtime image, gets none of them. On a machine without such
# additions nothing is added.
#
# Every stand-in carries the label org.tidewatch.stand-in=scripts/container-bases.sh, so
# `podman image inspect` tells it from an official image. To go back to the official images on a
# machine with a registry: `podman rmi` the three tags and `podman build --pull ...`.
#
# Environment:
#   MIRROR             Debian mirror for debootstrap (default http://deb.debian.org/debian)
#   WORKDIR            scratch folder for the root file system (default
#                      /var/tmp/tidewatch-container-bases; removed at the end)
#   RUST_TOOLCHAIN_DIR the toolchain to copy (default: rustup's 1.95.0 toolchain)
#   HOST_CA_BUNDLE     the host's CA bundle, for its local additions (above)
#   FORCE=1            make the images anew even if the tags exist
#   CONTAINERS_CONF    podman's and buildah's configuration; when a plain `podman run` fails on
#                      this machine, the script uses scripts/containers.conf (runc, lower
#                      ulimits; see that file) and says so: pass the same CONTAINERS_CONF to
#                      `podman build` and `podman run` then.
#
# Needs: podman, buildah, debootstrap (apt-get install -y podman buildah debootstrap; runc too
# where scripts/containers.conf is needed), root.
set -euo pipefail

MIRROR=${MIRROR:-http://deb.debian.org/debian}
WORKDIR=${WORKDIR:-/var/tmp/tidewatch-container-bases}
RUST_VERSION=1.95.0
RUST_TOOLCHAIN_DIR=${RUST_TOOLCHAIN_DIR:-${RUSTUP_HOME:-$HOME/.rustup}/toolchains/$RUST_VERSION-x86_64-unknown-linux-gnu}
FORCE=${FORCE:-0}
HOST_CA_BUNDLE=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

DEBIAN=docker.io/library/debian:bookworm-slim
RUST=docker.io/library/rust:1.95-slim-bookworm
PYTHON=docker.io/library/python:3.11-slim-bookworm
LABEL=org.tidewatch.stand-in=scripts/container-bases.sh
PATH_ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() { printf '[container-bases] %s\n' "$*" >&2; }
have() { [ "$FORCE" != 1 ] && podman image exists "$1"; }

[ "$(id -u)" = 0 ] || { log "run as root (debootstrap, buildah mount)"; exit 1; }
for tool in podman buildah debootstrap; do
    command -v "$tool" >/dev/null || { log "missing $tool: apt-get install -y podman buildah debootstrap"; exit 1; }
done

# A working container left by a failed step is removed on the way out.
ctr=
trap '[ -z "$ctr" ] || buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT

HERE=$(cd "$(dirname "$0")" && pwd)
STAGE1=localhost/tidewatch-debootstrap:bookworm

# Can podman start a container here with its defaults? If not, try scripts/containers.conf.
runs() { podman run --rm "$1" true >/dev/null 2>&1; }
check_runtime() {
    runs "$1" && return 0
    if [ -z "${CONTAINERS_CONF:-}" ]; then
        export CONTAINERS_CONF=$HERE/containers.conf
        if runs "$1"; then
            log "podman's defaults cannot start a container here; using CONTAINERS_CONF=$CONTAINERS_CONF"
            log "  (pass it to podman build and podman run too)"
            return 0
        fi
    fi
    log "podman cannot start a container here:"; podman run --rm "$1" true || true
    exit 1
}

# --- debian:bookworm-slim --------------------------------------------------------------------
if have "$DEBIAN"; then
    log "$DEBIAN exists (FORCE=1 to remake it)"
elif podman image exists "$STAGE1" && [ "$FORCE" != 1 ]; then
    log "$STAGE1 (the imported debootstrap) exists: finishing it"
else
    rootfs=$WORKDIR/rootfs
    rm -rf "$rootfs"
    mkdir -p "$WORKDIR"
    log "debootstrap --variant=minbase bookworm from $MIRROR"
    debootstrap --variant=minbase --arch=amd64 bookworm "$rootfs" "$MIRROR"
    # The official image's apt sources (deb822), with the security suite.
    rm -f "$rootfs/etc/apt/sources.list"
    cat > "$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # What debuerreotype does to the official slim images: no docs (but copyrights), man pages,
    # locales; apt drops its caches after every run and installs no suggests.
    cat > "$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
    cat > "$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    printf 'Apt::AutoRemove::SuggestsImportant "false";\n' > "$rootfs/etc/apt/apt.conf.d/docker-autoremove-suggests"
    printf 'Acquire::Languages "none";\n' > "$rootfs/etc/apt/apt.conf.d/docker-no-languages"
    find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "$rootfs"/usr/share/{man,groff,info,lintian,linda}/*
    find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/cache/debconf/*-old \
        "$rootfs"/var/log/{apt,dpkg.log,bootstrap.log,alternatives.log} "$rootfs"/tmp/*
    log "podman import -> $DEBIAN (intermediate)"
    tar -C "$rootfs" --numeric-owner -cf - . \
        | podman import --change "ENV $PATH_ENV" --change 'CMD ["bash"]' - "$STAGE1"
    rm -rf "$rootfs"
fi
if ! have "$DEBIAN"; then
    check_runtime "$STAGE1"
    # Bring it to the current point releases and security updates, as the official image is.
    ctr=$(buildah from "$STAGE1")
    buildah run "$ctr" -- sh -c 'apt-get update && DEBIAN_FRONTEND=noninteractive apt-get -y upgrade \
        && apt-get clean && rm -rf /var/lib/apt/lists/* /var/log/apt/* /var/log/dpkg.log'
    buildah config --label "$LABEL" --env "$PATH_ENV" --cmd bash "$ctr"
    buildah commit --rm --squash "$ctr" "$DEBIAN"
    ctr=
    podman rmi "$STAGE1" >/dev/null || log "kept $STAGE1 (a container still uses it)"
fi
check_runtime "$DEBIAN"

# The host's local CAs (not Debian's), one PEM file each, into a builder stand-in's
# /usr/local/share/ca-certificates.
add_local_cas() {
    local ctr=$1 dir n
    [ -r "$HOST_CA_BUNDLE" ] || return 0
    dir=$(mktemp -d)
    python3 - "$HOST_CA_BUNDLE" /usr/share/ca-certificates "$dir" <<'PY'
import pathlib, re, sys
pem = lambda text: re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", text, re.S)
known = set()
for path in pathlib.Path(sys.argv[2]).rglob("*.crt"):
    known.update(pem(path.read_text(errors="replace")))
local = [c for c in pem(pathlib.Path(sys.argv[1]).read_text(errors="replace")) if c not in known]
for i, cert in enumerate(local):
    pathlib.Path(sys.argv[3], f"host-local-ca-{i}.crt").write_text(cert + "\n")
PY
    n=$(find "$dir" -name '*.crt' | wc -l)
    if [ "$n" -gt 0 ]; then
        log "adding the host's $n local CA certificate(s) (TLS to crates.io/PyPI through the machine's proxy):"
        for f in "$dir"/*.crt; do openssl x509 -in "$f" -noout -subject >&2 || true; done
        buildah copy "$ctr" "$dir" /usr/local/share/ca-certificates/ >/dev/null
        buildah run "$ctr" -- update-ca-certificates
        buildah config --label "org.tidewatch.stand-in.local-cas=$n" "$ctr"
    fi
    rm -rf "$dir"
}

# --- rust:1.95-slim-bookworm -----------------------------------------------------------------
if have "$RUST"; then
    log "$RUST exists (FORCE=1 to remake it)"
else
    [ -x "$RUST_TOOLCHAIN_DIR/bin/rustc" ] || { log "no toolchain at $RUST_TOOLCHAIN_DIR (rustup toolchain install $RUST_VERSION)"; exit 1; }
    got=$("$RUST_TOOLCHAIN_DIR/bin/rustc" --version)
    case "$got" in "rustc $RUST_VERSION "*) ;; *) log "$RUST_TOOLCHAIN_DIR is $got, not $RUST_VERSION"; exit 1 ;; esac
    rustup_bin=$(command -v rustup || echo "$HOME/.cargo/bin/rustup")
    rustup_bin=$(readlink -f "$rustup_bin")
    ctr=$(buildah from "$DEBIAN")
    # As the official Dockerfile (minus wget, which it only uses to fetch rustup-init).
    buildah run "$ctr" -- sh -c 'apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*'
    add_local_cas "$ctr"
    mnt=$(buildah mount "$ctr")
    tc=$mnt/usr/local/rustup/toolchains/$RUST_VERSION-x86_64-unknown-linux-gnu
    mkdir -p "$tc" "$mnt/usr/local/cargo/bin"
    log "copying $RUST_TOOLCHAIN_DIR ($got) without its docs"
    tar -C "$(readlink -f "$RUST_TOOLCHAIN_DIR")" --exclude=./share/doc -cf - . | tar -C "$tc" -xf -
    rm -f "$tc/lib/rustlib/manifest-rust-docs-x86_64-unknown-linux-gnu"
    sed -i '/^rust-docs-/d' "$tc/lib/rustlib/components"
    cat > "$mnt/usr/local/rustup/settings.toml" <<EOF
version = "12"
default_toolchain = "$RUST_VERSION-x86_64-unknown-linux-gnu"
profile = "minimal"
auto_self_update = "disable"

[overrides]
EOF
    install -m 0755 "$rustup_bin" "$mnt/usr/local/cargo/bin/rustup"
    for proxy in cargo cargo-clippy cargo-fmt clippy-driver rustc rustdoc rustfmt rust-gdb rust-gdbgui rust-lldb; do
        ln -sf rustup "$mnt/usr/local/cargo/bin/$proxy"
    done
    chmod -R a+w "$mnt/usr/local/rustup" "$mnt/usr/local/cargo"
    buildah umount "$ctr" >/dev/null
    buildah config --label "$LABEL" \
        --env RUSTUP_HOME=/usr/local/rustup --env CARGO_HOME=/usr/local/cargo \
        --env PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env RUST_VERSION=$RUST_VERSION --cmd bash "$ctr"
    buildah run "$ctr" -- sh -c 'rustup --version && cargo --version && rustc --version'
    buildah commit --rm "$ctr" "$RUST"
    ctr=
fi

# --- python:3.11-slim-bookworm ---------------------------------------------------------------
if have "$PYTHON"; then
    log "$PYTHON exists (FORCE=1 to remake it)"
else
    ctr=$(buildah from "$DEBIAN")
    buildah run "$ctr" -- sh -c 'apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates python3 python3-pip \
        && rm -rf /var/lib/apt/lists/* \
        && ln -s /usr/bin/python3 /usr/local/bin/python \
        && python3 --version && pip --version'
    add_local_cas "$ctr"
    buildah config --label "$LABEL" --env LANG=C.UTF-8 --cmd python3 "$ctr"
    buildah commit --rm "$ctr" "$PYTHON"
    ctr=
fi

rmdir "$WORKDIR" 2>/dev/null || true
for image in "$DEBIAN" "$RUST" "$PYTHON"; do
    printf '%s\t%s\t%s\n' "$image" "$(podman image inspect --format '{{.Id}}' "$image" | cut -c1-12)" \
        "$(podman image inspect --format '{{.Size}}' "$image") bytes"
done
[ -z "${CONTAINERS_CONF:-}" ] || log "build and run with CONTAINERS_CONF=$CONTAINERS_CONF"
