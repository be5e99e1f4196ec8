//! A small QMP client: what `hopvm migrate`, `hopvm qmp`, the demo, the kvm-unit-tests
//! runner's migration tests (guest-tests) and the tests use to drive a running hopvm (or QEMU)
//! over its monitor socket. It is a crate of its own, apart from the monitor (crate `qmp`), so
//! that guest-tests can use it without depending on the VMM.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{self, Receiver};
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
    /// What bounds every read of a reply (and of the greeting), if anything.
    deadline: Option<Instant>,
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
        Self::negotiate(UnixStream::connect(path)?, None)
    }

    /// Connects like [`QmpClient::connect_retry`] until `deadline`, and bounds every read of
    /// the connection (the greeting, every reply) by the same deadline: a server that stops
    /// answering is a [`QmpClientError::Timeout`], never a hang.
    pub fn connect_until(path: &Path, deadline: Instant) -> Result<Self, QmpClientError> {
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => return Self::negotiate(stream, Some(deadline)),
                Err(e) if Instant::now() < deadline => {
                    log::debug!("qmp connect: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Bounds every later read of a reply by `deadline` (`None`: wait as long as it takes).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    /// Reads the greeting and negotiates capabilities on a connected socket.
    fn negotiate(stream: UnixStream, deadline: Option<Instant>) -> Result<Self, QmpClientError> {
        let mut client = Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            events: VecDeque::new(),
            greeting: Value::Null,
            next_id: 1,
            partial: String::new(),
            deadline,
        };
        client.greeting = client.read_message(deadline)?;
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
            let v = self.read_message(self.deadline)?;
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

/// A negotiated connection for interactive use (`hopvm qmp`'s shell): a reader thread of its
/// own hands every event to a callback the moment it arrives, while requests, any JSON text,
/// wait for their replies in order. Made by [`QmpClient::into_live`].
pub struct LiveQmpClient {
    writer: UnixStream,
    replies: Receiver<Value>,
    /// The server's greeting.
    pub greeting: Value,
}

impl QmpClient {
    /// Turns the connection into a [`LiveQmpClient`]; events received so far go to `on_event`
    /// first.
    pub fn into_live(
        self,
        mut on_event: Box<dyn FnMut(&Value) + Send>,
    ) -> Result<LiveQmpClient, QmpClientError> {
        let Self {
            mut reader,
            writer,
            events,
            greeting,
            mut partial,
            ..
        } = self;
        for e in events {
            on_event(&e.to_value());
        }
        reader.get_ref().set_read_timeout(None)?;
        let (tx, replies) = mpsc::channel();
        std::thread::Builder::new()
            .name(String::from("qmp-reader"))
            .spawn(move || loop {
                match reader.read_line(&mut partial) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = std::mem::take(&mut partial);
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if v.get("event").is_some() {
                    on_event(&v);
                } else if tx.send(v).is_err() {
                    break;
                }
            })?;
        Ok(LiveQmpClient {
            writer,
            replies,
            greeting,
        })
    }
}

impl QmpEvent {
    /// The event as the server sent it (`timestamp`, `event`, `data`).
    pub fn to_value(&self) -> Value {
        let seconds = self.timestamp.trunc();
        json!({
            "timestamp": {
                "seconds": seconds as u64,
                "microseconds": ((self.timestamp - seconds) * 1e6).round() as u64,
            },
            "event": self.name,
            "data": self.data,
        })
    }
}

impl LiveQmpClient {
    /// Sends one request (a JSON text) and waits for its reply (the whole `return` or `error`
    /// message).
    pub fn request(&mut self, text: &str) -> Result<Value, QmpClientError> {
        self.writer.write_all(format!("{text}\n").as_bytes())?;
        self.replies.recv().map_err(|_| {
            QmpClientError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the monitor closed the connection",
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake QMP server: greeting, capabilities, an event before a reply, an error reply,
    /// then silence, which the deadline turns into a timeout.
    #[test]
    fn commands_events_errors_and_deadline() {
        let dir = std::env::temp_dir().join(format!("qmp-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("q.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            let mut line = String::new();
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .unwrap();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("qmp_capabilities"), "{line}");
            w.write_all(b"{\"return\": {}, \"id\": 1}\r\n").unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            assert!(line.ends_with('\n'), "{line:?}");
            assert_eq!(
                serde_json::from_str::<Value>(&line).unwrap(),
                json!({"execute": "migrate", "arguments": {"uri": "unix:/x"}, "id": 2})
            );
            w.write_all(b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 500000}, \"event\": \"MIGRATION\", \"data\": {\"status\": \"setup\"}}\r\n{\"return\": {}, \"id\": 2}\r\n").unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            w.write_all(
                b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}, \"id\": 3}\r\n",
            )
            .unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            // No reply to the last command.
            let _ = r.read_line(&mut line);
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut q = QmpClient::connect_until(&path, deadline).unwrap();
        assert_eq!(
            q.execute("migrate", Some(json!({"uri": "unix:/x"})))
                .unwrap(),
            json!({})
        );
        assert_eq!(
            q.take_events(),
            [QmpEvent {
                name: String::from("MIGRATION"),
                data: json!({"status": "setup"}),
                timestamp: 1.5,
            }]
        );
        match q.execute("query-migrate", None) {
            Err(QmpClientError::Command { class, desc }) => {
                assert_eq!((class.as_str(), desc.as_str()), ("GenericError", "nope"))
            }
            other => panic!("{other:?}"),
        }
        q.set_deadline(Some(Instant::now() + Duration::from_millis(100)));
        assert!(matches!(
            q.execute("query-status", None),
            Err(QmpClientError::Timeout(_))
        ));
        drop(q);
        server.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
