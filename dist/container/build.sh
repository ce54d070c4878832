#!/usr/bin/env bash
# Builds the moderato OCI image FROM scratch (dist/container/Containerfile) with podman or buildah;
# nothing is pulled from a registry. The root filesystem is staged from this checkout: the release
# binary, the shared libraries `ldd` says it links (at their paths, the dynamic loader included),
# models/default, experiments/deploy/*.toml and experiments/scenarios/*.toml under
# /usr/share/moderato.
#
#   dist/container/build.sh [image]          # default image: localhost/moderato:<crate version>
#   BUILDER=buildah dist/container/build.sh  # pick the tool (default: podman, else buildah)
#   BUILD_FLAGS="--storage-driver vfs"       # extra flags for the builder (e.g. in CI containers)
set -euo pipefail
cd "$(dirname "$0")/../.."

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
image=${1:-localhost/moderato:$version}
builder=${BUILDER:-$(command -v podman || command -v buildah || true)}
if [ -z "$builder" ]; then
  echo "build.sh: needs podman or buildah (Debian: apt-get install podman, or buildah)" >&2
  exit 1
fi

bin=target/release/moderato
if [ ! -x "$bin" ]; then
  cargo build --release -p moderato-agent --bin moderato
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
root=$ctx/rootfs
install -D -m 0755 "$bin" "$root/usr/local/bin/moderato"
# The release profile keeps line tables for profiling; the image does not need them.
if command -v strip >/dev/null 2>&1; then
  strip --strip-debug "$root/usr/local/bin/moderato"
fi
# The libraries and the loader, copied (symlinks followed) to the paths the binary asks for.
libs=$(ldd "$bin" | grep -o '/[^ )]*' | sort -u)
if [ -z "$libs" ]; then
  echo "build.sh: ldd lists no libraries for $bin (a static binary needs none; check the build)" >&2
fi
for lib in $libs; do
  install -D -m 0755 "$lib" "$root$lib"
done
share=$root/usr/share/moderato
install -D -m 0644 -t "$share/models/default" models/default/model.json models/default/actor.bpk
install -D -m 0644 -t "$share/deploy" experiments/deploy/*.toml
install -D -m 0644 -t "$share/scenarios" experiments/scenarios/*.toml
# Mount points: the config, a model, the state directory, a scratch directory.
mkdir -p "$root/etc/moderato" "$root/var/lib/moderato/model" "$root/run/moderato" "$root/tmp"
cp dist/container/Containerfile "$ctx/Containerfile"

# shellcheck disable=SC2086  # BUILD_FLAGS is a list of flags
"$builder" ${BUILD_FLAGS:-} build --pull=never -f "$ctx/Containerfile" -t "$image" "$ctx"
echo "built $image with $(basename "$builder")"
