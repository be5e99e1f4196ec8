#!/usr/bin/env bash
# hopvm under libvirt, end to end: installs Debian's libvirt (daemon, QEMU driver, clients) if
# missing, runs virtlogd and libvirtd as root without systemd (no security driver, cgroups or
# namespaces: the settings below, as in ../shared/reference/libvirt-9.0-qemu-7.2/config/), and
# drives hopvm's qemu-system-x86_64 link with virsh: domcapabilities (the probe), define and
# start a Multiboot test guest (its serial output must appear), suspend / resume, dominfo,
# domstats, a libvirtd restart (it reconnects), live migration to a second libvirtd "host" and
# back (native, --p2p, --p2p --tunnelled: resources/libvirt-migrate.sh; HOPVM_SKIP_LIBVIRT_MIGRATE=1
# leaves it out), destroy (SIGTERM ends hopvm), undefine.
# Daemons it started it stops again. Usage: resources/libvirt-test.sh [HOPVM_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-$PWD/target}
hopvm=$(realpath "${1:-$target/debug/hopvm}")
[ -x "$hopvm" ] || { echo "libvirt-test: $hopvm missing: cargo build first" >&2; exit 1; }
guest=$(ls -t "$target"/debug/build/guest-tests-*/out/images/dirty.elf 2>/dev/null | head -1)
[ -n "$guest" ] || { echo "libvirt-test: the dirty test guest is not built" >&2; exit 1; }

if ! command -v virsh >/dev/null || [ ! -x /usr/sbin/libvirtd ] ||
    [ ! -e /usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so ]; then
    echo "installing libvirt"
    log=$(mktemp)
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            libvirt-daemon-driver-qemu libvirt-daemon libvirt-clients; } >"$log" 2>&1; then
        cat "$log" >&2
        exit 1
    fi
    rm -f "$log"
fi
# libvirt resolves this user before it reads qemu.conf.
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
getent passwd libvirt-qemu >/dev/null ||
    useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
mkdir -p /var/log/libvirt/qemu /etc/libvirt
marker="# hopvm libvirt-test settings"
if ! grep -qF "$marker" /etc/libvirt/qemu.conf 2>/dev/null; then
    [ -e /etc/libvirt/qemu.conf ] && cp /etc/libvirt/qemu.conf /etc/libvirt/qemu.conf.orig
    cat >/etc/libvirt/qemu.conf <<EOF
$marker
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
EOF
fi
if ! grep -qF "$marker" /etc/libvirt/libvirtd.conf 2>/dev/null; then
    [ -e /etc/libvirt/libvirtd.conf ] && cp /etc/libvirt/libvirtd.conf /etc/libvirt/libvirtd.conf.orig
    cat >/etc/libvirt/libvirtd.conf <<EOF
$marker
unix_sock_group = "root"
unix_sock_ro_perms = "0777"
unix_sock_rw_perms = "0770"
auth_unix_ro = "none"
auth_unix_rw = "none"
EOF
fi

started=()
cleanup() {
    if declare -F migrate_cleanup >/dev/null; then migrate_cleanup; fi
    command virsh -q -c qemu:///system destroy "$name" >/dev/null 2>&1 || true
    command virsh -q -c qemu:///system undefine "$name" >/dev/null 2>&1 || true
    for pidfile in "${started[@]}"; do
        [ -s "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    # HOPVM_LIBVIRT_KEEP=1 keeps the logs, XML and serial files for a look.
    if [ "${HOPVM_LIBVIRT_KEEP:-0}" = 1 ]; then echo "libvirt-test: kept $work" >&2; else rm -rf "$work"; fi
}
work=$(mktemp -d /var/tmp/hopvm-libvirt.XXXXXX)
name=hopvm-libvirt-test-$$
trap cleanup EXIT
if ! pgrep -x virtlogd >/dev/null; then
    /usr/sbin/virtlogd -d -p "$work/virtlogd.pid"
    started+=("$work/virtlogd.pid")
fi
if ! pgrep -x libvirtd >/dev/null; then
    /usr/sbin/libvirtd -d -p "$work/libvirtd.pid"
    started+=("$work/libvirtd.pid")
fi
virsh() { command virsh -q -c qemu:///system "$@"; }
for _ in $(seq 50); do virsh version >/dev/null 2>&1 && break; sleep 0.2; done

fail() { echo "libvirt-test: FAIL: $*" >&2; exit 1; }
ln -s "$hopvm" "$work/qemu-system-x86_64"
cp "$guest" "$work/guest.elf"

# The probe.
caps=$(virsh domcapabilities --emulatorbin "$work/qemu-system-x86_64" --virttype kvm) ||
    fail "domcapabilities"
grep -q "<machine>pc-i440fx-7.2</machine>" <<<"$caps" || fail "no pc-i440fx-7.2 in domcapabilities"
grep -q "<mode name='host-passthrough' supported='yes'>" <<<"$caps" || fail "no host-passthrough"
echo "ok domcapabilities"

# A domain like the reference mbguest.xml.
serial=$work/guest.serial
cat >"$work/domain.xml" <<EOF
<domain type='kvm'>
  <name>$name</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$work/guest.elf</kernel>
    <cmdline>ws=2</cmdline>
  </os>
  <cpu mode='custom' match='exact'>
    <model fallback='forbid'>qemu64</model>
    <feature policy='disable' name='svm'/>
  </cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>$work/qemu-system-x86_64</emulator>
    <controller type='usb' model='none'/>
    <serial type='file'>
      <source path='$serial'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
virsh define "$work/domain.xml" >/dev/null || fail "define"
virsh start "$name" >/dev/null || fail "start: $(tail -3 /var/log/libvirt/qemu/$name.log)"
for _ in $(seq 300); do grep -q "pass 1 ok" "$serial" 2>/dev/null && break; sleep 0.1; done
grep -q "pass 1 ok" "$serial" || fail "no guest output in $serial"
echo "ok start (the guest runs)"
grep -q -- "-sandbox on" "/var/log/libvirt/qemu/$name.log" || fail "libvirt passed no -sandbox"

virsh suspend "$name" >/dev/null && [ "$(virsh domstate "$name")" = paused ] || fail "suspend"
virsh resume "$name" >/dev/null && [ "$(virsh domstate "$name")" = running ] || fail "resume"
echo "ok suspend / resume"
info=$(virsh dominfo "$name") && grep -q "^CPU(s): *1" <<<"$info" || fail "dominfo: $info"
stats=$(virsh domstats "$name") && grep -q "vcpu.0.state=1" <<<"$stats" || fail "domstats: $stats"
echo "ok dominfo / domstats"

# A restarted libvirtd reconnects to the running guest (only with a daemon of our own).
if [ -s "$work/libvirtd.pid" ]; then
    daemon=$(cat "$work/libvirtd.pid")
    kill "$daemon"
    for _ in $(seq 50); do kill -0 "$daemon" 2>/dev/null || break; sleep 0.1; done
    /usr/sbin/libvirtd -d -p "$work/libvirtd.pid"
    for _ in $(seq 50); do virsh version >/dev/null 2>&1 && break; sleep 0.2; done
    for _ in $(seq 50); do [ "$(virsh domstate "$name" 2>/dev/null)" = running ] && break; sleep 0.2; done
    [ "$(virsh domstate "$name")" = running ] || fail "not running after a libvirtd restart"
    virsh suspend "$name" >/dev/null && virsh resume "$name" >/dev/null ||
        fail "suspend / resume after a libvirtd restart"
    echo "ok libvirtd restart (reconnected)"
fi

if [ "${HOPVM_SKIP_LIBVIRT_MIGRATE:-0}" != 1 ]; then
    # shellcheck source=resources/libvirt-migrate.sh
    . resources/libvirt-migrate.sh
fi

pid=$(cat "/run/libvirt/qemu/$name.pid")
virsh destroy "$name" >/dev/null || fail "destroy"
for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$pid" 2>/dev/null && fail "hopvm $pid still runs after destroy"
grep -q "terminating on signal 15" "/var/log/libvirt/qemu/$name.log" ||
    fail "hopvm did not end on SIGTERM"
echo "ok destroy"
echo "libvirt-test: all passed"
