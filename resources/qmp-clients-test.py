#!/usr/bin/env python3
"""Drives running hopvm processes with QEMU's own Python QMP library, `qemu.qmp` (PyPI).

hopvm promises to speak QMP as QEMU does, so a real QEMU client must work against it unchanged:
this script connects, queries, pauses and resumes (checking STOP / RESUME events), checks that
error replies carry QEMU's error classes, cancels a rate-limited migration (the source must run
on), and runs a full live migration, polling query-migrate and following the MIGRATION and
MIGRATION_PASS events, and passes a descriptor with
SCM_RIGHTS for getfd / closefd.

It is run by vmm/cli/tests/qmp_clients.rs, which starts the VMs:

    qmp-clients-test.py SRC_SOCK CANCEL_DST_URI FULL_DST_SOCK FULL_DST_URI

SRC_SOCK is the QMP socket of a running source; CANCEL_DST_URI a destination (`hopvm run
--incoming URI`) for the migration that is cancelled; FULL_DST_SOCK / FULL_DST_URI the monitor
and incoming URI of the destination of the full migration. Prints one line per check and exits
non-zero on the first failure. Needs the virtual environment resources/install-deps.sh makes.
"""

import asyncio
import sys
import time

from qemu.qmp import EventListener, ExecuteError, QMPClient

TIMEOUT = 180.0
CHECKS = 0


def ok(what):
    global CHECKS
    CHECKS += 1
    print(f"ok {CHECKS} - {what}", flush=True)


def check(cond, what):
    if not cond:
        raise AssertionError(what)


async def expect_error(qmp, error_class, cmd, args=None, desc=None):
    """Runs a command that must fail with `error_class` (and `desc`, when given)."""
    try:
        reply = await qmp.execute(cmd, args)
    except ExecuteError as e:
        check(e.error_class == error_class,
              f"{cmd} {args}: class {e.error_class!r}, expected {error_class!r} ({e})")
        if desc is not None:
            check(str(e) == desc, f"{cmd} {args}: desc {str(e)!r}, expected {desc!r}")
        ok(f"{cmd}{' ' + str(args) if args else ''} -> {error_class}: {e}")
        return
    raise AssertionError(f"{cmd} {args} succeeded: {reply}")


async def next_event(listener, name, timeout=TIMEOUT):
    """The next event named `name` (others are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        check(left > 0, f"no {name} event within {timeout} s")
        event = await asyncio.wait_for(listener.get(), left)
        if event["event"] == name:
            return event


async def wait_status(qmp, want, timeout=TIMEOUT):
    """Polls query-status until the VM is in state `want`."""
    deadline = time.monotonic() + timeout
    while True:
        status = (await qmp.execute("query-status"))["status"]
        if status == want:
            return
        check(time.monotonic() < deadline, f"status {status!r}, expected {want!r}")
        await asyncio.sleep(0.02)


async def basics(qmp):
    greeting = qmp.greeting
    check(greeting is not None, "no greeting")
    version = greeting.QMP.version
    qemu = version["qemu"]
    check(qemu["major"] >= 2, f"greeting version {version}")
    ok(f"greeting from {version['package'].strip() or 'hopvm'} (QEMU {qemu['major']}."
       f"{qemu['minor']}.{qemu['micro']})")
    status = await qmp.execute("query-status")
    check(status == {"status": "running", "singlestep": False, "running": True}, status)
    ok("query-status: running")
    names = {c["name"] for c in await qmp.execute("query-commands")}
    for cmd in ("query-status", "stop", "cont", "migrate", "migrate_cancel", "query-migrate"):
        check(cmd in names, f"{cmd} not in query-commands")
    ok("query-commands lists the migration commands")


async def stop_cont(qmp):
    with qmp.listener(("STOP", "RESUME")) as events:
        check(await qmp.execute("stop") == {}, "stop")
        await next_event(events, "STOP")
        await wait_status(qmp, "paused")
        ok("stop: STOP event, status paused")
        check(await qmp.execute("cont") == {}, "cont")
        await next_event(events, "RESUME")
        await wait_status(qmp, "running")
        ok("cont: RESUME event, status running")


async def errors(qmp):
    await expect_error(qmp, "CommandNotFound", "frobnicate",
                       desc="The command frobnicate has not been found")
    await expect_error(qmp, "GenericError", "migrate", {"uri": 5},
                       desc="Invalid parameter type for 'uri', expected: string")
    await expect_error(qmp, "GenericError", "migrate", {},
                       desc="Parameter 'uri' is missing")
    await expect_error(qmp, "GenericError", "query-status", {"verbose": True},
                       desc="Parameter 'verbose' is unexpected")
    await expect_error(qmp, "GenericError", "migrate-set-capabilities",
                       {"capabilities": [{"capability": "warp", "state": True}]},
                       desc="Parameter 'capability' does not accept value 'warp'")
    await expect_error(qmp, "GenericError", "migrate-incoming", {"uri": "tcp:127.0.0.1:1"},
                       desc="'-incoming' was not specified on the command line")
    await expect_error(qmp, "GenericError", "migrate", {"uri": "gopher:nowhere"})
    # The session survives its errors.
    check((await qmp.execute("query-status"))["status"] == "running", "still running")
    ok("the connection and the guest survive error replies")


async def cancel(qmp, uri):
    await qmp.execute("migrate-set-capabilities",
                      {"capabilities": [{"capability": "events", "state": True}]})
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 20})
    with qmp.listener("MIGRATION") as events:
        await qmp.execute("migrate", {"uri": uri})
        check((await next_event(events, "MIGRATION"))["data"]["status"] == "setup", "setup")
        check((await next_event(events, "MIGRATION"))["data"]["status"] == "active", "active")
        # Let some of it flow at 1 MiB/s, then give up.
        deadline = time.monotonic() + TIMEOUT
        while True:
            info = await qmp.execute("query-migrate")
            check(info["status"] == "active", f"not active: {info}")
            if info["ram"]["transferred"] > 256 << 10:
                break
            check(time.monotonic() < deadline, "nothing transferred")
            await asyncio.sleep(0.05)
        ok(f"rate-limited migration active: {info['ram']['transferred']} bytes sent")
        await expect_error(qmp, "GenericError", "migrate", {"uri": uri},
                           desc="There's a migration process in progress")
        check(await qmp.execute("migrate_cancel") == {}, "migrate_cancel")
        statuses = []
        while not statuses or statuses[-1] != "cancelled":
            statuses.append((await next_event(events, "MIGRATION"))["data"]["status"])
        check(statuses in (["cancelling", "cancelled"], ["cancelled"]), statuses)
    info = await qmp.execute("query-migrate")
    check(info == {"status": "cancelled"}, info)
    await wait_status(qmp, "running")
    ok(f"migrate_cancel: MIGRATION {' -> '.join(statuses)}, source running")


async def full_migration(qmp, dst_sock, uri):
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": 0, "downtime-limit": 300})
    polled = []
    with qmp.listener(("MIGRATION", "MIGRATION_PASS")) as events:
        await qmp.execute("migrate", {"uri": uri})
        deadline = time.monotonic() + TIMEOUT
        while True:
            info = await qmp.execute("query-migrate")
            if not polled or polled[-1] != info["status"]:
                polled.append(info["status"])
            if info["status"] in ("completed", "failed", "cancelled"):
                break
            check(time.monotonic() < deadline, f"migration still {info['status']}")
            await asyncio.sleep(0.1)
        check(info["status"] == "completed", f"migration ended {info}")
        ram = info["ram"]
        check(ram["remaining"] == 0 and ram["transferred"] > 0, info)
        check(0 <= info["downtime"] <= info["total-time"], info)
        ok(f"query-migrate polling saw {' -> '.join(polled)}: {ram['transferred']} bytes in "
           f"{info['total-time']} ms, downtime {info['downtime']} ms")
        # Wait for the MIGRATION completed event, then read every event heard so far.
        while (await next_event(events, "MIGRATION"))["data"]["status"] != "completed":
            pass
        history = events.history
    statuses = [e["data"]["status"] for e in history if e["event"] == "MIGRATION"]
    passes = [e["data"]["pass"] for e in history if e["event"] == "MIGRATION_PASS"]
    check(statuses == ["setup", "active", "completed"], f"MIGRATION events {statuses}")
    check(passes and passes[0] == 1 and passes == sorted(passes), f"passes {passes}")
    check(passes[-1] == ram["dirty-sync-count"], f"passes {passes} vs {ram}")
    ok(f"MIGRATION events {' -> '.join(statuses)}, MIGRATION_PASS {passes}")
    check((await qmp.execute("query-status"))["status"] == "postmigrate", "source state")
    ok("source: postmigrate")

    dst = QMPClient("destination")
    await dst.connect(dst_sock)
    try:
        await wait_status(dst, "running")
        check((await dst.execute("query-migrate"))["status"] == "completed", "dst migrate")
        ok("destination: running, query-migrate completed")
    finally:
        await dst.disconnect()


async def pass_fd(qmp):
    """getfd with a descriptor sent by the library's send_fd_scm, then closefd."""
    await expect_error(qmp, "GenericError", "getfd", {"fdname": "py"},
                       "No file descriptor supplied via SCM_RIGHTS")
    with open("/dev/null", "rb") as f:
        qmp.send_fd_scm(f.fileno())
        await qmp.execute("getfd", {"fdname": "py"})
    ok("send_fd_scm + getfd py")
    await qmp.execute("closefd", {"fdname": "py"})
    await expect_error(qmp, "GenericError", "closefd", {"fdname": "py"},
                       "File descriptor named 'py' not found")
    await expect_error(qmp, "GenericError", "migrate", {"uri": "fd:py"},
                       "File descriptor named 'py' has not been found")


async def main():
    src_sock, cancel_uri, dst_sock, full_uri = sys.argv[1:5]
    qmp = QMPClient("source")
    await qmp.connect(src_sock)
    try:
        await basics(qmp)
        await stop_cont(qmp)
        await errors(qmp)
        await pass_fd(qmp)
        await cancel(qmp, cancel_uri)
        await full_migration(qmp, dst_sock, full_uri)
    finally:
        await qmp.disconnect()
    print(f"qemu.qmp: {CHECKS} checks passed", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    try:
        asyncio.run(main())
    except Exception as e:  # pylint: disable=broad-except
        print(f"not ok - {type(e).__name__}: {e}", flush=True)
        sys.exit(1)
