//! 16550A UART, the guest's console (COM1: ports 0x3f8–0x3ff, IRQ 4).
//!
//! The serial port is how the guest kernel talks to us before anything else works, so it has to
//! behave exactly like the UART Linux's 8250 driver probes for: the driver writes and reads back
//! IER and the scratch register, runs a loopback test through MCR/MSR, detects the 16550A by the
//! FIFO bits in IIR, and then relies on the precise interrupt rules of the chip. QEMU's
//! `hw/char/serial.c` is the reference implementation; this module follows it register by
//! register, including its quirks. It is hand-written on purpose: rust-vmm's `vm-superio`
//! serial does not emulate FCR (its FIFO is always on, so the 16550A FIFO detection through
//! FCR/IIR and the trigger levels are missing) nor the character timeout. The quirks:
//!
//! * interrupt identification priority: line status > character timeout > received data >
//!   THR empty > modem status;
//! * the THR-empty interrupt is cleared by reading IIR while it is the reported source, and is
//!   re-armed when THRI is switched on in IER while THR is empty (Windows relies on that);
//! * the interrupt line is not gated by MCR.OUT2 (QEMU does not gate it either).
//!
//! # Timing
//!
//! Transmission is instantaneous: a byte written to THR is handed to the output sink before
//! the write returns, after which THR and the shift register are empty again. Because the line first goes
//! low when THR is written and high again once the byte is out, every transmitted byte gives an
//! edge-triggered ISA PIC a fresh THRE interrupt, exactly as under QEMU.
//!
//! There are no timers. QEMU raises the character-timeout interrupt four character times after
//! the last byte arrived when the FIFO holds fewer bytes than its trigger level; here the
//! timeout is considered to have elapsed as soon as the host has no more input queued, which a
//! guest cannot tell apart from a fast line.
//!
//! # Output to the host
//!
//! THR writes come from vCPU threads holding the big lock, so the sink must never block: the
//! VMM wraps the host's stdout or file in an [`OutputQueue`], a bounded buffer (1 MiB) that a
//! thread of its own drains into the sink outside every lock. A stalled host (a full stdout
//! pipe nobody reads) therefore never stalls a vCPU, `stop` or a migration; if the host stays
//! stalled until the buffer is full, further output is dropped and counted (logged once per
//! stall), as a UART whose line is not listened to loses it. [`OutputQueue::flush`] waits
//! (boundedly) for the buffer to drain, for hopvm's exit.
//!
//! # Input
//!
//! Host input ([`Serial::enqueue_input`]) waits in a bounded buffer (4 KiB, excess dropped) and
//! is fed into the receiver whenever it has room: the 16-byte FIFO when FIFOs are enabled, RBR
//! otherwise. Nothing is lost to overruns this way, like QEMU's chardev flow control. In loopback
//! mode the receiver is disconnected from the host, so input stays queued until loopback ends.
//!
//! # Interrupt line
//!
//! The device calls [`IrqLine::set_level`](crate::IrqLine::set_level) only when the pending
//! state changes, and always drives the line low before raising it again.

use std::collections::VecDeque;
use std::io::Write;

use serde::{Deserialize, Serialize};

use crate::{BusDevice, SharedIrq, VmRequest};

/// The conventional base port of COM1.
pub const COM1_BASE: u64 = 0x3f8;
/// The ISA interrupt of COM1.
pub const COM1_IRQ: u32 = 4;
/// The length of the port range the device expects to be registered with.
pub const SERIAL_PORT_LEN: u64 = 8;
/// How many bytes of host input wait for the guest at most; the rest is dropped.
pub const INPUT_BUFFER_CAPACITY: usize = 4096;

/// Depth of the receive FIFO of a 16550A.
const FIFO_LEN: usize = 16;

const LCR_DLAB: u8 = 0x80;

const IER_RDI: u8 = 0x01;
const IER_THRI: u8 = 0x02;
const IER_RLSI: u8 = 0x04;
const IER_MSI: u8 = 0x08;

const IIR_NO_INT: u8 = 0x01;
const IIR_ID: u8 = 0x06;
const IIR_MSI: u8 = 0x00;
const IIR_THRI: u8 = 0x02;
const IIR_RDI: u8 = 0x04;
const IIR_RLSI: u8 = 0x06;
const IIR_CTI: u8 = 0x0c;
const IIR_FE: u8 = 0xc0;

const FCR_FE: u8 = 0x01;
const FCR_RFR: u8 = 0x02;
const FCR_XFR: u8 = 0x04;
/// The FCR bits that stick: FIFO enable, DMA mode and the trigger level.
const FCR_STICKY: u8 = 0xc9;

const MCR_LOOP: u8 = 0x10;
const MCR_OUT2: u8 = 0x08;

const LSR_DR: u8 = 0x01;
const LSR_OE: u8 = 0x02;
const LSR_BI: u8 = 0x10;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;
/// Line status conditions that raise the receiver line status interrupt.
const LSR_INT_ANY: u8 = 0x1e;

const MSR_DCD: u8 = 0x80;
const MSR_DSR: u8 = 0x20;
const MSR_CTS: u8 = 0x10;
const MSR_ANY_DELTA: u8 = 0x0f;

/// Everything the guest can observe of a [`Serial`]: registers, FIFO contents, pending
/// interrupt conditions, the level of the interrupt line and host input not yet received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialState {
    /// Baud rate divisor latch (DLL in the low byte, DLM in the high byte).
    pub divisor: u16,
    /// Receiver buffer register (used while FIFOs are disabled).
    pub rbr: u8,
    /// Interrupt enable register (low 4 bits).
    pub ier: u8,
    /// Interrupt identification register as last computed, FIFO bits included.
    pub iir: u8,
    /// FIFO control register (the bits that stick: enable, DMA mode, trigger level).
    pub fcr: u8,
    /// Line control register.
    pub lcr: u8,
    /// Modem control register (low 5 bits).
    pub mcr: u8,
    /// Line status register.
    pub lsr: u8,
    /// Modem status register.
    pub msr: u8,
    /// Scratch register.
    pub scr: u8,
    /// Receive FIFO contents, oldest first (at most 16 bytes).
    pub rx_fifo: VecDeque<u8>,
    /// A THR-empty interrupt is pending (cleared by reading it from IIR).
    pub thr_ipending: bool,
    /// A character-timeout interrupt is pending.
    pub timeout_ipending: bool,
    /// Host input not yet moved into the receiver, oldest first.
    pub input: VecDeque<u8>,
    /// The level the interrupt line is driven to.
    pub irq_level: bool,
}

/// Why a [`SerialState`] cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SerialStateError {
    /// The receive FIFO holds more than the chip's 16 bytes.
    #[error("receive fifo of {0} bytes, the 16550A holds {FIFO_LEN}")]
    FifoTooLong(usize),
    /// More host input is queued than the device buffers.
    #[error("{0} bytes of queued input, at most {INPUT_BUFFER_CAPACITY} are buffered")]
    InputTooLong(usize),
    /// A register has bits set that the device always keeps clear.
    #[error("{register} {value:#04x} has reserved bits set")]
    ReservedBits {
        /// The register's name.
        register: &'static str,
        /// Its value in the state.
        value: u8,
    },
    /// IIR names no interrupt source, or its FIFO bits disagree with FCR.
    #[error("iir {iir:#04x} is impossible with fcr {fcr:#04x}")]
    BadIir {
        /// IIR in the state.
        iir: u8,
        /// FCR in the state.
        fcr: u8,
    },
    /// The interrupt line's level disagrees with the source IIR reports.
    #[error("interrupt line {} while iir {iir:#04x} reports {}", if *.level { "high" } else { "low" }, if *.iir & 0x0f == IIR_NO_INT { "no interrupt" } else { "an interrupt" })]
    IrqLevel {
        /// IIR in the state.
        iir: u8,
        /// The line's level in the state.
        level: bool,
    },
}

impl SerialState {
    /// Checks the state against what the device can reach (see [`Serial::restore`]).
    pub fn validate(&self) -> Result<(), SerialStateError> {
        if self.rx_fifo.len() > FIFO_LEN {
            return Err(SerialStateError::FifoTooLong(self.rx_fifo.len()));
        }
        if self.input.len() > INPUT_BUFFER_CAPACITY {
            return Err(SerialStateError::InputTooLong(self.input.len()));
        }
        for (register, value, allowed) in [
            ("ier", self.ier, 0x0f),
            ("mcr", self.mcr, 0x1f),
            ("fcr", self.fcr, FCR_STICKY),
        ] {
            if value & !allowed != 0 {
                return Err(SerialStateError::ReservedBits { register, value });
            }
        }
        let id = self.iir & 0x0f;
        let fifo_bits = if self.fcr & FCR_FE != 0 { IIR_FE } else { 0 };
        let known = [IIR_NO_INT, IIR_MSI, IIR_THRI, IIR_RDI, IIR_RLSI, IIR_CTI].contains(&id);
        if !known || self.iir & 0xf0 != fifo_bits {
            return Err(SerialStateError::BadIir {
                iir: self.iir,
                fcr: self.fcr,
            });
        }
        if self.irq_level != (id != IIR_NO_INT) {
            return Err(SerialStateError::IrqLevel {
                iir: self.iir,
                level: self.irq_level,
            });
        }
        Ok(())
    }
}

impl Default for SerialState {
    /// The state after power-on reset: 9600 baud 8N1, no interrupts, THR empty, OUT2 set.
    fn default() -> Self {
        Self {
            divisor: 0x0c,
            rbr: 0,
            ier: 0,
            iir: IIR_NO_INT,
            fcr: 0,
            lcr: 0,
            mcr: MCR_OUT2,
            lsr: LSR_TEMT | LSR_THRE,
            msr: MSR_DCD | MSR_DSR | MSR_CTS,
            scr: 0,
            rx_fifo: VecDeque::new(),
            thr_ipending: false,
            timeout_ipending: false,
            input: VecDeque::new(),
            irq_level: false,
        }
    }
}

/// How much output an [`OutputQueue`] holds while the host does not take it.
pub const OUTPUT_QUEUE_BYTES: usize = 1 << 20;
/// How long [`OutputQueue::flush`] waits for the host.
const FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Default)]
struct Queued {
    bytes: Vec<u8>,
    /// The drain thread is writing a batch.
    writing: bool,
    dropped: u64,
    closed: bool,
}

struct QueueShared {
    q: std::sync::Mutex<Queued>,
    cv: std::sync::Condvar,
}

/// A non-blocking writer in front of a host sink (see the module documentation): writes
/// append to a bounded buffer, a thread of its own writes the buffer to the sink.
pub struct OutputQueue {
    shared: std::sync::Arc<QueueShared>,
}

impl OutputQueue {
    /// Starts the drain thread for `sink`. If the thread cannot be started, output goes to
    /// the sink directly from the writer.
    pub fn spawn(sink: Box<dyn Write + Send>) -> Box<dyn Write + Send> {
        let shared = std::sync::Arc::new(QueueShared {
            q: std::sync::Mutex::new(Queued::default()),
            cv: std::sync::Condvar::new(),
        });
        let drain = shared.clone();
        let sink = std::sync::Arc::new(std::sync::Mutex::new(sink));
        let thread_sink = sink.clone();
        match std::thread::Builder::new()
            .name(String::from("serial-out"))
            .spawn(move || Self::drain(&drain, &thread_sink))
        {
            Ok(_) => Box::new(Self { shared }),
            Err(e) => {
                log::warn!("serial: no output thread ({e}); writing directly");
                Box::new(DirectSink(sink))
            }
        }
    }

    fn drain(shared: &QueueShared, sink: &std::sync::Mutex<Box<dyn Write + Send>>) {
        let mut failed = false;
        loop {
            let batch = {
                let mut q = vmm_sync::lock(&shared.q);
                q.writing = false;
                shared.cv.notify_all();
                while q.bytes.is_empty() && !q.closed {
                    q = vmm_sync::wait(&shared.cv, q);
                }
                if q.bytes.is_empty() {
                    return;
                }
                if q.dropped > 0 {
                    log::warn!(
                        "serial: the host did not take the guest's output; {} bytes dropped",
                        q.dropped
                    );
                    q.dropped = 0;
                }
                q.writing = true;
                std::mem::take(&mut q.bytes)
            };
            let mut sink = vmm_sync::lock(sink);
            let result = sink.write_all(&batch).and_then(|()| sink.flush());
            match result {
                Ok(()) => failed = false,
                Err(e) if !failed => {
                    failed = true;
                    log::warn!("serial: output failed: {e}");
                }
                Err(_) => {}
            }
        }
    }
}

impl Write for OutputQueue {
    /// Never blocks: what does not fit in the buffer is dropped (and counted).
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut q = vmm_sync::lock(&self.shared.q);
        let room = OUTPUT_QUEUE_BYTES.saturating_sub(q.bytes.len());
        let n = buf.len().min(room);
        q.bytes.extend_from_slice(&buf[..n]);
        q.dropped += (buf.len() - n) as u64;
        self.shared.cv.notify_all();
        Ok(buf.len())
    }

    /// Waits until everything written so far reached the sink, at most a few seconds.
    fn flush(&mut self) -> std::io::Result<()> {
        let deadline = std::time::Instant::now() + FLUSH_WAIT;
        let mut q = vmm_sync::lock(&self.shared.q);
        while !q.bytes.is_empty() || q.writing {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the host did not take the guest's serial output",
                ));
            }
            q = vmm_sync::wait_timeout(&self.shared.cv, q, left).0;
        }
        Ok(())
    }
}

impl Drop for OutputQueue {
    fn drop(&mut self) {
        vmm_sync::lock(&self.shared.q).closed = true;
        self.shared.cv.notify_all();
    }
}

/// The sink itself, when no drain thread could be started.
struct DirectSink(std::sync::Arc<std::sync::Mutex<Box<dyn Write + Send>>>);

impl Write for DirectSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut s = vmm_sync::lock(&self.0);
        s.write_all(buf)?;
        s.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        vmm_sync::lock(&self.0).flush()
    }
}

/// A 16550A UART; register it at [`COM1_BASE`] with length [`SERIAL_PORT_LEN`].
pub struct Serial {
    s: SerialState,
    irq: SharedIrq,
    out: Box<dyn Write + Send>,
    /// Output errors are logged once, not once per byte.
    out_failed: bool,
    /// Host input is queued but not fed to the receiver (see [`Serial::hold_input`]).
    input_held: bool,
}

impl Serial {
    /// A UART in its reset state that raises `irq` and transmits to `out`.
    pub fn new(irq: SharedIrq, out: Box<dyn Write + Send>) -> Self {
        Self {
            s: SerialState::default(),
            irq,
            out,
            out_failed: false,
            input_held: false,
        }
    }

    /// Keeps host input queued instead of feeding it to the receiver, for a device whose state
    /// an incoming migration is about to replace: what the host types meanwhile survives the
    /// [`restore`](Self::restore) and reaches the guest after [`release_input`](Self::release_input).
    pub fn hold_input(&mut self) {
        self.input_held = true;
    }

    /// Ends [`hold_input`](Self::hold_input): queued host input flows into the receiver.
    pub fn release_input(&mut self) {
        if std::mem::take(&mut self.input_held) {
            self.pump_input();
            self.update_irq();
        }
    }

    /// A snapshot of everything the guest can observe.
    pub fn state(&self) -> SerialState {
        self.s.clone()
    }

    /// Replaces the device's state with `state` and drives the interrupt line to its level.
    ///
    /// A state the device could not have reached (an over-long FIFO or input buffer, reserved
    /// register bits set, an IIR that disagrees with FCR or with the line's level) is rejected
    /// and the device is left as it was.
    ///
    /// Host input queued here and not yet received (typed while an incoming migration loaded)
    /// stays queued after the state's own, as far as the input buffer has room.
    pub fn restore(&mut self, state: &SerialState) -> Result<(), SerialStateError> {
        state.validate()?;
        let local = std::mem::take(&mut self.s.input);
        self.s = state.clone();
        let room = INPUT_BUFFER_CAPACITY.saturating_sub(self.s.input.len());
        self.s.input.extend(local.into_iter().take(room));
        self.irq.set_level(self.s.irq_level);
        Ok(())
    }

    /// Queues bytes the host typed for the guest and raises the received-data interrupt if it
    /// is enabled. Bytes that do not fit in the 4 KiB input buffer are dropped.
    pub fn enqueue_input(&mut self, bytes: &[u8]) {
        let room = INPUT_BUFFER_CAPACITY - self.s.input.len().min(INPUT_BUFFER_CAPACITY);
        if bytes.len() > room {
            log::debug!(
                "serial: input buffer full, dropping {} bytes",
                bytes.len() - room
            );
        }
        self.s.input.extend(bytes.iter().take(room));
        self.pump_input();
        self.update_irq();
    }

    /// How many bytes of host input have not reached the receiver yet.
    pub fn pending_input(&self) -> usize {
        self.s.input.len()
    }

    fn fifo_enabled(&self) -> bool {
        self.s.fcr & FCR_FE != 0
    }

    /// The receive FIFO interrupt trigger level selected by FCR bits 7:6.
    fn trigger_level(&self) -> usize {
        match self.s.fcr >> 6 {
            0 => 1,
            1 => 4,
            2 => 8,
            _ => 14,
        }
    }

    /// Recomputes IIR from the pending conditions (QEMU's `serial_update_irq`) and drives the
    /// line if its level changes.
    fn update_irq(&mut self) {
        let s = &self.s;
        let id = if s.ier & IER_RLSI != 0 && s.lsr & LSR_INT_ANY != 0 {
            IIR_RLSI
        } else if s.ier & IER_RDI != 0 && s.timeout_ipending {
            IIR_CTI
        } else if s.ier & IER_RDI != 0
            && s.lsr & LSR_DR != 0
            && (s.fcr & FCR_FE == 0 || s.rx_fifo.len() >= self.trigger_level())
        {
            IIR_RDI
        } else if s.ier & IER_THRI != 0 && s.thr_ipending {
            IIR_THRI
        } else if s.ier & IER_MSI != 0 && s.msr & MSR_ANY_DELTA != 0 {
            IIR_MSI
        } else {
            IIR_NO_INT
        };
        self.s.iir = id | (self.s.iir & 0xf0);
        self.set_irq(id != IIR_NO_INT);
    }

    fn set_irq(&mut self, level: bool) {
        if level != self.s.irq_level {
            self.s.irq_level = level;
            self.irq.set_level(level);
        }
    }

    /// A byte arrives at the receiver (QEMU's `serial_receive1`).
    fn receive(&mut self, byte: u8) {
        if self.fifo_enabled() {
            if self.s.rx_fifo.len() < FIFO_LEN {
                self.s.rx_fifo.push_back(byte);
            } else {
                // Receive overruns do not overwrite FIFO contents.
                self.s.lsr |= LSR_OE;
            }
        } else {
            if self.s.lsr & LSR_DR != 0 {
                self.s.lsr |= LSR_OE;
            }
            self.s.rbr = byte;
        }
        self.s.lsr |= LSR_DR;
    }

    /// Moves queued host input into the receiver as far as it has room, then decides whether
    /// the character timeout has elapsed (see the module documentation).
    fn pump_input(&mut self) {
        if self.input_held {
            return;
        }
        if self.s.mcr & MCR_LOOP == 0 {
            if self.fifo_enabled() {
                while self.s.rx_fifo.len() < FIFO_LEN {
                    let Some(b) = self.s.input.pop_front() else {
                        break;
                    };
                    self.receive(b);
                }
            } else if self.s.lsr & LSR_DR == 0 {
                if let Some(b) = self.s.input.pop_front() {
                    self.receive(b);
                }
            }
        }
        self.update_timeout();
    }

    fn update_timeout(&mut self) {
        if self.fifo_enabled() && !self.s.rx_fifo.is_empty() && self.s.input.is_empty() {
            // The FIFO holds data and nothing more is coming: the timeout fires (it only
            // matters below the trigger level, where RDI would not be raised).
            if self.s.rx_fifo.len() < self.trigger_level() {
                self.s.timeout_ipending = true;
            }
        }
    }

    /// Sends a byte written to THR (QEMU's THR write path and `serial_xmit`).
    fn transmit(&mut self, byte: u8) {
        self.s.thr_ipending = false;
        self.s.lsr &= !(LSR_THRE | LSR_TEMT);
        self.update_irq();

        self.s.lsr |= LSR_THRE;
        self.s.thr_ipending = true;
        if self.s.mcr & MCR_LOOP != 0 {
            // In loopback mode the transmitter feeds the receiver.
            self.receive(byte);
            self.update_timeout();
        } else {
            self.output(byte);
        }
        self.s.lsr |= LSR_TEMT;
        self.update_irq();
    }

    /// Waits until the output reached the host (see [`OutputQueue::flush`]).
    pub fn flush_output(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    fn output(&mut self, byte: u8) {
        let result = self.out.write_all(&[byte]);
        match result {
            Ok(()) => self.out_failed = false,
            Err(e) if !self.out_failed => {
                self.out_failed = true;
                log::warn!("serial: output failed: {e}");
            }
            Err(_) => {}
        }
    }

    fn read_rbr(&mut self) -> u8 {
        let ret;
        if self.fifo_enabled() {
            ret = self.s.rx_fifo.pop_front().unwrap_or(0);
            if self.s.rx_fifo.is_empty() {
                self.s.lsr &= !(LSR_DR | LSR_BI);
            }
            self.s.timeout_ipending = false;
        } else {
            ret = self.s.rbr;
            self.s.lsr &= !(LSR_DR | LSR_BI);
        }
        // The guest made room: accept more input (this may restart the timeout).
        self.pump_input();
        self.update_irq();
        ret
    }

    fn read_byte(&mut self, offset: u64) -> u8 {
        let dlab = self.s.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.s.divisor as u8,
            0 => self.read_rbr(),
            1 if dlab => (self.s.divisor >> 8) as u8,
            1 => self.s.ier,
            2 => {
                let ret = self.s.iir;
                if ret & IIR_ID == IIR_THRI {
                    self.s.thr_ipending = false;
                    self.update_irq();
                }
                ret
            }
            3 => self.s.lcr,
            4 => self.s.mcr,
            5 => {
                let ret = self.s.lsr;
                if self.s.lsr & (LSR_BI | LSR_OE) != 0 {
                    self.s.lsr &= !(LSR_BI | LSR_OE);
                    self.update_irq();
                }
                ret
            }
            6 => {
                let mcr = self.s.mcr;
                if mcr & MCR_LOOP != 0 {
                    // In loopback the modem outputs are wired to the inputs:
                    // OUT2 → DCD, OUT1 → RI, RTS → CTS, DTR → DSR.
                    ((mcr & 0x0c) << 4) | ((mcr & 0x02) << 3) | ((mcr & 0x01) << 5)
                } else {
                    let ret = self.s.msr;
                    if self.s.msr & MSR_ANY_DELTA != 0 {
                        self.s.msr &= 0xf0;
                        self.update_irq();
                    }
                    ret
                }
            }
            7 => self.s.scr,
            _ => 0xff,
        }
    }

    fn write_byte(&mut self, offset: u64, val: u8) {
        let dlab = self.s.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.s.divisor = (self.s.divisor & 0xff00) | u16::from(val),
            0 => self.transmit(val),
            1 if dlab => self.s.divisor = (self.s.divisor & 0x00ff) | (u16::from(val) << 8),
            1 => {
                let changed = (self.s.ier ^ val) & 0x0f;
                self.s.ier = val & 0x0f;
                // Enabling THRI while THR is empty raises the interrupt even if it had been
                // acknowledged by reading IIR before.
                if changed & IER_THRI != 0 {
                    self.s.thr_ipending = self.s.ier & IER_THRI != 0 && self.s.lsr & LSR_THRE != 0;
                }
                if changed != 0 {
                    self.update_irq();
                }
            }
            2 => {
                let mut val = val;
                // Switching the FIFOs on or off flushes them.
                if (val ^ self.s.fcr) & FCR_FE != 0 {
                    val |= FCR_XFR | FCR_RFR;
                }
                if val & FCR_RFR != 0 {
                    self.s.lsr &= !(LSR_DR | LSR_BI);
                    self.s.timeout_ipending = false;
                    self.s.rx_fifo.clear();
                }
                if val & FCR_XFR != 0 {
                    self.s.lsr |= LSR_THRE;
                    self.s.thr_ipending = true;
                }
                self.s.fcr = val & FCR_STICKY;
                if self.s.fcr & FCR_FE != 0 {
                    self.s.iir |= IIR_FE;
                } else {
                    self.s.iir &= !IIR_FE;
                }
                self.pump_input();
                self.update_irq();
            }
            3 => self.s.lcr = val,
            4 => {
                let was_loop = self.s.mcr & MCR_LOOP != 0;
                self.s.mcr = val & 0x1f;
                if was_loop && self.s.mcr & MCR_LOOP == 0 {
                    // The receiver is connected to the host again.
                    self.pump_input();
                    self.update_irq();
                }
            }
            7 => self.s.scr = val,
            // LSR and MSR are read-only.
            _ => {}
        }
    }
}

impl BusDevice for Serial {
    /// Wider accesses are split into byte accesses at consecutive offsets, as QEMU does.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.read_byte(offset.wrapping_add(i as u64));
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        for (i, b) in data.iter().enumerate() {
            self.write_byte(offset.wrapping_add(i as u64), *b);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::testutil::RecordingIrq;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const THR: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const FCR: u64 = 2;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const LSR: u64 = 5;
    const MSR: u64 = 6;
    const SCR: u64 = 7;

    fn serial() -> (Serial, Arc<RecordingIrq>, Sink) {
        let (irq, shared) = RecordingIrq::new();
        let sink = Sink::default();
        (Serial::new(shared, Box::new(sink.clone())), irq, sink)
    }

    fn rd(s: &mut Serial, off: u64) -> u8 {
        let mut b = [0];
        s.read(off, &mut b);
        b[0]
    }

    fn wr(s: &mut Serial, off: u64, v: u8) {
        assert_eq!(s.write(off, &[v]), None);
    }

    #[test]
    fn reset_values() {
        let (mut s, irq, _) = serial();
        assert_eq!(rd(&mut s, IER), 0);
        assert_eq!(rd(&mut s, IIR), 0x01);
        assert_eq!(rd(&mut s, LCR), 0);
        assert_eq!(rd(&mut s, MCR), 0x08);
        assert_eq!(rd(&mut s, LSR), 0x60);
        assert_eq!(rd(&mut s, MSR), 0xb0);
        assert_eq!(rd(&mut s, SCR), 0);
        assert!(!irq.level());
    }

    #[test]
    fn output_goes_to_sink() {
        let (mut s, _, sink) = serial();
        for b in b"hi\n" {
            wr(&mut s, THR, *b);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        assert_eq!(rd(&mut s, LSR) & 0x60, 0x60);
    }

    #[test]
    fn dlab_divisor_and_scratch() {
        let (mut s, _, sink) = serial();
        wr(&mut s, LCR, 0x83);
        wr(&mut s, 0, 0x01);
        wr(&mut s, 1, 0x02);
        assert_eq!(rd(&mut s, 0), 0x01);
        assert_eq!(rd(&mut s, 1), 0x02);
        wr(&mut s, LCR, 0x03);
        assert_eq!(rd(&mut s, IER), 0);
        assert!(sink.0.lock().unwrap().is_empty());
        wr(&mut s, SCR, 0x5a);
        assert_eq!(rd(&mut s, SCR), 0x5a);
        assert_eq!(s.state().divisor, 0x0201);
    }

    #[test]
    fn thre_interrupt_and_iir_read_clears_it() {
        let (mut s, irq, _) = serial();
        wr(&mut s, IER, IER_THRI);
        assert!(irq.level());
        assert_eq!(rd(&mut s, IIR), 0x02);
        assert!(!irq.level());
        assert_eq!(rd(&mut s, IIR), 0x01);
        // Each transmitted byte brings a new edge.
        let edges = irq.rising_edges();
        wr(&mut s, THR, b'a');
        assert!(irq.level());
        assert_eq!(irq.rising_edges(), edges + 1);
        wr(&mut s, THR, b'b');
        assert_eq!(irq.rising_edges(), edges + 2);
        // Toggling THRI re-arms it.
        assert_eq!(rd(&mut s, IIR), 0x02);
        wr(&mut s, IER, 0);
        wr(&mut s, IER, IER_THRI);
        assert_eq!(rd(&mut s, IIR), 0x02);
    }

    #[test]
    fn received_data_without_fifo() {
        let (mut s, irq, _) = serial();
        wr(&mut s, IER, IER_RDI);
        s.enqueue_input(b"xy");
        assert!(irq.level());
        assert_eq!(rd(&mut s, IIR), 0x04);
        assert_eq!(rd(&mut s, LSR) & LSR_DR, LSR_DR);
        assert_eq!(rd(&mut s, THR), b'x');
        // The next byte moves into RBR as soon as it was read.
        assert!(irq.level());
        assert_eq!(rd(&mut s, THR), b'y');
        assert!(!irq.level());
        assert_eq!(rd(&mut s, LSR) & LSR_DR, 0);
        assert_eq!(rd(&mut s, IIR), 0x01);
    }

    #[test]
    fn rda_has_priority_over_thre() {
        let (mut s, _, _) = serial();
        wr(&mut s, IER, IER_RDI | IER_THRI);
        s.enqueue_input(b"z");
        assert_eq!(rd(&mut s, IIR), 0x04);
        assert_eq!(rd(&mut s, THR), b'z');
        assert_eq!(rd(&mut s, IIR), 0x02);
        assert_eq!(rd(&mut s, IIR), 0x01);
    }

    #[test]
    fn fifo_mode() {
        let (mut s, irq, _) = serial();
        wr(&mut s, FCR, 0x01);
        assert_eq!(rd(&mut s, IIR), 0xc1);
        // Trigger level 8.
        wr(&mut s, FCR, 0x81);
        wr(&mut s, IER, IER_RDI);
        s.enqueue_input(b"abc");
        // Below the trigger level with no more input: character timeout.
        assert_eq!(rd(&mut s, IIR), 0xcc);
        assert!(irq.level());
        let data: Vec<u8> = (0..3).map(|_| rd(&mut s, THR)).collect();
        assert_eq!(data, b"abc");
        assert!(!irq.level());
        assert_eq!(rd(&mut s, IIR), 0xc1);

        let input: Vec<u8> = (0..40).collect();
        s.enqueue_input(&input);
        assert_eq!(s.state().rx_fifo.len(), 16);
        assert_eq!(rd(&mut s, IIR), 0xc4);
        let mut got = Vec::new();
        while rd(&mut s, LSR) & LSR_DR != 0 {
            got.push(rd(&mut s, THR));
        }
        assert_eq!(got, input);
        assert_eq!(rd(&mut s, LSR) & LSR_OE, 0);
        // Clearing the receive FIFO.
        s.enqueue_input(b"q");
        wr(&mut s, FCR, 0x83);
        assert_eq!(rd(&mut s, LSR) & LSR_DR, 0);
        wr(&mut s, FCR, 0x00);
        assert_eq!(rd(&mut s, IIR) & 0xc0, 0);
    }

    #[test]
    fn input_buffer_is_bounded() {
        let (mut s, _, _) = serial();
        s.enqueue_input(&vec![b'a'; INPUT_BUFFER_CAPACITY + 100]);
        // One byte sits in RBR.
        assert_eq!(s.pending_input(), INPUT_BUFFER_CAPACITY - 1);
        s.enqueue_input(b"more");
        assert_eq!(s.pending_input(), INPUT_BUFFER_CAPACITY);
    }

    #[test]
    fn input_held_for_an_incoming_migration_survives_the_restore() {
        // The source guest enabled FIFOs and the received-data interrupt, and had "ab" queued.
        let (mut src, _, _) = serial();
        wr(&mut src, FCR, FCR_FE);
        wr(&mut src, IER, IER_RDI);
        src.enqueue_input(b"ab");
        let saved = src.state();
        // The destination's host types "\n" while the stream loads.
        let (mut dst, irq, _) = serial();
        dst.hold_input();
        dst.enqueue_input(b"\n");
        assert_eq!(dst.pending_input(), 1, "held input must stay queued");
        dst.restore(&saved).unwrap();
        dst.release_input();
        assert!(irq.level());
        let got: Vec<u8> = (0..3).map(|_| rd(&mut dst, THR)).collect();
        assert_eq!(got, b"ab\n");
        assert_eq!(dst.pending_input(), 0);
    }

    #[test]
    fn loopback() {
        let (mut s, irq, sink) = serial();
        wr(&mut s, MCR, MCR_LOOP | 0x0a);
        assert_eq!(rd(&mut s, MSR) & 0xf0, 0x90);
        wr(&mut s, MCR, MCR_LOOP | 0x05);
        assert_eq!(rd(&mut s, MSR) & 0xf0, 0x60);
        wr(&mut s, IER, IER_RDI);
        s.enqueue_input(b"host");
        assert!(!irq.level());
        wr(&mut s, THR, 0x42);
        assert!(irq.level());
        assert_eq!(rd(&mut s, THR), 0x42);
        assert!(sink.0.lock().unwrap().is_empty());
        // Leaving loopback connects the host input.
        wr(&mut s, MCR, 0x0b);
        assert_eq!(rd(&mut s, THR), b'h');
    }

    #[test]
    fn overrun_in_loopback_without_fifo() {
        let (mut s, irq, _) = serial();
        wr(&mut s, MCR, MCR_LOOP);
        wr(&mut s, IER, IER_RLSI);
        wr(&mut s, THR, 1);
        wr(&mut s, THR, 2);
        assert_eq!(rd(&mut s, IIR), 0x06);
        assert!(irq.level());
        assert_eq!(rd(&mut s, LSR) & LSR_OE, LSR_OE);
        assert!(!irq.level());
        assert_eq!(rd(&mut s, LSR) & LSR_OE, 0);
        assert_eq!(rd(&mut s, THR), 2);
    }

    #[test]
    fn wide_accesses_split_into_bytes() {
        let (mut s, _, _) = serial();
        // A 16-bit write at offset 6 writes MSR (ignored) and the scratch register.
        assert_eq!(s.write(6, &[0x11, 0x22]), None);
        assert_eq!(rd(&mut s, SCR), 0x22);
        let mut d = [0u8; 4];
        s.read(4, &mut d);
        assert_eq!(d, [0x08, 0x60, 0xb0, 0x22]);
        // Out-of-range offsets neither panic nor do anything.
        s.read(u64::MAX, &mut d);
        assert_eq!(s.write(u64::MAX - 1, &[1, 2, 3, 4, 5, 6, 7, 8]), None);
    }

    #[test]
    fn save_restore_round_trip() {
        let (mut s, _, _) = serial();
        wr(&mut s, LCR, 0x80);
        wr(&mut s, 0, 0x03);
        wr(&mut s, LCR, 0x1b);
        wr(&mut s, FCR, 0x41);
        wr(&mut s, IER, IER_RDI | IER_THRI);
        wr(&mut s, SCR, 0x77);
        wr(&mut s, MCR, 0x0b);
        s.enqueue_input(&[7u8; 30]);
        let state = s.state();
        let json = serde_json::to_string(&state).unwrap();
        let state: SerialState = serde_json::from_str(&json).unwrap();

        let (irq2, shared2) = RecordingIrq::new();
        let sink2 = Sink::default();
        let mut t = Serial::new(shared2, Box::new(sink2));
        t.restore(&state).unwrap();
        assert_eq!(t.state(), s.state());
        assert!(irq2.level());
        for off in [1, 2, 3, 4, 5, 6, 7, 2, 0, 0, 5, 2] {
            assert_eq!(rd(&mut s, off), rd(&mut t, off), "offset {off}");
        }
        for _ in 0..30 {
            assert_eq!(rd(&mut s, 0), rd(&mut t, 0));
            assert_eq!(rd(&mut s, 2), rd(&mut t, 2));
        }
        assert_eq!(s.state(), t.state());
    }

    struct FailingSink;

    impl Write for FailingSink {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("closed"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_errors_are_not_fatal() {
        let (_, shared) = RecordingIrq::new();
        let mut s = Serial::new(shared, Box::new(FailingSink));
        wr(&mut s, THR, b'a');
        wr(&mut s, THR, b'b');
        assert_eq!(rd(&mut s, LSR) & 0x60, 0x60);
    }

    #[test]
    fn restore_rejects_invalid_state() {
        let (mut s, irq, _) = serial();
        wr(&mut s, SCR, 0x5a);
        let good = s.state();
        let cases: Vec<(SerialState, SerialStateError)> = vec![
            (
                SerialState {
                    rx_fifo: vec![0; FIFO_LEN + 1].into(),
                    ..good.clone()
                },
                SerialStateError::FifoTooLong(17),
            ),
            (
                SerialState {
                    input: vec![0; INPUT_BUFFER_CAPACITY + 1].into(),
                    ..good.clone()
                },
                SerialStateError::InputTooLong(INPUT_BUFFER_CAPACITY + 1),
            ),
            (
                SerialState {
                    ier: 0x10,
                    ..good.clone()
                },
                SerialStateError::ReservedBits {
                    register: "ier",
                    value: 0x10,
                },
            ),
            (
                SerialState {
                    mcr: 0x20,
                    ..good.clone()
                },
                SerialStateError::ReservedBits {
                    register: "mcr",
                    value: 0x20,
                },
            ),
            (
                SerialState {
                    iir: 0x08,
                    ..good.clone()
                },
                SerialStateError::BadIir { iir: 0x08, fcr: 0 },
            ),
            (
                // FIFO bits in IIR without FIFOs enabled.
                SerialState {
                    iir: IIR_FE | IIR_NO_INT,
                    ..good.clone()
                },
                SerialStateError::BadIir { iir: 0xc1, fcr: 0 },
            ),
            (
                SerialState {
                    irq_level: true,
                    ..good.clone()
                },
                SerialStateError::IrqLevel {
                    iir: IIR_NO_INT,
                    level: true,
                },
            ),
        ];
        let edges = irq.levels.lock().unwrap().len();
        for (bad, want) in cases {
            assert_eq!(s.restore(&bad), Err(want.clone()), "{want}");
            assert!(!want.to_string().is_empty());
            // Nothing of the rejected state was applied, the line was not touched.
            assert_eq!(s.state(), good);
            assert_eq!(irq.levels.lock().unwrap().len(), edges);
        }
        // The limits themselves are fine.
        let full = SerialState {
            rx_fifo: vec![1; FIFO_LEN].into(),
            input: vec![2; INPUT_BUFFER_CAPACITY].into(),
            ..good.clone()
        };
        s.restore(&full).unwrap();
        assert_eq!(s.state(), full);
    }
}
