//! vCPU threads: the `KVM_RUN` loop, exit handling, and pause / resume.
//!
//! Each vCPU runs on its own thread and calls `KVM_RUN` *without* the big lock; it takes the lock
//! only to hand a port or MMIO access to the bus. So a migration thread holding the lock for a
//! long time never stops a guest that is merely computing.
//!
//! Pausing must get every vCPU out of `KVM_RUN` quickly and reliably, even one halted with
//! interrupts off. The controller sets the request and sends each thread a real-time signal.
//! The signal handler sets `kvm_run.immediate_exit`, so a signal that lands just *before* the
//! thread re-enters `KVM_RUN` still makes that `KVM_RUN` return at once with `EINTR` instead of
//! being lost. Before parking, a vCPU runs `KVM_RUN` once more with `immediate_exit` set: KVM
//! then finishes any port or MMIO instruction it was in the middle of, so the saved state never
//! holds half an instruction.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use devices::VmRequest;
use kvm_bindings::{kvm_run, KVM_EXIT_DIRTY_RING_FULL};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::bus::{lock, Bus};
use crate::cpu_throttle::CpuThrottle;
use crate::memory::GuestMemoryMmap;

/// Errors setting up vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The kick signal handler could not be installed.
    #[error("cannot install the vcpu kick signal handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The thread could not be started.
    #[error("cannot start a vcpu thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// The signal that kicks a vCPU out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer was set by this thread to its own vCPU's kvm_run mapping, which
        // stays mapped while the thread runs; a volatile byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick signal handler (once per process).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), handle_kick).map_err(|e| e.errno()))
        .map_err(|e| VcpuError::Signal(vmm_sys_util::errno::Error::new(e)))
}

/// What the vCPUs are asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Stop,
}

/// The vCPUs' run state. It lives in [`Machine`], under the big lock, so that a thread holding
/// the big lock (the migration thread, a QMP command) can pause the vCPUs and wait for them with
/// the lock *released* while it waits — as QEMU's `pause_all_vcpus` waits on the BQL — and a vCPU
/// blocked on the big lock for a port access can finish it and park.
#[derive(Debug)]
pub struct VcpuRunState {
    request: Request,
    parked: usize,
    alive: usize,
    /// Counts resumes, so a vCPU parked after reporting an event knows when to go on.
    resumes: u64,
}

impl Default for VcpuRunState {
    fn default() -> Self {
        Self {
            request: Request::Pause,
            parked: 0,
            alive: 0,
            resumes: 0,
        }
    }
}

/// Shared between the controller and all vCPU threads of a VM.
pub struct VcpuControl {
    /// Fast path for the vCPU loop: true whenever the request is not `Run`.
    not_running: AtomicBool,
    /// Signalled when a vCPU parks.
    parked_cv: Condvar,
    /// Signalled when the request changes.
    request_cv: Condvar,
    threads: Mutex<Vec<JoinHandle<()>>>,
    vcpus: Mutex<Vec<Arc<Mutex<VcpuFd>>>>,
    /// `auto-converge`'s slow-down ([`crate::cpu_throttle`]).
    throttle: Arc<CpuThrottle>,
}

/// Something a vCPU reports to the VM's owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// A device asked for the process to end with this status.
    Exit(i32),
    /// The guest reset the machine (i8042, triple fault, KVM system event).
    Reset,
    /// The guest triple-faulted.
    TripleFault,
    /// The guest asked to power off.
    PowerOff,
    /// The host asked hopvm to quit (QMP `quit`, Ctrl-A x).
    Quit,
    /// The guest suspended the machine to RAM (ACPI S3).
    Suspend,
    /// The host asked a suspended machine to wake up (QMP `system_wakeup`).
    Wakeup,
    /// A vCPU cannot go on; the message says why.
    Fatal(String),
}

/// What every vCPU thread shares.
#[derive(Clone)]
pub struct VcpuShared {
    /// The big lock: the buses and through them every device, and the vCPUs' run state.
    pub machine: Arc<Mutex<Machine>>,
    /// Pause / resume / stop.
    pub control: Arc<VcpuControl>,
    /// Where events go.
    pub events: Sender<VmEvent>,
    /// Guest memory, to read the instruction bytes of a failed emulation.
    pub memory: GuestMemoryMmap,
    /// KVM's dirty rings, reaped by a vCPU whose ring is full.
    pub dirty_rings: Option<Arc<crate::dirty_ring::DirtyRings>>,
}

/// What the big lock protects: the port and MMIO buses and the vCPUs' run state.
pub struct Machine {
    /// Port I/O.
    pub pio: Bus,
    /// MMIO outside RAM.
    pub mmio: Bus,
    /// Whether the vCPUs run.
    pub vcpus: VcpuRunState,
    /// The run state `query-status` reports.
    pub runstate: crate::runstate::RunState,
    /// Device back-ends that run outside the vCPU threads, paused and resumed with them.
    pub quiesce: Vec<Arc<dyn devices::Quiesce>>,
    /// The userspace IOAPIC (`kernel-irqchip=split`), for the LAPICs' EOIs KVM reports.
    pub ioapic: Option<Arc<Mutex<devices::ioapic::Ioapic>>>,
}

impl Machine {
    /// A machine with these buses and its vCPUs (none yet) paused.
    pub fn new(pio: Bus, mmio: Bus) -> Self {
        Self {
            pio,
            mmio,
            vcpus: VcpuRunState::default(),
            runstate: crate::runstate::RunState::Prelaunch,
            quiesce: Vec::new(),
            ioapic: None,
        }
    }

    /// True while the vCPUs are asked to run.
    pub fn vcpus_running(&self) -> bool {
        self.vcpus.request == Request::Run
    }
}

impl VcpuControl {
    /// A control in the paused state: threads park until [`VcpuControl::resume`].
    pub fn new() -> Self {
        Self {
            not_running: AtomicBool::new(true),
            parked_cv: Condvar::new(),
            request_cv: Condvar::new(),
            threads: Mutex::new(Vec::new()),
            vcpus: Mutex::new(Vec::new()),
            throttle: Arc::default(),
        }
    }

    /// Starts a vCPU thread (parked until the vCPUs are resumed).
    pub fn spawn(
        &self,
        name: String,
        vcpu: VcpuFd,
        id: usize,
        shared: VcpuShared,
    ) -> Result<(), VcpuError> {
        let vcpu = Arc::new(Mutex::new(vcpu));
        lock(&shared.machine).vcpus.alive += 1;
        let thread_vcpu = vcpu.clone();
        let thread_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || run_loop(thread_vcpu, id, thread_shared))
            .map_err(|e| {
                lock(&shared.machine).vcpus.alive -= 1;
                VcpuError::Spawn(e)
            })?;
        lock(&self.threads).push(handle);
        lock(&self.vcpus).push(vcpu);
        Ok(())
    }

    /// The vCPU file descriptors, in vCPU order. Only touch them while the vCPUs are paused:
    /// a running vCPU holds its lock for the whole of `KVM_RUN`.
    pub fn vcpus(&self) -> Vec<Arc<Mutex<VcpuFd>>> {
        lock(&self.vcpus).clone()
    }

    fn kick_all(&self) {
        for t in lock(&self.threads).iter() {
            // A thread that already ended cannot be signalled; nothing to do then.
            let _ = t.kill(kick_signal());
        }
    }

    /// Throttles the vCPUs to run only `100 − pct` % of the time (0: full speed again).
    pub fn set_throttle(self: &Arc<Self>, pct: u32) {
        let me = Arc::downgrade(self);
        self.throttle.set(pct, move || {
            if let Some(c) = me.upgrade() {
                c.kick_all();
            }
        });
    }

    /// The throttle percentage now (QEMU's `cpu-throttle-percentage`).
    pub fn throttle_percentage(&self) -> u32 {
        self.throttle.percentage()
    }

    /// Stops every vCPU outside `KVM_RUN` and waits until all are parked. Takes and returns the
    /// big lock, which is released while waiting.
    pub fn pause<'a>(&self, mut g: MutexGuard<'a, Machine>) -> MutexGuard<'a, Machine> {
        if g.vcpus.request == Request::Stop {
            return g;
        }
        g.vcpus.request = Request::Pause;
        self.not_running.store(true, Ordering::SeqCst);
        self.kick_all();
        self.throttle.wake();
        while g.vcpus.parked < g.vcpus.alive && g.vcpus.request == Request::Pause {
            g = vmm_sync::wait(&self.parked_cv, g);
        }
        // No vCPU can notify a device now; let the back-ends finish what they serve and stop.
        for q in &g.quiesce {
            q.pause();
        }
        g
    }

    /// Lets every vCPU run again.
    pub fn resume(&self, g: &mut Machine) {
        for q in &g.quiesce {
            q.resume();
        }
        if g.vcpus.request != Request::Stop {
            g.vcpus.request = Request::Run;
            g.vcpus.resumes += 1;
            self.not_running.store(false, Ordering::SeqCst);
        }
        self.request_cv.notify_all();
    }

    /// Ends every vCPU thread and joins them.
    pub fn stop(&self, machine: &Mutex<Machine>) {
        lock(machine).vcpus.request = Request::Stop;
        self.not_running.store(true, Ordering::SeqCst);
        self.request_cv.notify_all();
        self.kick_all();
        self.throttle.set(0, || {});
        let threads = std::mem::take(&mut *lock(&self.threads));
        for t in threads {
            let _ = t.join();
        }
    }

    /// Parks the calling vCPU while paused; returns false when it must stop.
    fn park(&self, vcpu: &Mutex<VcpuFd>, shared: &VcpuShared) -> bool {
        complete_pending_io(&mut lock(vcpu), shared);
        let mut g = lock(&shared.machine);
        if g.vcpus.request == Request::Run {
            return true;
        }
        g.vcpus.parked += 1;
        self.parked_cv.notify_all();
        while g.vcpus.request == Request::Pause {
            g = vmm_sync::wait(&self.request_cv, g);
        }
        g.vcpus.parked -= 1;
        g.vcpus.request == Request::Run
    }

    /// Parks the calling vCPU after it reported an event, until the VM has dealt with it: the
    /// vCPUs are resumed (after a reset) — return true — or stopped — return false.
    fn park_after_event(&self, machine: &Mutex<Machine>) -> bool {
        let mut g = lock(machine);
        let resumes = g.vcpus.resumes;
        g.vcpus.parked += 1;
        self.parked_cv.notify_all();
        while g.vcpus.request != Request::Stop && g.vcpus.resumes == resumes {
            g = vmm_sync::wait(&self.request_cv, g);
        }
        g.vcpus.parked -= 1;
        g.vcpus.request != Request::Stop
    }

    /// Records that a vCPU thread ended.
    fn exited(&self, machine: &Mutex<Machine>) {
        lock(machine).vcpus.alive -= 1;
        self.parked_cv.notify_all();
    }
}

impl Default for VcpuControl {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs `KVM_RUN` with `immediate_exit` set so KVM completes an in-flight port / MMIO access
/// (KVM's API: state read after an I/O exit is only consistent once userspace re-entered
/// `KVM_RUN`). Finishing one access can start the next (a `rep outs` / `rep movs` over the
/// bus): those are handed to the bus too, until KVM answers `EINTR`.
fn complete_pending_io(vcpu: &mut VcpuFd, shared: &VcpuShared) {
    vcpu.set_kvm_immediate_exit(1);
    // A string instruction has at most a page's worth of iterations per exit; the bound only
    // guards against a KVM that never answers EINTR.
    for _ in 0..4096 {
        match vcpu.run() {
            Ok(
                exit @ (VcpuExit::IoIn(..)
                | VcpuExit::IoOut(..)
                | VcpuExit::MmioRead(..)
                | VcpuExit::MmioWrite(..)
                // An EOI for the userspace IOAPIC must not be lost while parking either.
                | VcpuExit::IoapicEoi(..)),
            ) => {
                if let Next::Report(event) = handle_exit(exit, shared) {
                    log::warn!("vcpu: {event:?} requested while parking; deferred to the next run");
                    let _ = shared.events.send(event);
                }
            }
            // EINTR: nothing (more) was pending. Anything else shows up again on the next
            // real run.
            _ => break,
        }
    }
    vcpu.set_kvm_immediate_exit(0);
}

/// The result of handling one exit.
enum Next {
    Continue,
    Report(VmEvent),
}

fn request_event(req: Option<VmRequest>, shared: &VcpuShared) -> Next {
    match req {
        None => Next::Continue,
        Some(VmRequest::Reset) => Next::Report(VmEvent::Reset),
        Some(VmRequest::Exit(code)) => Next::Report(VmEvent::Exit(code)),
        Some(VmRequest::PowerOff) => Next::Report(VmEvent::PowerOff),
        Some(VmRequest::Suspend) => Next::Report(VmEvent::Suspend),
        Some(VmRequest::FlushPage(gpa)) => {
            flush_page(&shared.memory, gpa);
            Next::Continue
        }
    }
}

/// Makes the host mapping of one guest page inaccessible and accessible again, as QEMU's
/// pc-testdev does: the kernel's MMU notifier then drops KVM's mapping of the page, and the
/// guest's next access faults it back in.
fn flush_page(mem: &GuestMemoryMmap, gpa: u64) {
    use vm_memory::GuestMemoryBackend;
    let page = gpa & !(crate::memory::PAGE_SIZE - 1);
    let Ok(host) = mem.get_host_address(GuestAddress(page)) else {
        log::info!("flush of page {page:#x} outside guest ram ignored");
        return;
    };
    let len = crate::memory::PAGE_SIZE as usize;
    // SAFETY: `host` is the page-aligned start of a page of the guest RAM mapping; the mapping
    // is restored to read/write right after, and no Rust reference into guest RAM exists.
    unsafe {
        libc::mprotect(host.cast(), len, libc::PROT_NONE);
        libc::mprotect(host.cast(), len, libc::PROT_READ | libc::PROT_WRITE);
    }
}

fn run_loop(vcpu: Arc<Mutex<VcpuFd>>, id: usize, shared: VcpuShared) {
    let run_ptr: *mut kvm_run = lock(&vcpu).get_kvm_run();
    KVM_RUN.with(|c| c.set(run_ptr));
    let control = &shared.control;
    let mut throttle_seen = 0;
    loop {
        // A throttle tick: sleep this vCPU's share first, holding no lock.
        control.throttle.throttle_vcpu(&mut throttle_seen, || {
            control.not_running.load(Ordering::SeqCst)
        });
        if control.not_running.load(Ordering::SeqCst) && !control.park(&vcpu, &shared) {
            break;
        }
        let mut fd = lock(&vcpu);
        let next = match fd.run() {
            Ok(exit) => handle_exit(exit, &shared),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0);
                Next::Continue
            }
            Err(e) => Next::Report(VmEvent::Fatal(format!("KVM_RUN failed: {e}"))),
        };
        if let Next::Report(event) = next {
            let event = match event {
                VmEvent::Fatal(msg) => VmEvent::Fatal(describe_failure(&mut fd, id, &msg, &shared)),
                other => {
                    // The vCPU may stay parked for a while (a suspended machine, a migration
                    // that saves it meanwhile): finish the access that reported the event
                    // first, so the saved state never holds half an instruction.
                    complete_pending_io(&mut fd, &shared);
                    other
                }
            };
            drop(fd);
            let _ = shared.events.send(event);
            if !shared.control.park_after_event(&shared.machine) {
                break;
            }
        }
    }
    shared.control.exited(&shared.machine);
    KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
}

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

fn handle_exit(exit: VcpuExit, shared: &VcpuShared) -> Next {
    match exit {
        VcpuExit::IoIn(port, data) => {
            lock(&shared.machine).pio.read(u64::from(port), data);
            Next::Continue
        }
        VcpuExit::IoOut(port, data) => request_event(
            lock(&shared.machine).pio.write(u64::from(port), data),
            shared,
        ),
        VcpuExit::MmioRead(addr, data) => {
            lock(&shared.machine).mmio.read(addr, data);
            Next::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            request_event(lock(&shared.machine).mmio.write(addr, data), shared)
        }
        VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::Intr => Next::Continue,
        // `kernel-irqchip=split`: a LAPIC's EOI of a level-triggered IOAPIC vector. The big
        // lock is released before the IOAPIC's is taken.
        VcpuExit::IoapicEoi(vector) => {
            let ioapic = lock(&shared.machine).ioapic.clone();
            if let Some(ioapic) = ioapic {
                lock(&ioapic).eoi(vector);
            }
            Next::Continue
        }
        // KVM does not let this vCPU run again before entries of its ring were given back:
        // reap every ring (their pages wait in the harvest for the next dirty sync).
        VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => match &shared.dirty_rings {
            Some(rings) => match rings.ring_full() {
                Ok(()) => Next::Continue,
                Err(e) => Next::Report(VmEvent::Fatal(format!("cannot reap the dirty ring: {e}"))),
            },
            None => Next::Report(VmEvent::Fatal(String::from(
                "dirty ring full exit without a dirty ring",
            ))),
        },
        VcpuExit::Shutdown => Next::Report(VmEvent::TripleFault),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => Next::Report(VmEvent::Reset),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => Next::Report(VmEvent::PowerOff),
        VcpuExit::InternalError => Next::Report(VmEvent::Fatal(String::from("emulation failure"))),
        VcpuExit::FailEntry(reason, cpu) => Next::Report(VmEvent::Fatal(format!(
            "kvm entry failure (hardware reason {reason:#x}, cpu {cpu})"
        ))),
        other => Next::Report(VmEvent::Fatal(format!("unexpected kvm exit {other:?}"))),
    }
}

/// KVM's `internal.suberror` for a failed instruction emulation.
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
/// `emulation_failure.flags`: instruction bytes are present.
const FLAG_INSTRUCTION_BYTES: u64 = 1;

/// Builds the report for a vCPU that cannot go on: what happened, where (RIP and CPU mode) and
/// the instruction bytes — from KVM when it gives them, else read from guest memory.
fn describe_failure(vcpu: &mut VcpuFd, id: usize, what: &str, shared: &VcpuShared) -> String {
    let (suberror, data) = {
        let run = vcpu.get_kvm_run();
        if run.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
            // SAFETY: exit_reason says the `internal` member of the union is the valid one.
            let internal = unsafe { run.__bindgen_anon_1.internal };
            let n = (internal.ndata as usize).min(internal.data.len());
            (Some(internal.suberror), internal.data[..n].to_vec())
        } else {
            (None, Vec::new())
        }
    };
    let regs = vcpu.get_regs().ok();
    let sregs = vcpu.get_sregs().ok();
    let rip = regs.map(|r| r.rip);
    let mode = sregs.map(|s| {
        if s.cr0 & 1 == 0 {
            "real mode"
        } else if s.efer & (1 << 10) != 0 && s.cs.l == 1 {
            "64-bit"
        } else if s.cs.db == 1 {
            "32-bit protected"
        } else {
            "16-bit protected"
        }
    });
    // `emulation_failure`: data[0] = flags; then a u8 instruction size and up to 15 bytes.
    let mut bytes: Vec<u8> = Vec::new();
    if suberror == Some(KVM_INTERNAL_ERROR_EMULATION)
        && data.len() >= 3
        && data[0] & FLAG_INSTRUCTION_BYTES != 0
    {
        let raw: Vec<u8> = data[1..3].iter().flat_map(|w| w.to_le_bytes()).collect();
        let size = usize::from(raw[0]).min(15);
        bytes = raw[1..=size].to_vec();
    }
    if bytes.is_empty() {
        if let (Some(rip), Some(s)) = (rip, sregs) {
            let linear = s.cs.base.wrapping_add(rip);
            let phys = vcpu
                .translate_gva(linear)
                .ok()
                .filter(|t| t.valid != 0)
                .map(|t| t.physical_address)
                .unwrap_or(linear);
            let mut buf = [0u8; 15];
            if shared
                .memory
                .read_slice(&mut buf, GuestAddress(phys))
                .is_ok()
            {
                bytes = buf.to_vec();
            }
        }
    }
    let mut msg = format!("vcpu {id}: {what}");
    if let Some(s) = suberror {
        msg.push_str(&format!(" (kvm internal error, suberror {s})"));
    }
    match (rip, mode) {
        (Some(rip), Some(mode)) => msg.push_str(&format!(" at rip {rip:#x} ({mode})")),
        _ => msg.push_str(" at an unknown rip"),
    }
    if !bytes.is_empty() {
        let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        msg.push_str(&format!(": instruction bytes {}", hex.join(" ")));
    } else if !data.is_empty() {
        let words: Vec<String> = data.iter().map(|w| format!("{w:#x}")).collect();
        msg.push_str(&format!(": data {}", words.join(" ")));
    }
    msg
}
