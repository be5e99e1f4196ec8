//! Hostile input in CI: a few thousand seeded mutations each for the stream loader (with and
//! without `x-integrity`), the XBZRLE decoder, every device-state restore and the QMP input
//! path — no panic, no hang, no huge allocation (see `hostile/mod.rs`); with `x-integrity`
//! every changed stream is refused. The long run is `cargo bench -p hopvm --bench
//! hostile_input`.

mod common;
mod hostile;

use hostile::{Counting, Streams};

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// One test, so that the allocation record is not shared with a parallel test.
#[test]
fn mutated_inputs_are_refused_or_harmless() {
    let streams = Streams::new();
    let plain = streams.plain_campaign(1500, 1);
    println!("stream loader: {plain}");
    assert!(plain.rejected > plain.cases / 2, "{plain}");
    let integrity = streams.integrity_campaign(1500, 2);
    println!("stream loader, x-integrity: {integrity}");
    assert_eq!(integrity.accepted, 0);
    let devices = streams.device_campaign(1500, 3);
    println!("device restore: {devices}");
    assert!(devices.rejected > 0 && devices.accepted > 0, "{devices}");
    let xbzrle = hostile::xbzrle_campaign(5000, 4);
    println!("xbzrle decoder: {xbzrle}");
    let dir = common::proc::TempDir::new("hostile-qmp");
    let server = hostile::qmp_server(&dir.0);
    let qmp = hostile::qmp_campaign(&server, 1000, 5);
    println!("qmp input: {qmp}");
    server.shutdown();
}
