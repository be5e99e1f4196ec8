//! QMP over a real socket: a `QmpServer` with a small fake backend, driven by raw clients the
//! way management tools drive QEMU. Replies are compared byte for byte with QEMU 7.2's where
//! the reference transcripts have the same situation.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use qmp::{
    Args, EventSender, QmpBackend, QmpError, QmpListenSpec, QmpServer, QmpServerConfig,
    QmpServerError,
};
use serde_json::{json, Map, Value};

const TIMEOUT: Duration = Duration::from_secs(20);

/// A VM that only knows whether it runs.
#[derive(Default)]
struct FakeVm {
    running: AtomicBool,
    events: Mutex<Option<EventSender>>,
}

impl FakeVm {
    fn emit(&self, name: &str, data: Option<Value>) {
        if let Some(events) = self.events.lock().unwrap().as_ref() {
            events.emit(name, data);
        }
    }
}

impl QmpBackend for FakeVm {
    fn execute(&self, command: &str, arguments: &Map<String, Value>) -> Result<Value, QmpError> {
        match command {
            "query-status" => {
                Args::expect_none(arguments)?;
                let running = self.running.load(Ordering::SeqCst);
                Ok(json!({
                    "status": if running { "running" } else { "paused" },
                    "singlestep": false,
                    "running": running,
                }))
            }
            "stop" => {
                Args::expect_none(arguments)?;
                self.running.store(false, Ordering::SeqCst);
                self.emit("STOP", None);
                Ok(Value::Null)
            }
            "migrate" => {
                let mut args = Args::new(arguments);
                let uri = args.required_str("uri")?;
                let detach = args.optional_bool("detach")?;
                args.finish()?;
                Ok(json!({"uri": uri, "detach": detach}))
            }
            "migrate_set_speed" => {
                let mut args = Args::new(arguments);
                let value = args.required_i64("value")?;
                args.finish()?;
                Ok(json!({"value": value}))
            }
            "migrate-set-capabilities" => {
                let mut args = Args::new(arguments);
                let list = args.required_array("capabilities")?;
                for mut cap in list.objects()? {
                    cap.required_enum("capability", &["xbzrle", "events"])?;
                    cap.required_bool("state")?;
                    cap.finish()?;
                }
                args.finish()?;
                Ok(Value::Null)
            }
            "device-info" => {
                let mut args = Args::new(arguments);
                let id = args.required_str("id")?;
                args.finish()?;
                Err(QmpError::device_not_found(id))
            }
            _ => Err(QmpError::command_not_found(command)),
        }
    }

    fn has_command(&self, command: &str) -> bool {
        matches!(
            command,
            "query-status"
                | "stop"
                | "migrate"
                | "migrate_set_speed"
                | "migrate-set-capabilities"
                | "device-info"
        )
    }
}

/// A private directory for one test's socket, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "hopvm-qmp-{}-{}-{name}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn socket(&self) -> PathBuf {
        self.0.join("qmp.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Fixture {
    dir: TempDir,
    vm: Arc<FakeVm>,
    server: QmpServer,
}

fn start(name: &str) -> Fixture {
    start_with(name, QmpServerConfig::default())
}

fn start_with(name: &str, config: QmpServerConfig) -> Fixture {
    let dir = TempDir::new(name);
    let vm = Arc::new(FakeVm::default());
    vm.running.store(true, Ordering::SeqCst);
    let server = QmpServer::bind(&QmpListenSpec::unix(dir.socket()), vm.clone(), config).unwrap();
    *vm.events.lock().unwrap() = Some(server.events());
    Fixture { dir, vm, server }
}

/// A raw QMP client.
struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    fn connect(path: &Path) -> Self {
        let stream = UnixStream::connect(path).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(TIMEOUT)).unwrap();
        Self {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        }
    }

    /// Connects and reads the greeting.
    fn greeted(path: &Path) -> Self {
        let mut client = Self::connect(path);
        assert!(client.recv().get("QMP").is_some());
        client
    }

    /// Connects, reads the greeting and negotiates capabilities.
    fn negotiated(path: &Path) -> Self {
        let mut client = Self::greeted(path);
        assert_eq!(
            client.cmd(r#"{"execute": "qmp_capabilities"}"#),
            "{\"return\": {}}"
        );
        client
    }

    fn send(&mut self, text: &str) {
        self.writer.write_all(text.as_bytes()).unwrap();
    }

    /// The next line, without its line end (QEMU's monitor ends every line with CR LF).
    fn recv_line(&mut self) -> String {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).unwrap();
        assert!(n > 0, "connection closed");
        assert!(line.ends_with("\r\n"), "{line:?}");
        line.truncate(line.len() - 2);
        line
    }

    fn recv(&mut self) -> Value {
        let line = self.recv_line();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    /// Sends one request line and returns the reply line.
    fn cmd(&mut self, request: &str) -> String {
        self.send(request);
        self.send("\n");
        self.recv_line()
    }

    /// The description of the error reply to `request`.
    fn error_desc(&mut self, request: &str) -> String {
        let reply: Value = serde_json::from_str(&self.cmd(request)).unwrap();
        assert_eq!(reply["error"]["class"], "GenericError", "{reply}");
        reply["error"]["desc"].as_str().unwrap().to_string()
    }

    /// Reads until the server closes the connection; returns what was left to read. A server
    /// that closes while bytes this client sent are still unread in its socket (the newline
    /// after a request) ends the connection with a reset: after what it had sent, which is
    /// still read first, that is the end too.
    fn read_to_eof(&mut self) -> Vec<u8> {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("reading to the end: {e}"),
        }
        rest
    }
}

const QUERY_STATUS_RUNNING: &str =
    r#"{"return": {"running": true, "singlestep": false, "status": "running"}}"#;

#[test]
fn greeting_and_capabilities_negotiation() {
    let fx = start("negotiation");
    let mut client = Client::connect(&fx.dir.socket());
    assert_eq!(
        client.recv_line(),
        format!(
            "{{\"QMP\": {{\"version\": {{\"qemu\": {{\"micro\": 22, \"minor\": 2, \"major\": 7}}, \
             \"package\": \"hopvm-{}\"}}, \"capabilities\": []}}}}",
            env!("CARGO_PKG_VERSION")
        )
    );
    // As in the transcript: every command but qmp_capabilities is refused at first.
    assert_eq!(
        client.cmd(r#"{"execute": "query-status"}"#),
        r#"{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#
    );
    assert_eq!(
        client.cmd(r#"{"execute": "no-such-command", "id": 7}"#),
        r#"{"id": 7, "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#
    );
    // Errors other than CommandNotFound are not rewritten.
    assert_eq!(
        client.error_desc(r#"{"execute": "query-status", "arguments": 1}"#),
        "QMP input member 'arguments' must be an object"
    );
    assert_eq!(
        client.error_desc(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#),
        "Capability oob not available"
    );
    assert_eq!(
        client.error_desc(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["turbo"]}}"#),
        "Parameter 'null' does not accept value 'turbo'"
    );
    assert_eq!(
        client.error_desc(r#"{"execute": "qmp_capabilities", "arguments": {"enable": "oob"}}"#),
        "Invalid parameter type for 'enable', expected: array"
    );
    assert_eq!(
        client.cmd(r#"{"execute": "qmp_capabilities", "arguments": {"enable": []}, "id": 1}"#),
        r#"{"return": {}, "id": 1}"#
    );
    assert_eq!(
        client.cmd(r#"{"execute": "qmp_capabilities"}"#),
        r#"{"error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}"#
    );
    assert_eq!(
        client.cmd(r#"{"execute": "query-status"}"#),
        QUERY_STATUS_RUNNING
    );
    assert_eq!(
        client.cmd(r#"{"execute": "no-such-command", "id": 7}"#),
        r#"{"id": 7, "error": {"class": "CommandNotFound", "desc": "The command no-such-command has not been found"}}"#
    );
    assert_eq!(
        client.cmd(r#"{"execute": "migrate_set_speed", "arguments": {"value": "fast"}}"#),
        r#"{"error": {"class": "GenericError", "desc": "Invalid parameter type for 'value', expected: integer"}}"#
    );
}

#[test]
fn ids_are_echoed_verbatim() {
    let fx = start("ids");
    let mut client = Client::negotiated(&fx.dir.socket());
    for id in [
        "7",
        "-1",
        "18446744073709551615",
        "1.5",
        "\"v1\"",
        "\"\\u00e9\\n\"",
        "{\"a\": [1, {\"b\": null}]}",
        "[]",
        "null",
        "true",
    ] {
        let reply = client.cmd(&format!(r#"{{"execute": "query-status", "id": {id}}}"#));
        let value: Value = serde_json::from_str(&reply).unwrap();
        let sent: Value = serde_json::from_str(id).unwrap();
        assert_eq!(value["id"], sent, "{reply}");
        assert_eq!(value["return"]["status"], "running", "{reply}");
        assert!(reply.starts_with("{\"return\": {"), "{reply}");
    }
    // Non-ASCII text is escaped like QEMU's JSON writer does.
    assert_eq!(
        client.cmd(
            r#"{"execute": "migrate_set_speed", "arguments": {"value": 1}, "id": "\u00e9\n"}"#
        ),
        r#"{"return": {"value": 1}, "id": "\u00E9\n"}"#
    );
    assert_eq!(
        client.cmd(r#"{"execute": "device-info", "arguments": {"id": "net0"}, "id": {"n": 1}}"#),
        r#"{"id": {"n": 1}, "error": {"class": "DeviceNotFound", "desc": "Device 'net0' not found"}}"#
    );
}

#[test]
fn malformed_json_keeps_the_connection_usable() {
    let fx = start("malformed");
    let mut client = Client::negotiated(&fx.dir.socket());
    let cases: &[(&str, &[&str])] = &[
        (
            r#"{"execute": "query-status",}"#,
            &["JSON parse error, expecting value"],
        ),
        (
            r#"{"execute" "query-status"}"#,
            &["JSON parse error, missing : in object pair"],
        ),
        (
            r#"{"execute": "stop" "id": 1}"#,
            &["JSON parse error, expected separator in dict"],
        ),
        (
            r#"{"execute": "stop", "execute": "stop"}"#,
            &["JSON parse error, duplicate key"],
        ),
        ("@#$ garbage", &["JSON parse error, stray '@'"]),
        (
            "{\"execute\": @}",
            &[
                "JSON parse error, stray '@'",
                "JSON parse error, expecting value",
            ],
        ),
        (
            "\"unterminated",
            &["JSON parse error, stray '\"unterminated\n'"],
        ),
        // A lone UTF-8 lead byte is shown as U+FFFD, as QEMU's writer does.
        ("\u{ff}", &["JSON parse error, stray '\u{fffd}'"]),
        ("]", &["JSON parse error, expecting value"]),
        (
            "nonsense",
            &["JSON parse error, invalid keyword 'nonsense'"],
        ),
    ];
    for (input, errors) in cases {
        client.send(input);
        client.send("\n");
        for desc in errors.iter() {
            let reply = client.recv();
            assert_eq!(reply["error"]["class"], "GenericError", "{input}: {reply}");
            assert_eq!(reply["error"]["desc"], *desc, "{input}: {reply}");
            assert!(reply.get("id").is_none(), "{input}: {reply}");
        }
        assert_eq!(
            client.cmd(r#"{"execute": "query-status"}"#),
            QUERY_STATUS_RUNNING,
            "{input}"
        );
    }
    // A raw byte that is not UTF-8 makes a lexical error, too.
    client.writer.write_all(b"\xfe\n").unwrap();
    assert_eq!(client.recv()["error"]["class"], "GenericError");

    // Objects may span lines, and several may share a line.
    client.send("{\"execute\":\n  \"query-status\",\n \"id\": 1}{\"execute\": \"query-status\", \"id\": 2} ");
    client.send("{\"execute\": \"query-status\", \"id\": 3}\n");
    for id in 1..=3 {
        let reply = client.recv();
        assert_eq!(reply["id"], id);
        assert_eq!(reply["return"]["status"], "running");
    }
    // Single-quoted strings are QEMU's extension.
    assert_eq!(
        client.cmd("{'execute': 'query-status'}"),
        QUERY_STATUS_RUNNING
    );
}

#[test]
fn request_shape_errors_match_qemu() {
    let fx = start("shape");
    let mut client = Client::greeted(&fx.dir.socket());
    // Before negotiation, shape errors are reported as they are.
    assert_eq!(
        client.error_desc("[1, 2]"),
        "QMP input must be a JSON object"
    );
    client.cmd(r#"{"execute": "qmp_capabilities"}"#);
    let cases = [
        ("1", "QMP input must be a JSON object"),
        ("\"execute\"", "QMP input must be a JSON object"),
        ("{}", "QMP input lacks member 'execute'"),
        (
            r#"{"arguments": {}, "id": 1}"#,
            "QMP input lacks member 'execute'",
        ),
        (
            r#"{"execute": ["stop"]}"#,
            "QMP input member 'execute' must be a string",
        ),
        (
            r#"{"execute": "stop", "arguments": [1]}"#,
            "QMP input member 'arguments' must be an object",
        ),
        (
            r#"{"execute": "stop", "argument": {}}"#,
            "QMP input member 'argument' is unexpected",
        ),
        (
            r#"{"exec-oob": "stop", "id": 3}"#,
            "QMP input member 'exec-oob' is unexpected",
        ),
    ];
    for (request, desc) in cases {
        assert_eq!(client.error_desc(request), desc, "{request}");
    }
    // The id is echoed for errors in an object, never for non-objects.
    assert_eq!(
        client.cmd(r#"{"exec-oob": "stop", "id": 3}"#),
        r#"{"id": 3, "error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}"#
    );
    assert_eq!(
        client.cmd("[{\"id\": 1}]"),
        r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#
    );
}

#[test]
fn argument_errors_match_qemu() {
    let fx = start("arguments");
    let mut client = Client::negotiated(&fx.dir.socket());
    let cases = [
        (r#"{"execute": "migrate"}"#, "Parameter 'uri' is missing"),
        (
            r#"{"execute": "migrate", "arguments": {"uri": 5}}"#,
            "Invalid parameter type for 'uri', expected: string",
        ),
        (
            r#"{"execute": "migrate", "arguments": {"uri": "tcp:h:1", "detach": "yes"}}"#,
            "Invalid parameter type for 'detach', expected: boolean",
        ),
        (
            r#"{"execute": "migrate", "arguments": {"uri": "tcp:h:1", "speed": 1}}"#,
            "Parameter 'speed' is unexpected",
        ),
        (
            r#"{"execute": "migrate_set_speed", "arguments": {"value": 1.5}}"#,
            "Invalid parameter type for 'value', expected: integer",
        ),
        (
            r#"{"execute": "stop", "arguments": {"now": true}}"#,
            "Parameter 'now' is unexpected",
        ),
        (
            r#"{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "xbzrle"}]}}"#,
            "Parameter 'capabilities[0].state' is missing",
        ),
        (
            r#"{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "events", "state": true}, {"capability": "warp", "state": true}]}}"#,
            "Parameter 'capability' does not accept value 'warp'",
        ),
        (
            r#"{"execute": "migrate-set-capabilities", "arguments": {"capabilities": {"capability": "events"}}}"#,
            "Invalid parameter type for 'capabilities', expected: array",
        ),
    ];
    for (request, desc) in cases {
        assert_eq!(client.error_desc(request), desc, "{request}");
    }
    assert_eq!(
        client.cmd(r#"{"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:47111"}}"#),
        r#"{"return": {"detach": null, "uri": "tcp:127.0.0.1:47111"}}"#
    );
    assert_eq!(
        client.cmd(r#"{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "events", "state": true}, {"capability": "xbzrle", "state": true}]}}"#),
        r#"{"return": {}}"#
    );
}

#[test]
fn huge_line_is_refused_in_bounded_memory() {
    let fx = start("huge");
    let mut client = Client::negotiated(&fx.dir.socket());
    // A 10 MiB string argument...
    let mut request = br#"{"execute": "migrate", "arguments": {"uri": ""#.to_vec();
    request.resize(request.len() + (10 << 20), b'x');
    request.extend_from_slice(b"\"}}\n");
    client.writer.write_all(&request).unwrap();
    assert_eq!(
        client.recv_line(),
        r#"{"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}"#
    );
    assert_eq!(
        client.cmd(r#"{"execute": "query-status"}"#),
        QUERY_STATUS_RUNNING
    );

    // ... and 10 MiB of small tokens each cost one error, then the next line works.
    let mut request = b"[".to_vec();
    while request.len() < 10 << 20 {
        request.extend_from_slice(b"1,");
    }
    request.extend_from_slice(b"1]\n");
    client.writer.write_all(&request).unwrap();
    let reply = client.recv();
    assert_eq!(reply["error"]["class"], "GenericError");
    assert!(
        reply["error"]["desc"]
            .as_str()
            .unwrap()
            .starts_with("JSON token"),
        "{reply}"
    );
    assert_eq!(
        client.cmd(r#"{"execute": "query-status"}"#),
        QUERY_STATUS_RUNNING
    );

    // Deep nesting is refused too.
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    assert_eq!(
        client.cmd(&deep),
        r#"{"error": {"class": "GenericError", "desc": "JSON nesting depth limit exceeded"}}"#
    );
    assert_eq!(
        client.cmd(r#"{"execute": "query-status"}"#),
        QUERY_STATUS_RUNNING
    );
}

#[test]
fn clients_negotiate_separately() {
    let fx = start("two-clients");
    let socket = fx.dir.socket();
    let mut a = Client::greeted(&socket);
    let mut b = Client::greeted(&socket);
    assert_eq!(
        a.cmd(r#"{"execute": "qmp_capabilities"}"#),
        r#"{"return": {}}"#
    );
    assert_eq!(
        b.cmd(r#"{"execute": "query-status", "id": "b"}"#),
        r#"{"id": "b", "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#
    );
    assert_eq!(
        a.cmd(r#"{"execute": "query-status"}"#),
        QUERY_STATUS_RUNNING
    );
    assert_eq!(
        b.cmd(r#"{"execute": "qmp_capabilities"}"#),
        r#"{"return": {}}"#
    );
    assert_eq!(
        b.cmd(r#"{"execute": "query-status"}"#),
        QUERY_STATUS_RUNNING
    );
    assert!(a
        .cmd(r#"{"execute": "qmp_capabilities"}"#)
        .contains("already complete"));
    assert_eq!(fx.server.client_count(), 2);

    // A client that leaves mid-message, or right after sending garbage, harms nobody.
    let mut c = Client::negotiated(&socket);
    c.send("{\"execute\": \"query-sta");
    drop(c);
    let mut d = Client::connect(&socket);
    d.writer.write_all(b"\x00\xff}}]]{{{{ garbage").unwrap();
    drop(d);
    assert_eq!(
        a.cmd(r#"{"execute": "query-status"}"#),
        QUERY_STATUS_RUNNING
    );
    assert_eq!(
        b.cmd(r#"{"execute": "query-status"}"#),
        QUERY_STATUS_RUNNING
    );
}

#[test]
fn events_reach_only_negotiated_clients() {
    let fx = start("events");
    let socket = fx.dir.socket();
    let mut a = Client::negotiated(&socket);
    let mut b = Client::greeted(&socket);
    let events = fx.server.events();

    let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    events.emit("MIGRATION", Some(json!({"status": "setup"})));
    let line = a.recv_line();
    let after = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    assert!(
        line.starts_with("{\"timestamp\": {\"seconds\": ")
            && line.ends_with(", \"event\": \"MIGRATION\", \"data\": {\"status\": \"setup\"}}"),
        "{line}"
    );
    let event: Value = serde_json::from_str(&line).unwrap();
    let seconds = event["timestamp"]["seconds"].as_u64().unwrap();
    let micros = event["timestamp"]["microseconds"].as_u64().unwrap();
    assert!(micros < 1_000_000);
    let stamp = Duration::from_secs(seconds) + Duration::from_micros(micros);
    assert!(
        before - Duration::from_micros(1) <= stamp && stamp <= after,
        "{line}"
    );

    // b was greeted before the event but has not negotiated: its next line is its reply.
    assert_eq!(
        b.cmd(r#"{"execute": "query-status"}"#),
        r#"{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#
    );
    assert_eq!(
        b.cmd(r#"{"execute": "qmp_capabilities"}"#),
        r#"{"return": {}}"#
    );

    // Events without data omit the member; an event raised by a command precedes its reply.
    a.send("{\"execute\": \"stop\", \"id\": 1}\n");
    let stop = a.recv();
    assert_eq!(stop["event"], "STOP");
    assert!(stop.get("data").is_none());
    assert_eq!(a.recv_line(), r#"{"return": {}, "id": 1}"#);
    assert_eq!(b.recv()["event"], "STOP");
    assert!(!fx.vm.running.load(Ordering::SeqCst));

    // Events are delivered in order.
    for pass in 1..=50 {
        events.emit("MIGRATION_PASS", Some(json!({"pass": pass})));
    }
    for pass in 1..=50 {
        assert_eq!(a.recv()["data"]["pass"], pass);
        assert_eq!(b.recv()["data"]["pass"], pass);
    }
}

#[test]
fn a_client_that_never_reads_is_dropped_without_blocking_events() {
    let config = QmpServerConfig {
        queue_capacity: 8,
        ..QmpServerConfig::default()
    };
    let fx = start_with("stalled", config);
    let socket = fx.dir.socket();
    let mut stalled = Client::negotiated(&socket);
    let mut good = Client::negotiated(&socket);
    let events = fx.server.events();
    let data = json!({"status": "active", "padding": "x".repeat(200)});

    // The good client keeps up; the stalled one fills its socket buffer, then its queue.
    let mut emitted = 0u64;
    while fx.server.client_count() == 2 {
        assert!(emitted < 1_000_000, "the stalled client was never dropped");
        events.emit("MIGRATION", Some(data.clone()));
        emitted += 1;
        assert_eq!(good.recv()["event"], "MIGRATION");
    }
    // Emission goes on for the remaining client.
    events.emit("RESUME", None);
    assert_eq!(good.recv()["event"], "RESUME");
    assert_eq!(
        good.cmd(r#"{"execute": "query-status"}"#),
        QUERY_STATUS_RUNNING
    );

    // The stalled client finds only what was already in its socket buffer, then the end.
    let rest = stalled.read_to_eof();
    let lines = rest
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .count() as u64;
    assert!(lines < emitted, "{lines} of {emitted}");
}

#[test]
fn socket_is_private_and_stale_sockets_are_replaced() {
    let dir = TempDir::new("socket");
    let path = dir.socket();

    // A stale socket (its listener is gone) is replaced; a live one is refused.
    drop(UnixListener::bind(&path).unwrap());
    let vm: Arc<FakeVm> = Arc::default();
    let server = QmpServer::listen(&path, vm.clone()).unwrap();
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(server.socket_path(), Some(path.as_path()));
    assert!(matches!(
        QmpServer::listen(&path, vm.clone()),
        Err(QmpServerError::InUse(_))
    ));

    // wait=on semantics: a client has connected.
    assert!(!server.wait_for_client(Some(Duration::ZERO)));
    let mut client = Client::negotiated(&path);
    assert!(server.wait_for_client(Some(TIMEOUT)));

    // Shutdown closes clients and removes the socket.
    server.shutdown();
    assert!(client.read_to_eof().is_empty());
    assert!(!path.exists());
    assert!(UnixStream::connect(&path).is_err());
    server.shutdown();

    // A regular file in the way is not deleted.
    std::fs::write(&path, b"data").unwrap();
    assert!(matches!(
        QmpServer::listen(&path, vm),
        Err(QmpServerError::NotASocket(_))
    ));
    assert_eq!(std::fs::read(&path).unwrap(), b"data");
}

#[test]
fn shutdown_flushes_queued_replies() {
    let fx = start("flush");
    let mut client = Client::negotiated(&fx.dir.socket());
    client.send("{\"execute\": \"query-status\", \"id\": 1}\n");
    // The reply is either already queued or sent; it must arrive before the end of stream.
    assert_eq!(client.recv()["id"], 1);
    fx.server.shutdown();
    assert_eq!(client.read_to_eof(), b"");
    // Events after shutdown go nowhere and do not block.
    fx.server
        .events()
        .emit("SHUTDOWN", Some(json!({"guest": false})));
    EventSender::default().emit("SHUTDOWN", None);
}

#[test]
fn serves_over_tcp() {
    let vm: Arc<FakeVm> = Arc::default();
    let spec = QmpListenSpec::parse("tcp:127.0.0.1:0,server=on,wait=off").unwrap();
    let server = QmpServer::bind(&spec, vm, QmpServerConfig::default()).unwrap();
    let addr = server.tcp_addr().unwrap();
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("{\"QMP\": "));
    writer
        .write_all(b"{\"execute\": \"qmp_capabilities\", \"id\": \"t\"}\n")
        .unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "{\"return\": {}, \"id\": \"t\"}\r\n");
    server.shutdown();
    line.clear();
    match reader.read_line(&mut line) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("{other:?} {line:?}"),
    }
}

/// A client that connects and leaves at once used to be listed after its threads had already
/// removed it: the stale entry stayed, and `max_clients` of them locked every client out.
#[test]
fn clients_that_leave_at_once_are_not_leaked() {
    let config = QmpServerConfig {
        max_clients: 2,
        ..QmpServerConfig::default()
    };
    let fx = start_with("leave-at-once", config);
    let socket = fx.dir.socket();
    for _ in 0..300 {
        let mut s = UnixStream::connect(&socket).unwrap();
        let _ = s.write_all(b"{\"execute\":\"qmp_capabilities\"}");
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }
    // Every one of them is gone from the server, and a new client is served.
    let deadline = std::time::Instant::now() + TIMEOUT;
    while fx.server.client_count() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} clients leaked",
            fx.server.client_count()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut client = Client::negotiated(&socket);
    assert!(client
        .cmd(r#"{"execute": "query-status"}"#)
        .contains("running"));
}
