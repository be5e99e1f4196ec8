# Sourced by resources/libvirt-test.sh with its domain $name running under the system libvirtd:
# starts a second libvirtd "host" in its own mount namespace, as
# ../shared/reference/libvirt-9.0-qemu-7.2/README.md does (bind-mounted /run/libvirt,
# /var/lib/libvirt, /etc/libvirt, /var/cache/libvirt, /var/log/libvirt, its own host_uuid and
# virtlogd), and live-migrates the running self-verifying guest there and back with
# `virsh migrate --live`: native (the virsh client drives both daemons; with --verbose, which
# polls query-migrate), --p2p (the source's daemon drives; with --auto-converge, then with
# --compressed, i.e. xbzrle), --p2p --tunnelled (the stream goes through the two daemons'
# connection), then a `virsh domjobabort`.
# Each side writes the guest's serial output to a file of its own (--xml with the serial path
# changed): after every migration the guest must print two more verified passes there, never
# CORRUPT, run on the destination and be gone from the source. The second daemon and anything
# it runs are stopped at exit (migrate_cleanup, called by libvirt-test.sh's cleanup).

dst_root=$work/dst
mkdir -p "$dst_root"/{run,lib,etc,cache,log/qemu} /var/cache/libvirt /var/lib/libvirt /var/log/libvirt
cp /etc/libvirt/qemu.conf "$dst_root/etc/qemu.conf"
cat >"$dst_root/etc/libvirtd.conf" <<CONF
# second ("destination") libvirtd of hopvm's libvirt-test
host_uuid = "$(cat /proc/sys/kernel/random/uuid)"
unix_sock_group = "root"
unix_sock_ro_perms = "0777"
unix_sock_rw_perms = "0770"
auth_unix_ro = "none"
auth_unix_rw = "none"
CONF
# HOPVM_LIBVIRT_DEBUG=1: the second daemon logs its QMP, migration and CPU checks
# (dst/log/libvirtd.log, kept with HOPVM_LIBVIRT_KEEP=1).
[ "${HOPVM_LIBVIRT_DEBUG:-0}" = 1 ] && cat >>"$dst_root/etc/libvirtd.conf" <<CONF
log_filters = "1:qemu.qemu_monitor 1:qemu.qemu_migration 1:qemu.qemu_migration_cookie 1:qemu.qemu_process 1:cpu 3:*"
log_outputs = "1:file:/var/log/libvirt/libvirtd.log"
CONF
migrate_cleanup() {
    local pidfile
    command virsh -q -c "$dst_uri" destroy "$name" >/dev/null 2>&1 || true
    for pidfile in "$dst_root/run/libvirtd.pid" "$dst_root/run/virtlogd.pid"; do
        [ -s "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    for pidfile in "$dst_root/run/libvirtd.pid" "$dst_root/run/virtlogd.pid"; do
        for _ in $(seq 50); do [ -e "$pidfile" ] || break; sleep 0.1; done
    done
}
dst_uri="qemu+unix:///system?socket=$dst_root/run/libvirt-sock"
unshare -m bash -e -c '
    mount --make-rprivate /
    mount --bind "$1/run" /run/libvirt
    mount --bind "$1/lib" /var/lib/libvirt
    mount --bind "$1/etc" /etc/libvirt
    mount --bind "$1/cache" /var/cache/libvirt
    mount --bind "$1/log" /var/log/libvirt
    /usr/sbin/virtlogd -d -p /run/libvirt/virtlogd.pid
    /usr/sbin/libvirtd -d -p /run/libvirt/libvirtd.pid -f /etc/libvirt/libvirtd.conf
' unshare-dst "$dst_root" || fail "cannot start the second libvirtd"
vdst() { command virsh -q -c "$dst_uri" "$@"; }
for _ in $(seq 50); do vdst version >/dev/null 2>&1 && break; sleep 0.2; done
vdst version >/dev/null || fail "the second libvirtd does not answer on $dst_root/run/libvirt-sock"
# The system daemon's socket under a path the second daemon's namespace does not cover (a hard
# link reaches the same socket), for the migrations the second daemon drives (--p2p back).
ln -f /run/libvirt/libvirt-sock "$work/src-sock"
src_uri="qemu+unix:///system?socket=$work/src-sock"
echo "ok second libvirtd"

free_port() {
    local p
    for p in $(seq 49152 49215); do
        ss -Htln "sport = :$p" | grep -q . || { echo "$p"; return; }
    done
    fail "no free migration port in 49152-49215"
}

# One migration: FROM_URI TO_URI SERIAL VIRSH_OPTIONS... — the guest then runs on TO_URI,
# writing to SERIAL.
hop=0
migrate_to() {
    local from=$1 to=$2 out=$3 what
    shift 3
    what="virsh migrate --live $* ($hop)"
    command virsh -q -c "$from" dumpxml --migratable "$name" >"$work/mig.xml" ||
        fail "$what: dumpxml"
    sed -i "s|<source path='[^']*'/>|<source path='$out'/>|" "$work/mig.xml"
    local t0=$SECONDS
    command virsh -q -c "$from" migrate --live "$name" "$to" --xml "$work/mig.xml" "$@" \
        >"$work/virsh.out" 2>&1 ||
        fail "$what: $(tr '\r' '\n' <"$work/virsh.out" | tail -2)
$(tail -n 3 "$dst_root/log/qemu/$name.log" "/var/log/libvirt/qemu/$name.log" 2>/dev/null)"
    [ "$(command virsh -q -c "$to" domstate "$name" 2>/dev/null)" = running ] ||
        fail "$what: not running on the destination"
    [ "$(command virsh -q -c "$from" domstate "$name" 2>/dev/null)" != running ] ||
        fail "$what: still running on the source"
    for _ in $(seq 300); do
        [ "$(grep -c '^pass ' "$out" 2>/dev/null)" -ge 2 ] && break
        sleep 0.1
    done
    grep -q CORRUPT "$out" && fail "$what: the guest found corrupt memory: $(grep CORRUPT "$out" | head -1)"
    [ "$(grep -c '^pass ' "$out" 2>/dev/null)" -ge 2 ] ||
        fail "$what: the guest does not run on: $(tail -2 "$out" 2>/dev/null)"
    echo "ok $what: $((SECONDS - t0)) s, $(grep -c '^pass ' "$out") verified passes there"
    hop=$((hop + 1))
}

sys_uri=qemu:///system
port=$(free_port)
migrate_to "$sys_uri" "$dst_uri" "$work/serial.$hop" --migrateuri "tcp://127.0.0.1:$port" --verbose
port=$(free_port)
migrate_to "$dst_uri" "$sys_uri" "$work/serial.$hop" --migrateuri "tcp://127.0.0.1:$port"
port=$(free_port)
migrate_to "$sys_uri" "$dst_uri" "$work/serial.$hop" --p2p --migrateuri "tcp://127.0.0.1:$port" \
    --auto-converge
port=$(free_port)
migrate_to "$dst_uri" "$src_uri" "$work/serial.$hop" --p2p --migrateuri "tcp://127.0.0.1:$port" \
    --compressed
migrate_to "$sys_uri" "$dst_uri" "$work/serial.$hop" --p2p --tunnelled
migrate_to "$dst_uri" "$src_uri" "$work/serial.$hop" --p2p --tunnelled
echo "ok live migration there and back: native, --p2p, --p2p --tunnelled"

# virsh domjobabort while the stream runs: at 1 MiB/s the guest's rewritten working set never
# converges. The guest goes on on the source; nothing stays on the destination.
out=$work/serial.$((hop - 1))
port=$(free_port)
# (The destination's libvirt truncates its serial file: give it one of its own.)
command virsh -q -c "$sys_uri" dumpxml --migratable "$name" >"$work/mig.xml" || fail "dumpxml"
sed -i "s|<source path='[^']*'/>|<source path='$work/serial.aborted'/>|" "$work/mig.xml"
command virsh -q -c "$sys_uri" migrate --live "$name" "$dst_uri" --bandwidth 1 \
    --xml "$work/mig.xml" --migrateuri "tcp://127.0.0.1:$port" >"$work/abort.out" 2>&1 &
mig=$!
for _ in $(seq 100); do
    command virsh -q -c "$sys_uri" domjobinfo "$name" 2>/dev/null | grep -q "^Job type: *Unbounded" && break
    sleep 0.1
done
sleep 0.5
command virsh -q -c "$sys_uri" domjobabort "$name" || fail "domjobabort"
wait "$mig" && fail "virsh migrate succeeded despite domjobabort"
[ "$(command virsh -q -c "$sys_uri" domstate "$name")" = running ] ||
    fail "not running on the source after domjobabort: $(cat "$work/abort.out")"
vdst domstate "$name" >/dev/null 2>&1 && fail "left on the destination after domjobabort"
n=$(grep -c '^pass ' "$out") || fail "no guest output in $out"
for _ in $(seq 300); do
    [ "$(grep -c '^pass ' "$out")" -ge $((n + 2)) ] && break
    sleep 0.1
done
[ "$(grep -c '^pass ' "$out")" -ge $((n + 2)) ] && ! grep -q CORRUPT "$out" ||
    fail "the guest does not go on after domjobabort: $(tail -2 "$out")"
echo "ok virsh domjobabort: $(head -c 200 "$work/abort.out" | tr '\n' ' ')"
