//! A running hopvm: the VM plus its run state, migration sections, migration state and the
//! events it reports — what the QMP commands act on.
//!
//! Every operation that changes whether the vCPUs run takes the big lock (the VM's
//! [`Machine`]) first; the migration registry is always locked after it, never before. The
//! threads and the whole lock order are in `docs/architecture.md`.

use std::sync::{Arc, Mutex, MutexGuard};

use migration::ram::RamSection;
use migration::registry::{Registry, RegistryError};
use migration::return_path::ReturnPathError;
use migration::stream::StreamReader;
use migration::thread::{
    Connector, Migration, MigrationError, MigrationEvent, MigrationHost, MigrationOutput,
};
use migration::transport::{
    connect_outgoing_cancellable, connect_outgoing_with, listen_incoming_with, ConnectCancel,
    IncomingChannel, MigrationUri, NamedFds, Outgoing, TransportError,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use crate::bus::lock;
use crate::config::VmConfig;
use crate::kvm_state::{SavedMsrs, VCPU_STATE_VERSION, VM_STATE_VERSION};
use crate::runstate::RunState;
use crate::sections::{
    DeviceSection, KvmDirtyLog, KvmVmSection, VcpuSection, DEVICE_STATE_VERSION,
};
use crate::vcpu::{Machine, VmEvent};
use crate::vm::{SharedWriter, Vm, VmError};

/// The RTC's section: CMOS RAM is battery-backed, so a reset keeps it (and the clock), as on
/// a PC and in QEMU.
const RTC_SECTION: &str = "mc146818rtc";

/// Registers a device's state as a section of its own.
fn device<D, S, E>(
    registry: &mut Registry,
    name: &'static str,
    dev: &Arc<Mutex<D>>,
    save: fn(&D) -> S,
    restore: fn(&mut D, &S) -> Result<(), E>,
) where
    D: Send + 'static,
    S: Serialize + DeserializeOwned + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    registry.register(
        name,
        0,
        DEVICE_STATE_VERSION,
        Box::new(DeviceSection::new(name, dev.clone(), save, restore)),
    );
}

/// Emits a QMP event: name and optional data.
pub type EventEmitter = Box<dyn Fn(&str, Option<Value>) + Send + Sync>;

/// Errors of instance operations, worded for QMP replies (QEMU's texts where QEMU has one).
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// `cont` in a state the guest cannot run from.
    #[error("cannot continue a VM in state {}", .0.as_str())]
    CannotContinue(RunState),
    /// `migrate` while a migration runs.
    #[error("There's a migration process in progress")]
    MigrationInProgress,
    /// `migrate` on a destination that has not loaded yet.
    #[error("Guest is waiting for an incoming migration")]
    WaitingForIncoming,
    /// A migration blocker is registered; its reason.
    #[error("{0}")]
    Blocked(String),
    /// The migration URI is invalid, or its channel could not be opened.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The migration thread refused to start.
    #[error(transparent)]
    Start(#[from] MigrationError),
    /// `migrate-incoming` without `-incoming`.
    #[error("'-incoming' was not specified on the command line")]
    NotIncoming,
    /// A second `migrate-incoming`.
    #[error("The incoming migration has already been started")]
    IncomingStarted,
    /// The incoming thread could not be spawned.
    #[error(transparent)]
    Thread(std::io::Error),
}

/// Why an incoming migration, or a stream given to [`Instance::load`], failed.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    /// No source connected.
    #[error(transparent)]
    Accept(TransportError),
    /// The multifd channels could not be accepted.
    #[error(transparent)]
    Multifd(#[from] migration::multifd::MultifdError),
    /// The stream did not load.
    #[error(transparent)]
    Load(#[from] RegistryError),
    /// Loaded, but the source could not be told so (it resumes its guest).
    #[error("cannot confirm the load to the source: {0}")]
    Confirm(#[source] std::io::Error),
    /// The source cancelled after the load.
    #[error("the source cancelled the migration after the load and runs the guest on")]
    SourceCancelled,
}

/// A running hopvm.
pub struct Instance {
    /// The VM.
    pub vm: Vm,
    /// The migration sections.
    pub registry: Mutex<Registry>,
    /// Migration parameters and the current or last migration.
    pub migration: Arc<Migration>,
    /// Run the guest once an incoming migration has loaded (no `--paused`).
    autostart: Mutex<bool>,
    events: Mutex<Option<EventEmitter>>,
    power_on: Vec<Vec<u8>>,
    incoming: Mutex<Incoming>,
    announcer: Arc<crate::announce::Announcer>,
}

/// Where the destination side of a migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Incoming {
    /// Not a destination.
    No,
    /// `--incoming defer`: waiting for QMP `migrate-incoming`.
    Deferred,
    /// Listening (QEMU's `setup`).
    Listening,
    /// Loading.
    Active,
    /// Loaded.
    Completed,
    /// Loaded, but the source never gave its go-ahead: paused.
    Unconfirmed,
}

/// The destination's MIGRATION events.
#[derive(Debug, Clone, Copy)]
enum IncomingEvent {
    Setup,
    Active,
    Completed,
    Failed,
}

/// How an incoming migration ended, when it did not fail.
enum Received {
    /// Loaded: start the guest (or leave it paused without autostart).
    Run,
    /// Loaded and already started (and the source told).
    Started,
    /// Loaded, but the source never sent its go-ahead (why): stay paused.
    Unconfirmed(ReturnPathError),
}

/// Reads and drops what the source still sends, for up to two seconds, so that it can read
/// the destination's verdict before the connection closes (closing with unread input would
/// reset it).
fn drain_briefly<R: std::io::Read + Send + 'static>(mut input: R) {
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let _ = std::thread::Builder::new()
        .name(String::from("incoming-drain"))
        .spawn(move || {
            let _ = std::io::copy(&mut input, &mut std::io::sink());
            let _ = done_tx.send(());
        });
    let _ = done_rx.recv_timeout(std::time::Duration::from_secs(2));
}

impl Instance {
    /// Builds the VM for `config` and registers its migration sections. The vCPUs are not
    /// started: see [`Instance::cont`].
    pub fn new(config: &VmConfig, serial_out: SharedWriter) -> Result<Arc<Self>, VmError> {
        let mut vm = Vm::build(config, serial_out)?;
        let migration = Arc::new(Migration::new());
        let mut registry = Registry::new();
        registry.register_live(
            "ram",
            0,
            migration::ram_format::RAM_SECTION_VERSION,
            Box::new(
                RamSection::new(
                    vm.memory.clone(),
                    Box::new(
                        KvmDirtyLog::new(vm.fd.clone(), vm.memory.clone())
                            .with_rings(vm.dirty_rings.clone())
                            .with_profile(migration.ram.clone()),
                    ),
                    migration.xbzrle.clone(),
                    migration.ram.clone(),
                )
                .with_multifd(migration.multifd.clone()),
            ),
        );
        let vcpus = vm.control().vcpus();
        let msrs = Arc::new(
            SavedMsrs::probe(vm.kvm(), &vm.fd, &lock(&vcpus[0])).map_err(VmError::KvmState)?,
        );
        // Without these, part of a vCPU's state cannot be read back from KVM: migrating
        // would silently lose it, so migration is blocked instead.
        let caps = msrs.caps();
        for (missing, what) in [
            (
                !caps.vcpu_events,
                "KVM_CAP_VCPU_EVENTS (pending exceptions and interrupts)",
            ),
            (caps.adjust_clock == 0, "KVM_CAP_ADJUST_CLOCK (kvmclock)"),
        ] {
            if missing {
                registry.add_blocker(format!(
                    "this host's kvm lacks {what}: the vm cannot be migrated"
                ));
            }
        }
        for (i, vcpu) in vcpus.into_iter().enumerate() {
            registry.register(
                "cpu",
                i as u32,
                VCPU_STATE_VERSION,
                Box::new(VcpuSection::new(vcpu, msrs.clone())),
            );
        }
        let d = &vm.devices;
        if d.ioapic.is_none() {
            registry.register(
                "kvm-vm",
                0,
                VM_STATE_VERSION,
                Box::new(KvmVmSection::new(vm.fd.clone())),
            );
        } else {
            // Under kernel-irqchip=split KVM holds no PIC, IOAPIC or PIT (KVM_GET_IRQCHIP
            // fails): its VM-wide state is kvmclock alone; the userspace IOAPIC, the IOMMU and
            // edu have sections of their own.
            registry.register(
                "kvm-split-vm",
                0,
                VM_STATE_VERSION,
                Box::new(crate::sections::KvmSplitVmSection::new(vm.fd.clone())),
            );
        }
        // The chipset's configuration spaces (PAM, SMRAM, PIRQ routes, command registers …),
        // in QEMU's sections, loaded before the devices: their restores drive their INTx
        // lines through the PIRQ routes already restored, so no IRQ the guest did not route
        // is raised on the way (QEMU's piix_post_load avoids the same).
        match &d.chipset {
            crate::vm::Chipset::Pc { i440fx, piix3 } => {
                use devices::{i440fx::I440fx, piix3::Piix3};
                device(
                    &mut registry,
                    "I440FX",
                    i440fx,
                    I440fx::state,
                    I440fx::restore,
                );
                device(&mut registry, "PIIX3", piix3, Piix3::state, Piix3::restore);
            }
            crate::vm::Chipset::Q35 { mch, lpc } => {
                use devices::q35::{Ich9Lpc, Mch};
                device(&mut registry, "mch", mch, Mch::state, Mch::restore);
                device(
                    &mut registry,
                    "ICH9LPC",
                    lpc,
                    Ich9Lpc::state,
                    Ich9Lpc::restore,
                );
            }
        }
        if let Some(ioapic) = &d.ioapic {
            device(
                &mut registry,
                "ioapic",
                ioapic,
                devices::ioapic::Ioapic::state,
                devices::ioapic::Ioapic::restore,
            );
        }
        if let Some(iommu) = &d.intel_iommu {
            device(
                &mut registry,
                "intel-iommu",
                iommu,
                devices::intel_iommu::IntelIommu::state,
                devices::intel_iommu::IntelIommu::restore,
            );
        }
        for (i, edu) in d.edu.iter().enumerate() {
            registry.register(
                "edu",
                i as u32,
                DEVICE_STATE_VERSION,
                Box::new(DeviceSection::new(
                    "edu",
                    edu.clone(),
                    devices::edu::Edu::state,
                    devices::edu::Edu::restore,
                )),
            );
        }
        for (i, t) in d.pci_testdev.iter().enumerate() {
            registry.register(
                "pci-testdev",
                i as u32,
                DEVICE_STATE_VERSION,
                Box::new(DeviceSection::new(
                    "pci-testdev",
                    t.clone(),
                    devices::pci_testdev::PciTestdev::state,
                    devices::pci_testdev::PciTestdev::restore,
                )),
            );
        }
        use devices::{cmos, fw_cfg, i8042, pc_testdev, pci_host, pm_timer, reset_ports, serial};
        device(
            &mut registry,
            "serial",
            &d.serial,
            serial::Serial::state,
            serial::Serial::restore,
        );
        device(
            &mut registry,
            "i8042",
            &d.i8042,
            i8042::I8042::state,
            i8042::I8042::restore,
        );
        device(
            &mut registry,
            RTC_SECTION,
            &d.cmos,
            cmos::Cmos::state,
            cmos::Cmos::restore,
        );
        device(
            &mut registry,
            "pci-host",
            &d.pci_host,
            pci_host::PciHost::state,
            pci_host::PciHost::restore,
        );
        device(
            &mut registry,
            "fw_cfg",
            &d.fw_cfg,
            fw_cfg::FwCfg::state,
            fw_cfg::FwCfg::restore,
        );
        device(
            &mut registry,
            "pc-testdev",
            &d.testdev_ports,
            pc_testdev::PcTestdevPorts::state,
            pc_testdev::PcTestdevPorts::restore,
        );
        device(
            &mut registry,
            "pc-testdev-irq",
            &d.testdev_irq,
            pc_testdev::PcTestdevIrq::state,
            pc_testdev::PcTestdevIrq::restore,
        );
        device(
            &mut registry,
            "pc-testdev-mmio",
            &d.testdev_mmio,
            pc_testdev::PcTestdevMmio::state,
            pc_testdev::PcTestdevMmio::restore,
        );
        device(
            &mut registry,
            "acpi-pm",
            &d.acpi_pm,
            devices::acpi_pm::AcpiPm::state,
            devices::acpi_pm::AcpiPm::restore,
        );
        device(
            &mut registry,
            "acpi-pm-timer",
            &d.pm_timer,
            pm_timer::PmTimer::state,
            pm_timer::PmTimer::restore,
        );
        device(
            &mut registry,
            "port92",
            &d.port92,
            reset_ports::Port92::state,
            reset_ports::Port92::restore,
        );
        // virtio-blk: the transport's state (every request completed: they are served whole
        // under the device's core lock, and the back-end is paused with the vCPUs). The disk's
        // contents are in the stream only with block migration (the `block` section above);
        // otherwise both sides open the same image (shared storage).
        for (i, dev) in d.virtio_blk.iter().enumerate() {
            registry.register(
                "virtio-blk",
                i as u32,
                DEVICE_STATE_VERSION,
                Box::new(DeviceSection::new(
                    "virtio-blk",
                    dev.clone(),
                    virtio::VirtioPci::state,
                    virtio::VirtioPci::restore,
                )),
            );
        }
        for (i, dev) in d.virtio_net.iter().enumerate() {
            registry.register(
                "virtio-net",
                i as u32,
                DEVICE_STATE_VERSION,
                Box::new(DeviceSection::new(
                    "virtio-net",
                    dev.clone(),
                    virtio::VirtioPci::state,
                    virtio::VirtioPci::restore,
                )),
            );
        }
        if let Some(dev) = &d.virtio_rng {
            registry.register(
                "virtio-rng",
                0,
                DEVICE_STATE_VERSION,
                Box::new(DeviceSection::new(
                    "virtio-rng",
                    dev.clone(),
                    virtio::VirtioPci::state,
                    virtio::VirtioPci::restore,
                )),
            );
        }
        // Block migration (QEMU's `block` section): in the stream only when a migration copies
        // the disks (`blk`, `inc`, the `block` capability); a destination takes it when it
        // comes. Registered last, so that the other sections keep their ids and a stream
        // without it is byte for byte what it was before block migration existed.
        registry.register_live(
            migration::block::SECTION,
            0,
            migration::block::SECTION_VERSION,
            Box::new(migration::block::BlockSection::new(
                std::mem::take(&mut vm.devices.block_disks),
                migration.block.clone(),
            )),
        );
        // The power-on state of every non-RAM section, taken before any vCPU ran: a reset
        // restores it.
        let power_on = registry.save_snapshots().map_err(VmError::Sections)?;
        lock(&vm.machine).runstate = RunState::Prelaunch;
        let instance = Arc::new(Self {
            vm,
            registry: Mutex::new(registry),
            migration,
            autostart: Mutex::new(true),
            events: Mutex::new(None),
            power_on,
            incoming: Mutex::new(Incoming::No),
            announcer: Arc::default(),
        });
        let weak = Arc::downgrade(&instance);
        instance.migration.add_notifier(move |e| {
            let Some(me) = weak.upgrade() else { return };
            if !me.migration_events_enabled() {
                return;
            }
            match e {
                MigrationEvent::Status(s) => {
                    me.emit("MIGRATION", Some(json!({"status": s.as_str()})))
                }
                MigrationEvent::Pass(n) => me.emit("MIGRATION_PASS", Some(json!({"pass": n}))),
            }
        });
        Ok(instance)
    }

    /// Sets where events go (the QMP server).
    pub fn set_event_emitter(&self, f: EventEmitter) {
        *lock(&self.events) = Some(f);
    }

    /// Emits an event.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        if let Some(f) = lock(&self.events).as_ref() {
            f(name, data);
        }
    }

    fn migration_events_enabled(&self) -> bool {
        self.migration.events_enabled()
    }

    /// The run state.
    pub fn runstate(&self) -> RunState {
        lock(&self.vm.machine).runstate
    }

    /// Sets whether an incoming migration starts the guest once loaded.
    pub fn set_autostart(&self, on: bool) {
        *lock(&self.autostart) = on;
    }

    fn start_locked(&self, g: &mut Machine) {
        if !g.vcpus_running() {
            self.vm.control().resume(g);
            g.runstate = RunState::Running;
            self.emit("RESUME", None);
        }
    }

    fn stop_locked<'a>(
        &self,
        g: MutexGuard<'a, Machine>,
        state: RunState,
    ) -> (MutexGuard<'a, Machine>, bool) {
        let was_running = g.vcpus_running();
        let mut g = if was_running {
            self.vm.control().pause(g)
        } else {
            g
        };
        g.runstate = state;
        if was_running {
            self.emit("STOP", None);
        }
        (g, was_running)
    }

    /// Starts or resumes the vCPUs (QMP `cont`).
    pub fn cont(&self) -> Result<(), InstanceError> {
        let mut g = lock(&self.vm.machine);
        match g.runstate {
            RunState::Inmigrate => {
                // As QEMU: the guest starts once the incoming migration has loaded.
                *lock(&self.autostart) = true;
                Ok(())
            }
            RunState::Running => Ok(()),
            s if s.can_continue() => {
                self.start_locked(&mut g);
                Ok(())
            }
            s => Err(InstanceError::CannotContinue(s)),
        }
    }

    /// Stops the vCPUs (QMP `stop`).
    pub fn stop(&self) {
        let g = lock(&self.vm.machine);
        if g.vcpus_running() {
            drop(self.stop_locked(g, RunState::Paused));
        } else if g.runstate == RunState::Inmigrate {
            *lock(&self.autostart) = false;
        }
    }

    /// Resets the machine in place: RAM cleared and the kernel reloaded, every vCPU, the
    /// interrupt controllers and the devices back to their power-on state.
    pub fn reset(&self, guest: bool) -> Result<(), VmError> {
        if matches!(
            *lock(&self.incoming),
            Incoming::Listening | Incoming::Active
        ) {
            // The incoming stream is writing RAM and device state: a reset now would mix
            // power-on state into the guest being loaded.
            return Err(VmError::ResetWhileLoading);
        }
        let g = lock(&self.vm.machine);
        let was_running = g.vcpus_running();
        let mut g = if was_running {
            self.vm.control().pause(g)
        } else {
            g
        };
        self.vm.clear_memory();
        lock(&self.registry)
            .restore_snapshots(&self.power_on, &|name| name != RTC_SECTION)
            .map_err(VmError::Sections)?;
        self.vm.load_kernel()?;
        self.emit(
            "RESET",
            Some(json!({"guest": guest, "reason": if guest { "guest-reset" } else { "host-qmp-system-reset" }})),
        );
        if was_running {
            self.vm.control().resume(&mut g);
        }
        Ok(())
    }

    /// The guest suspended the machine to RAM (ACPI S3): stop the vCPUs until a wake event.
    pub fn suspend(&self) {
        let g = lock(&self.vm.machine);
        let (mut g, _) = self.stop_locked(g, RunState::Suspended);
        g.runstate = RunState::Suspended;
        self.emit("SUSPEND", None);
    }

    /// True when a suspended machine's wake source has fired: the RTC alarm, when the guest
    /// enabled waking on it (PM1_EN.RTC_EN).
    pub fn rtc_wake_due(&self) -> bool {
        let _g = lock(&self.vm.machine);
        lock(&self.vm.devices.acpi_pm).rtc_wake_enabled()
            && lock(&self.vm.devices.cmos).alarm_fired()
    }

    /// Wakes a machine suspended to RAM as firmware would: every vCPU back to its power-on
    /// state, the PICs and PIT as a BIOS leaves them, WAK_STS set, and the boot vCPU entering
    /// the FACS waking vector in real mode. RAM and the devices keep their state.
    pub fn wakeup(&self, by_rtc: bool) -> Result<(), VmError> {
        let mut g = lock(&self.vm.machine);
        if g.runstate != RunState::Suspended {
            return Ok(());
        }
        lock(&self.registry)
            .restore_snapshots(&self.power_on, &|name| name == "cpu")
            .map_err(VmError::Sections)?;
        crate::arch::bios::program_pic_and_pit(&self.vm.fd, self.vm.has_pit())?;
        lock(&self.vm.devices.acpi_pm).wake(by_rtc);
        self.vm.enter_waking_vector()?;
        self.emit("WAKEUP", None);
        self.start_locked(&mut g);
        Ok(())
    }

    /// Starts an outgoing migration to `uri` (QMP `migrate`); `fd:` takes inherited
    /// descriptor numbers only.
    pub fn migrate(self: &Arc<Self>, uri: &str) -> Result<(), InstanceError> {
        self.migrate_with(uri, None)
    }

    /// [`migrate`](Self::migrate), taking `fd:NAME` from `named` (the monitor's `getfd`
    /// table). The descriptor is taken only once every other check has passed.
    pub fn migrate_with(
        self: &Arc<Self>,
        uri: &str,
        named: Option<&dyn NamedFds>,
    ) -> Result<(), InstanceError> {
        if self.migration.status().is_running() {
            return Err(InstanceError::MigrationInProgress);
        }
        if self.runstate() == RunState::Inmigrate {
            return Err(InstanceError::WaitingForIncoming);
        }
        if let Some(reason) = lock(&self.registry).blocker() {
            return Err(InstanceError::Blocked(reason.to_string()));
        }
        let uri: MigrationUri = uri.parse()?;
        self.migration.check_uri(&uri)?;
        // A descriptor is opened at once (QEMU reports a missing name from `migrate`); every
        // other connect runs on the migration thread: `migrate` returns at once, in `setup`,
        // and `migrate_cancel` interrupts a destination that does not answer.
        // With `tls-creds` set, every channel runs TLS (QEMU's order: the creds are looked
        // up when the channel opens, and a problem fails the migration with its reason).
        let host = match &uri {
            MigrationUri::Tcp { host, .. } => Some(host.clone()),
            _ => None,
        };
        let tls = self.migration.tls.client(host.as_deref());
        let secure = move |out: Outgoing,
                           cancel: &ConnectCancel|
              -> Result<Box<dyn MigrationOutput>, TransportError> {
            match tls.map_err(TransportError::Tls)? {
                Some(tls) => Ok(Box::new(out.start_tls_cancellable(&tls, cancel)?)),
                None => Ok(Box::new(out)),
            }
        };
        let connector: Connector = if let MigrationUri::Fd(_) = uri {
            let out = connect_outgoing_with(&uri, named)?;
            Box::new(move |cancel| secure(out, cancel))
        } else {
            Box::new(move |cancel| secure(connect_outgoing_cancellable(&uri, cancel)?, cancel))
        };
        Ok(self.migration.start(self.clone(), connector)?)
    }

    /// Listens on `uri` for an incoming migration and loads it in the background; once loaded
    /// the guest runs (or stays paused without autostart). A failed load ends hopvm with
    /// status 1 and a clear message.
    pub fn incoming(self: &Arc<Self>, uri: &str) -> Result<(), InstanceError> {
        self.incoming_with(uri, None)
    }

    /// [`incoming`](Self::incoming), taking `fd:NAME` from `named` (the monitor's `getfd`
    /// table).
    pub fn incoming_with(
        self: &Arc<Self>,
        uri: &str,
        named: Option<&dyn NamedFds>,
    ) -> Result<(), InstanceError> {
        let parsed: MigrationUri = uri.parse()?;
        if self.migration.multifd.settings().enabled
            && !migration::transport::supports_multi_channel(&parsed)
        {
            return Err(TransportError::MultiChannelUnsupported.into());
        }
        {
            let mut current = lock(&self.incoming);
            let mut g = lock(&self.vm.machine);
            match *current {
                Incoming::No if g.runstate == RunState::Prelaunch => {}
                Incoming::Deferred => {}
                Incoming::No => return Err(InstanceError::NotIncoming),
                Incoming::Listening
                | Incoming::Active
                | Incoming::Completed
                | Incoming::Unconfirmed => return Err(InstanceError::IncomingStarted),
            }
            g.runstate = RunState::Inmigrate;
            *current = Incoming::Listening;
            lock(&self.vm.devices.serial).hold_input();
        }
        let listener = listen_incoming_with(&parsed, named).map_err(|e| {
            *lock(&self.incoming) = Incoming::Deferred;
            InstanceError::Transport(e)
        })?;
        self.incoming_event(IncomingEvent::Setup);
        if let Some(addr) = listener.local_addr() {
            log::info!("waiting for an incoming migration on {addr}");
        }
        // RAM is faulted in while the source connects, not one fault per received page.
        lock(&self.registry).prepare_load();
        let me = self.clone();
        std::thread::Builder::new()
            .name(String::from("incoming"))
            .spawn(move || {
                let load = |channel| {
                    *lock(&me.incoming) = Incoming::Active;
                    me.incoming_event(IncomingEvent::Active);
                    me.receive(channel)
                };
                // With multifd, the channels' guard lives as long as the load; with TLS,
                // every channel runs its own handshake (without multifd: the one channel).
                let m = me.migration.clone();
                let tls: migration::multifd::ServerTlsSource = Arc::new(move || m.tls.server());
                let received = migration::multifd::accept(listener, &me.migration.multifd, tls)
                    .map_err(|e| match e {
                        migration::multifd::MultifdError::Transport(e) => IncomingError::Accept(e),
                        e => e.into(),
                    })
                    .and_then(|(channel, _multifd)| load(channel));
                match received {
                    Ok(Received::Run) => me.incoming_done(),
                    Ok(Received::Started) => {}
                    Ok(Received::Unconfirmed(why)) => me.incoming_unconfirmed(&why),
                    Err(e) => {
                        me.incoming_event(IncomingEvent::Failed);
                        eprintln!("hopvm: incoming migration failed: {e}");
                        let _ = me.vm.event_sender().send(VmEvent::Exit(1));
                    }
                }
            })
            .map_err(InstanceError::Thread)?;
        Ok(())
    }

    /// Loads an accepted incoming migration and, when the source asks for it, answers on the
    /// return path and runs the switchover handshake ([`migration::return_path`]): the
    /// verdict on the load goes back to the source (with the reason if it failed), and the
    /// guest starts only on the source's go-ahead.
    fn receive(&self, channel: IncomingChannel) -> Result<Received, IncomingError> {
        use migration::return_path::{self as rp, GoAhead, RpMessage};
        let IncomingChannel {
            input,
            return_path: mut back,
        } = channel;
        let mut reader = self.stream_reader(input);
        let mut rp_open = false;
        let mut handshake = false;
        let result = {
            let multifd = self.migration.multifd.clone();
            let mut on_command = |cmd: u16, data: &[u8]| {
                multifd.on_command(cmd, data)?;
                match cmd {
                    migration::stream::MIG_CMD_OPEN_RETURN_PATH => rp_open = back.is_some(),
                    rp::MIG_CMD_X_HOPVM_SWITCHOVER => handshake = true,
                    rp::MIG_CMD_PING => {
                        if let (true, Some(w), Ok(v)) =
                            (rp_open, back.as_mut(), <[u8; 4]>::try_from(data))
                        {
                            let _ = RpMessage::Pong(u32::from_be_bytes(v)).send(w.as_mut());
                        }
                    }
                    _ => {}
                }
                Ok(())
            };
            self.load_reader(&mut reader, &mut on_command)
        };
        // A multifd channel's failure, rather than what it did to the main channel — unless
        // the main channel found the two sides set up differently (the cause of the rest).
        let result = result.map_err(|e| {
            use migration::multifd::MultifdError as M;
            if matches!(
                e,
                RegistryError::Multifd(
                    M::ChannelCount { .. } | M::NotEnabledHere(_) | M::NotEnabledAtSource
                )
            ) {
                return e;
            }
            match self
                .migration
                .multifd
                .receiver()
                .and_then(|r| r.error_within(std::time::Duration::from_millis(500)))
            {
                Some(m) => RegistryError::Multifd(migration::multifd::MultifdError::Shared(m)),
                None => e,
            }
        });
        let back = back.as_mut().filter(|_| rp_open);
        let Some(back) = back else {
            return Ok(result.map(|_| Received::Run)?);
        };
        if let Err(e) = result {
            if handshake {
                let _ = RpMessage::Error(e.to_string()).send(back.as_mut());
            }
            let _ = RpMessage::Shut { failed: true }.send(back.as_mut());
            // Let the source read the verdict before the connection goes: it stops sending
            // and closes once it has it.
            drain_briefly(reader.into_inner());
            return Err(e.into());
        }
        if !handshake {
            // A QEMU source: QEMU's order, run the guest, then report.
            self.incoming_done();
            let _ = RpMessage::Shut { failed: false }.send(back.as_mut());
            return Ok(Received::Started);
        }
        if let Err(e) = (RpMessage::Shut { failed: false }).send(back.as_mut()) {
            // The source cannot learn that the load succeeded: it resumes its guest.
            return Err(IncomingError::Confirm(e));
        }
        let mut rest = reader.into_inner();
        match rp::read_go_ahead(&mut rest) {
            Ok(GoAhead::Go) => {
                self.incoming_done();
                let _ = RpMessage::Started.send(back.as_mut());
                Ok(Received::Started)
            }
            Ok(GoAhead::Abort) => Err(IncomingError::SourceCancelled),
            Err(e) => Ok(Received::Unconfirmed(e)),
        }
    }

    /// The loaded guest was never confirmed by the source: it stays paused here.
    fn incoming_unconfirmed(&self, why: &ReturnPathError) {
        *lock(&self.incoming) = Incoming::Unconfirmed;
        self.incoming_event(IncomingEvent::Failed);
        {
            let mut g = lock(&self.vm.machine);
            lock(&self.vm.devices.serial).release_input();
            g.runstate = RunState::Paused;
        }
        eprintln!(
            "hopvm: incoming migration not confirmed: the source did not send its go-ahead \
             after the load ({why}): it may have resumed the guest, so this copy stays paused \
             ('cont' runs it only if the source is known to be stopped)"
        );
    }

    fn stream_reader(
        &self,
        input: Box<dyn std::io::Read + Send>,
    ) -> StreamReader<std::io::BufReader<Box<dyn std::io::Read + Send>>> {
        let input = std::io::BufReader::with_capacity(1 << 20, input);
        if self.migration.integrity_enabled() {
            StreamReader::with_integrity(input)
        } else {
            StreamReader::new(input)
        }
    }

    fn load_reader<R: std::io::Read>(
        &self,
        reader: &mut StreamReader<R>,
        on_command: &mut migration::registry::CommandHandler<'_>,
    ) -> Result<migration::registry::IncomingLoad, RegistryError> {
        let start = std::time::Instant::now();
        self.migration.ram.profile.reset();
        let result = Registry::load_locked_with(&self.registry, reader, on_command);
        if std::env::var_os(migration::ram::PROFILE_ENV).is_some() {
            eprintln!(
                "hopvm: migration profile (destination, {} ms): {}",
                start.elapsed().as_millis(),
                self.migration.ram.profile.destination_summary()
            );
        }
        result
    }

    /// Loads a whole migration stream (the vCPUs are paused). The registry is locked only
    /// to hand each section its data, never while waiting on the network, so the monitor
    /// stays responsive whatever the source does.
    pub fn load(&self, input: Box<dyn std::io::Read + Send>) -> Result<(), IncomingError> {
        self.load_stream(input).map(drop)
    }

    /// [`load`](Self::load), returning what the stream asked for besides its sections.
    pub fn load_stream(
        &self,
        input: Box<dyn std::io::Read + Send>,
    ) -> Result<migration::registry::IncomingLoad, IncomingError> {
        let mut reader = self.stream_reader(input);
        Ok(self.load_reader(&mut reader, &mut |_, _| Ok(()))?)
    }

    /// Waits for QMP `migrate-incoming` (`--incoming defer`).
    pub fn defer_incoming(&self) {
        lock(&self.registry).prepare_load();
        *lock(&self.incoming) = Incoming::Deferred;
        let mut g = lock(&self.vm.machine);
        g.runstate = RunState::Inmigrate;
        // Typed input waits for the guest the stream brings (Serial::restore keeps it).
        lock(&self.vm.devices.serial).hold_input();
    }

    /// True while waiting for `migrate-incoming`.
    pub fn incoming_deferred(&self) -> bool {
        *lock(&self.incoming) == Incoming::Deferred
    }

    /// The destination side's migration status, if this instance is a destination.
    pub fn incoming_status(&self) -> Option<migration::thread::MigrationStatus> {
        use migration::thread::MigrationStatus;
        match *lock(&self.incoming) {
            Incoming::No | Incoming::Deferred => None,
            Incoming::Listening => Some(MigrationStatus::Setup),
            Incoming::Active => Some(MigrationStatus::Active),
            Incoming::Completed => Some(MigrationStatus::Completed),
            Incoming::Unconfirmed => Some(MigrationStatus::Failed),
        }
    }

    /// QEMU's self-announce (module [`crate::announce`]) of the virtio-net cards named in
    /// `interfaces` (all if none) with `params`, as `timer`.
    pub fn announce_self(
        &self,
        timer: crate::announce::AnnounceTimer,
        params: migration::thread::AnnounceParameters,
        interfaces: Option<Vec<String>>,
    ) {
        let d = &self.vm.devices;
        let nics = d
            .virtio_net_names
            .iter()
            .cloned()
            .zip(d.virtio_net.iter().cloned())
            .collect();
        self.announcer
            .start(timer, params, interfaces, nics, self.vm.machine.clone());
    }

    fn incoming_done(&self) {
        // After an incoming migration, with the `announce-*` migration parameters.
        self.announce_self(
            crate::announce::AnnounceTimer::Incoming,
            self.migration.announce_parameters(),
            None,
        );
        *lock(&self.incoming) = Incoming::Completed;
        {
            let mut g = lock(&self.vm.machine);
            lock(&self.vm.devices.serial).release_input();
            if *lock(&self.autostart) {
                self.start_locked(&mut g);
            } else {
                g.runstate = RunState::Paused;
            }
        }
        self.incoming_event(IncomingEvent::Completed);
    }

    /// The destination's MIGRATION event (with the `events` capability), as QEMU's: `setup`
    /// once listening, `active` once the source connected, then `completed` or `failed`.
    fn incoming_event(&self, status: IncomingEvent) {
        if self.migration_events_enabled() {
            let status = match status {
                IncomingEvent::Setup => "setup",
                IncomingEvent::Active => "active",
                IncomingEvent::Completed => "completed",
                IncomingEvent::Failed => "failed",
            };
            self.emit("MIGRATION", Some(json!({ "status": status })));
        }
    }
}

impl MigrationHost for Instance {
    type Locked = Machine;

    fn big_lock(&self) -> &Mutex<Machine> {
        &self.vm.machine
    }

    fn registry(&self) -> &Mutex<Registry> {
        &self.registry
    }

    fn stop_vm<'a>(&self, g: MutexGuard<'a, Machine>) -> (MutexGuard<'a, Machine>, bool) {
        self.stop_locked(g, RunState::FinishMigrate)
    }

    fn aborted(&self, g: &mut Machine, was_running: bool) {
        if was_running {
            self.start_locked(g);
        } else if g.runstate == RunState::FinishMigrate {
            g.runstate = RunState::Paused;
        }
    }

    fn completed(&self, g: &mut Machine) {
        g.runstate = RunState::Postmigrate;
    }

    fn throttle_vcpus(&self, pct: u32) {
        self.vm.control().set_throttle(pct);
    }
}
