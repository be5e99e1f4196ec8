//! i8042 PS/2 controller with a PS/2 keyboard and a PS/2 mouse behind it.
//!
//! A PC without an i8042 confuses more than keyboards: Linux's `i8042` driver probes it at boot
//! (self test, command byte, the AUX loopback test with its IRQ 12 check) and firmware and
//! kernels use it to reset the machine (command 0xFE, or clearing bit 0 of the output port).
//! QEMU's `hw/input/pckbd.c` and `hw/input/ps2.c` are the reference; this module follows their
//! current ("extended state") behaviour: controller replies sit in a one-byte controller buffer
//! of their own, device replies in each device's 16-byte queue, and a device's data only reaches
//! the output buffer while its interface is enabled in the command byte.
//!
//! Behind the controller sit a keyboard and a mouse that answer commands like QEMU's: the
//! keyboard acks, resets (0xFA 0xAA), identifies as an MF2 keyboard (0xFA 0xAB 0x83, or 0x41
//! with translation), takes LED and typematic settings; the mouse acks, reports status and ID
//! (including the IntelliMouse detection sequences) and resets (0xFA 0xAA 0x00). No key presses
//! or movements are generated: there is no input source yet.
//!
//! # Port layout
//!
//! The two ports are 0x60 (data) and 0x64 (status on read, command on write). Register the
//! device once at base [`I8042_BASE`] (0x60) with length [`I8042_PORT_LEN`] (5): offset 0 is the
//! data port and offset 4 the status/command port. Offsets 1–3 (ports 0x61–0x63, the PC speaker
//! and NMI status port on a real PC) are not the controller's: reads return 0xff and writes are
//! ignored. Registering the device twice with length 1 each does not work, since both ports
//! would then be seen at offset 0. Wider accesses are split into byte accesses at consecutive
//! offsets, as QEMU does.
//!
//! # Interrupts
//!
//! IRQ 1 is driven while the output buffer holds keyboard or controller data and the command
//! byte enables keyboard interrupts (and the keyboard interface); IRQ 12 while it holds mouse
//! data (including 0xD3 loopback bytes) and the command byte enables mouse interrupts. Lines are
//! driven only when their level changes.
//!
//! # Left out
//!
//! Keyboard and mouse input, the typematic/scancode translation of key events (there are none),
//! the A20 gate (KVM has no A20 masking; the output port bit is kept readable), the optional
//! keyboard throttle timer, and the controller password/test-mode commands QEMU does not
//! implement either.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::{BusDevice, SharedIrq, VmRequest};

/// The port the device expects to be registered at.
pub const I8042_BASE: u64 = 0x60;
/// The length of the port range the device expects (0x60–0x64).
pub const I8042_PORT_LEN: u64 = 5;
/// The keyboard's ISA interrupt.
pub const I8042_KBD_IRQ: u32 = 1;
/// The mouse's (AUX port's) ISA interrupt.
pub const I8042_AUX_IRQ: u32 = 12;

/// Offset of the data port (0x60) from [`I8042_BASE`].
const DATA_OFFSET: u64 = 0;
/// Offset of the status/command port (0x64) from [`I8042_BASE`].
const CMD_OFFSET: u64 = 4;

// Controller commands.
const CCMD_READ_MODE: u8 = 0x20;
const CCMD_WRITE_MODE: u8 = 0x60;
const CCMD_MOUSE_DISABLE: u8 = 0xa7;
const CCMD_MOUSE_ENABLE: u8 = 0xa8;
const CCMD_TEST_MOUSE: u8 = 0xa9;
const CCMD_SELF_TEST: u8 = 0xaa;
const CCMD_KBD_TEST: u8 = 0xab;
const CCMD_KBD_DISABLE: u8 = 0xad;
const CCMD_KBD_ENABLE: u8 = 0xae;
const CCMD_READ_INPORT: u8 = 0xc0;
const CCMD_READ_OUTPORT: u8 = 0xd0;
const CCMD_WRITE_OUTPORT: u8 = 0xd1;
const CCMD_WRITE_OBUF: u8 = 0xd2;
const CCMD_WRITE_AUX_OBUF: u8 = 0xd3;
const CCMD_WRITE_MOUSE: u8 = 0xd4;
const CCMD_DISABLE_A20: u8 = 0xdd;
const CCMD_ENABLE_A20: u8 = 0xdf;
const CCMD_PULSE_BITS_3_0: u8 = 0xf0;
const CCMD_RESET: u8 = 0xfe;
const CCMD_NO_OP: u8 = 0xff;

// Status register bits.
const STAT_OBF: u8 = 0x01;
const STAT_SELFTEST: u8 = 0x04;
const STAT_CMD: u8 = 0x08;
const STAT_UNLOCKED: u8 = 0x10;
const STAT_MOUSE_OBF: u8 = 0x20;

// Command byte ("mode") bits.
const MODE_KBD_INT: u8 = 0x01;
const MODE_MOUSE_INT: u8 = 0x02;
const MODE_DISABLE_KBD: u8 = 0x10;
const MODE_DISABLE_MOUSE: u8 = 0x20;
const MODE_KCC: u8 = 0x40;

// Output port bits.
const OUT_RESET: u8 = 0x01;
const OUT_A20: u8 = 0x02;
const OUT_OBF: u8 = 0x10;
const OUT_MOUSE_OBF: u8 = 0x20;
/// Bits QEMU keeps set in the output port by default.
const OUT_ONES: u8 = 0xcc;

// Sources of pending output-buffer data.
const PENDING_CTRL_KBD: u8 = 0x04;
const PENDING_CTRL_AUX: u8 = 0x08;
/// Keyboard data pending; the same bit as [`MODE_DISABLE_KBD`] so that the mode masks it.
const PENDING_KBD: u8 = MODE_DISABLE_KBD;
/// Mouse data pending; the same bit as [`MODE_DISABLE_MOUSE`].
const PENDING_AUX: u8 = MODE_DISABLE_MOUSE;

// Which source the byte in the output buffer came from.
const OBSRC_KBD: u8 = 0x01;
const OBSRC_MOUSE: u8 = 0x02;
const OBSRC_CTRL: u8 = 0x04;

/// Depth of each PS/2 device's reply queue.
const PS2_QUEUE_SIZE: usize = 16;

// PS/2 keyboard commands and replies.
const KBD_CMD_SET_LEDS: u8 = 0xed;
const KBD_CMD_ECHO: u8 = 0xee;
const KBD_CMD_SCANCODE: u8 = 0xf0;
const KBD_CMD_GET_ID: u8 = 0xf2;
const KBD_CMD_SET_RATE: u8 = 0xf3;
const KBD_CMD_ENABLE: u8 = 0xf4;
const KBD_CMD_RESET_DISABLE: u8 = 0xf5;
const KBD_CMD_RESET_ENABLE: u8 = 0xf6;
const KBD_CMD_SET_TYPEMATIC: u8 = 0xfa;
const KBD_CMD_SET_MAKE_BREAK: u8 = 0xfc;
const KBD_CMD_RESET: u8 = 0xff;
const KBD_REPLY_POR: u8 = 0xaa;
const KBD_REPLY_ID: u8 = 0xab;
const KBD_REPLY_ACK: u8 = 0xfa;
const KBD_REPLY_RESEND: u8 = 0xfe;

// PS/2 mouse commands and replies.
const AUX_SET_SCALE11: u8 = 0xe6;
const AUX_SET_SCALE21: u8 = 0xe7;
const AUX_SET_RES: u8 = 0xe8;
const AUX_GET_SCALE: u8 = 0xe9;
const AUX_SET_STREAM: u8 = 0xea;
const AUX_POLL: u8 = 0xeb;
const AUX_RESET_WRAP: u8 = 0xec;
const AUX_SET_WRAP: u8 = 0xee;
const AUX_SET_REMOTE: u8 = 0xf0;
const AUX_GET_TYPE: u8 = 0xf2;
const AUX_SET_SAMPLE: u8 = 0xf3;
const AUX_ENABLE_DEV: u8 = 0xf4;
const AUX_DISABLE_DEV: u8 = 0xf5;
const AUX_SET_DEFAULT: u8 = 0xf6;
const AUX_RESET: u8 = 0xff;
const AUX_ACK: u8 = 0xfa;

const MOUSE_STATUS_REMOTE: u8 = 0x40;
const MOUSE_STATUS_ENABLED: u8 = 0x20;
const MOUSE_STATUS_SCALE21: u8 = 0x10;

/// The PS/2 keyboard's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ps2KeyboardState {
    /// Bytes waiting to be read by the controller, oldest first (at most 16).
    pub queue: VecDeque<u8>,
    /// The byte last read, returned again when the queue is empty.
    pub last: u8,
    /// A command waiting for its parameter byte.
    pub write_cmd: Option<u8>,
    /// Scanning enabled (0xF4 / 0xF5).
    pub scan_enabled: bool,
    /// The controller translates scancodes (command byte bit 6).
    pub translate: bool,
    /// The selected scancode set (1–3).
    pub scancode_set: u8,
    /// The LED state last set with 0xED.
    pub ledstate: u8,
}

impl Default for Ps2KeyboardState {
    fn default() -> Self {
        Self {
            queue: VecDeque::new(),
            last: 0,
            write_cmd: None,
            scan_enabled: true,
            translate: false,
            scancode_set: 2,
            ledstate: 0,
        }
    }
}

/// The PS/2 mouse's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ps2MouseState {
    /// Bytes waiting to be read by the controller, oldest first (at most 16).
    pub queue: VecDeque<u8>,
    /// The byte last read, returned again when the queue is empty.
    pub last: u8,
    /// A command waiting for its parameter byte.
    pub write_cmd: Option<u8>,
    /// Status byte: remote mode, reporting enabled, 2:1 scaling.
    pub status: u8,
    /// Resolution set with 0xE8.
    pub resolution: u8,
    /// Sample rate set with 0xF3.
    pub sample_rate: u8,
    /// Wrap (echo) mode.
    pub wrap: bool,
    /// Device ID: 0 plain PS/2, 3 IntelliMouse, 4 IntelliMouse Explorer.
    pub mouse_type: u8,
    /// Progress through the IntelliMouse sample-rate detection sequences.
    pub detect_state: u8,
}

/// Everything the guest can observe of an [`I8042`], both PS/2 devices included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I8042State {
    /// Controller command byte (interrupt enables, interface disables, translation).
    pub mode: u8,
    /// Status register.
    pub status: u8,
    /// Output port (bit 0 reset line, bit 1 A20, bits 4/5 buffer-full mirrors).
    pub outport: u8,
    /// Sources with data for the output buffer (`PENDING_*` bits).
    pub pending: u8,
    /// A controller command waiting for its data byte on port 0x60 (0 = none).
    pub write_cmd: u8,
    /// The controller's own reply byte.
    pub cbdata: u8,
    /// Source of the byte in the output buffer.
    pub obsrc: u8,
    /// The byte last read from the data port.
    pub obdata: u8,
    /// The keyboard.
    pub kbd: Ps2KeyboardState,
    /// The mouse.
    pub mouse: Ps2MouseState,
    /// Level of IRQ 1.
    pub kbd_irq_level: bool,
    /// Level of IRQ 12.
    pub aux_irq_level: bool,
}

/// Why an [`I8042State`] cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum I8042StateError {
    /// A PS/2 device's reply queue is longer than its 16 bytes.
    #[error("{device} queue of {len} bytes, at most {PS2_QUEUE_SIZE}")]
    QueueTooLong {
        /// `keyboard` or `mouse`.
        device: &'static str,
        /// The queue's length in the state.
        len: usize,
    },
    /// The keyboard's scancode set is not 1, 2 or 3.
    #[error("scancode set {0}, the keyboard has sets 1 to 3")]
    ScancodeSet(u8),
    /// The mouse type is not one the mouse emulates (0, 3 or 4).
    #[error("mouse type {0}, the mouse is type 0, 3 or 4")]
    MouseType(u8),
    /// The IntelliMouse detection sequence is past its last step.
    #[error("mouse detection step {0}, at most 3")]
    DetectState(u8),
    /// A bit field has bits the controller never sets.
    #[error("{field} {value:#04x} has unknown bits set")]
    UnknownBits {
        /// The field's name.
        field: &'static str,
        /// Its value in the state.
        value: u8,
    },
    /// A controller command awaiting data that takes none.
    #[error("controller command {0:#04x} takes no data byte")]
    WriteCmd(u8),
}

impl I8042State {
    /// Checks the state against what the controller can reach (see [`I8042::restore`]).
    pub fn validate(&self) -> Result<(), I8042StateError> {
        for (device, len) in [
            ("keyboard", self.kbd.queue.len()),
            ("mouse", self.mouse.queue.len()),
        ] {
            if len > PS2_QUEUE_SIZE {
                return Err(I8042StateError::QueueTooLong { device, len });
            }
        }
        if !(1..=3).contains(&self.kbd.scancode_set) {
            return Err(I8042StateError::ScancodeSet(self.kbd.scancode_set));
        }
        if !matches!(self.mouse.mouse_type, 0 | 3 | 4) {
            return Err(I8042StateError::MouseType(self.mouse.mouse_type));
        }
        if self.mouse.detect_state > 3 {
            return Err(I8042StateError::DetectState(self.mouse.detect_state));
        }
        let pending_bits = PENDING_CTRL_KBD | PENDING_CTRL_AUX | PENDING_KBD | PENDING_AUX;
        for (field, value, allowed) in [
            ("pending", self.pending, pending_bits),
            ("obsrc", self.obsrc, OBSRC_KBD | OBSRC_MOUSE | OBSRC_CTRL),
        ] {
            if value & !allowed != 0 {
                return Err(I8042StateError::UnknownBits { field, value });
            }
        }
        match self.write_cmd {
            0 | CCMD_WRITE_MODE | CCMD_WRITE_OBUF | CCMD_WRITE_AUX_OBUF | CCMD_WRITE_MOUSE
            | CCMD_WRITE_OUTPORT => Ok(()),
            other => Err(I8042StateError::WriteCmd(other)),
        }
    }
}

impl Default for I8042State {
    /// The state after reset.
    fn default() -> Self {
        Self {
            mode: MODE_KBD_INT | MODE_MOUSE_INT,
            status: STAT_CMD | STAT_UNLOCKED,
            outport: OUT_RESET | OUT_A20 | OUT_ONES,
            pending: 0,
            write_cmd: 0,
            cbdata: 0,
            obsrc: 0,
            obdata: 0,
            kbd: Ps2KeyboardState::default(),
            mouse: Ps2MouseState::default(),
            kbd_irq_level: false,
            aux_irq_level: false,
        }
    }
}

/// An i8042 PS/2 controller; register it at [`I8042_BASE`] with length [`I8042_PORT_LEN`].
pub struct I8042 {
    s: I8042State,
    kbd_irq: SharedIrq,
    aux_irq: SharedIrq,
}

impl I8042 {
    /// A controller in its reset state driving `kbd_irq` (IRQ 1) and `aux_irq` (IRQ 12).
    pub fn new(kbd_irq: SharedIrq, aux_irq: SharedIrq) -> Self {
        Self {
            s: I8042State::default(),
            kbd_irq,
            aux_irq,
        }
    }

    /// A snapshot of everything the guest can observe.
    pub fn state(&self) -> I8042State {
        self.s.clone()
    }

    /// Replaces the device's state with `state` and drives both lines to its levels.
    ///
    /// A state the controller could not have reached (an over-long reply queue, a scancode set
    /// or mouse type it does not know, unknown pending or source bits) is rejected and the
    /// device is left as it was.
    pub fn restore(&mut self, state: &I8042State) -> Result<(), I8042StateError> {
        state.validate()?;
        self.s = state.clone();
        self.kbd_irq.set_level(self.s.kbd_irq_level);
        self.aux_irq.set_level(self.s.aux_irq_level);
        Ok(())
    }

    /// Pending sources whose interface is enabled.
    fn pending(&self) -> u8 {
        self.s.pending & !(self.s.mode & (PENDING_KBD | PENDING_AUX))
    }

    fn update_irq_lines(&mut self) {
        let mut kbd = false;
        let mut aux = false;
        if self.s.status & STAT_OBF != 0 {
            if self.s.status & STAT_MOUSE_OBF != 0 {
                aux = self.s.mode & MODE_MOUSE_INT != 0;
            } else {
                kbd = self.s.mode & MODE_KBD_INT != 0 && self.s.mode & MODE_DISABLE_KBD == 0;
            }
        }
        if kbd != self.s.kbd_irq_level {
            self.s.kbd_irq_level = kbd;
            self.kbd_irq.set_level(kbd);
        }
        if aux != self.s.aux_irq_level {
            self.s.aux_irq_level = aux;
            self.aux_irq.set_level(aux);
        }
    }

    fn deassert_irq(&mut self) {
        self.s.status &= !(STAT_OBF | STAT_MOUSE_OBF);
        self.s.outport &= !(OUT_OBF | OUT_MOUSE_OBF);
        self.update_irq_lines();
    }

    /// Fills the output buffer from the highest-priority pending source.
    fn update_irq(&mut self) {
        let pending = self.pending();
        self.s.status &= !(STAT_OBF | STAT_MOUSE_OBF);
        self.s.outport &= !(OUT_OBF | OUT_MOUSE_OBF);
        if pending != 0 {
            self.s.status |= STAT_OBF;
            self.s.outport |= OUT_OBF;
            if pending & PENDING_CTRL_KBD != 0 {
                self.s.obsrc = OBSRC_CTRL;
            } else if pending & PENDING_CTRL_AUX != 0 {
                self.s.status |= STAT_MOUSE_OBF;
                self.s.outport |= OUT_MOUSE_OBF;
                self.s.obsrc = OBSRC_CTRL;
            } else if pending & PENDING_KBD != 0 {
                self.s.obsrc = OBSRC_KBD;
            } else {
                self.s.status |= STAT_MOUSE_OBF;
                self.s.outport |= OUT_MOUSE_OBF;
                self.s.obsrc = OBSRC_MOUSE;
            }
        }
        self.update_irq_lines();
    }

    /// Fills the output buffer unless it is already full.
    fn safe_update_irq(&mut self) {
        if self.s.status & STAT_OBF == 0 && self.pending() != 0 {
            self.update_irq();
        }
    }

    fn set_pending(&mut self, bit: u8, level: bool) {
        if level {
            self.s.pending |= bit;
        } else {
            self.s.pending &= !bit;
        }
        self.safe_update_irq();
    }

    /// Puts a controller reply in the output buffer, as if from the keyboard or the AUX port.
    fn ctrl_queue(&mut self, b: u8, aux: bool) {
        self.s.cbdata = b;
        self.s.pending &= !(PENDING_CTRL_KBD | PENDING_CTRL_AUX);
        self.s.pending |= if aux {
            PENDING_CTRL_AUX
        } else {
            PENDING_CTRL_KBD
        };
        self.safe_update_irq();
    }

    fn ctrl_dequeue(&mut self) -> u8 {
        self.s.pending &= !(PENDING_CTRL_KBD | PENDING_CTRL_AUX);
        if self.pending() != 0 {
            self.update_irq();
        }
        self.s.cbdata
    }

    /// Queues a keyboard reply; like QEMU, all of it or nothing if the queue lacks room.
    fn kbd_reply(&mut self, bytes: &[u8]) {
        let q = &mut self.s.kbd.queue;
        if PS2_QUEUE_SIZE - q.len().min(PS2_QUEUE_SIZE) < bytes.len() {
            return;
        }
        q.extend(bytes);
        self.set_pending(PENDING_KBD, true);
    }

    /// Queues a mouse reply; all of it or nothing.
    fn mouse_reply(&mut self, bytes: &[u8]) {
        let q = &mut self.s.mouse.queue;
        if PS2_QUEUE_SIZE - q.len().min(PS2_QUEUE_SIZE) < bytes.len() {
            return;
        }
        q.extend(bytes);
        self.set_pending(PENDING_AUX, true);
    }

    fn kbd_read(&mut self) -> u8 {
        let Some(val) = self.s.kbd.queue.pop_front() else {
            return self.s.kbd.last;
        };
        self.s.kbd.last = val;
        self.set_pending(PENDING_KBD, false);
        if !self.s.kbd.queue.is_empty() {
            self.set_pending(PENDING_KBD, true);
        }
        val
    }

    fn mouse_read(&mut self) -> u8 {
        let Some(val) = self.s.mouse.queue.pop_front() else {
            return self.s.mouse.last;
        };
        self.s.mouse.last = val;
        self.set_pending(PENDING_AUX, false);
        if !self.s.mouse.queue.is_empty() {
            self.set_pending(PENDING_AUX, true);
        }
        val
    }

    fn read_data(&mut self) -> u8 {
        if self.s.status & STAT_OBF != 0 {
            self.deassert_irq();
            if self.s.obsrc & OBSRC_KBD != 0 {
                self.s.obdata = self.kbd_read();
            } else if self.s.obsrc & OBSRC_MOUSE != 0 {
                self.s.obdata = self.mouse_read();
            } else if self.s.obsrc & OBSRC_CTRL != 0 {
                self.s.obdata = self.ctrl_dequeue();
            }
        }
        self.s.obdata
    }

    fn outport_write(&mut self, val: u8) -> Option<VmRequest> {
        self.s.outport = val;
        (val & OUT_RESET == 0).then_some(VmRequest::Reset)
    }

    fn write_command(&mut self, val: u8) -> Option<VmRequest> {
        // 0xF0–0xFF pulse output port bits 3–0 whose command bit is clear; only bit 0 (the
        // reset line) does anything.
        let val = if val & CCMD_PULSE_BITS_3_0 == CCMD_PULSE_BITS_3_0 {
            if val & 1 == 0 {
                CCMD_RESET
            } else {
                CCMD_NO_OP
            }
        } else {
            val
        };
        match val {
            CCMD_READ_MODE => self.ctrl_queue(self.s.mode, false),
            CCMD_WRITE_MODE | CCMD_WRITE_OBUF | CCMD_WRITE_AUX_OBUF | CCMD_WRITE_MOUSE
            | CCMD_WRITE_OUTPORT => self.s.write_cmd = val,
            CCMD_MOUSE_DISABLE => self.s.mode |= MODE_DISABLE_MOUSE,
            CCMD_MOUSE_ENABLE => {
                self.s.mode &= !MODE_DISABLE_MOUSE;
                self.safe_update_irq();
            }
            CCMD_TEST_MOUSE | CCMD_KBD_TEST => self.ctrl_queue(0x00, false),
            CCMD_SELF_TEST => {
                self.s.status |= STAT_SELFTEST;
                self.ctrl_queue(0x55, false);
            }
            CCMD_KBD_DISABLE => self.s.mode |= MODE_DISABLE_KBD,
            CCMD_KBD_ENABLE => {
                self.s.mode &= !MODE_DISABLE_KBD;
                self.safe_update_irq();
            }
            CCMD_READ_INPORT => self.ctrl_queue(0x80, false),
            CCMD_READ_OUTPORT => self.ctrl_queue(self.s.outport, false),
            CCMD_ENABLE_A20 => self.s.outport |= OUT_A20,
            CCMD_DISABLE_A20 => self.s.outport &= !OUT_A20,
            CCMD_RESET => return Some(VmRequest::Reset),
            CCMD_NO_OP => {}
            _ => log::debug!("i8042: unsupported controller command {val:#04x}"),
        }
        None
    }

    fn write_data(&mut self, val: u8) -> Option<VmRequest> {
        let mut request = None;
        match self.s.write_cmd {
            0 => {
                self.kbd_write(val);
                // Sending data to the keyboard re-enables its interface.
                self.s.mode &= !MODE_DISABLE_KBD;
                self.safe_update_irq();
            }
            CCMD_WRITE_MODE => {
                self.s.mode = val;
                self.s.kbd.translate = val & MODE_KCC != 0;
                self.update_irq_lines();
                self.safe_update_irq();
            }
            CCMD_WRITE_OBUF => self.ctrl_queue(val, false),
            CCMD_WRITE_AUX_OBUF => self.ctrl_queue(val, true),
            CCMD_WRITE_OUTPORT => request = self.outport_write(val),
            CCMD_WRITE_MOUSE => {
                self.mouse_write(val);
                // Sending data to the mouse re-enables its interface.
                self.s.mode &= !MODE_DISABLE_MOUSE;
                self.safe_update_irq();
            }
            _ => {}
        }
        self.s.write_cmd = 0;
        request
    }

    fn kbd_reset(&mut self) {
        let k = &mut self.s.kbd;
        k.scan_enabled = true;
        k.scancode_set = 2;
        k.queue.clear();
        k.ledstate = 0;
    }

    /// A byte from the controller to the keyboard (QEMU's `ps2_write_keyboard`).
    fn kbd_write(&mut self, val: u8) {
        match self.s.kbd.write_cmd.take() {
            None => match val {
                0x00 => self.kbd_reply(&[KBD_REPLY_ACK]),
                0x05 => self.kbd_reply(&[KBD_REPLY_RESEND]),
                KBD_CMD_GET_ID => {
                    let id2 = if self.s.kbd.translate { 0x41 } else { 0x83 };
                    self.kbd_reply(&[KBD_REPLY_ACK, KBD_REPLY_ID, id2]);
                }
                KBD_CMD_ECHO => self.kbd_reply(&[KBD_CMD_ECHO]),
                KBD_CMD_ENABLE => {
                    self.s.kbd.scan_enabled = true;
                    self.kbd_reply(&[KBD_REPLY_ACK]);
                }
                KBD_CMD_SCANCODE | KBD_CMD_SET_LEDS | KBD_CMD_SET_RATE | KBD_CMD_SET_MAKE_BREAK => {
                    self.s.kbd.write_cmd = Some(val);
                    self.kbd_reply(&[KBD_REPLY_ACK]);
                }
                KBD_CMD_RESET_DISABLE => {
                    self.kbd_reset();
                    self.s.kbd.scan_enabled = false;
                    self.kbd_reply(&[KBD_REPLY_ACK]);
                }
                KBD_CMD_RESET_ENABLE => {
                    self.kbd_reset();
                    self.s.kbd.scan_enabled = true;
                    self.kbd_reply(&[KBD_REPLY_ACK]);
                }
                KBD_CMD_RESET => {
                    self.kbd_reset();
                    self.kbd_reply(&[KBD_REPLY_ACK, KBD_REPLY_POR]);
                }
                KBD_CMD_SET_TYPEMATIC => self.kbd_reply(&[KBD_REPLY_ACK]),
                _ => self.kbd_reply(&[KBD_REPLY_RESEND]),
            },
            Some(KBD_CMD_SCANCODE) => {
                if val == 0 {
                    let set = self.s.kbd.scancode_set;
                    let reported = if self.s.kbd.translate {
                        // QEMU reports the set through its translation table.
                        match set {
                            1 => 0x43,
                            2 => 0x41,
                            3 => 0x3f,
                            _ => 0xff,
                        }
                    } else {
                        set
                    };
                    self.kbd_reply(&[KBD_REPLY_ACK, reported]);
                } else if (1..=3).contains(&val) {
                    self.s.kbd.scancode_set = val;
                    self.kbd_reply(&[KBD_REPLY_ACK]);
                } else {
                    self.kbd_reply(&[KBD_REPLY_RESEND]);
                }
            }
            Some(KBD_CMD_SET_LEDS) => {
                self.s.kbd.ledstate = val;
                self.kbd_reply(&[KBD_REPLY_ACK]);
            }
            // SET_RATE, SET_MAKE_BREAK: parameter accepted and ignored.
            Some(_) => self.kbd_reply(&[KBD_REPLY_ACK]),
        }
    }

    /// A byte from the controller to the mouse (QEMU's `ps2_write_mouse`).
    fn mouse_write(&mut self, val: u8) {
        match self.s.mouse.write_cmd.take() {
            Some(AUX_SET_SAMPLE) => {
                let m = &mut self.s.mouse;
                m.sample_rate = val;
                // IntelliMouse detection: rates 200, 100, 80 → type 3; 200, 200, 80 → type 4.
                m.detect_state = match (m.detect_state, val) {
                    (1, 100) => 2,
                    (1, 200) => 3,
                    (2, 80) => {
                        m.mouse_type = 3;
                        0
                    }
                    (3, 80) => {
                        m.mouse_type = 4;
                        0
                    }
                    (1..=3, _) => 0,
                    (_, 200) => 1,
                    _ => 0,
                };
                self.mouse_reply(&[AUX_ACK]);
            }
            Some(_) => {
                // AUX_SET_RES is the only other command with a parameter.
                self.s.mouse.resolution = val;
                self.mouse_reply(&[AUX_ACK]);
            }
            None => {
                if self.s.mouse.wrap {
                    if val == AUX_RESET_WRAP {
                        self.s.mouse.wrap = false;
                        self.mouse_reply(&[AUX_ACK]);
                        return;
                    } else if val != AUX_RESET {
                        self.mouse_reply(&[val]);
                        return;
                    }
                }
                let m = &mut self.s.mouse;
                match val {
                    AUX_SET_SCALE11 => {
                        m.status &= !MOUSE_STATUS_SCALE21;
                        self.mouse_reply(&[AUX_ACK]);
                    }
                    AUX_SET_SCALE21 => {
                        m.status |= MOUSE_STATUS_SCALE21;
                        self.mouse_reply(&[AUX_ACK]);
                    }
                    AUX_SET_STREAM => {
                        m.status &= !MOUSE_STATUS_REMOTE;
                        self.mouse_reply(&[AUX_ACK]);
                    }
                    AUX_SET_WRAP => {
                        m.wrap = true;
                        self.mouse_reply(&[AUX_ACK]);
                    }
                    AUX_SET_REMOTE => {
                        m.status |= MOUSE_STATUS_REMOTE;
                        self.mouse_reply(&[AUX_ACK]);
                    }
                    AUX_GET_TYPE => {
                        let t = m.mouse_type;
                        self.mouse_reply(&[AUX_ACK, t]);
                    }
                    AUX_SET_RES | AUX_SET_SAMPLE => {
                        m.write_cmd = Some(val);
                        self.mouse_reply(&[AUX_ACK]);
                    }
                    AUX_GET_SCALE => {
                        let reply = [AUX_ACK, m.status, m.resolution, m.sample_rate];
                        self.mouse_reply(&reply);
                    }
                    AUX_POLL => {
                        // A packet without movement or buttons.
                        let four = matches!(m.mouse_type, 3 | 4);
                        self.mouse_reply(&[AUX_ACK]);
                        if four {
                            self.mouse_reply(&[0x08, 0, 0, 0]);
                        } else {
                            self.mouse_reply(&[0x08, 0, 0]);
                        }
                    }
                    AUX_ENABLE_DEV => {
                        m.status |= MOUSE_STATUS_ENABLED;
                        self.mouse_reply(&[AUX_ACK]);
                    }
                    AUX_DISABLE_DEV => {
                        m.status &= !MOUSE_STATUS_ENABLED;
                        self.mouse_reply(&[AUX_ACK]);
                    }
                    AUX_SET_DEFAULT => {
                        m.sample_rate = 100;
                        m.resolution = 2;
                        m.status = 0;
                        self.mouse_reply(&[AUX_ACK]);
                    }
                    AUX_RESET => {
                        m.sample_rate = 100;
                        m.resolution = 2;
                        m.status = 0;
                        m.mouse_type = 0;
                        m.queue.clear();
                        self.mouse_reply(&[AUX_ACK, 0xaa, 0]);
                    }
                    // QEMU ignores other mouse commands without a reply.
                    _ => {}
                }
            }
        }
    }

    fn read_byte(&mut self, offset: u64) -> u8 {
        match offset {
            DATA_OFFSET => self.read_data(),
            CMD_OFFSET => self.s.status,
            _ => 0xff,
        }
    }

    fn write_byte(&mut self, offset: u64, val: u8) -> Option<VmRequest> {
        match offset {
            DATA_OFFSET => self.write_data(val),
            CMD_OFFSET => self.write_command(val),
            _ => None,
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.read_byte(offset.wrapping_add(i as u64));
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        let mut request = None;
        for (i, b) in data.iter().enumerate() {
            request = request.or(self.write_byte(offset.wrapping_add(i as u64), *b));
        }
        request
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::testutil::RecordingIrq;

    struct Rig {
        dev: I8042,
        kbd: Arc<RecordingIrq>,
        aux: Arc<RecordingIrq>,
    }

    fn rig() -> Rig {
        let (kbd, k) = RecordingIrq::new();
        let (aux, a) = RecordingIrq::new();
        Rig {
            dev: I8042::new(k, a),
            kbd,
            aux,
        }
    }

    impl Rig {
        fn status(&mut self) -> u8 {
            let mut b = [0];
            self.dev.read(CMD_OFFSET, &mut b);
            b[0]
        }
        fn data(&mut self) -> u8 {
            let mut b = [0];
            self.dev.read(DATA_OFFSET, &mut b);
            b[0]
        }
        fn cmd(&mut self, v: u8) -> Option<VmRequest> {
            self.dev.write(CMD_OFFSET, &[v])
        }
        fn put(&mut self, v: u8) -> Option<VmRequest> {
            self.dev.write(DATA_OFFSET, &[v])
        }
        /// Reads everything in the output buffer.
        fn drain(&mut self) -> Vec<u8> {
            let mut out = Vec::new();
            while self.status() & STAT_OBF != 0 && out.len() < 64 {
                out.push(self.data());
            }
            out
        }
    }

    #[test]
    fn self_test_and_interface_tests() {
        let mut r = rig();
        assert_eq!(r.status(), 0x18);
        assert_eq!(r.cmd(0xaa), None);
        assert_eq!(r.status() & (STAT_OBF | STAT_SELFTEST), 0x05);
        assert!(r.kbd.level());
        assert_eq!(r.data(), 0x55);
        assert!(!r.kbd.level());
        assert_eq!(r.status() & STAT_OBF, 0);
        // An empty output buffer reads the last byte again.
        assert_eq!(r.data(), 0x55);
        r.cmd(0xab);
        assert_eq!(r.drain(), [0x00]);
        r.cmd(0xa9);
        assert_eq!(r.drain(), [0x00]);
    }

    #[test]
    fn command_byte() {
        let mut r = rig();
        r.cmd(0x20);
        assert_eq!(r.drain(), [0x03]);
        r.cmd(0x60);
        r.put(0x44);
        r.cmd(0x20);
        assert_eq!(r.drain(), [0x44]);
        // Interrupts off: no IRQ for controller replies.
        assert_eq!(r.kbd.rising_edges(), 1);
        r.cmd(0xa7);
        r.cmd(0x20);
        assert_eq!(r.drain(), [0x64]);
        r.cmd(0xa8);
        r.cmd(0xad);
        r.cmd(0x20);
        assert_eq!(r.drain(), [0x54]);
        r.cmd(0xae);
        r.cmd(0x20);
        assert_eq!(r.drain(), [0x44]);
    }

    #[test]
    fn aux_loopback_raises_irq12() {
        let mut r = rig();
        r.cmd(0x60);
        r.put(0x47);
        r.cmd(0xd3);
        r.put(0x5a);
        assert_eq!(r.status() & 0x21, 0x21);
        assert!(r.aux.level());
        assert!(!r.kbd.level());
        assert_eq!(r.data(), 0x5a);
        assert!(!r.aux.level());
        // Keyboard loopback comes on IRQ 1.
        r.cmd(0xd2);
        r.put(0xa5);
        assert_eq!(r.status() & 0x21, 0x01);
        assert!(r.kbd.level());
        assert_eq!(r.data(), 0xa5);
        assert!(!r.kbd.level());
    }

    #[test]
    fn keyboard_commands() {
        let mut r = rig();
        r.put(0xff);
        let edges = r.kbd.rising_edges();
        assert_eq!(r.drain(), [0xfa, 0xaa]);
        // Each byte is its own interrupt.
        assert_eq!(r.kbd.rising_edges(), edges + 1);
        r.put(0xf2);
        assert_eq!(r.drain(), [0xfa, 0xab, 0x83]);
        r.cmd(0x60);
        r.put(0x43);
        r.put(0xf2);
        assert_eq!(r.drain(), [0xfa, 0xab, 0x41]);
        r.put(0xed);
        r.put(0x07);
        assert_eq!(r.drain(), [0xfa, 0xfa]);
        assert_eq!(r.dev.state().kbd.ledstate, 7);
        r.put(0xf5);
        assert_eq!(r.drain(), [0xfa]);
        assert!(!r.dev.state().kbd.scan_enabled);
        r.put(0xf4);
        assert_eq!(r.drain(), [0xfa]);
        r.put(0xf0);
        r.put(0x00);
        assert_eq!(r.drain(), [0xfa, 0xfa, 0x41]);
        r.put(0xee);
        assert_eq!(r.drain(), [0xee]);
        r.put(0x12);
        assert_eq!(r.drain(), [0xfe]);
    }

    #[test]
    fn keyboard_disable_holds_data() {
        let mut r = rig();
        r.cmd(0xad);
        // Writing to the keyboard re-enables the interface.
        r.put(0xf4);
        assert_eq!(r.drain(), [0xfa]);
        r.cmd(0xad);
        assert_eq!(r.dev.state().mode & MODE_DISABLE_KBD, MODE_DISABLE_KBD);
        // Controller replies still get through while the keyboard is disabled.
        r.cmd(0x20);
        assert_eq!(r.drain(), [0x13]);
    }

    #[test]
    fn mouse_commands() {
        let mut r = rig();
        r.cmd(0xd4);
        r.put(0xff);
        assert_eq!(r.status() & STAT_MOUSE_OBF, STAT_MOUSE_OBF);
        assert!(r.aux.level());
        assert_eq!(r.drain(), [0xfa, 0xaa, 0x00]);
        r.cmd(0xd4);
        r.put(0xf2);
        assert_eq!(r.drain(), [0xfa, 0x00]);
        for rate in [200, 100, 80] {
            r.cmd(0xd4);
            r.put(0xf3);
            r.cmd(0xd4);
            r.put(rate);
        }
        assert_eq!(r.drain(), [0xfa; 6]);
        r.cmd(0xd4);
        r.put(0xf2);
        assert_eq!(r.drain(), [0xfa, 0x03]);
        r.cmd(0xd4);
        r.put(0xe9);
        assert_eq!(r.drain(), [0xfa, 0x00, 0x02, 80]);
        r.cmd(0xd4);
        r.put(0xeb);
        assert_eq!(r.drain(), [0xfa, 0x08, 0, 0, 0]);
    }

    #[test]
    fn resets() {
        let mut r = rig();
        assert_eq!(r.cmd(0xfe), Some(VmRequest::Reset));
        assert_eq!(r.cmd(0xf0), Some(VmRequest::Reset));
        assert_eq!(r.cmd(0xff), None);
        assert_eq!(r.cmd(0xf1), None);
        r.cmd(0xd0);
        assert_eq!(r.drain(), [0xcf]);
        r.cmd(0xd1);
        assert_eq!(r.put(0xdf), None);
        r.cmd(0xd1);
        assert_eq!(r.put(0xde), Some(VmRequest::Reset));
    }

    #[test]
    fn other_offsets_and_widths() {
        let mut r = rig();
        let mut d = [0u8; 4];
        r.dev.read(1, &mut d);
        assert_eq!(d, [0xff, 0xff, 0xff, 0x18]);
        assert_eq!(r.dev.write(1, &[0xfe, 0xfe, 0xfe]), None);
        // A wide write at offset 3 reaches the command port with its second byte.
        assert_eq!(r.dev.write(3, &[0x00, 0xfe]), Some(VmRequest::Reset));
        for v in 0..=255u8 {
            r.cmd(v);
            r.put(v);
            r.drain();
        }
    }

    #[test]
    fn save_restore_round_trip() {
        let mut r = rig();
        r.cmd(0x60);
        r.put(0x47);
        r.put(0xed);
        r.put(0x02);
        r.put(0xf2);
        r.cmd(0xd4);
        r.put(0xe8);
        r.cmd(0xd4);
        r.put(0x03);
        r.cmd(0xa7);
        assert_eq!(r.data(), 0xfa);
        let state = r.dev.state();
        let json = serde_json::to_string(&state).unwrap();
        let state: I8042State = serde_json::from_str(&json).unwrap();

        let mut t = rig();
        t.dev.restore(&state).unwrap();
        assert_eq!(t.dev.state(), r.dev.state());
        assert_eq!(t.kbd.level(), r.kbd.level());
        assert_eq!(t.aux.level(), r.aux.level());
        assert_eq!(t.drain(), r.drain());
        for dev in [&mut r, &mut t] {
            dev.cmd(0xa8);
        }
        assert_eq!(t.drain(), r.drain());
        assert_eq!(t.dev.state(), r.dev.state());
    }

    #[test]
    fn restore_rejects_invalid_state() {
        let mut r = rig();
        r.cmd(0x60);
        r.put(0x47);
        let good = r.dev.state();
        let mut long_queue = good.clone();
        long_queue.mouse.queue = vec![0; PS2_QUEUE_SIZE + 1].into();
        let mut set = good.clone();
        set.kbd.scancode_set = 4;
        let mut mouse = good.clone();
        mouse.mouse.mouse_type = 2;
        let mut detect = good.clone();
        detect.mouse.detect_state = 4;
        let cases = [
            (
                long_queue,
                I8042StateError::QueueTooLong {
                    device: "mouse",
                    len: 17,
                },
            ),
            (set, I8042StateError::ScancodeSet(4)),
            (mouse, I8042StateError::MouseType(2)),
            (detect, I8042StateError::DetectState(4)),
            (
                I8042State {
                    pending: 0x80,
                    ..good.clone()
                },
                I8042StateError::UnknownBits {
                    field: "pending",
                    value: 0x80,
                },
            ),
            (
                I8042State {
                    obsrc: 0x08,
                    ..good.clone()
                },
                I8042StateError::UnknownBits {
                    field: "obsrc",
                    value: 0x08,
                },
            ),
            (
                I8042State {
                    write_cmd: 0x20,
                    ..good.clone()
                },
                I8042StateError::WriteCmd(0x20),
            ),
        ];
        for (bad, want) in cases {
            assert_eq!(r.dev.restore(&bad), Err(want.clone()), "{want}");
            assert_eq!(r.dev.state(), good);
        }
        // Unknown fields are refused by the decoder.
        let mut v = serde_json::to_value(&good).unwrap();
        v["extra"] = serde_json::json!(1);
        assert!(serde_json::from_value::<I8042State>(v).is_err());
    }
}
