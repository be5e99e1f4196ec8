//! QEMU's self-announce: rounds of RARP frames from each virtio-net card's MAC on its tap (and,
//! for a driver that accepted VIRTIO_NET_F_GUEST_ANNOUNCE, a request to the guest to announce
//! itself), so that switches learn where the guest is now. After an incoming migration with
//! the `announce-*` migration parameters, and on QMP `announce-self` with its own.
//!
//! Timing as QEMU's `qemu_announce_self`: the first round at once, then the gaps
//! [`AnnounceParameters::gap_after`] gives. Each run is a thread (`announce`) that takes the big
//! lock for each round. Runs are named as QEMU's timers: the incoming migration's, and one per
//! `announce-self` `id` (default ""); a new run of a name replaces the one still going (it
//! stops before its next round).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use migration::thread::AnnounceParameters;

use crate::bus::lock;
use crate::vcpu::Machine;

/// Which run: QEMU's timer of the incoming migration, or an `announce-self` id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AnnounceTimer {
    /// After an incoming migration.
    Incoming,
    /// QMP `announce-self` with this `id`.
    Named(String),
}

/// The announcement runs of one VM.
#[derive(Default)]
pub struct Announcer {
    /// The current run of each timer (a run whose number is no longer here stops).
    current: Mutex<HashMap<AnnounceTimer, u64>>,
    next: AtomicU64,
}

/// A virtio-net card and its name (QEMU's network client name, for `interfaces`).
pub type NamedNic = (String, Arc<Mutex<virtio::VirtioPci>>);

impl Announcer {
    /// Starts a run of `timer` with `params` over `nics` (only those named in `interfaces`
    /// when given), replacing the timer's previous run.
    pub fn start(
        self: &Arc<Self>,
        timer: AnnounceTimer,
        params: AnnounceParameters,
        interfaces: Option<Vec<String>>,
        nics: Vec<NamedNic>,
        machine: Arc<Mutex<Machine>>,
    ) {
        let run = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        lock(&self.current).insert(timer.clone(), run);
        let nics: Vec<_> = nics
            .into_iter()
            .filter(|(name, _)| interfaces.as_ref().is_none_or(|l| l.contains(name)))
            .map(|(_, dev)| dev)
            .collect();
        if params.rounds == 0 || nics.is_empty() {
            return;
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name(String::from("announce"))
            .spawn(move || {
                for round in 1..=params.rounds {
                    if lock(&me.current).get(&timer) != Some(&run) {
                        return;
                    }
                    {
                        let _g = lock(&machine);
                        for dev in &nics {
                            lock(dev).announce();
                        }
                    }
                    if round < params.rounds {
                        // The protocol's own timing, not a synchronisation.
                        std::thread::sleep(params.gap_after(round));
                    }
                }
            });
        if let Err(e) = spawned {
            log::warn!("cannot start the announce thread: {e}");
        }
    }
}
