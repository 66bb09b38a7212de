#!/usr/bin/env bash
# Lets the kernel run another architecture's binaries through Debian's qemu-user-static, also inside a
# chroot (flag F: the interpreter is opened once, when registered), for building and running the image's
# foreign half. Usage: scripts/image/binfmt.sh <arch or linux/arch>...   (the host's own arch is skipped)
set -euo pipefail
host="$(dpkg --print-architecture)"
dir=/proc/sys/fs/binfmt_misc
for arch in "$@"; do
  arch="${arch#linux/}"
  [[ "$arch" == "$host" ]] && continue
  case "$arch" in
    amd64) qemu=x86_64 ;;
    arm64) qemu=aarch64 ;;
    *) echo "binfmt: no qemu-user mapping for $arch" >&2; exit 1 ;;
  esac
  [[ -e "$dir/register" ]] || mount -t binfmt_misc binfmt_misc "$dir"
  if [[ ! -e "$dir/qemu-$qemu" ]]; then
    conf="/usr/lib/binfmt.d/qemu-$qemu.conf"
    [[ -r "$conf" ]] || { echo "binfmt: $conf is missing: install qemu-user-static" >&2; exit 1; }
    # EEXIST when another process registered it meanwhile: fine, checked below.
    grep -v '^#' "$conf" | head -n 1 | tr -d '\n' > "$dir/register" 2>/dev/null || true
  fi
  if ! grep -qx enabled "$dir/qemu-$qemu" || ! grep -q '^flags: .*F' "$dir/qemu-$qemu"; then
    echo "binfmt: $dir/qemu-$qemu is disabled or lacks flag F, so $arch binaries cannot run in a chroot:" >&2
    cat "$dir/qemu-$qemu" >&2
    exit 1
  fi
done
