#!/usr/bin/env bash
# A Python 3.11 base image made from Debian packages alone, for building the Dockerfile where the
# registry its FROM names (python:3.11-slim-bookworm) cannot be reached. Same OS (bookworm), same
# Python minor version, pip on PATH as `pip`, `python` next to `python3` in /usr/local/bin: what
# the Dockerfile relies on. Usage (buildah reads CONTAINERS_STORAGE_CONF as usual):
#
#   scripts/image/python-base.sh <amd64|arm64> <image name>
#
# A foreign architecture's second debootstrap stage runs under qemu-user. Needs root, debootstrap,
# buildah and (for a foreign arch) qemu-user-static.
set -euo pipefail
arch="$1" name="$2"
"$(dirname "$0")/binfmt.sh" "$arch"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
suite=bookworm

ctr="$(buildah from --arch "$arch" scratch)"
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
root="$(buildah mount "$ctr")"

debootstrap --variant=minbase --arch="$arch" --include=python3,python3-pip,python3-venv,ca-certificates \
  "$suite" "$root" "$mirror" >&2

# The apt sources of the official Debian images (deb822, with updates and security).
rm -f "$root/etc/apt/sources.list"
cat > "$root/etc/apt/sources.list.d/debian.sources" <<SOURCES
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror%/debian}/debian-security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
# What debuerreotype puts into debian:bookworm-slim, which the python:*-slim images start from: apt
# keeps no package caches (an `apt-get update` in a Dockerfile leaves ~80 MB of them otherwise) and
# dpkg skips documentation. The files already unpacked get the same treatment.
cat > "$root/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT
echo 'Acquire::Languages "none";' > "$root/etc/apt/apt.conf.d/docker-no-languages"
echo 'Acquire::GzipIndexes "true";' > "$root/etc/apt/apt.conf.d/docker-gzip-indexes"
echo 'Apt::AutoRemove::SuggestsImportant "false";' > "$root/etc/apt/apt.conf.d/docker-autoremove-suggests"
cat > "$root/etc/dpkg/dpkg.cfg.d/docker" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
DPKG
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$root"/usr/share/{groff,info,linda,lintian/overrides,locale,man}/*
# pip installs into the system interpreter, as it does in the official image (PEP 668 marker gone).
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
ln -s /usr/bin/python3 "$root/usr/local/bin/python"
ln -s /usr/bin/pip3 "$root/usr/local/bin/pip"
# What the slim images leave out: package lists, downloaded .debs, debootstrap's logs.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin \
  "$root"/var/log/bootstrap.log "$root"/debootstrap

buildah config --os linux --arch "$arch" $([[ "$arch" == arm64 ]] && echo --variant v8) \
  --env LANG=C.UTF-8 --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --cmd python3 --created-by "debootstrap --variant=minbase $suite ($arch): python3 python3-pip python3-venv" \
  "$ctr"
buildah umount "$ctr" >/dev/null
buildah commit --quiet --rm "$ctr" "$name"
trap - EXIT
