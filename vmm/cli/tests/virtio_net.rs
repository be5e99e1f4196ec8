//! virtio-net end to end: the `virtio-net` test guest broadcasts a frame through hopvm's
//! virtio-net-pci; this test, on the host side of the tap, receives it with a packet socket
//! and answers; the guest must receive the answer. Needs root (tap devices, packet sockets),
//! which the CI machine has.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::proc::{pump, Hopvm, TempDir};
use common::tools::qemu_guest_args;
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
    let mac = "52:54:00:12:34:56";
    let mut args = guest_args(seed, mac);
    args.extend(
        [
            "-netdev",
            &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
            "-device",
            "virtio-net-pci,netdev=n0,addr=0x4",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let mut hopvm_args = vec![String::from("qemu")];
    hopvm_args.extend(args.iter().cloned());
    let mac_bytes = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    exchange(
        env!("CARGO_BIN_EXE_hopvm"),
        &hopvm_args,
        &tap,
        mac_bytes,
        seed,
    );
    if Command::new("qemu-system-x86_64")
        .arg("-version")
        .output()
        .is_ok()
    {
        exchange("qemu-system-x86_64", &args, &tap, mac_bytes, seed);
    }
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
/// it there (RARP from its MAC, as QEMU's self-announce), and the guest, now running on the
/// destination, gets its pong through the new tap.
#[test]
fn live_migration_announces_the_guest_on_the_new_tap() {
    use serde_json::json;
    let long = Duration::from_secs(60);
    let dir = TempDir::new("virtio-net-mig");
    let (tap_a, tap_b) = (
        format!("hva{}", std::process::id() % 100_000),
        format!("hvb{}", std::process::id() % 100_000),
    );
    let seed = std::process::id() ^ 0x77;
    let mac = "02:00:00:11:22:33";
    let mac_bytes = [2, 0, 0, 0x11, 0x22, 0x33];
    let kernel = guest_tests::image_path("virtio-net").display().to_string();
    let cmdline = format!("seed={seed} mac={mac}");
    let mut src = Hopvm::spawn(
        &dir.0,
        "src",
        &[
            "--kernel",
            &kernel,
            "--memory",
            "64M",
            "--cmdline",
            &cmdline,
            "--net",
            &format!("tap={tap_a},mac={mac}"),
        ],
    );
    src.out
        .wait_for(long, "the guest's driver", |t| t.contains("net: ready"));
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = Hopvm::spawn(
        &dir.0,
        "dst",
        &[
            "--memory",
            "64M",
            "--incoming",
            &uri,
            "--net",
            &format!("tap={tap_b},mac={mac}"),
        ],
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
    let f = rarp.recv();
    assert_eq!(&f[..6], &[0xff; 6]);
    assert_eq!(&f[6..12], &mac_bytes, "RARP from the guest's MAC");
    assert_eq!(&f[20..22], &[0, 3], "reverse request");
    // The guest pings on; answer on the destination's tap.
    let ping = format!("hopvm-ping {seed}");
    loop {
        let f = sock.recv();
        if f.len() >= 14 + ping.len() && &f[14..14 + ping.len()] == ping.as_bytes() {
            break;
        }
    }
    let mut pong = Vec::new();
    pong.extend_from_slice(&mac_bytes);
    pong.extend_from_slice(&[2, 0, 0, 0, 0, 0x99]);
    pong.extend_from_slice(&ETHERTYPE.to_be_bytes());
    pong.extend_from_slice(format!("hopvm-pong {seed}").as_bytes());
    pong.resize(60, 0);
    sock.send(&pong);
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
