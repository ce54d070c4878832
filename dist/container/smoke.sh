#!/usr/bin/env bash
# Smoke test of a built image: the binary starts with only the libraries in the image, and the
# bundled default model loads and decides (a short simulation of rr-latency with it); podman runs
# it with a read-only root and no network, buildah (chroot isolation) in the host network.
#   dist/container/smoke.sh [image]            # default: localhost/moderato:<crate version>
set -euo pipefail
cd "$(dirname "$0")/../.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
image=${1:-localhost/moderato:$version}
builder=${BUILDER:-$(command -v podman || command -v buildah || true)}
share=/usr/share/moderato

run() {
  case "$(basename "$builder")" in
    podman) podman ${BUILD_FLAGS:-} run --rm --network none --read-only "$image" "$@" ;;
    buildah)
      ctr=$(buildah ${BUILD_FLAGS:-} from --pull-never "$image")
      status=0
      buildah ${BUILD_FLAGS:-} run --isolation chroot "$ctr" -- /usr/local/bin/moderato "$@" || status=$?
      buildah ${BUILD_FLAGS:-} rm "$ctr" >/dev/null
      return $status
      ;;
    *) echo "smoke.sh: needs podman or buildah" >&2; return 1 ;;
  esac
}

out=$(run --version)
echo "$out"
case "$out" in moderato*) ;; *) echo "smoke.sh: unexpected --version output" >&2; exit 1 ;; esac
out=$(run simulate "$share/scenarios/rr-latency.toml" --settings "$share/models/default" --seconds 0.05 --quiet)
echo "$out"
case "$out" in *"under $share/models/default"*) ;; *) echo "smoke.sh: the simulation printed no summary of $share/models/default" >&2; exit 1 ;; esac
echo "smoke test of $image passed"
