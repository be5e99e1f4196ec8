//! virtio-net end to end: the `virtio-net` test guest broadcasts a frame through hopvm's
//! virtio-net-pci; this test, on the host side of the tap, receives it with a packet socket
//! and answers; the guest must receive the answer. Needs root (tap devices, packet sockets),
//! which the CI machine has.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::proc::{pump, Hopvm, TempDir};
use common::tools::{on_hopvm_and_qemu, qemu_guest_args};
use common::Capture;

const ETHERTYPE: u16 = 0x88b5;

/// A packet socket bound to interface `ifname` for frames of our ethertype.
struct PacketSocket {
    fd: libc::c_int,
    ifindex: libc::c_int,
    proto: u16,
}

impl PacketSocket {
    fn open(ifname: &str) -> Self {
        Self::open_proto(ifname, ETHERTYPE)
    }

    fn open_proto(ifname: &str, ethertype: u16) -> Self {
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: if_nametoindex reads a NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as libc::c_int;
        assert!(ifindex > 0, "no interface {ifname}");
        let proto = ethertype.to_be();
        // SAFETY: plain socket creation.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, libc::c_int::from(proto)) };
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let addr = Self::addr(ifindex, ethertype, [0; 6]);
        // SAFETY: bind with a sockaddr_ll of the right size.
        let r = unsafe {
            libc::bind(
                fd,
                (&addr as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 60,
            tv_usec: 0,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as u32,
            )
        };
        Self {
            fd,
            ifindex,
            proto: ethertype,
        }
    }

    fn addr(ifindex: libc::c_int, ethertype: u16, dst: [u8; 6]) -> libc::sockaddr_ll {
        // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
        let mut a: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        a.sll_family = libc::AF_PACKET as u16;
        a.sll_protocol = ethertype.to_be();
        a.sll_ifindex = ifindex;
        a.sll_halen = 6;
        a.sll_addr[..6].copy_from_slice(&dst);
        a
    }

    /// Sets the receive timeout.
    fn set_timeout(&self, t: Duration) {
        let tv = libc::timeval {
            tv_sec: t.as_secs() as libc::time_t,
            tv_usec: t.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval.
        unsafe {
            libc::setsockopt(
                self.fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as u32,
            )
        };
    }

    /// The next frame, or the error (a timeout is `WouldBlock`).
    fn try_recv(&self) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; 2048];
        // SAFETY: recv into a buffer we own, of its length.
        let n = unsafe { libc::recv(self.fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    /// When the kernel received the last frame `recv` returned (SIOCGSTAMP).
    fn stamp(&self) -> std::time::SystemTime {
        const SIOCGSTAMP: libc::c_ulong = 0x8906;
        let mut tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        };
        // SAFETY: SIOCGSTAMP writes one timeval to a valid pointer.
        let r = unsafe { libc::ioctl(self.fd, SIOCGSTAMP, &mut tv) };
        assert_eq!(r, 0, "SIOCGSTAMP: {}", std::io::Error::last_os_error());
        std::time::UNIX_EPOCH
            + Duration::from_secs(tv.tv_sec as u64)
            + Duration::from_micros(tv.tv_usec as u64)
    }

    /// The next frame (waits up to the receive timeout).
    fn recv(&self) -> Vec<u8> {
        let mut buf = vec![0u8; 2048];
        // SAFETY: recv into a buffer we own, of its length.
        let n = unsafe { libc::recv(self.fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        assert!(
            n > 0,
            "no frame from the guest: {}",
            std::io::Error::last_os_error()
        );
        buf.truncate(n as usize);
        buf
    }

    fn send(&self, frame: &[u8]) {
        let mut dst = [0u8; 6];
        dst.copy_from_slice(&frame[..6]);
        let addr = Self::addr(self.ifindex, self.proto, dst);
        // SAFETY: sendto from a buffer we own with a sockaddr_ll of the right size.
        let n = unsafe {
            libc::sendto(
                self.fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for PacketSocket {
    fn drop(&mut self) {
        // SAFETY: closing our own descriptor.
        unsafe { libc::close(self.fd) };
    }
}

/// Runs `program args…` (a VMM with the virtio-net guest on tap `tap` with MAC `mac`), answers
/// the guest's ping from the host side of the tap, and checks the guest got the answer.
fn exchange(program: &str, args: &[String], tap: &str, mac: [u8; 6], seed: u32) {
    exchange_sized(program, args, tap, mac, seed, 60);
}

/// [`exchange`] with a pong of `size` bytes (past its text, byte i is i × 7).
fn exchange_sized(program: &str, args: &[String], tap: &str, mac: [u8; 6], seed: u32, size: usize) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (out, err) = (Capture::default(), Capture::default());
    pump(child.stdout.take().unwrap(), out.clone());
    pump(child.stderr.take().unwrap(), err.clone());
    out.wait_for(Duration::from_secs(60), "the guest's driver", |t| {
        t.contains("net: ready") || t.contains("SUMMARY")
    });
    // The tap exists while the VMM runs.
    tap_up(tap);
    let sock = PacketSocket::open(tap);
    let ping = format!("hopvm-ping {seed}");
    let frame = loop {
        let f = sock.recv();
        if f.len() >= 14 + ping.len() && &f[14..14 + ping.len()] == ping.as_bytes() {
            break f;
        }
    };
    assert_eq!(&frame[..6], &[0xff; 6], "{program}: broadcast");
    assert_eq!(&frame[6..12], &mac, "{program}: from the guest's MAC");
    let mut pong = Vec::new();
    pong.extend_from_slice(&mac);
    pong.extend_from_slice(&[2, 0, 0, 0, 0, 0x99]);
    pong.extend_from_slice(&ETHERTYPE.to_be_bytes());
    pong.extend_from_slice(format!("hopvm-pong {seed}").as_bytes());
    pong.resize(60, 0);
    let text_end = 14 + format!("hopvm-pong {seed}").len();
    if size > 60 {
        pong = (0..size).map(|i| (i * 7) as u8).collect();
        pong[..6].copy_from_slice(&mac);
        pong[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 0x99]);
        pong[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
        pong[14..text_end].copy_from_slice(format!("hopvm-pong {seed}").as_bytes());
        pong[text_end] = 0;
    }
    sock.send(&pong);
    out.wait_for(Duration::from_secs(120), "the guest's summary", |t| {
        t.contains("SUMMARY")
    });
    let status = child.wait().unwrap();
    let text = out.text();
    assert!(
        text.contains(", 0 failures"),
        "{program}: {text}\n{}",
        err.text()
    );
    assert!(text.contains("PASS: received the host's pong"), "{text}");
    assert_eq!(status.code(), Some(1), "{program}: {text}");
}

fn guest_args(seed: u32, mac: &str) -> Vec<String> {
    let kernel = guest_tests::image_path("virtio-net").display().to_string();
    qemu_guest_args(&kernel, &format!("seed={seed} mac={mac}"))
}

/// QEMU's command line for the virtio-net guest given `cmdline`, with `-netdev tap` on `tap`
/// (id `n0`) and `-device` `device`.
fn tap_guest_args(tap: &str, cmdline: &str, device: &str) -> Vec<String> {
    let kernel = guest_tests::image_path("virtio-net").display().to_string();
    let mut args = qemu_guest_args(&kernel, cmdline);
    args.extend([
        String::from("-netdev"),
        format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
        String::from("-device"),
        String::from(device),
    ]);
    args
}

#[test]
fn guest_and_host_exchange_frames_through_the_tap() {
    let tap = format!("hvn{}", std::process::id() % 100_000);
    let seed = std::process::id();
    let kernel = guest_tests::image_path("virtio-net").display().to_string();
    let mac = "02:00:00:aa:bb:cc";
    let args: Vec<String> = [
        "run",
        "--kernel",
        &kernel,
        "--memory",
        "64M",
        "--no-reboot",
        "--serial",
        "stdio",
        "--cmdline",
        &format!("seed={seed} mac={mac}"),
        "--net",
        &format!("tap={tap},mac={mac}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    exchange(
        env!("CARGO_BIN_EXE_hopvm"),
        &args,
        &tap,
        [2, 0, 0, 0xaa, 0xbb, 0xcc],
        seed,
    );
}

/// QEMU's `-netdev tap` + `-device virtio-net-pci`, through hopvm's QEMU front end and, when
/// installed, QEMU 7.2 itself (a transitional 1af4:1000, driven through its modern interface).
#[test]
fn qemu_netdev_and_device() {
    let tap = format!("hvq{}", std::process::id() % 100_000);
    let seed = std::process::id() ^ 0x5a5a;
    let args = tap_guest_args(
        &tap,
        &format!("seed={seed} mac=52:54:00:12:34:56"),
        "virtio-net-pci,netdev=n0,addr=0x4",
    );
    let mac_bytes = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    on_hopvm_and_qemu(&args, |program, args| {
        exchange(program, args, &tap, mac_bytes, seed);
    });
}

/// libvirt's way: the tap is opened by the caller (here, this test) and handed over as an
/// inherited descriptor, `-netdev tap,fd=N`.
#[test]
fn tap_descriptor_handed_over_as_libvirt_does() {
    let tap = format!("hvf{}", std::process::id() % 100_000);
    let seed = std::process::id() ^ 0x1234;
    // SAFETY: opening a device node; no CLOEXEC, so the VMM inherits the descriptor.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR) };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    let mut req = [0u8; 40];
    req[..tap.len()].copy_from_slice(tap.as_bytes());
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u16;
    req[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes the 40-byte ifreq buffer.
    let r = unsafe { libc::ioctl(fd, libc::TUNSETIFF, req.as_mut_ptr()) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    let mut args = vec![String::from("qemu")];
    args.extend(guest_args(seed, "52:54:00:12:34:56"));
    args.extend([
        String::from("-netdev"),
        format!(r#"{{"type":"tap","fd":"{fd}","id":"hostnet0"}}"#),
        String::from("-device"),
        String::from(r#"{"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0","bus":"pci.0","addr":"0x3"}"#),
    ]);
    exchange(
        env!("CARGO_BIN_EXE_hopvm"),
        &args,
        &tap,
        [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        seed,
    );
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
}

/// Source and destination tap names for a migration test (`h{kind}a…`, `h{kind}b…`), unique
/// to this process.
fn tap_pair(kind: char) -> (String, String) {
    let id = std::process::id() % 100_000;
    (format!("h{kind}a{id}"), format!("h{kind}b{id}"))
}

/// hopvm booting the virtio-net guest with `cmdline`, its card on tap `tap` with `mac`;
/// returned once the guest's driver is ready.
fn spawn_net_guest(dir: &TempDir, tap: &str, mac: &str, cmdline: &str) -> Hopvm {
    let kernel = guest_tests::image_path("virtio-net").display().to_string();
    let net = format!("tap={tap},mac={mac}");
    let args = [
        "--kernel",
        &kernel,
        "--memory",
        "64M",
        "--cmdline",
        cmdline,
        "--net",
        &net,
    ];
    let src = Hopvm::spawn(&dir.0, "src", &args);
    src.out
        .wait_for(Duration::from_secs(60), "the guest's driver", |t| {
            t.contains("net: ready")
        });
    src
}

/// A destination hopvm waiting on `uri`, with the same card on tap `tap`.
fn spawn_net_destination(dir: &TempDir, tap: &str, mac: &str, uri: &str) -> Hopvm {
    let net = format!("tap={tap},mac={mac}");
    let args = ["--memory", "64M", "--incoming", uri, "--net", &net];
    Hopvm::spawn(&dir.0, "dst", &args)
}

/// Brings tap `name` up, without IPv6 chatter.
fn tap_up(name: &str) {
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    let up = Command::new("ip")
        .args(["link", "set", name, "up"])
        .status()
        .unwrap();
    assert!(up.success(), "ip link set {name} up");
}

/// A networked guest migrates live to a destination on another tap: the destination announces
/// it there with the `announce-*` parameters set on it (RARP from its MAC, as QEMU's
/// self-announce: first round within a second of the switchover, one frame per round), asks
/// the guest (which negotiated GUEST_ANNOUNCE) to announce itself, which the guest
/// acknowledges, and the guest, now running on the destination, gets its pong through the new
/// tap.
#[test]
fn live_migration_announces_the_guest_on_the_new_tap() {
    use serde_json::json;
    let long = Duration::from_secs(60);
    let dir = TempDir::new("virtio-net-mig");
    let (tap_a, tap_b) = tap_pair('v');
    let seed = std::process::id() ^ 0x77;
    let mac = "02:00:00:11:22:33";
    let mac_bytes = [2, 0, 0, 0x11, 0x22, 0x33];
    let mut src = spawn_net_guest(
        &dir,
        &tap_a,
        mac,
        &format!("seed={seed} mac={mac} announce=1"),
    );
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = spawn_net_destination(&dir, &tap_b, mac, &uri);
    dst.cmd(
        "migrate-set-parameters",
        json!({"announce-initial": 40, "announce-max": 150, "announce-rounds": 4, "announce-step": 30}),
    );
    tap_up(&tap_b);
    let rarp = PacketSocket::open_proto(&tap_b, 0x8035);
    let sock = PacketSocket::open(&tap_b);
    src.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    src.cmd("migrate", json!({"uri": uri}));
    src.wait_migration("completed", long);
    let switchover = std::time::SystemTime::now();
    let times = rarp_rounds(&rarp, mac_bytes, long, Duration::from_secs(2));
    assert_eq!(times.len(), 4, "announce-rounds frames");
    let late = times[0].duration_since(switchover).unwrap_or_default();
    assert!(
        late < Duration::from_secs(1),
        "first frame {late:?} after the switchover"
    );
    // Gaps of 40, 70 and 100 ms at least (the clock's own, not a speed).
    for (w, min) in times.windows(2).zip([40u64, 70, 100]) {
        let gap = w[1].duration_since(w[0]).unwrap_or_default();
        assert!(gap >= Duration::from_millis(min / 2), "gap {gap:?}");
    }
    dst.out.wait_for(long, "the guest's acknowledgement", |t| {
        t.contains("net: announce acknowledged") || t.contains("SUMMARY")
    });
    // The guest pings on; answer on the destination's tap.
    answer_ping(&sock, mac_bytes, seed);
    assert_eq!(
        dst.wait_exit(Duration::from_secs(120)),
        Some(1),
        "{}",
        dst.out.text()
    );
    let text = dst.out.text();
    assert!(
        text.contains("PASS: VIRTIO_NET_S_ANNOUNCE set by the device"),
        "{text}"
    );
    assert!(text.contains("PASS: received the host's pong"), "{text}");
    assert!(text.contains(", 0 failures"), "{text}");
}

/// The host side of the `rpc=1` guest: executes each request once (in order: a request never
/// comes before the previous one was answered) and answers retransmissions again.
#[derive(Default)]
struct Responder {
    /// Requests executed (the next expected is this one).
    executed: u64,
    /// Requests received again (retransmissions) and answered again.
    repeats: u64,
    /// Requests beyond the next expected one (must stay 0).
    skipped: u64,
    /// Executed on the destination's tap.
    on_destination: u64,
    /// Answer "S" once this many ran on the destination's tap.
    stop_after: Option<u64>,
}

/// Serves `sock` for `state` until `quit`; `destination` marks the destination's tap.
fn respond(
    sock: PacketSocket,
    mac: [u8; 6],
    seed: u32,
    state: std::sync::Arc<std::sync::Mutex<Responder>>,
    quit: std::sync::Arc<std::sync::atomic::AtomicBool>,
    destination: bool,
) {
    use std::sync::atomic::Ordering;
    sock.set_timeout(Duration::from_millis(100));
    let prefix = format!("hopvm-req {seed} ");
    while !quit.load(Ordering::Relaxed) {
        let f = match sock.try_recv() {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            // The source's tap went away with the source.
            Err(_) => return,
        };
        let Some(rest) = f.get(14..).and_then(|p| p.strip_prefix(prefix.as_bytes())) else {
            continue;
        };
        let digits: Vec<u8> = rest
            .iter()
            .copied()
            .take_while(u8::is_ascii_digit)
            .collect();
        let Some(n) = std::str::from_utf8(&digits)
            .ok()
            .and_then(|d| d.parse::<u64>().ok())
        else {
            continue;
        };
        let stop = {
            let mut s = state.lock().unwrap();
            if n == s.executed {
                s.executed += 1;
                if destination {
                    s.on_destination += 1;
                }
            } else if n < s.executed {
                s.repeats += 1;
            } else {
                s.skipped += 1;
                continue;
            }
            s.stop_after.is_some_and(|m| s.on_destination >= m)
        };
        let mut rsp = Vec::new();
        rsp.extend_from_slice(&mac);
        rsp.extend_from_slice(&[2, 0, 0, 0, 0, 0x99]);
        rsp.extend_from_slice(&ETHERTYPE.to_be_bytes());
        rsp.extend_from_slice(
            format!("hopvm-rsp {seed} {n} {}", if stop { 'S' } else { 'C' }).as_bytes(),
        );
        rsp.resize(60, 0);
        sock.send(&rsp);
    }
}

/// Live migration with packets in flight: the guest keeps exchanging numbered requests with a
/// responder on the source's tap while the migration runs, and after the switchover goes on
/// on the destination's tap (the responder serves both, as one host the guest moved away
/// from). Every request is executed exactly once by the responder and answered in order (the
/// guest retransmits what the switch lost), no receive buffer is completed twice, and the
/// guest's count of completed requests is the responder's.
#[test]
fn live_migration_with_packets_in_flight() {
    use serde_json::json;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let long = Duration::from_secs(60);
    let dir = TempDir::new("virtio-net-rpc");
    let (tap_a, tap_b) = tap_pair('r');
    let seed = std::process::id() ^ 0x4242;
    let mac = "02:00:00:44:55:66";
    let mac_bytes = [2, 0, 0, 0x44, 0x55, 0x66];
    let mut src = spawn_net_guest(&dir, &tap_a, mac, &format!("seed={seed} mac={mac} rpc=1"));
    let state = Arc::new(Mutex::new(Responder::default()));
    let quit = Arc::new(AtomicBool::new(false));
    tap_up(&tap_a);
    let sock_a = PacketSocket::open(&tap_a);
    let (st, q) = (state.clone(), quit.clone());
    let a = std::thread::spawn(move || respond(sock_a, mac_bytes, seed, st, q, false));
    // Requests flow before the migration starts.
    src.out.wait_for(long, "requests on the source", |t| {
        t.contains("net: rpc 32")
    });
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = spawn_net_destination(&dir, &tap_b, mac, &uri);
    tap_up(&tap_b);
    let sock_b = PacketSocket::open(&tap_b);
    let (st, q) = (state.clone(), quit.clone());
    let b = std::thread::spawn(move || respond(sock_b, mac_bytes, seed, st, q, true));
    src.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    // A slow link, so that requests (and the device's writes into the guest's receive
    // buffers, which dirty its RAM) go on through the live phase; a downtime limit it meets
    // once the first pass is through.
    src.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 256 << 10, "downtime-limit": 2000}),
    );
    let before = state.lock().unwrap().executed;
    src.cmd("migrate", json!({"uri": uri}));
    src.wait_migration("completed", long);
    let at_switch = state.lock().unwrap().executed;
    // 32 more requests on the destination's tap, then the run ends.
    state.lock().unwrap().stop_after = Some(32);
    let code = dst.wait_exit(Duration::from_secs(180));
    quit.store(true, Ordering::Relaxed);
    a.join().unwrap();
    b.join().unwrap();
    let text = dst.out.text();
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains(", 0 failures"), "{text}");
    let s = state.lock().unwrap();
    assert_eq!(
        s.skipped, 0,
        "a request came before the previous one was answered"
    );
    assert!(
        s.on_destination >= 32,
        "{} on the destination",
        s.on_destination
    );
    let done = format!("net: completed {} requests,", s.executed);
    assert!(
        text.contains(&done),
        "the guest completed what the responder executed ({done}): {text}"
    );
    eprintln!(
        "{} requests ({before} before the migration, {at_switch} once it completed), {} \
         answered again; the guest: {}",
        s.executed,
        s.repeats,
        text.lines()
            .find(|l| l.starts_with("net: completed"))
            .unwrap_or_default()
    );
}

#[test]
fn bad_net_options_are_clear_errors() {
    let kernel = guest_tests::image_path("virtio-net").display().to_string();
    for (arg, code) in [
        ("tap=", 2),
        ("tap=x,mac=1:2:3", 2),
        ("mac=02:00:00:00:00:01", 2),
        ("tap=this-name-is-too-long", 1),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_hopvm"))
            .args(["run", "--kernel", &kernel, "--serial", "null", "--net", arg])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(code), "{arg}: {err}");
        assert_eq!(err.lines().count(), 1, "{arg}: {err}");
    }
}

/// The RARP frames of one self-announce on `sock` (bound to ethertype 0x8035): each checked
/// to be QEMU's (broadcast reverse request from and about `mac`), with the kernel's arrival
/// times; the first within `first`, the run over when none came for `quiet`.
fn rarp_rounds(
    sock: &PacketSocket,
    mac: [u8; 6],
    first: Duration,
    quiet: Duration,
) -> Vec<std::time::SystemTime> {
    let mut times = Vec::new();
    sock.set_timeout(first);
    loop {
        let f = match sock.try_recv() {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return times,
            Err(e) => panic!("recv: {e}"),
        };
        assert_eq!(&f[..6], &[0xff; 6], "broadcast");
        assert_eq!(&f[6..12], &mac, "RARP from the guest's MAC");
        assert_eq!(&f[12..14], &[0x80, 0x35], "RARP");
        assert_eq!(&f[20..22], &[0, 3], "reverse request");
        assert_eq!(&f[22..28], &mac, "sender hardware address");
        times.push(sock.stamp());
        sock.set_timeout(quiet);
    }
}

/// Waits for the guest's ping for `seed` on `sock` and answers it.
fn answer_ping(sock: &PacketSocket, mac: [u8; 6], seed: u32) {
    let ping = format!("hopvm-ping {seed}");
    loop {
        let f = sock.recv();
        if f.len() >= 14 + ping.len() && &f[14..14 + ping.len()] == ping.as_bytes() {
            break;
        }
    }
    let mut pong = Vec::new();
    pong.extend_from_slice(&mac);
    pong.extend_from_slice(&[2, 0, 0, 0, 0, 0x99]);
    pong.extend_from_slice(&ETHERTYPE.to_be_bytes());
    pong.extend_from_slice(format!("hopvm-pong {seed}").as_bytes());
    pong.resize(60, 0);
    sock.send(&pong);
}

/// The `announce-*` migration parameters: QEMU 7.2's defaults, set and shown, checked with
/// QEMU's texts (nothing changes on a refused set); `announce-self`'s arguments checked. (The
/// texts are QEMU 7.2's replies to the same commands.)
#[test]
fn announce_parameters_are_migration_parameters() {
    use serde_json::json;
    let dir = TempDir::new("announce-params");
    let mut h = Hopvm::spawn(&dir.0, "vm", &["--memory", "16M", "--incoming", "defer"]);
    let shown = |h: &mut Hopvm| {
        let p = h.cmd("query-migrate-parameters", serde_json::Value::Null);
        [
            "announce-initial",
            "announce-max",
            "announce-rounds",
            "announce-step",
        ]
        .map(|k| p[k].as_u64().unwrap_or_else(|| panic!("{k} in {p}")))
    };
    assert_eq!(shown(&mut h), [50, 550, 5, 100], "QEMU's defaults");
    h.cmd(
        "migrate-set-parameters",
        json!({"announce-initial": 10, "announce-max": 90, "announce-rounds": 7, "announce-step": 20}),
    );
    assert_eq!(shown(&mut h), [10, 90, 7, 20]);
    for (args, text) in [
        (
            json!({"announce-initial": 100_001}),
            "Parameter 'announce_initial' expects a value between 0 and 100000",
        ),
        (
            json!({"announce-max": 100_001}),
            "Parameter 'announce_max' expects a value between 0 and 100000",
        ),
        (
            json!({"announce-rounds": 1001}),
            "Parameter 'announce_rounds' expects a value between 0 and 1000",
        ),
        (
            json!({"announce-step": 0, "announce-rounds": 2}),
            "Parameter 'announce_step' expects a value between 0 and 10000",
        ),
        (
            json!({"announce-step": 10_001}),
            "Parameter 'announce_step' expects a value between 0 and 10000",
        ),
        // QEMU's uint64 takes -1 as 2^64 - 1, out of range.
        (
            json!({"announce-rounds": -1}),
            "Parameter 'announce_rounds' expects a value between 0 and 1000",
        ),
        (
            json!({"announce-initial": "x"}),
            "Parameter 'announce-initial' expects uint64",
        ),
    ] {
        let e = h
            .qmp
            .execute("migrate-set-parameters", Some(args.clone()))
            .expect_err(&args.to_string())
            .to_string();
        assert!(e.contains(text), "{args}: {e}");
    }
    assert_eq!(shown(&mut h), [10, 90, 7, 20], "unchanged by refused sets");
    for (args, text) in [
        (
            json!({"max": 1, "rounds": 1, "step": 1}),
            "Parameter 'initial' is missing",
        ),
        (
            json!({"initial": 1, "max": 1, "rounds": 1, "step": 1, "interfaces": "x"}),
            "Invalid parameter type for 'interfaces', expected: array",
        ),
        (
            json!({"initial": 1, "max": 1, "rounds": 1, "step": 1, "bogus": 1}),
            "Parameter 'bogus' is unexpected",
        ),
    ] {
        let e = h
            .qmp
            .execute("announce-self", Some(args.clone()))
            .expect_err(&args.to_string())
            .to_string();
        assert!(e.contains(text), "{args}: {e}");
    }
    // A VM without a network card: nothing to announce, but not an error (as QEMU).
    h.cmd(
        "announce-self",
        json!({"initial": 1, "max": 1, "rounds": 1, "step": 1}),
    );
}

/// Runs the `announce=1` guest under `program args…` on tap `tap` (monitor at `qmp`), has it
/// announced with QMP `announce-self` (3 rounds), and checks the frames on the tap, that the
/// guest saw VIRTIO_NET_S_ANNOUNCE and acknowledged it, and that frames still flow.
fn announce_self_on(
    program: &str,
    args: &[String],
    qmp: &std::path::Path,
    tap: &str,
    mac: [u8; 6],
    seed: u32,
    named: Option<&str>,
) {
    use serde_json::json;
    let long = Duration::from_secs(60);
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (out, err) = (Capture::default(), Capture::default());
    pump(child.stdout.take().unwrap(), out.clone());
    pump(child.stderr.take().unwrap(), err.clone());
    let mut q = qmp::client::QmpClient::connect_retry(qmp, long)
        .unwrap_or_else(|e| panic!("{program}: {e}: {}", err.text()));
    out.wait_for(long, "the guest's driver", |t| {
        t.contains("net: ready") || t.contains("SUMMARY")
    });
    tap_up(tap);
    let rarp = PacketSocket::open_proto(tap, 0x8035);
    let sock = PacketSocket::open(tap);
    let params = |extra: serde_json::Value| {
        let mut p = json!({"initial": 30, "max": 200, "rounds": 3, "step": 40, "id": "t"});
        if let (Some(p), Some(extra)) = (p.as_object_mut(), extra.as_object()) {
            p.extend(extra.clone());
        }
        Some(p)
    };
    if let Some(name) = named {
        // Another card's name: this one is left alone.
        q.execute(
            "announce-self",
            params(json!({"interfaces": ["none-such"]})),
        )
        .unwrap();
        assert!(
            rarp_rounds(&rarp, mac, Duration::from_secs(1), Duration::from_secs(1)).is_empty(),
            "{program}: frames for a card not named in interfaces"
        );
        q.execute("announce-self", params(json!({"interfaces": [name]})))
            .unwrap();
    } else {
        q.execute("announce-self", params(json!({}))).unwrap();
    }
    let times = rarp_rounds(&rarp, mac, long, Duration::from_secs(2));
    assert_eq!(times.len(), 3, "{program}: one frame per round");
    // Gaps of 30 and 70 ms at least (the clock's own, not a speed).
    for (w, min) in times.windows(2).zip([30u64, 70]) {
        let gap = w[1].duration_since(w[0]).unwrap_or_default();
        assert!(
            gap >= Duration::from_millis(min / 2),
            "{program}: gap {gap:?}"
        );
    }
    out.wait_for(long, "the guest's acknowledgement", |t| {
        t.contains("net: announce acknowledged") || t.contains("SUMMARY")
    });
    answer_ping(&sock, mac, seed);
    out.wait_for(Duration::from_secs(120), "the guest's summary", |t| {
        t.contains("SUMMARY")
    });
    let _ = child.wait();
    let text = out.text();
    assert!(
        text.contains(", 0 failures"),
        "{program}: {text}\n{}",
        err.text()
    );
    assert!(
        text.contains("PASS: ANNOUNCE_ACK answered VIRTIO_NET_OK"),
        "{text}"
    );
    assert!(text.contains("PASS: received the host's pong"), "{text}");
}

/// QMP `announce-self`: RARP rounds from the card's MAC with the given timing, only for the
/// cards named in `interfaces`; a guest that negotiated GUEST_ANNOUNCE is asked to announce
/// itself (VIRTIO_NET_S_ANNOUNCE and a configuration change) and acknowledges through the
/// control queue. The same guest under QEMU 7.2, when installed.
#[test]
fn announce_self_sends_rounds_and_asks_the_guest() {
    let dir = TempDir::new("announce-self");
    let tap = format!("hvs{}", std::process::id() % 100_000);
    let seed = std::process::id() ^ 0x3c3c;
    let mac = "52:54:00:12:34:56";
    let mac_bytes = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let mut args = tap_guest_args(
        &tap,
        &format!("seed={seed} mac={mac} announce=1"),
        "virtio-net-pci,netdev=n0,id=nic0",
    );
    let qmp = dir.join("qmp.sock");
    args.extend([
        String::from("-qmp"),
        format!("unix:{},server=on,wait=off", qmp.display()),
    ]);
    on_hopvm_and_qemu(&args, |program, args| {
        let _ = std::fs::remove_file(&qmp);
        announce_self_on(program, args, &qmp, &tap, mac_bytes, seed, Some("nic0"));
    });
}

/// A guest that programs nonsense into the transmit queue (a buffer beyond RAM, an absurd
/// length, a descriptor loop, a next index past the queue, an available index 1000 ahead) and
/// writes the configuration space: each time the device completes the chain or flags
/// DEVICE_NEEDS_RESET, never hangs the vCPU or the VMM, works again after a reset, and ends
/// with a normal exchange with the host. Under QEMU 7.2 too, when installed.
#[test]
fn a_hostile_driver_gets_dropped_chains_or_needs_reset() {
    let tap = format!("hvh{}", std::process::id() % 100_000);
    let seed = std::process::id() ^ 0x0f0f;
    let args = tap_guest_args(
        &tap,
        &format!("seed={seed} mac=52:54:00:12:34:56 hostile=1"),
        "virtio-net-pci,netdev=n0",
    );
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    on_hopvm_and_qemu(&args, |program, args| {
        exchange(program, args, &tap, mac, seed);
    });
}

/// VIRTIO_NET_F_MRG_RXBUF: a guest with 128-byte receive buffers gets a 1000-byte frame in as
/// many buffers as it takes (num_buffers in the first header) and puts it together intact —
/// under hopvm and QEMU 7.2, when installed.
#[test]
fn mergeable_receive_buffers_carry_a_frame_in_several() {
    let tap = format!("hvm{}", std::process::id() % 100_000);
    let seed = std::process::id() ^ 0x6d6d;
    let args = tap_guest_args(
        &tap,
        &format!("seed={seed} mac=52:54:00:12:34:56 mrg=1"),
        "virtio-net-pci,netdev=n0",
    );
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    on_hopvm_and_qemu(&args, |program, args| {
        exchange_sized(program, args, &tap, mac, seed, 1000);
    });
}

/// QEMU's `-netdev` / `-device virtio-net-pci` front end: malformed or unsupported options and
/// a tap that cannot be opened are one clear line and a non-zero status, never a panic.
#[test]
fn bad_netdev_options_are_clear_errors() {
    let kernel = guest_tests::image_path("virtio-net").display().to_string();
    for (netdev, device, what) in [
        ("tap,id=n0", "virtio-net-pci,netdev=n0", "ifname"),
        ("user,id=n0", "virtio-net-pci,netdev=n0", "tap"),
        (
            "tap,id=n0,ifname=t0,vhost=on",
            "virtio-net-pci,netdev=n0",
            "vhost",
        ),
        ("tap,id=n0,fd=zz", "virtio-net-pci,netdev=n0", "fd=zz"),
        (
            "tap,id=n0,ifname=t0",
            "virtio-net-pci,netdev=n1",
            "netdev=n1",
        ),
        (
            "tap,id=n0,ifname=t0",
            "virtio-net-pci,netdev=n0,mac=zz",
            "mac=zz",
        ),
        (
            "tap,id=n0,ifname=this-name-is-too-long",
            "virtio-net-pci,netdev=n0",
            "this-name-is-too-long",
        ),
        // Descriptor 99 is not open: not an inherited tap.
        ("tap,id=n0,fd=99", "virtio-net-pci,netdev=n0", "99"),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_hopvm"))
            .args([
                "qemu", "-kernel", &kernel, "-display", "none", "-serial", "none",
            ])
            .args(["-netdev", netdev, "-device", device])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(
            matches!(o.status.code(), Some(1 | 2)),
            "{netdev} {device}: {:?} {err}",
            o.status
        );
        assert_eq!(err.lines().count(), 1, "{netdev} {device}: {err}");
        assert!(err.contains(what), "{netdev} {device}: {err}");
    }
}

/// A frame that reached the destination's tap before the guest state did (the tap was readable
/// before there was a driver to take it) is delivered once the guest runs there: the device
/// looks at every queue when the migrated VM starts, as QEMU's does.
#[test]
fn a_frame_waiting_on_the_destinations_tap_is_received_after_the_switchover() {
    use serde_json::json;
    let long = Duration::from_secs(60);
    let dir = TempDir::new("virtio-net-early");
    let (tap_a, tap_b) = tap_pair('e');
    let seed = std::process::id() ^ 0x1e1e;
    let mac = "02:00:00:77:88:99";
    let mac_bytes = [2, 0, 0, 0x77, 0x88, 0x99];
    let mut src = spawn_net_guest(&dir, &tap_a, mac, &format!("seed={seed} mac={mac}"));
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = spawn_net_destination(&dir, &tap_b, mac, &uri);
    tap_up(&tap_b);
    // The pong waits in the destination's tap; nothing answers the guest there afterwards.
    let sock = PacketSocket::open(&tap_b);
    let mut pong = Vec::new();
    pong.extend_from_slice(&mac_bytes);
    pong.extend_from_slice(&[2, 0, 0, 0, 0, 0x99]);
    pong.extend_from_slice(&ETHERTYPE.to_be_bytes());
    pong.extend_from_slice(format!("hopvm-pong {seed}").as_bytes());
    pong.resize(60, 0);
    sock.send(&pong);
    src.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    src.cmd("migrate", json!({"uri": uri}));
    src.wait_migration("completed", long);
    assert_eq!(
        dst.wait_exit(Duration::from_secs(120)),
        Some(1),
        "{}",
        dst.out.text()
    );
    let text = dst.out.text();
    assert!(text.contains("PASS: received the host's pong"), "{text}");
    assert!(text.contains(", 0 failures"), "{text}");
}
