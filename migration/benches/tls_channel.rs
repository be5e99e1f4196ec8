//! The cost of TLS on a migration channel: 1 GiB through a loopback TCP connection, written in
//! the migration thread's batches (1 MiB `write_vectored` calls of 4 KiB pages) and read through
//! the destination's 1 MiB `BufReader` in 4 KiB reads, plain and over TLS 1.3
//! ([`migration::transport::tls`]), with the return path open on the TLS channel as in a real
//! migration.
//!
//! `cargo bench -p migration --features test-certs --bench tls_channel` — prints GiB/s and the
//! CPU time of each side; nothing is asserted.

use std::io::{BufReader, IoSlice, Read, Write};
use std::time::Instant;

use migration::transport::tls::test_certs::Ca;
use migration::transport::tls::{Endpoint, TlsCredsX509};
use migration::transport::{connect_outgoing, listen_incoming, MigrationUri};

const PAGE: usize = 4096;
const BATCH: usize = 1 << 20;
const TOTAL: usize = 1 << 30;

fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn run(tls: bool, dir: &std::path::Path) {
    let listen: MigrationUri = "tcp:127.0.0.1:0".parse().unwrap();
    let incoming = listen_incoming(&listen).unwrap();
    let port = incoming.local_addr().unwrap().port();
    let server = TlsCredsX509::load("s", &dir.join("dst"), Endpoint::Server, true)
        .unwrap()
        .server()
        .unwrap();
    let reader = std::thread::spawn(move || {
        let ch = incoming
            .accept_channel_tls(&|| Ok(tls.then(|| server.clone())))
            .unwrap();
        let mut r = BufReader::with_capacity(1 << 20, ch.input);
        let mut page = vec![0u8; PAGE];
        let cpu0 = thread_cpu();
        let mut got = 0usize;
        while got < TOTAL {
            r.read_exact(&mut page).unwrap();
            got += PAGE;
        }
        thread_cpu() - cpu0
    });
    let to: MigrationUri = format!("tcp:127.0.0.1:{port}").parse().unwrap();
    let mut out = connect_outgoing(&to).unwrap();
    if tls {
        let client = TlsCredsX509::load("c", &dir.join("src"), Endpoint::Client, true)
            .unwrap()
            .client(Some("localhost"))
            .unwrap();
        out = out.start_tls(&client).unwrap();
    }
    // The return path is read by a thread of its own, as in a migration.
    let rp = out.return_path().map(|mut r| {
        std::thread::spawn(move || {
            let mut b = [0u8; 64];
            let _ = r.read(&mut b);
        })
    });
    let pages: Vec<u8> = (0..BATCH).map(|i| (i * 7 + (i >> 12)) as u8).collect();
    let start = Instant::now();
    let cpu0 = thread_cpu();
    let mut sent = 0;
    while sent < TOTAL {
        let iov: Vec<IoSlice<'_>> = pages.chunks(PAGE).map(IoSlice::new).collect();
        let mut n = 0;
        while n < BATCH {
            n += out.write_vectored(&iov[n / PAGE..]).unwrap();
        }
        sent += BATCH;
    }
    out.flush().unwrap();
    let send_cpu = thread_cpu() - cpu0;
    let recv_cpu = reader.join().unwrap();
    let secs = start.elapsed().as_secs_f64();
    out.finish().unwrap();
    if let Some(rp) = rp {
        let _ = rp.join();
    }
    println!(
        "{:<6} {:>6.2} GiB/s  sender CPU {:>5.2} s  receiver CPU {:>5.2} s  (1 GiB)",
        if tls { "tls" } else { "plain" },
        TOTAL as f64 / secs / f64::from(1u32 << 30),
        send_cpu,
        recv_cpu
    );
}

fn main() {
    let dir = std::env::temp_dir().join(format!("hopvm-tls-bench-{}", std::process::id()));
    let ca = Ca::new("bench CA");
    ca.server_dir(&dir.join("dst"), &["localhost"], false);
    ca.client_dir(&dir.join("src"), false);
    for tls in [false, true, false, true] {
        run(tls, &dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
