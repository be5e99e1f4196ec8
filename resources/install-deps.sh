#!/usr/bin/env bash
# Installs what hopvm's build and tests need on a fresh Debian machine (idempotent, quiet).
# Test guests are built with gcc/binutils (the upstream kvm-unit-tests with make too; its runner
# uses getopt); the real-kernel test unpacks Debian's kernel package;
# the QMP client tests use socat and the Python `qemu.qmp` library (from PyPI, in a virtual
# environment: $HOPVM_VENV, default /opt/hopvm-venv); `hopvm demo --transport netns` uses ip(8).
set -euo pipefail
need=()
for cmd_pkg in gcc:gcc as:binutils objcopy:binutils make:make getopt:util-linux dpkg-deb:dpkg cpio:cpio socat:socat \
    ip:iproute2 /usr/bin/python3:python3; do
    cmd=${cmd_pkg%%:*} pkg=${cmd_pkg##*:}
    command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
# Debian's python3 creates virtual environments only with python3-venv (it brings ensurepip).
if [ -x /usr/bin/python3 ] && ! /usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    need+=(python3-venv)
elif [ ! -x /usr/bin/python3 ]; then
    need+=(python3-venv)
fi
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    log=$(mktemp)
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq "${need[@]}"; } >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        exit 1
    fi
    rm -f "$log"
fi

venv=${HOPVM_VENV:-/opt/hopvm-venv}
qmp_version=0.0.6
if ! "$venv/bin/python" -c "import qemu.qmp, sys; from importlib.metadata import version; \
        sys.exit(version('qemu.qmp') != '$qmp_version')" >/dev/null 2>&1; then
    if [ -e "$venv" ] && [ ! -f "$venv/pyvenv.cfg" ]; then
        echo "error: $venv exists and is not a Python virtual environment" >&2
        exit 1
    fi
    echo "installing qemu.qmp $qmp_version into $venv"
    rm -rf "$venv"
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "qemu.qmp==$qmp_version"
fi

if [ ! -c /dev/kvm ]; then
    echo "warning: /dev/kvm is missing: the VM tests will fail" >&2
fi
