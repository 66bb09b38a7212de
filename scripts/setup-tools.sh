#!/usr/bin/env bash
# Debian packages the test tiers use, listed in scripts/debian-tools.txt. Idempotent: installs only
# what is missing, so a developer machine that has them pays nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
while read -r probe pkg; do
  [[ -z "$probe" || "$probe" == \#* ]] && continue
  if [[ "$probe" == /* ]]; then [[ -e "$probe" ]] && continue
  else command -v "$probe" >/dev/null 2>&1 && continue; fi
  need+=("$pkg")
done < scripts/debian-tools.txt
if ((${#need[@]})); then
  if [ "$(id -u)" != 0 ]; then echo "setup-tools: need root to install: ${need[*]}" >&2; exit 1; fi
  echo "setup-tools: installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
