#!/usr/bin/env bash
# Builds (once) what the VM test tier boots: Debian's kernel and modules, netdevsim built out of tree from
# linux-source, and a busybox initramfs that mounts the host root over 9p. Everything lands in
#   $1 (default <repo>/.cache/vm)/<kernel-version>/
# and a "current" symlink names the last complete build. Re-running with a complete build present costs nothing.
# Needs: apt-get (Debian registry), dpkg-deb, make, gcc, depmod (kmod), cpio.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
cache="${1:-$repo/.cache/vm}"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"
# Rebuild when this script (which also holds the guest's /init) changes.
stamp="$(sha256sum "$0" | cut -c1-16)"

if [[ -z "${VM_REBUILD:-}" && -e "$cache/current/READY" && "$(cat "$cache/current/READY")" == "$stamp" ]]; then
  echo "vm-assets: up to date: $(readlink -f "$cache/current")"
  exit 0
fi

log() { echo "vm-assets: $*" >&2; }

# Kernel version: the one Debian's linux-image-amd64 metapackage names (6.1.x on bookworm).
resolve_kver() {
  apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{sub("linux-image-","",$2); print $2; exit}'
}
kver="$(resolve_kver)"
if [[ -z "$kver" ]]; then
  log "apt lists empty: apt-get update"
  apt-get update -qq
  kver="$(resolve_kver)"
fi
[[ -n "$kver" ]] || { log "cannot resolve linux-image-amd64's kernel version"; exit 1; }
kseries="${kver%%-*}"                      # 6.1.0
kmajor="$(echo "$kseries" | cut -d. -f1-2)" # 6.1
common="linux-headers-${kver%-amd64}-common"
out="$cache/$kver"
log "kernel $kver -> $out"
rm -rf "$out.tmp"
mkdir -p "$cache/debs" "$out.tmp"

# 1. Debian packages (kept in debs/ across rebuilds).
pkgs=("linux-image-$kver" "linux-headers-$kver" "$common" "linux-kbuild-$kmajor" "linux-source-$kmajor" busybox-static)
missing=()
for p in "${pkgs[@]}"; do compgen -G "$cache/debs/${p}_*.deb" >/dev/null || missing+=("$p"); done
if ((${#missing[@]})); then
  log "apt-get download ${missing[*]}"
  (cd "$cache/debs" && apt-get download -q "${missing[@]}" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
  for p in "${missing[@]}"; do
    compgen -G "$cache/debs/${p}_*.deb" >/dev/null || { log "download of $p failed"; exit 1; }
  done
fi

# 2. Extract: kernel, modules, headers, kbuild, busybox. Only netdevsim's sources from the source tarball.
root="$out.tmp/root"
mkdir -p "$root"
for p in "${pkgs[@]}"; do
  [[ "$p" == "linux-source-$kmajor" ]] && continue
  deb=("$cache"/debs/"${p}"_*.deb)
  dpkg-deb -x "${deb[-1]}" "$root"
done
src=("$cache"/debs/linux-source-"${kmajor}"_*.deb)
dpkg-deb --fsys-tarfile "${src[-1]}" | tar -xO --wildcards './usr/src/linux-source-*.tar.xz' \
  | tar -xJ -C "$out.tmp" --strip-components=3 --wildcards "linux-source-$kmajor/drivers/net/netdevsim"

# 3. netdevsim, out of tree. The headers' Makefile includes the common tree by absolute path: point it here.
hdr="$root/usr/src/linux-headers-$kver"
sed -i "s|^include /usr/src/|include $root/usr/src/|" "$hdr/Makefile"
log "building netdevsim"
make -s -C "$hdr" M="$out.tmp/netdevsim" CONFIG_NETDEVSIM=m modules -j"$(nproc)" 2>&1 \
  | grep -v 'Skipping BTF generation' >&2 || true
[[ -f "$out.tmp/netdevsim/netdevsim.ko" ]] || { log "netdevsim build failed"; exit 1; }
mkdir -p "$root/lib/modules/$kver/extra"
cp "$out.tmp/netdevsim/netdevsim.ko" "$root/lib/modules/$kver/extra/"
depmod -b "$root" "$kver"

# 4. initramfs: busybox, the modules that reach the 9p share, and /init.
ird="$out.tmp/initramfs"
mkdir -p "$ird"/{bin,dev,proc,sys,host}
cp "$root/bin/busybox" "$ird/bin/busybox"
modprobe -d "$root" -S "$kver" --show-depends -a virtio_pci 9pnet_virtio 9p \
  | awk '$1=="insmod"{print $2}' | awk '!seen[$0]++' > "$out.tmp/initramfs-modules"
: > "$ird/modules"
while read -r ko; do
  cp "$ko" "$ird/$(basename "$ko")"
  basename "$ko" >> "$ird/modules"
done < "$out.tmp/initramfs-modules"
cat > "$ird/init" <<'INIT'
#!/bin/busybox sh
# Guest PID 1: mount the host root read-only (9p tag "hostroot") and the results share (tag "results"),
# then run /tmp/vm/run.sh chrooted into the host root, and power off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules); do insmod "/$m" || echo "vm-init: insmod $m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /host || { echo "vm-init: cannot mount host root"; poweroff -f; }
mkdir -p /ro
mount -o bind /host /ro  # the host root as it is, before tmpfs mounts cover /tmp and /run
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t devtmpfs dev /host/dev
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs shm /host/dev/shm
mount -t tmpfs tmp /host/tmp
mount -t tmpfs run /host/run
mkdir -p /host/tmp/vm
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results /host/tmp/vm || { echo "vm-init: cannot mount results"; poweroff -f; }
# A checkout under /tmp or /run (a CI clone, say) is hidden by the tmpfs above: bind it back.
if [ -f /host/tmp/vm/binds ]; then
  while read -r p; do
    [ -z "$p" ] && continue
    mkdir -p "/host$p" && mount -o bind "/ro$p" "/host$p" || echo "vm-init: cannot bind $p"
  done < /host/tmp/vm/binds
fi
echo "vm-init: running /tmp/vm/run.sh"
chroot /host /bin/sh /tmp/vm/run.sh
echo "$?" > /host/tmp/vm/exit-code
sync
echo "vm-init: done"
poweroff -f
INIT
chmod 755 "$ird/init"
(cd "$ird" && find . | cpio -o -H newc --quiet | gzip -1) > "$out.tmp/initramfs.cpio.gz"

# 5. Keep only what the VM needs: kernel, initramfs, the module tree (read by the guest's modprobe -d).
mkdir -p "$out.tmp/modroot/lib/modules"
mv "$root/lib/modules/$kver" "$out.tmp/modroot/lib/modules/"
mv "$root/boot/vmlinuz-$kver" "$out.tmp/vmlinuz"
rm -rf "$root" "$ird" "$out.tmp/netdevsim"
echo "$kver" > "$out.tmp/KVER"
echo "$stamp" > "$out.tmp/READY"
rm -rf "$out"
mv "$out.tmp" "$out"
ln -sfn "$kver" "$cache/current"
log "ready: $out"
