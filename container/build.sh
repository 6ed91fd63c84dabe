#!/usr/bin/env bash
# Builds the Remora sidecar image from a release binary (see container/Containerfile).
#
#   container/build.sh [BINARY] [TAG]
#
# BINARY defaults to $CARGO_TARGET_DIR/release/remora (or target/release/remora), built with
# `cargo build --release -p remora --bin remora` when missing; TAG defaults to localhost/remora:latest.
# Extra buildah global options (e.g. --root DIR --runroot DIR for a private store) come from $BUILDAH_OPTS.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
bin=${1:-$target/release/remora}
tag=${2:-localhost/remora:latest}
if [ ! -x "$bin" ]; then
  (cd "$root" && cargo build --release -p remora --bin remora)
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
rootfs=$stage/rootfs
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc/envoy" "$rootfs/tmp"
chmod 1777 "$rootfs/tmp"
# The release profile keeps line tables (debug = 1) for backtraces; the image does not need the rest.
if command -v objcopy >/dev/null 2>&1; then
  objcopy --strip-debug "$bin" "$rootfs/usr/local/bin/remora"
else
  cp "$bin" "$rootfs/usr/local/bin/remora"
fi
chmod 0755 "$rootfs/usr/local/bin/remora"
ln -s remora "$rootfs/usr/local/bin/envoy"

# The shared libraries the binary links, at the paths the loader looks for them (ldd: `name => /path (addr)`
# lines, and the loader's own absolute path).
ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u | while read -r lib; do
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done

# Users as in Envoy's image (envoy is 101), for tools that map uids to names.
printf 'root:x:0:0:root:/root:/sbin/nologin\nenvoy:x:101:101:envoy:/nonexistent:/sbin/nologin\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\nenvoy:x:101:\n' >"$rootfs/etc/group"
printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"

# The default config: the embedded development proxy, with the admin on all interfaces (as Envoy's image has
# it) so that probes from outside the container reach /ready.
sed 's/socket_address: { address: 127.0.0.1, port_value: 9901 }/socket_address: { address: 0.0.0.0, port_value: 9901 }/' \
  "$root/config/default.yaml" >"$rootfs/etc/envoy/envoy.yaml"
grep -q 'address: 0.0.0.0, port_value: 9901' "$rootfs/etc/envoy/envoy.yaml" || {
  echo "build.sh: config/default.yaml's admin address changed: update the sed above" >&2
  exit 1
}
chmod -R a+rX "$rootfs"

cp "$root/container/Containerfile" "$stage/Containerfile"
# shellcheck disable=SC2086
buildah ${BUILDAH_OPTS:-} --storage-driver vfs bud --quiet -f "$stage/Containerfile" -t "$tag" "$stage"
