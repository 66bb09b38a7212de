#!/usr/bin/env bash
# `make image`: the agent's image for linux/amd64 and linux/arm64, built with buildah from the Dockerfile
# into one manifest list, optionally pushed. Variables (all optional):
#
#   IMAGE         the manifest list's name; default: the reference daemonset/kustomization.yaml deploys
#                 (ghcr.io/sriov-rdma-agent/sriov-rdma-agent:<pyproject version>)
#   PLATFORMS     default linux/amd64,linux/arm64 (a foreign one needs qemu-user-static in binfmt_misc)
#   PYTHON_IMAGE  the base, passed as --build-arg; default the Dockerfile's pinned python:3.11 slim image
#   CA_BUNDLE     a CA bundle the RUN steps trust instead of the base's own (a TLS-intercepting proxy);
#                 bind-mounted over /etc/ssl/certs/ca-certificates.crt for the build only, never written
#                 into the image. Debian's apt and pip read that file.
#   PUSH=1        push the list and every image in it to docker://$IMAGE
#
# Further arguments go to `buildah bud`. Not --layers with buildah 1.28: its layer cache ignores what
# `RUN --mount=type=bind` mounts (a changed lock file or agent would be missed) and mounts an empty
# directory when the `from=` stage came wholly from the cache.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)"
image="${IMAGE:-ghcr.io/sriov-rdma-agent/sriov-rdma-agent:$version}"
platforms="${PLATFORMS:-linux/amd64,linux/arm64}"

command -v buildah >/dev/null || { echo "build.sh: buildah not found (Debian: apt-get install buildah qemu-user-static)" >&2; exit 1; }
IFS=, read -ra wanted <<< "$platforms"
"$repo/scripts/image/binfmt.sh" "${wanted[@]}"

args=(--isolation chroot --platform "$platforms" --jobs 2 --manifest "$image")
if [[ -n "${PYTHON_IMAGE:-}" ]]; then args+=(--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE"); fi
if [[ -n "${CA_BUNDLE:-}" ]]; then args+=(--volume "$(readlink -f "$CA_BUNDLE"):/etc/ssl/certs/ca-certificates.crt:ro"); fi

# --manifest adds to an existing list: start from an empty one so the list holds this build only.
buildah manifest rm "$image" >/dev/null 2>&1 || true
buildah bud "${args[@]}" "$@" "$repo"
echo "built $image ($platforms)"
if [[ "${PUSH:-}" == 1 ]]; then
  buildah manifest push --all "$image" "docker://$image"
  echo "pushed $image"
fi
