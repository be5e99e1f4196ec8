#!/usr/bin/env bash
# Installs the Debian packages hopvm's build and tests need on a fresh machine (idempotent).
# Test guests are built with gcc/binutils; the real-kernel test unpacks Debian's kernel package.
set -euo pipefail
need=()
for cmd_pkg in gcc:gcc as:binutils objcopy:binutils dpkg-deb:dpkg cpio:cpio; do
    cmd=${cmd_pkg%%:*} pkg=${cmd_pkg##*:}
    command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ ! -c /dev/kvm ]; then
    echo "warning: /dev/kvm is missing: the VM tests will fail" >&2
fi
