//! `hopvm qmp`: QMP without writing JSON by hand.
//!
//! With a command, it runs that one command and pretty-prints the reply (exit status 1 on an
//! error reply, with its class and description; 2 when the arguments cannot be parsed), so
//! scripts and people can query a VM in one line. Without one, it is an interactive shell in the manner of QEMU's `qmp-shell`:
//! `command key=value …` (values are JSON when they parse as JSON — numbers, `true`, arrays,
//! objects — and strings otherwise; `a.b=1` builds nested objects) or a raw JSON request, with
//! line editing, history (`~/.hopvm_qmp_history`) and tab completion of command names, and
//! events printed the moment they arrive. A reader thread owns the socket's read side for that:
//! replies go to the prompt loop through a channel, events straight to the screen. When
//! standard input is not a terminal the shell reads commands line by line, so it can be
//! scripted (`printf 'stop\ncont\n' | hopvm qmp --qmp unix:PATH`).

use std::borrow::Cow;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use rustyline::completion::Completer;
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{Editor, ExternalPrinter, Helper};
use serde_json::{Map, Value};

use qmp::client::{LiveQmpClient, QmpClientError};

/// `hopvm qmp` options.
#[derive(Debug, Clone, Args)]
pub struct QmpArgs {
    /// The VM's QMP monitor (`hopvm run --qmp unix:PATH`, or QEMU's -qmp).
    #[arg(long, value_name = "unix:PATH")]
    pub qmp: String,
    /// The command to run (e.g. query-status); without one, an interactive shell starts.
    #[arg(value_name = "COMMAND")]
    pub command: Option<String>,
    /// The command's arguments: one JSON object, or key=value pairs (values are JSON when they
    /// parse as JSON, strings otherwise; a.b=1 nests).
    #[arg(value_name = "ARGS", requires = "command", allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// How long to wait for the monitor socket to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The shell's prompt.
const PROMPT: &str = "(hopvm) ";

/// Errors of `hopvm qmp`.
#[derive(Debug, thiserror::Error)]
pub enum QmpShellError {
    /// The monitor could not be reached or the connection broke.
    #[error("QMP monitor {path}: {source}")]
    Connection {
        /// The socket path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The server does not speak QMP.
    #[error("not a QMP server: {0}")]
    Protocol(String),
    /// A command line the shell cannot turn into a request.
    #[error("{0}")]
    Syntax(String),
    /// The one-shot client could not connect.
    #[error("cannot connect to the QMP monitor {path}: {source}")]
    Monitor {
        /// The socket path.
        path: String,
        /// Why.
        source: QmpClientError,
    },
    /// The one-shot client failed.
    #[error(transparent)]
    Client(#[from] QmpClientError),
    /// The line editor failed.
    #[error("line editor: {0}")]
    Editor(#[from] ReadlineError),
}

/// Splits a shell line into words; single or double quotes keep spaces in a word (and are
/// kept, so a quoted value can be a JSON string).
fn words(line: &str) -> Result<Vec<String>, QmpShellError> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => {
                quote = None;
                word.push(c);
            }
            (Some(_), '\\') => {
                word.push(c);
                if let Some(next) = chars.next() {
                    word.push(next);
                }
            }
            (Some(_), c) => word.push(c),
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
                word.push(c);
            }
            (None, c) => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if quote.is_some() {
        return Err(QmpShellError::Syntax(String::from("unterminated quote")));
    }
    if in_word {
        out.push(word);
    }
    Ok(out)
}

/// A `key=value` value: JSON when it parses as JSON, a string otherwise (a single-quoted word
/// is a string without its quotes).
fn value(text: &str) -> Value {
    if let Some(inner) = text.strip_prefix('\'').and_then(|t| t.strip_suffix('\'')) {
        return Value::String(inner.to_string());
    }
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

/// Builds the `arguments` object from `key=value` words; `a.b=1` nests.
pub fn arguments(pairs: &[String]) -> Result<Map<String, Value>, QmpShellError> {
    let mut args = Map::new();
    for pair in pairs {
        let (key, text) = pair
            .split_once('=')
            .ok_or_else(|| QmpShellError::Syntax(format!("expected key=value, not '{pair}'")))?;
        let mut path: Vec<&str> = key.split('.').collect();
        let last = path.pop().unwrap_or_default();
        if last.is_empty() || path.iter().any(|p| p.is_empty()) {
            return Err(QmpShellError::Syntax(format!("invalid key '{key}'")));
        }
        let mut map = &mut args;
        for part in path {
            let entry = map
                .entry(part.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            map = entry.as_object_mut().ok_or_else(|| {
                QmpShellError::Syntax(format!("'{part}' is both a value and an object"))
            })?;
        }
        if map.insert(last.to_string(), value(text)).is_some() {
            return Err(QmpShellError::Syntax(format!("'{key}' is given twice")));
        }
    }
    Ok(args)
}

/// What a shell line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum ShellRequest {
    /// Nothing (an empty line or a comment).
    Nothing,
    /// Raw JSON, sent as typed: the server parses it (QEMU's single quotes work too).
    Raw(String),
    /// `command key=value …`, as a QMP request.
    Command(Value),
}

/// Parses one shell line.
pub fn parse_line(line: &str) -> Result<ShellRequest, QmpShellError> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(ShellRequest::Nothing);
    }
    if line.starts_with('{') {
        return Ok(ShellRequest::Raw(line.to_string()));
    }
    let words = words(line)?;
    let (command, rest) = words
        .split_first()
        .ok_or_else(|| QmpShellError::Syntax(String::from("no command")))?;
    let mut request = Map::new();
    request.insert("execute".into(), Value::String(command.clone()));
    let args = arguments(rest)?;
    if !args.is_empty() {
        request.insert("arguments".into(), Value::Object(args));
    }
    Ok(ShellRequest::Command(Value::Object(request)))
}

/// One line describing an event.
pub fn format_event(v: &Value) -> String {
    let name = v["event"].as_str().unwrap_or("?");
    let ts = &v["timestamp"];
    let when = format!(
        "{}.{:06}",
        ts["seconds"].as_u64().unwrap_or(0),
        ts["microseconds"].as_u64().unwrap_or(0)
    );
    match v.get("data") {
        Some(d) if !d.is_null() => format!("event {name} {d} (at {when})"),
        _ => format!("event {name} (at {when})"),
    }
}

/// How a reply is shown: the pretty `return` value, or the error's class and description.
pub fn format_reply(v: &Value) -> (bool, String) {
    if let Some(r) = v.get("return") {
        return (true, serde_json::to_string_pretty(r).unwrap_or_default());
    }
    match v.get("error") {
        Some(e) => (
            false,
            format!(
                "error: {}: {}",
                e["class"].as_str().unwrap_or("?"),
                e["desc"].as_str().unwrap_or("?")
            ),
        ),
        None => (false, format!("unexpected message: {v}")),
    }
}

/// A shell's connection: requests wait for their replies while the client's reader thread
/// shows events as they come.
struct ShellConnection {
    client: LiveQmpClient,
    path: PathBuf,
}

impl ShellConnection {
    /// Connects, reads the greeting and negotiates; `show_event` is called (on the reader
    /// thread) for every event.
    fn open(
        path: &Path,
        mut show_event: Box<dyn FnMut(String) + Send>,
    ) -> Result<Self, QmpShellError> {
        let monitor_err = |source| QmpShellError::Monitor {
            path: path.display().to_string(),
            source,
        };
        let client = super::connect_qmp(path, CONNECT_TIMEOUT)
            .and_then(|c| c.into_live(Box::new(move |event| show_event(format_event(event)))))
            .map_err(monitor_err)?;
        Ok(Self {
            client,
            path: path.to_path_buf(),
        })
    }

    /// The server's greeting.
    fn greeting(&self) -> &Value {
        &self.client.greeting
    }

    /// Sends one request (a JSON text) and waits for its reply.
    fn request(&mut self, text: &str) -> Result<Value, QmpShellError> {
        self.client
            .request(text)
            .map_err(|source| QmpShellError::Monitor {
                path: self.path.display().to_string(),
                source,
            })
    }

    /// The command names the server offers, for completion.
    fn commands(&mut self) -> Vec<String> {
        self.request(r#"{"execute": "query-commands"}"#)
            .ok()
            .and_then(|r| r["return"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|c| c["name"].as_str().map(str::to_string))
            .collect()
    }
}

/// Tab completion of command names (the first word only).
struct CommandCompleter {
    commands: Vec<String>,
}

impl Completer for CommandCompleter {
    type Candidate = String;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &rustyline::Context<'_>,
    ) -> rustyline::Result<(usize, Vec<String>)> {
        let prefix = &line[..pos];
        if prefix.contains(char::is_whitespace) || prefix.starts_with('{') {
            return Ok((pos, Vec::new()));
        }
        let mut found: Vec<String> = self
            .commands
            .iter()
            .filter(|c| c.starts_with(prefix))
            .cloned()
            .collect();
        found.sort();
        Ok((0, found))
    }
}

impl Hinter for CommandCompleter {
    type Hint = String;
}

impl Highlighter for CommandCompleter {
    fn highlight_prompt<'b, 's: 'b, 'p: 'b>(
        &'s self,
        prompt: &'p str,
        _default: bool,
    ) -> Cow<'b, str> {
        Cow::Borrowed(prompt)
    }
}

impl Validator for CommandCompleter {}

impl Helper for CommandCompleter {}

/// Where the shell keeps its history.
fn history_path() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".hopvm_qmp_history"))
}

/// Runs one shell line; returns false when the connection is gone.
fn run_line(
    conn: &mut ShellConnection,
    line: &str,
    print: &mut dyn FnMut(&str),
) -> Result<(), QmpShellError> {
    let text = match parse_line(line) {
        Ok(ShellRequest::Nothing) => return Ok(()),
        Ok(ShellRequest::Raw(text)) => text,
        Ok(ShellRequest::Command(v)) => v.to_string(),
        Err(e) => {
            print(&format!("hopvm: {e}"));
            return Ok(());
        }
    };
    let reply = conn.request(&text)?;
    print(&format_reply(&reply).1);
    Ok(())
}

/// The interactive shell on a terminal.
fn interactive_shell(path: &Path) -> Result<(), QmpShellError> {
    let mut editor: Editor<CommandCompleter, DefaultHistory> = Editor::new()?;
    let mut printer = editor.create_external_printer()?;
    let mut conn = ShellConnection::open(
        path,
        Box::new(move |line| {
            // Outside the prompt rustyline writes the text as it is: end the line.
            let _ = printer.print(format!("{line}\n"));
        }),
    )?;
    let version = &conn.greeting()["QMP"]["version"];
    println!(
        "Connected to {} (QEMU {}.{}.{} compatible). Type `command key=value …` or JSON; \
         Tab completes commands; Ctrl-D leaves.",
        version["package"].as_str().unwrap_or("a QMP server").trim(),
        version["qemu"]["major"],
        version["qemu"]["minor"],
        version["qemu"]["micro"],
    );
    let commands = conn.commands();
    editor.set_helper(Some(CommandCompleter { commands }));
    let history = history_path();
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    let result = loop {
        match editor.readline(PROMPT) {
            Ok(line) => {
                if !line.trim().is_empty() {
                    let _ = editor.add_history_entry(line.as_str());
                }
                if let Err(e) = run_line(&mut conn, &line, &mut |s| println!("{s}")) {
                    break Err(e);
                }
            }
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break Ok(()),
            Err(e) => break Err(e.into()),
        }
    };
    if let Some(h) = &history {
        let _ = editor.save_history(h);
    }
    result
}

/// The shell reading commands from a pipe or file.
fn scripted_shell(path: &Path) -> Result<(), QmpShellError> {
    let mut conn = ShellConnection::open(
        path,
        Box::new(|line| {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }),
    )?;
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|source| QmpShellError::Connection {
            path: String::from("standard input"),
            source,
        })?;
        run_line(&mut conn, &line, &mut |s| {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{s}");
            let _ = out.flush();
        })?;
    }
    Ok(())
}

/// Runs one command; returns the exit status.
fn one_shot(path: &Path, command: &str, args: &[String]) -> Result<i32, QmpShellError> {
    let arguments = match args {
        [] => None,
        [json] if json.trim_start().starts_with('{') => {
            let v: Value = serde_json::from_str(json)
                .map_err(|e| QmpShellError::Syntax(format!("invalid JSON arguments: {e}")))?;
            if !v.is_object() {
                return Err(QmpShellError::Syntax(String::from(
                    "the arguments must be a JSON object",
                )));
            }
            Some(v)
        }
        pairs => Some(Value::Object(arguments(pairs)?)),
    };
    let mut client =
        super::connect_qmp(path, CONNECT_TIMEOUT).map_err(|source| QmpShellError::Monitor {
            path: path.display().to_string(),
            source,
        })?;
    match client.execute(command, arguments) {
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            Ok(0)
        }
        Err(QmpClientError::Command { class, desc }) => {
            eprintln!("hopvm: {command}: {class}: {desc}");
            Ok(1)
        }
        Err(e) => Err(e.into()),
    }
}

/// `hopvm qmp`: returns the exit status.
pub fn command(args: &QmpArgs) -> i32 {
    let path = super::qmp_socket_path(&args.qmp);
    let result = match &args.command {
        Some(c) => one_shot(&path, c, &args.args),
        None if std::io::stdin().is_terminal() && std::io::stdout().is_terminal() => {
            interactive_shell(&path).map(|_| 0)
        }
        None => scripted_shell(&path).map(|_| 0),
    };
    result.unwrap_or_else(|e| {
        eprintln!("hopvm: {e}");
        match e {
            // A mistake in the command line, as clap's: nothing was sent.
            QmpShellError::Syntax(_) => crate::run::EXIT_USAGE,
            _ => 1,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(line: &str) -> Value {
        match parse_line(line).unwrap() {
            ShellRequest::Command(v) => v,
            other => panic!("{line}: {other:?}"),
        }
    }

    #[test]
    fn shell_lines_become_requests() {
        assert_eq!(request("query-status"), json!({"execute": "query-status"}));
        assert_eq!(
            request("migrate uri=tcp:127.0.0.1:4444"),
            json!({"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:4444"}})
        );
        assert_eq!(
            request("migrate-set-parameters max-bandwidth=1048576 downtime-limit=300"),
            json!({"execute": "migrate-set-parameters",
                   "arguments": {"max-bandwidth": 1048576, "downtime-limit": 300}})
        );
        assert_eq!(
            request(
                r#"migrate-set-capabilities capabilities=[{"capability":"events","state":true}]"#
            ),
            json!({"execute": "migrate-set-capabilities",
                   "arguments": {"capabilities": [{"capability": "events", "state": true}]}})
        );
        assert_eq!(
            request(r#"x a.b=1 a.c=true d="two words" e='123'"#),
            json!({"execute": "x", "arguments": {"a": {"b": 1, "c": true}, "d": "two words", "e": "123"}})
        );
        assert_eq!(parse_line("  ").unwrap(), ShellRequest::Nothing);
        assert_eq!(parse_line("# note").unwrap(), ShellRequest::Nothing);
        assert_eq!(
            parse_line("{'execute': 'stop'}").unwrap(),
            ShellRequest::Raw(String::from("{'execute': 'stop'}"))
        );
        for bad in ["stop now", "x a=1 a=2", "x a=1 a.b=2", "x 'open", "x .a=1"] {
            assert!(parse_line(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replies_and_events_are_readable() {
        assert_eq!(
            format_reply(&json!({"return": {"status": "running"}})),
            (true, String::from("{\n  \"status\": \"running\"\n}"))
        );
        assert_eq!(
            format_reply(&json!({"error": {"class": "CommandNotFound", "desc": "The command x has not been found"}})).1,
            "error: CommandNotFound: The command x has not been found"
        );
        assert_eq!(
            format_event(&json!({"event": "MIGRATION", "data": {"status": "active"},
                                 "timestamp": {"seconds": 5, "microseconds": 42}})),
            "event MIGRATION {\"status\":\"active\"} (at 5.000042)"
        );
        assert_eq!(
            format_event(&json!({"event": "STOP", "timestamp": {"seconds": 5, "microseconds": 0}})),
            "event STOP (at 5.000000)"
        );
    }
}
