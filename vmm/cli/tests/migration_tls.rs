//! Issue 12: live migration over TLS (QEMU's `tls-creds-x509` objects and the `tls-creds` /
//! `tls-hostname` migration parameters). Certificates are made here (rcgen, through
//! `migration::transport::tls::test_certs`). The busy, self-verifying `dirty` guest crosses
//! over TLS on loopback TCP and between two network namespaces; each refusal (a plaintext
//! source, a client certificate from another CA, an expired one, a destination whose
//! certificate names another host) fails the source's migration with its reason and leaves the
//! source guest running while the destination keeps waiting; and a capture of the wire shows
//! the guest's memory without TLS and none of it with TLS.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::passes;
use common::proc::{in_netns, Hopvm, TempDir};
use common::proxy::{Policy, Proxy};
use common::tools::{dirty_args, free_tcp_port, strs};
use migration::transport::tls::test_certs::Ca;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(180);
const MEMORY: &str = "32M";

/// `--object tls-creds-x509,…` arguments.
fn object(id: &str, dir: &Path, endpoint: &str) -> [String; 2] {
    [
        String::from("--object"),
        format!(
            "tls-creds-x509,id={id},dir={},endpoint={endpoint}",
            dir.display()
        ),
    ]
}

fn events_on(vm: &mut Hopvm) {
    vm.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
}

/// A source running the busy guest, with a first verified pass behind it.
fn source(dir: &Path, name: &str, extra: &[String]) -> Hopvm {
    let mut args = dirty_args(MEMORY, "4");
    args.extend_from_slice(extra);
    let mut src = Hopvm::spawn(dir, name, &strs(&args));
    src.out.wait_for(LONG, "a first pass", |t| passes(t) >= 1);
    events_on(&mut src);
    src.cmd("migrate-set-parameters", json!({"max-bandwidth": 0}));
    src
}

/// A destination waiting on `incoming`.
fn destination(dir: &Path, name: &str, incoming: &str, extra: &[String]) -> Hopvm {
    let mut args = vec![
        String::from("--memory"),
        String::from(MEMORY),
        String::from("--incoming"),
        String::from(incoming),
    ];
    args.extend_from_slice(extra);
    let mut dst = Hopvm::spawn(dir, name, &strs(&args));
    events_on(&mut dst);
    dst
}

/// A destination with the server credentials `tls0`, listening on a free TCP port; the
/// `migrate` arguments that reach it by the name its certificate carries (`localhost`).
fn tls_destination(dir: &TempDir, certs: &Certs) -> (Hopvm, Value) {
    let port = free_tcp_port();
    let dst = destination(
        &dir.0,
        "dst",
        &format!("tcp:127.0.0.1:{port}"),
        &object("tls0", &certs.path("dst"), "server"),
    );
    (dst, json!({"uri": format!("tcp:localhost:{port}")}))
}

/// The migration completed, the guest verifies on the destination, the source is done.
fn check_moved(src: &mut Hopvm, dst: &mut Hopvm) {
    src.wait_migration("completed", LONG);
    let before = passes(&dst.out.text());
    dst.out.wait_for(LONG, "passes on the destination", |t| {
        passes(t) >= before + 2
    });
    assert_eq!(dst.status(), "running");
    assert_eq!(src.status(), "postmigrate");
    for vm in [&*src, &*dst] {
        assert!(!vm.out.text().contains("CORRUPT"), "{}", vm.out.text());
    }
}

/// The source's migration failed; its error; the source guest still runs and verifies.
fn check_refused(src: &mut Hopvm) -> String {
    src.wait_migration("failed", LONG);
    let info = src.cmd("query-migrate", Value::Null);
    assert_eq!(info["status"], "failed", "{info}");
    let error = info["error-desc"].as_str().unwrap_or("").to_string();
    eprintln!("refused: {error}");
    assert_eq!(src.status(), "running");
    let before = passes(&src.out.text());
    src.out
        .wait_for(LONG, "the source guest goes on", |t| passes(t) > before);
    assert!(!src.out.text().contains("CORRUPT"), "{}", src.out.text());
    error
}

struct Certs {
    ca: Ca,
    dir: PathBuf,
}

impl Certs {
    /// A CA, a destination directory `dst` for `names` and a source directory `src`.
    fn new(dir: &TempDir, names: &[&str]) -> Self {
        let ca = Ca::new("hopvm test CA");
        ca.server_dir(&dir.join("dst"), names, false);
        ca.client_dir(&dir.join("src"), false);
        Self {
            ca,
            dir: dir.0.clone(),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.join(p)
    }

    /// A source directory `other-ca` whose client certificate comes from another CA, beside
    /// the right CA certificate (so that this source trusts the destination, and only the
    /// destination can refuse).
    fn other_ca_client(&self) {
        Ca::new("another CA").client_dir(&self.path("other-ca"), false);
        std::fs::copy(
            self.path("src").join("ca-cert.pem"),
            self.path("other-ca").join("ca-cert.pem"),
        )
        .unwrap();
    }
}

#[test]
fn tls_migration_over_tcp() {
    let dir = TempDir::new("tls-tcp");
    let certs = Certs::new(&dir, &["localhost"]);
    let port = free_tcp_port();
    let mut dst = destination(
        &dir.0,
        "dst",
        &format!("tcp:127.0.0.1:{port}"),
        &object("tls0", &certs.path("dst"), "server"),
    );
    // Set after the destination started listening: taken when the source connects.
    dst.cmd("migrate-set-parameters", json!({"tls-creds": "tls0"}));
    let mut src = source(&dir.0, "src", &object("tls0", &certs.path("src"), "client"));
    src.cmd("migrate-set-parameters", json!({"tls-creds": "tls0"}));
    let p = src.cmd("query-migrate-parameters", Value::Null);
    assert_eq!(
        (&p["tls-creds"], &p["tls-hostname"]),
        (&json!("tls0"), &json!(""))
    );
    // The destination's certificate names localhost: the URI's host is what is checked.
    src.cmd("migrate", json!({"uri": format!("tcp:localhost:{port}")}));
    check_moved(&mut src, &mut dst);
}

#[test]
fn tls_refusals_leave_the_source_running() {
    let dir = TempDir::new("tls-refuse");
    let certs = Certs::new(&dir, &["localhost"]);
    certs.other_ca_client();
    certs.ca.client_dir(&certs.path("expired"), true);
    let (mut dst, uri) = tls_destination(&dir, &certs);
    dst.cmd("migrate-set-parameters", json!({"tls-creds": "tls0"}));
    let mut src = source(&dir.0, "src", &[]);

    // A plaintext source: the destination refuses the connection.
    src.cmd("migrate", uri.clone());
    let error = check_refused(&mut src);
    assert!(!error.is_empty());
    dst.err
        .wait_for_lines(LONG, "the destination's refusal", |t| {
            t.contains("refused a connection") && t.contains("TLS handshake failed")
        });

    // Credentials made at run time (object-add), from another CA: refused by the
    // destination, which says why in its alert; the source names it.
    for (id, sub, reason) in [
        ("other", "other-ca", "UnknownCA"),
        ("old", "expired", "CertificateExpired"),
    ] {
        src.cmd(
            "object-add",
            json!({"qom-type": "tls-creds-x509", "id": id, "endpoint": "client",
                   "dir": certs.path(sub).display().to_string()}),
        );
        src.cmd("migrate-set-parameters", json!({"tls-creds": id}));
        src.cmd("migrate", uri.clone());
        let error = check_refused(&mut src);
        assert!(error.contains(reason), "{id}: {error}");
    }

    // The right credentials, but a name the destination's certificate does not carry: the
    // source refuses the destination.
    src.cmd(
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": "good", "endpoint": "client",
               "dir": certs.path("src").display().to_string()}),
    );
    src.cmd(
        "migrate-set-parameters",
        json!({"tls-creds": "good", "tls-hostname": "elsewhere.example"}),
    );
    src.cmd("migrate", uri.clone());
    let error = check_refused(&mut src);
    assert!(
        error.contains("certificate not valid for name \"elsewhere.example\""),
        "{error}"
    );

    // Credentials that do not exist, and a server object on the source: QEMU's errors.
    for (creds, expect) in [
        ("nosuch", "No TLS credentials with id 'nosuch'"),
        (
            "tls-server",
            "Expecting TLS credentials with a client endpoint",
        ),
    ] {
        if creds == "tls-server" {
            src.cmd(
                "object-add",
                json!({"qom-type": "tls-creds-x509", "id": creds, "endpoint": "server",
                       "dir": certs.path("dst").display().to_string()}),
            );
        }
        src.cmd("migrate-set-parameters", json!({"tls-creds": creds}));
        src.cmd("migrate", uri.clone());
        assert_eq!(check_refused(&mut src), expect);
    }

    // After all that, the destination is still waiting: the right source gets through.
    assert_eq!(dst.status(), "inmigrate");
    src.cmd(
        "migrate-set-parameters",
        json!({"tls-creds": "good", "tls-hostname": ""}),
    );
    src.cmd("migrate", uri);
    check_moved(&mut src, &mut dst);
}

/// Whether `wire` holds a page of the dirty guest: 4 KiB of one repeated non-zero qword.
fn has_guest_page(wire: &[u8]) -> bool {
    let mut i = 0;
    while i + 4096 <= wire.len() {
        let q = &wire[i..i + 8];
        if q != [0u8; 8] && wire[i + 8..i + 16] == *q && wire[i..i + 4096].chunks(8).all(|c| c == q)
        {
            return true;
        }
        i += 1;
    }
    false
}

/// Migrates the busy guest over a unix socket through the recording proxy; returns the
/// source's bytes as seen on the wire.
fn captured(dir: &TempDir, tls: bool) -> Vec<u8> {
    let certs = Certs::new(dir, &["localhost"]);
    let sock = dir.join("dst-mig.sock");
    let (src_obj, dst_obj) = if tls {
        (
            object("tls0", &certs.path("src"), "client").to_vec(),
            object("tls0", &certs.path("dst"), "server").to_vec(),
        )
    } else {
        (Vec::new(), Vec::new())
    };
    let mut dst = destination(&dir.0, "dst", &format!("unix:{}", sock.display()), &dst_obj);
    let mut src = source(&dir.0, "src", &src_obj);
    if tls {
        dst.cmd("migrate-set-parameters", json!({"tls-creds": "tls0"}));
        // A unix socket has no host name: tls-hostname gives the one to check.
        src.cmd(
            "migrate-set-parameters",
            json!({"tls-creds": "tls0", "tls-hostname": "localhost"}),
        );
    }
    let proxy = Proxy::start(&dir.join("proxy.sock"), &sock, Policy::Record);
    src.cmd(
        "migrate",
        json!({"uri": format!("unix:{}", proxy.path.display())}),
    );
    check_moved(&mut src, &mut dst);
    drop(src);
    proxy
        .done_rx
        .recv_timeout(LONG)
        .expect("the source's side of the proxy ends");
    proxy.recorded()
}

#[test]
fn tls_capture_shows_no_guest_memory() {
    let plain = captured(&TempDir::new("tls-capture-plain"), false);
    let sealed = captured(&TempDir::new("tls-capture-tls"), true);
    // Both carried a whole stream (a 4 MiB working set at least).
    assert!(
        plain.len() > 4 << 20,
        "plain capture: {} bytes",
        plain.len()
    );
    assert!(
        sealed.len() > 4 << 20,
        "TLS capture: {} bytes",
        sealed.len()
    );
    assert!(
        has_guest_page(&plain),
        "the plaintext capture must show the guest's pages (else this test cannot fail)"
    );
    assert!(
        !has_guest_page(&sealed),
        "guest memory in clear on the wire"
    );
    assert!(
        !sealed.windows(4).take(64).any(|w| w == b"QEVM"),
        "the stream header in clear"
    );
}

#[test]
fn tls_between_two_network_namespaces() {
    use hopvm::tools::netns::{NetnsPair, DST_ADDR};
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP tls_between_two_network_namespaces (needs root to create namespaces)");
        return;
    }
    let hosts = NetnsPair::create("hopvm-tls-").expect("the two hosts");
    let dir = TempDir::new("tls-netns");
    // The destination's certificate carries its address (an IP SAN).
    let certs = Certs::new(&dir, &[DST_ADDR]);
    let mut args = dirty_args(MEMORY, "4");
    args.extend(object("tls0", &certs.path("src"), "client"));
    let mut src = Hopvm::spawn_with(&dir.0, "src", &strs(&args), in_netns(hosts.src()));
    src.out.wait_for(LONG, "a first pass", |t| passes(t) >= 1);
    let mut args: Vec<String> = ["--memory", MEMORY, "--incoming", "tcp:0:4444"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(object("tls0", &certs.path("dst"), "server"));
    let mut dst = Hopvm::spawn_with(&dir.0, "dst", &strs(&args), in_netns(hosts.dst()));
    for vm in [&mut src, &mut dst] {
        events_on(vm);
        vm.cmd("migrate-set-parameters", json!({"tls-creds": "tls0"}));
    }
    src.cmd("migrate-set-parameters", json!({"max-bandwidth": 0}));
    src.cmd("migrate", json!({"uri": format!("tcp:{DST_ADDR}:4444")}));
    check_moved(&mut src, &mut dst);
    drop((src, dst));
    drop(hosts);
}

/// Connects to a TCP port, retrying while nothing listens yet.
fn connect_retry(port: u16) -> std::net::TcpStream {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => return s,
            Err(e) if std::time::Instant::now() > deadline => panic!("no monitor: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// What a client gets from the monitor before the server closes or `timeout` passes.
fn read_some(r: &mut dyn std::io::Read) -> String {
    let mut buf = [0u8; 4096];
    match r.read(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => format!("error: {e}"),
    }
}

/// A VM waiting for `migrate-incoming` whose QMP monitor listens on TLS at `port` with the
/// destination's credentials (`mon`) and `qmp_opts` after them, and `extra` arguments.
fn tls_monitor(
    certs: &Certs,
    port: u16,
    qmp_opts: &str,
    extra: &[&str],
) -> (std::process::Child, common::Capture, common::Capture) {
    let qmp = format!("tcp:127.0.0.1:{port},tls-creds=mon{qmp_opts}");
    let mon = object("mon", &certs.path("dst"), "server");
    let mut args = vec![
        "--memory",
        MEMORY,
        "--incoming",
        "defer",
        "--qmp",
        &qmp,
        &mon[0],
        &mon[1],
    ];
    args.extend_from_slice(extra);
    common::proc::spawn_plain(&args)
}

#[test]
fn tls_qmp_monitor() {
    use migration::transport::tls::{Endpoint, TlsCredsX509, TlsReader, TlsWriter};
    use std::io::{BufRead, Write};
    let dir = TempDir::new("tls-qmp");
    let certs = Certs::new(&dir, &["localhost"]);
    certs.other_ca_client();
    let port = free_tcp_port();
    let (mut child, _out, err) = tls_monitor(&certs, port, "", &[]);
    let client = |sub: &str| {
        TlsCredsX509::load("c", &certs.path(sub), Endpoint::Client, true)
            .unwrap()
            .client(Some("localhost"))
            .unwrap()
    };

    // A plaintext client gets no greeting: the server wants a handshake and hangs up.
    let mut plain = connect_retry(port);
    plain
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    plain
        .write_all(b"{\"execute\": \"qmp_capabilities\"}\n")
        .unwrap();
    let got = read_some(&mut plain);
    assert!(!got.contains("QMP"), "plaintext client served: {got}");

    // A certificate from another CA: refused.
    let sock = connect_retry(port);
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let got = match client("other-ca").connect(sock.into()) {
        Err(e) => e.to_string(),
        Ok(t) => read_some(&mut TlsReader(t)),
    };
    assert!(
        !got.contains("QMP"),
        "a foreign certificate was served: {got}"
    );

    // The right certificate: the monitor answers.
    let sock = connect_retry(port);
    let t = client("src").connect(sock.into()).unwrap();
    let mut r = std::io::BufReader::new(TlsReader(t.clone()));
    let mut w = TlsWriter(t);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("\"QMP\""), "greeting: {line}");
    for (cmd, want) in [
        ("qmp_capabilities", "\"return\": {}"),
        ("query-status", "\"status\": \"inmigrate\""),
    ] {
        writeln!(w, "{{\"execute\": \"{cmd}\"}}").unwrap();
        w.flush().unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        assert!(line.contains(want), "{cmd}: {line}");
    }
    writeln!(w, "{{\"execute\": \"quit\"}}").unwrap();
    w.flush().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}; stderr: {}", err.text());
}

/// Issue 12 with issue 9: sets the `multifd` capability and `multifd-channels` on `vm`.
fn multifd_on(vm: &mut Hopvm, channels: u8) {
    vm.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "multifd", "state": true}]}),
    );
    vm.cmd(
        "migrate-set-parameters",
        json!({"multifd-channels": channels}),
    );
}

/// A multifd destination with TLS (`--incoming defer`, then the capabilities and
/// `tls-creds`, then `migrate-incoming`, QEMU's order).
fn multifd_destination(certs: &Certs, dir: &TempDir, name: &str, uri: &str, ch: u8) -> Hopvm {
    let mut dst = destination(
        &dir.0,
        name,
        "defer",
        &object("tls0", &certs.path("dst"), "server"),
    );
    multifd_on(&mut dst, ch);
    dst.cmd("migrate-set-parameters", json!({"tls-creds": "tls0"}));
    dst.cmd("migrate-incoming", json!({"uri": uri}));
    dst
}

/// A multifd source with the client credentials set (`tls-hostname` for unix sockets).
fn multifd_source(certs: &Certs, dir: &TempDir, name: &str, ch: u8) -> Hopvm {
    let mut src = source(&dir.0, name, &object("tls0", &certs.path("src"), "client"));
    multifd_on(&mut src, ch);
    src.cmd(
        "migrate-set-parameters",
        json!({"tls-creds": "tls0", "tls-hostname": "localhost"}),
    );
    src
}

/// The completed migration's `multifd-bytes`.
fn multifd_bytes(src: &mut Hopvm) -> u64 {
    let info = src.cmd("query-migrate", Value::Null);
    assert_eq!(info["status"], "completed", "{info}");
    info["ram"]["multifd-bytes"].as_u64().unwrap_or(0)
}

#[test]
fn tls_multifd_over_tcp_and_unix() {
    for (channels, unix) in [(2, false), (4, false), (4, true)] {
        let dir = TempDir::new(&format!("tls-mfd-{channels}-{unix}"));
        let certs = Certs::new(&dir, &["localhost"]);
        let uri = if unix {
            format!("unix:{}", dir.join("mig.sock").display())
        } else {
            format!("tcp:localhost:{}", free_tcp_port())
        };
        let mut dst = multifd_destination(&certs, &dir, "dst", &uri, channels);
        let mut src = multifd_source(&certs, &dir, "src", channels);
        src.cmd("migrate", json!({ "uri": uri }));
        check_moved(&mut src, &mut dst);
        // The 4 MiB working set went over the channels, sealed.
        let bytes = multifd_bytes(&mut src);
        assert!(
            bytes >= 4 << 20,
            "{channels} channels: {bytes} multifd bytes"
        );
    }
}

#[test]
fn tls_multifd_refuses_a_plaintext_source_and_waits_on() {
    let dir = TempDir::new("tls-mfd-plain");
    let certs = Certs::new(&dir, &["localhost"]);
    let uri = format!("tcp:localhost:{}", free_tcp_port());
    let mut dst = multifd_destination(&certs, &dir, "dst", &uri, 2);
    // A peer that connects and hangs up at once: refused, the destination waits on.
    let port: u16 = uri.rsplit(':').next().unwrap().parse().unwrap();
    drop(std::net::TcpStream::connect(("127.0.0.1", port)).unwrap());
    dst.err
        .wait_for_lines(LONG, "the refused empty connection", |t| {
            t.contains("refused a connection") && t.contains("the peer closed the connection")
        });
    // A plaintext multifd source: every one of its connections is refused at the handshake.
    let mut plain = source(&dir.0, "plain", &[]);
    multifd_on(&mut plain, 2);
    plain.cmd("migrate", json!({ "uri": uri }));
    let error = check_refused(&mut plain);
    assert!(!error.is_empty());
    dst.err
        .wait_for_lines(LONG, "the destination's refusal", |t| {
            t.contains("refused a connection") && t.contains("TLS handshake failed")
        });
    assert_eq!(dst.status(), "inmigrate");
    // The destination still waits: a TLS multifd source gets through.
    let mut src = multifd_source(&certs, &dir, "src", 2);
    src.cmd("migrate", json!({ "uri": uri }));
    check_moved(&mut src, &mut dst);
    assert!(multifd_bytes(&mut src) > 0);
    // The plaintext source was not harmed either.
    assert_eq!(plain.status(), "running");
}

/// Migrates the busy guest with 2 multifd channels over a unix socket through a proxy that
/// records every connection; the source's bytes, one entry per connection.
fn captured_multifd(dir: &TempDir, tls: bool) -> Vec<Vec<u8>> {
    let certs = Certs::new(dir, &["localhost"]);
    let sock = dir.join("dst-mig.sock");
    let uri = format!("unix:{}", sock.display());
    let (mut src, mut dst) = if tls {
        (
            multifd_source(&certs, dir, "src", 2),
            multifd_destination(&certs, dir, "dst", &uri, 2),
        )
    } else {
        let mut dst = destination(&dir.0, "dst", "defer", &[]);
        multifd_on(&mut dst, 2);
        dst.cmd("migrate-incoming", json!({ "uri": uri }));
        let mut src = source(&dir.0, "src", &[]);
        multifd_on(&mut src, 2);
        (src, dst)
    };
    let via = dir.join("proxy.sock");
    let proxy = common::proxy::MultiProxy::start(&via, sock, None);
    src.cmd("migrate", json!({"uri": format!("unix:{}", via.display())}));
    check_moved(&mut src, &mut dst);
    assert!(multifd_bytes(&mut src) >= 4 << 20);
    drop(src);
    for _ in 0..3 {
        proxy
            .done_rx
            .recv_timeout(LONG)
            .expect("every connection's source side ends");
    }
    let recorded = proxy.recorded.lock().unwrap().clone();
    recorded
}

#[test]
fn tls_multifd_capture_shows_no_guest_memory() {
    let plain = captured_multifd(&TempDir::new("tls-mfd-capture-plain"), false);
    let sealed = captured_multifd(&TempDir::new("tls-mfd-capture-tls"), true);
    // The main channel and two multifd channels, each way.
    assert_eq!(plain.len(), 3, "plain connections");
    assert_eq!(sealed.len(), 3, "TLS connections");
    // In clear, the multifd channels carry the guest's pages (else this test cannot fail).
    let magic = [0x11u8, 0x22, 0x33, 0x44];
    let plain_channels: Vec<_> = plain.iter().filter(|c| c.starts_with(&magic)).collect();
    assert_eq!(plain_channels.len(), 2);
    assert!(
        plain_channels.iter().any(|c| has_guest_page(c)),
        "the plaintext multifd channels must show the guest's pages"
    );
    let total: usize = sealed.iter().map(Vec::len).sum();
    assert!(total > 4 << 20, "TLS capture: {total} bytes");
    for (i, c) in sealed.iter().enumerate() {
        assert!(
            !has_guest_page(c),
            "guest memory in clear on connection {i}"
        );
        assert!(
            !c.windows(4).take(64).any(|w| w == b"QEVM" || w == magic),
            "a stream or multifd header in clear on connection {i}"
        );
    }
    // Both multifd channels carried a share of the pages, sealed.
    assert!(
        sealed.iter().filter(|c| c.len() > 1 << 20).count() >= 2,
        "{:?}",
        sealed.iter().map(Vec::len).collect::<Vec<_>>()
    );
}

/// The source's client certificate subject in the `tls-authz` tests, and its distinguished
/// name as QEMU 7.2 (GnuTLS) and hopvm write it: the certificate's order, commas escaped.
const SOURCE_DN: [(&str, &str); 4] = [
    ("C", "GB"),
    ("L", "London"),
    ("O", "Example, Org"),
    ("CN", "source.example.com"),
];
const SOURCE_ID: &str = r"C=GB,L=London,O=Example\, Org,CN=source.example.com";

/// Certificates for `localhost`, with the source's client certificate made out to
/// [`SOURCE_DN`].
fn authz_certs(dir: &TempDir) -> Certs {
    let certs = Certs::new(dir, &["localhost"]);
    certs
        .ca
        .client_dir_dn(&certs.path("src"), &SOURCE_DN, false);
    certs
}

/// A QMP command that must fail; its error text.
fn refused_cmd(vm: &mut Hopvm, command: &str, args: Value) -> String {
    match vm.qmp.execute(command, Some(args)) {
        Ok(v) => panic!("{command} succeeded: {v}"),
        Err(e) => e.to_string(),
    }
}

/// Issue 12's `tls-authz`: the destination checks the source's certificate's distinguished
/// name against an authorization object after the handshake. Objects from the command line
/// (key=value with `,,` in the DN, dotted rules, and JSON) and QMP; a denying `authz-simple`,
/// an `authz-list` whose rule denies, and an id that names nothing each refuse the source,
/// whose migration fails naming the destination's `access_denied` (or `internal_error`)
/// while its guest runs on and the destination, saying whom it refused and why, keeps
/// waiting; then an `authz-list` that allows the source lets the busy guest across intact.
#[test]
fn tls_authz_refuses_then_allows_the_source() {
    let dir = TempDir::new("tls-authz");
    let certs = authz_certs(&dir);
    let port = free_tcp_port();
    let uri = json!({"uri": format!("tcp:localhost:{port}")});
    let mut objects = object("tls0", &certs.path("dst"), "server").to_vec();
    objects.extend([
        String::from("--object"),
        String::from("authz-simple,id=other,identity=C=GB,,L=London,,CN=other.example.com"),
        String::from("--object"),
        String::from(
            "authz-list,id=deny-src,policy=allow,rules.0.match=*CN=source.example.com,\
             rules.0.policy=deny,rules.0.format=glob",
        ),
        String::from("--object"),
        json!({"qom-type": "authz-list", "id": "allow-src", "policy": "deny",
               "rules": [{"match": "*CN=intruder*", "policy": "deny", "format": "glob"},
                         {"match": SOURCE_ID, "policy": "allow"}]})
        .to_string(),
    ]);
    let mut dst = destination(&dir.0, "dst", &format!("tcp:127.0.0.1:{port}"), &objects);
    dst.cmd(
        "migrate-set-parameters",
        json!({"tls-creds": "tls0", "tls-authz": "other"}),
    );
    let mut src = source(&dir.0, "src", &object("tls0", &certs.path("src"), "client"));
    src.cmd("migrate-set-parameters", json!({"tls-creds": "tls0"}));

    let denied = format!("TLS x509 authz check for {SOURCE_ID} is denied");
    for (authz, alert, dst_says) in [
        ("other", "AccessDenied", denied.clone()),
        ("deny-src", "AccessDenied", denied.clone()),
        (
            "missing",
            "InternalError",
            String::from("Cannot find QAuthZ object ID missing"),
        ),
    ] {
        dst.cmd("migrate-set-parameters", json!({"tls-authz": authz}));
        let before = dst.err.text().matches(&dst_says).count();
        src.cmd("migrate", uri.clone());
        let error = check_refused(&mut src);
        assert!(
            error.contains(&format!("received fatal alert: {alert}")),
            "{authz}: {error}"
        );
        dst.err
            .wait_for_lines(LONG, "the destination's refusal", |t| {
                t.matches(&dst_says).count() > before
            });
        assert!(dst.err.text().contains("refused a connection from"));
        assert_eq!(dst.status(), "inmigrate");
    }

    // The object tls-authz names cannot be deleted; another can.
    dst.cmd("migrate-set-parameters", json!({"tls-authz": "allow-src"}));
    assert!(
        refused_cmd(&mut dst, "object-del", json!({"id": "allow-src"}))
            .ends_with("object 'allow-src' is in use by the migration parameter tls-authz")
    );
    dst.cmd("object-del", json!({"id": "other"}));
    let p = dst.cmd("query-migrate-parameters", Value::Null);
    assert_eq!(p["tls-authz"], "allow-src", "{p}");

    src.cmd("migrate", uri);
    check_moved(&mut src, &mut dst);
}

/// An `authz-list-file` (QMP `object-add`, `refresh` on) edited between two migrations
/// changes the outcome: the file first denies the source, then allows it. Bad objects given
/// to `object-add` are refused with QEMU's messages and leave nothing behind.
#[test]
fn tls_authz_list_file_edited_between_migrations() {
    let dir = TempDir::new("tls-authz-file");
    let certs = authz_certs(&dir);
    let acl = certs.path("acl.json");
    let write_acl = |v: Value| std::fs::write(&acl, v.to_string()).unwrap();
    write_acl(json!({"policy": "allow",
                     "rules": [{"match": "*,O=Example\\, Org,*", "policy": "deny",
                                "format": "glob"}]}));
    let (mut dst, uri) = tls_destination(&dir, &certs);

    // Bad objects: clear errors, nothing added.
    let missing = certs.path("no-such-acl.json");
    for (args, want) in [
        (
            json!({"qom-type": "authz-list", "id": "l",
                   "rules": [{"match": "x", "policy": "perhaps"}]}),
            String::from("Parameter 'policy' does not accept value 'perhaps'"),
        ),
        (
            json!({"qom-type": "authz-list", "id": "l", "rules": "x"}),
            String::from("Invalid parameter type for 'rules', expected: array"),
        ),
        (
            json!({"qom-type": "authz-simple", "id": "s"}),
            String::from("Parameter 'identity' is missing"),
        ),
        (
            json!({"qom-type": "authz-list-file", "id": "f",
                   "filename": missing.display().to_string()}),
            format!("Unable to read '{}'", missing.display()),
        ),
        (
            json!({"qom-type": "authz-pam", "id": "p", "service": "qemu"}),
            String::from("authz-pam is not supported"),
        ),
    ] {
        let err = refused_cmd(&mut dst, "object-add", args.clone());
        assert!(err.contains(&want), "{args}: {err}");
    }
    assert!(
        refused_cmd(&mut dst, "object-del", json!({"id": "l"})).ends_with("object 'l' not found")
    );

    dst.cmd(
        "object-add",
        json!({"qom-type": "authz-list-file", "id": "acl",
               "filename": acl.display().to_string(), "refresh": true}),
    );
    assert!(refused_cmd(
        &mut dst,
        "object-add",
        json!({"qom-type": "authz-simple", "id": "acl", "identity": "x"})
    )
    .contains("duplicate"));
    dst.cmd(
        "migrate-set-parameters",
        json!({"tls-creds": "tls0", "tls-authz": "acl"}),
    );
    let mut src = source(&dir.0, "src", &object("tls0", &certs.path("src"), "client"));
    src.cmd("migrate-set-parameters", json!({"tls-creds": "tls0"}));

    src.cmd("migrate", uri.clone());
    let error = check_refused(&mut src);
    assert!(error.contains("AccessDenied"), "{error}");
    let denied = format!("TLS x509 authz check for {SOURCE_ID} is denied");
    dst.err
        .wait_for_lines(LONG, "the destination's refusal", |t| t.contains(&denied));

    // The same object, the file edited: now the source is let in.
    write_acl(json!({"policy": "deny",
                     "rules": [{"match": "C=GB,*,CN=source.example.com", "policy": "allow",
                                "format": "glob"}]}));
    src.cmd("migrate", uri);
    check_moved(&mut src, &mut dst);
}

/// The TLS monitor's `tls-authz` (QEMU's `-chardev socket,…,tls-creds=ID,tls-authz=ID`): a
/// client whose certificate the CA signed but the object does not allow gets no greeting.
#[test]
fn tls_authz_on_the_qmp_monitor() {
    use migration::transport::tls::{Endpoint, TlsCredsX509, TlsReader};
    use std::io::BufRead;
    let dir = TempDir::new("tls-authz-qmp");
    let certs = Certs::new(&dir, &["localhost"]);
    certs.ca.client_dir_dn(
        &certs.path("admin"),
        &[("O", "Ops"), ("CN", "admin")],
        false,
    );
    let port = free_tcp_port();
    let (mut child, _out, err) = tls_monitor(
        &certs,
        port,
        ",tls-authz=ops",
        &[
            "--object",
            "authz-list,id=ops,rules.0.match=O=Ops,,CN=*,rules.0.policy=allow,\
             rules.0.format=glob",
        ],
    );
    let greeting = |sub: &str| {
        let sock = connect_retry(port);
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let client = TlsCredsX509::load("c", &certs.path(sub), Endpoint::Client, true)
            .unwrap()
            .client(Some("localhost"))
            .unwrap();
        match client.connect(sock.into()) {
            Err(e) => e.to_string(),
            Ok(t) => {
                let mut line = String::new();
                match std::io::BufReader::new(TlsReader(t)).read_line(&mut line) {
                    Ok(_) => line,
                    Err(e) => format!("error: {e}"),
                }
            }
        }
    };
    // `CN=source`: signed by the CA, not allowed by the list (default deny).
    let got = greeting("src");
    assert!(!got.contains("QMP"), "a refused client was served: {got}");
    assert!(got.contains("AccessDenied"), "{got}");
    let got = greeting("admin");
    assert!(got.contains("\"QMP\""), "greeting: {got}");
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        err.text()
            .contains("TLS x509 authz check for CN=source is denied"),
        "{}",
        err.text()
    );
}

/// `tls-authz` with `multifd`: every connection of the migration is checked. A source whose
/// certificate the CA signed but the object does not allow is refused (its guest runs on);
/// the allowed source then moves the busy guest over 2 TLS multifd channels.
#[test]
fn tls_authz_with_multifd() {
    let dir = TempDir::new("tls-authz-mfd");
    let certs = authz_certs(&dir);
    certs
        .ca
        .client_dir_dn(&certs.path("intruder"), &[("CN", "intruder")], false);
    let uri = format!("tcp:localhost:{}", free_tcp_port());
    let mut dst = multifd_destination(&certs, &dir, "dst", &uri, 2);
    dst.cmd(
        "object-add",
        json!({"qom-type": "authz-simple", "id": "only-src", "identity": SOURCE_ID}),
    );
    dst.cmd("migrate-set-parameters", json!({"tls-authz": "only-src"}));

    let mut intruder = source(
        &dir.0,
        "intruder",
        &object("tls0", &certs.path("intruder"), "client"),
    );
    multifd_on(&mut intruder, 2);
    intruder.cmd("migrate-set-parameters", json!({"tls-creds": "tls0"}));
    intruder.cmd("migrate", json!({ "uri": uri }));
    let error = check_refused(&mut intruder);
    assert!(error.contains("AccessDenied"), "{error}");
    dst.err
        .wait_for_lines(LONG, "the destination's refusal", |t| {
            t.contains("TLS x509 authz check for CN=intruder is denied")
        });
    assert_eq!(dst.status(), "inmigrate");

    let mut src = multifd_source(&certs, &dir, "src", 2);
    src.cmd("migrate", json!({ "uri": uri }));
    check_moved(&mut src, &mut dst);
    assert!(multifd_bytes(&mut src) > 0);
    assert_eq!(intruder.status(), "running");
}

/// The identity `tls-authz` checks is the one QEMU 7.2 checks: the same destination command
/// line (QEMU's) under hopvm's QEMU front end and, when installed, under QEMU 7.2, with an
/// `authz-simple` that allows nobody; a TLS client with the source's certificate connects;
/// each prints the identity it refused, and both print [`SOURCE_ID`] (the certificate's
/// order, the comma in `O` escaped — not the RFC 4514 order QEMU's docs show).
#[test]
fn tls_authz_identity_as_qemu_7_2_names_it() {
    use common::proc::pump;
    use common::Capture;
    use migration::transport::tls::{Endpoint, TlsCredsX509, TlsReader, TlsWriter};
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};
    let dir = TempDir::new("tls-authz-qemu");
    let certs = authz_certs(&dir);
    let sock = dir.join("mon.sock");
    let args: Vec<String> = [
        "-M",
        "pc",
        "-cpu",
        "qemu64",
        "-enable-kvm",
        "-m",
        "32",
        "-display",
        "none",
        "-nodefaults",
        "-object",
        &format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=server",
            certs.path("dst").display()
        ),
        "-object",
        "authz-simple,id=az,identity=nobody",
        "-incoming",
        "defer",
        "-qmp",
        &format!("unix:{},server=on,wait=off", sock.display()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut seen = Vec::new();
    common::tools::on_hopvm_and_qemu(&args, |program, args| {
        let _ = std::fs::remove_file(&sock);
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = Capture::default();
        pump(child.stderr.take().unwrap(), err.clone());
        let mut qmp = qmp::client::QmpClient::connect_retry(&sock, LONG)
            .unwrap_or_else(|e| panic!("{program}: {e}; {}", err.text()));
        let port = free_tcp_port();
        for (cmd, a) in [
            (
                "migrate-set-parameters",
                json!({"tls-creds": "tls0", "tls-authz": "az"}),
            ),
            (
                "migrate-incoming",
                json!({"uri": format!("tcp:127.0.0.1:{port}")}),
            ),
        ] {
            qmp.execute(cmd, Some(a))
                .unwrap_or_else(|e| panic!("{program} {cmd}: {e}"));
        }
        let client = TlsCredsX509::load("c", &certs.path("src"), Endpoint::Client, true)
            .unwrap()
            .client(Some("localhost"))
            .unwrap();
        let t = client.connect(connect_retry(port).into()).unwrap();
        let _ = TlsWriter(t.clone()).write_all(b"QEVM");
        // The destination hangs up (QEMU without a word, hopvm with its alert).
        let read = TlsReader(t).read(&mut [0u8; 1]);
        assert!(
            !matches!(read, Ok(n) if n > 0),
            "{program} answered: {read:?}"
        );
        err.wait_for_lines(LONG, "the refusal", |t| t.contains(" is denied"));
        let text = err.text();
        let id = text
            .split("TLS x509 authz check for ")
            .nth(1)
            .and_then(|rest| rest.split(" is denied").next())
            .unwrap()
            .to_string();
        seen.push((program.to_string(), id));
        let _ = child.kill();
        let _ = child.wait();
    });
    assert_eq!(seen.len(), 1 + usize::from(common::tools::qemu_installed()));
    for (program, id) in &seen {
        assert_eq!(id, SOURCE_ID, "{program}");
    }
}
