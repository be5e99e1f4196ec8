//! A small QMP client: what `hopvm migrate`, `hopvm qmp` and the tests use to drive a running
//! hopvm (or QEMU) over its monitor socket.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Errors talking to a QMP server.
#[derive(Debug, thiserror::Error)]
pub enum QmpClientError {
    /// The socket could not be reached or broke.
    #[error("qmp connection: {0}")]
    Io(#[from] std::io::Error),
    /// The server sent something that is not QMP.
    #[error("qmp protocol: {0}")]
    Protocol(String),
    /// The command failed; class and description as the server said.
    #[error("{class}: {desc}")]
    Command {
        /// The error class.
        class: String,
        /// The description.
        desc: String,
    },
    /// Nothing arrived in time.
    #[error("timed out waiting for {0}")]
    Timeout(String),
}

/// An asynchronous event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Its name.
    pub name: String,
    /// Its data (`null` when it has none).
    pub data: Value,
    /// Its timestamp, seconds since the epoch.
    pub timestamp: f64,
}

/// A negotiated QMP connection.
pub struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<QmpEvent>,
    /// The server's greeting.
    pub greeting: Value,
    next_id: u64,
    /// A line read in part when a timed read timed out; the rest follows.
    partial: String,
}

fn parse_event(v: &Value) -> Option<QmpEvent> {
    let name = v.get("event")?.as_str()?.to_string();
    let ts = v.get("timestamp");
    let seconds = ts
        .and_then(|t| t.get("seconds"))
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    let micros = ts
        .and_then(|t| t.get("microseconds"))
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    Some(QmpEvent {
        name,
        data: v.get("data").cloned().unwrap_or(Value::Null),
        timestamp: seconds + micros / 1e6,
    })
}

impl QmpClient {
    /// Connects to the Unix socket at `path` and negotiates capabilities.
    pub fn connect(path: &Path) -> Result<Self, QmpClientError> {
        let stream = UnixStream::connect(path)?;
        let mut client = Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            events: VecDeque::new(),
            greeting: Value::Null,
            next_id: 1,
            partial: String::new(),
        };
        client.greeting = client.read_message(None)?;
        if client.greeting.get("QMP").is_none() {
            return Err(QmpClientError::Protocol(format!(
                "no greeting: {}",
                client.greeting
            )));
        }
        client.execute("qmp_capabilities", None)?;
        Ok(client)
    }

    /// Connects, retrying while the socket does not exist yet or refuses, until `timeout`.
    pub fn connect_retry(path: &Path, timeout: Duration) -> Result<Self, QmpClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            match Self::connect(path) {
                Ok(c) => return Ok(c),
                Err(QmpClientError::Io(e)) if Instant::now() < deadline => {
                    log::debug!("qmp connect: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn read_message(&mut self, deadline: Option<Instant>) -> Result<Value, QmpClientError> {
        let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if timeout == Some(Duration::ZERO) {
            return Err(QmpClientError::Timeout(String::from("a qmp message")));
        }
        self.reader.get_ref().set_read_timeout(timeout)?;
        // `read_line` appends: bytes of a line cut short by a timeout stay in `partial`.
        match self.reader.read_line(&mut self.partial) {
            Ok(0) => Err(QmpClientError::Io(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(_) if !self.partial.ends_with('\n') => {
                Err(QmpClientError::Io(std::io::ErrorKind::UnexpectedEof.into()))
            }
            Ok(_) => {
                let line = std::mem::take(&mut self.partial);
                serde_json::from_str(&line)
                    .map_err(|e| QmpClientError::Protocol(format!("{e}: {line}")))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(QmpClientError::Timeout(String::from("a qmp message")))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Sends a raw line (for protocol tests).
    pub fn send_raw(&mut self, text: &str) -> Result<(), QmpClientError> {
        self.writer.write_all(text.as_bytes())?;
        self.writer.flush()?;
        Ok(())
    }

    /// Reads the next reply (`return` or `error`), queueing events that arrive before it.
    pub fn read_reply(&mut self) -> Result<Value, QmpClientError> {
        loop {
            let v = self.read_message(None)?;
            match parse_event(&v) {
                Some(e) => self.events.push_back(e),
                None => return Ok(v),
            }
        }
    }

    /// Runs a command; returns its `return` value or its error.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpClientError> {
        let (id, line) = self.request(command, arguments);
        self.send_raw(&line)?;
        self.reply_to(id)
    }

    /// Runs a command with descriptor `fd` attached to its bytes (SCM_RIGHTS), as libvirt
    /// sends `getfd`.
    pub fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, QmpClientError> {
        let (id, line) = self.request(command, arguments);
        let sent = self
            .writer
            .send_with_fd(line.as_bytes(), fd.as_raw_fd())
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        if sent < line.len() {
            self.send_raw(line.get(sent..).unwrap_or_default())?;
        }
        self.reply_to(id)
    }

    fn request(&mut self, command: &str, arguments: Option<Value>) -> (u64, String) {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = Map::new();
        req.insert("execute".into(), json!(command));
        if let Some(a) = arguments {
            req.insert("arguments".into(), a);
        }
        req.insert("id".into(), json!(id));
        (id, format!("{}\n", Value::Object(req)))
    }

    fn reply_to(&mut self, id: u64) -> Result<Value, QmpClientError> {
        let reply = self.read_reply()?;
        if reply.get("id") != Some(&json!(id)) {
            return Err(QmpClientError::Protocol(format!(
                "reply for another id: {reply}"
            )));
        }
        if let Some(r) = reply.get("return") {
            return Ok(r.clone());
        }
        let err = reply.get("error").cloned().unwrap_or(Value::Null);
        Err(QmpClientError::Command {
            class: err["class"].as_str().unwrap_or("?").to_string(),
            desc: err["desc"].as_str().unwrap_or("?").to_string(),
        })
    }

    /// Takes the events received so far.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    /// Waits for an event named `name` whose data satisfies `pred`; earlier events that do
    /// not match stay queued.
    pub fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<QmpEvent, QmpClientError> {
        if let Some(pos) = self
            .events
            .iter()
            .position(|e| e.name == name && pred(&e.data))
        {
            return Ok(self.events.remove(pos).expect("position is valid"));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.read_message(Some(deadline)).map_err(|e| match e {
                QmpClientError::Timeout(_) => QmpClientError::Timeout(format!("event {name}")),
                other => other,
            })?;
            match parse_event(&v) {
                Some(e) if e.name == name && pred(&e.data) => return Ok(e),
                Some(e) => self.events.push_back(e),
                None => {
                    return Err(QmpClientError::Protocol(format!(
                        "unexpected reply while waiting for {name}: {v}"
                    )))
                }
            }
        }
    }
}
