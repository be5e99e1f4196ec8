//! Parser for the test manifest (`unittests.cfg`), in the INI-like format of
//! kvm-unit-tests.
//!
//! ```text
//! # Comment lines start with '#' or ';'.
//! [test-name]
//! file = hello.elf            # image name in the images directory (required)
//! smp = 2                     # vCPUs (default 1)
//! memory = 256M               # guest RAM, n[K|M|G|T] or plain MiB (default 256M)
//! append = foo bar=1          # guest command line arguments
//! extra_params = --initrd x   # extra `hopvm run` arguments (shell-like quoting)
//! expect_status = 1           # hopvm exit status (default 1 = guest exit code 0)
//! expect_output = some text   # substring of stdout+stderr; repeatable
//! expect_output = /regex/     # regular expression (see crate::pattern)
//! timeout = 60                # seconds; "90s" and "2m" also accepted (default 60)
//! groups = smoke smp          # whitespace-separated group names
//! emulation_failure_at = xrstor at
//! no_reboot = false           # run without --no-reboot (default true)
//! migrate = yes               # live-migrate the guest (default no)
//! disk = 1M                    # a fresh zeroed raw image as a virtio-blk disk
//! ```
//!
//! `disk = SIZE` makes the runner create a zero-filled raw image of that size
//! (same syntax as `memory`) in the temporary directory, pass it as
//! `--disk PATH` (source and destination of a migration share it) and remove
//! it when the test is over.
//!
//! In `extra_params`, `{manifest_dir}` stands for the directory holding the
//! manifest file (when it was loaded from a file), so that tests can name data
//! files next to it, e.g. `--initrd {manifest_dir}/data/x.bin`.
//!
//! `migrate = yes` makes the runner migrate the guest live when it prints
//! "Now migrate the VM" (kvm-unit-tests' migration tests): see
//! [`crate::migrate`].  Booleans are `yes`/`no`, `true`/`false`, `on`/`off`
//! or `1`/`0`.
//!
//! `emulation_failure_at = PREFIX` accepts a second outcome besides the one
//! described by `expect_status`/`expect_output`: hopvm exiting with status 3
//! after reporting a KVM emulation failure whose rip equals the address the
//! guest printed right after `PREFIX` (as `PREFIX 0x<hex>`).
//!
//! Comments must be on their own line (values may contain `#`).  A value of
//! `append` or `expect_output` may be wrapped in double quotes to keep
//! leading or trailing spaces.  Tests in the group `nodefault` run only when
//! selected by name or by `-g nodefault`.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::pattern::Pattern;

/// Default guest RAM when a test has no `memory` key.
pub const DEFAULT_MEMORY: &str = "256M";
/// Default `expect_status`: the guest exited with code 0 through
/// isa-debug-exit (`(0 << 1) | 1`).
pub const DEFAULT_EXPECT_STATUS: i32 = 1;
/// Default per-test timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Group whose tests only run when explicitly selected.
pub const NODEFAULT_GROUP: &str = "nodefault";
/// Stands for the manifest's directory in `extra_params`.
pub const MANIFEST_DIR_PLACEHOLDER: &str = "{manifest_dir}";

/// Keys a test section may contain.
pub const KEYS: &[&str] = &[
    "file",
    "smp",
    "memory",
    "append",
    "extra_params",
    "expect_status",
    "expect_output",
    "timeout",
    "groups",
    "emulation_failure_at",
    "no_reboot",
    "migrate",
    "disk",
];

/// A guest RAM size as written in the manifest and in bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemorySize {
    /// Size in bytes.
    pub bytes: u64,
    /// The text passed to `hopvm run --memory`, e.g. `256M`.
    pub text: String,
}

impl MemorySize {
    /// Parses `n[K|M|G|T]` (optionally followed by `B` or `iB`); a bare
    /// number means MiB, as with QEMU's `-m`.
    pub fn parse(s: &str) -> Result<MemorySize, ValueError> {
        let s = s.trim();
        let digits = s.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(ValueError::MemoryNotANumber(s.to_string()));
        }
        let n: u64 = s[..digits]
            .parse()
            .map_err(|_| ValueError::MemoryTooLarge(s.to_string()))?;
        let suffix = s[digits..].trim_end_matches("iB").trim_end_matches('B');
        let (unit, letter) = match suffix {
            "" | "M" | "m" => (1u64 << 20, "M"),
            "K" | "k" => (1 << 10, "K"),
            "G" | "g" => (1 << 30, "G"),
            "T" | "t" => (1 << 40, "T"),
            _ => return Err(ValueError::MemoryUnit(s.to_string(), suffix.to_string())),
        };
        let bytes = n
            .checked_mul(unit)
            .ok_or_else(|| ValueError::MemoryTooLarge(s.to_string()))?;
        if bytes == 0 {
            return Err(ValueError::MemoryZero(s.to_string()));
        }
        Ok(MemorySize {
            bytes,
            text: format!("{n}{letter}"),
        })
    }
}

impl fmt::Display for MemorySize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// One test: a `[name]` section of the manifest.
#[derive(Clone, Debug)]
pub struct TestSpec {
    /// Section name.
    pub name: String,
    /// Line of the `[name]` header (1-based).
    pub line: usize,
    /// Image name (`file`), resolved with [`crate::image_path`].
    pub file: String,
    /// Number of vCPUs (`smp`).
    pub smp: u32,
    /// Guest RAM (`memory`).
    pub memory: MemorySize,
    /// Guest command line arguments (`append`); hopvm prepends the image path.
    pub append: String,
    /// Extra `hopvm run` arguments (`extra_params`), already split.
    pub extra_params: Vec<String>,
    /// Expected hopvm exit status (`expect_status`).
    pub expect_status: i32,
    /// Patterns that stdout+stderr must all contain (`expect_output`).
    pub expect_output: Vec<Pattern>,
    /// Hard time limit (`timeout`).
    pub timeout: Duration,
    /// Groups (`groups`).
    pub groups: Vec<String>,
    /// Prefix of the guest's `PREFIX 0x<rip>` line for the emulation-failure
    /// outcome (`emulation_failure_at`).
    pub emulation_failure_at: Option<String>,
    /// Pass `--no-reboot` (`no_reboot`, default true): a guest reset ends the
    /// VM with status 0 instead of rebooting it.
    pub no_reboot: bool,
    /// Migrate the guest live when it asks to be (`migrate`, default false).
    pub migrate: bool,
    /// A fresh virtio-blk disk image of this size (`disk`).
    pub disk: Option<MemorySize>,
}

impl TestSpec {
    /// Whether the test belongs to `group`.
    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }
}

/// A parsed manifest.
#[derive(Clone, Debug, Default)]
pub struct Manifest {
    /// The file it was read from, if any.
    pub path: Option<PathBuf>,
    /// Tests in file order.
    pub tests: Vec<TestSpec>,
}

impl Manifest {
    /// Looks a test up by name.
    pub fn get(&self, name: &str) -> Option<&TestSpec> {
        self.tests.iter().find(|t| t.name == name)
    }

    /// Replaces [`MANIFEST_DIR_PLACEHOLDER`] in every test's `extra_params`
    /// with `dir` ([`load`] does this with the manifest's directory).
    pub fn substitute_manifest_dir(&mut self, dir: &Path) {
        let dir = dir.to_string_lossy();
        for t in &mut self.tests {
            for p in &mut t.extra_params {
                if p.contains(MANIFEST_DIR_PLACEHOLDER) {
                    *p = p.replace(MANIFEST_DIR_PLACEHOLDER, &dir);
                }
            }
        }
    }
}

/// A manifest value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// A memory size that does not start with a number.
    #[error("bad memory size {0:?}: expected a number such as 256M or 4G")]
    MemoryNotANumber(String),
    /// A memory size beyond 64 bits.
    #[error("bad memory size {0:?}: too large")]
    MemoryTooLarge(String),
    /// A memory size with an unknown unit (the size, the unit).
    #[error("bad memory size {0:?}: unknown unit {1:?} (use K, M, G or T)")]
    MemoryUnit(String, String),
    /// A memory size of zero.
    #[error("bad memory size {0:?}: must not be zero")]
    MemoryZero(String),
    /// A timeout that is not a positive number of seconds or minutes.
    #[error("timeout must be a positive number of seconds (e.g. 60, 90s, 2m), not {0:?}")]
    Timeout(String),
    /// Shell-like words with a quote that never closes (which kind).
    #[error("unterminated {0} quote")]
    Quote(&'static str),
    /// Shell-like words ending in a lone backslash.
    #[error("trailing backslash")]
    TrailingBackslash,
}

/// Errors from reading or parsing a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("cannot read manifest {}: {source}", path.display())]
    Io {
        /// The manifest path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A syntax or value error at a line.
    #[error("{}:{line}: {message}", path.as_deref().map_or_else(|| "manifest".to_string(), |p| p.display().to_string()))]
    Syntax {
        /// The manifest path, if parsed from a file.
        path: Option<PathBuf>,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

impl ManifestError {
    /// The line number of a syntax error.
    pub fn line(&self) -> Option<usize> {
        match self {
            ManifestError::Syntax { line, .. } => Some(*line),
            ManifestError::Io { .. } => None,
        }
    }
}

/// Reads and parses the manifest at `path`.
pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut m = parse(&text).map_err(|e| match e {
        ManifestError::Syntax { line, message, .. } => ManifestError::Syntax {
            path: Some(path.to_path_buf()),
            line,
            message,
        },
        other => other,
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    m.substitute_manifest_dir(&dir);
    m.path = Some(path.to_path_buf());
    Ok(m)
}

/// A section being collected: key -> (line, value), plus repeated outputs.
struct Section {
    name: String,
    line: usize,
    keys: HashMap<&'static str, (usize, String)>,
    outputs: Vec<(usize, String)>,
}

/// Parses manifest text.
pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
    let err = |line: usize, message: String| ManifestError::Syntax {
        path: None,
        line,
        message,
    };
    let mut sections: Vec<Section> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();

    for (idx, raw) in text.lines().enumerate() {
        let line_no = idx + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            let name = rest
                .strip_suffix(']')
                .ok_or_else(|| err(line_no, format!("section header {line:?} is missing ']'")))?
                .trim();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            {
                return Err(err(
                    line_no,
                    format!("bad test name {name:?} (use letters, digits, '_', '-', '.')"),
                ));
            }
            if let Some(first) = seen.get(name) {
                return Err(err(
                    line_no,
                    format!("duplicate test [{name}] (first defined at line {first})"),
                ));
            }
            seen.insert(name.to_string(), line_no);
            sections.push(Section {
                name: name.to_string(),
                line: line_no,
                keys: HashMap::new(),
                outputs: Vec::new(),
            });
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(err(
                line_no,
                format!("expected `key = value` or `[test-name]`, found {line:?}"),
            ));
        };
        let key = key.trim();
        let value = value.trim();
        let Some(section) = sections.last_mut() else {
            return Err(err(
                line_no,
                format!("`{key}` appears before the first [test-name] section"),
            ));
        };
        let Some(&known) = KEYS.iter().find(|k| **k == key) else {
            return Err(err(
                line_no,
                format!("unknown key `{key}` (known keys: {})", KEYS.join(", ")),
            ));
        };
        if known == "expect_output" {
            section.outputs.push((line_no, value.to_string()));
            continue;
        }
        if let Some((first, _)) = section.keys.get(known) {
            return Err(err(
                line_no,
                format!(
                    "duplicate key `{key}` in [{}] (first set at line {first})",
                    section.name
                ),
            ));
        }
        section.keys.insert(known, (line_no, value.to_string()));
    }

    let mut tests = Vec::with_capacity(sections.len());
    for s in sections {
        tests.push(build_test(s).map_err(|(line, message)| err(line, message))?);
    }
    Ok(Manifest { path: None, tests })
}

fn unquote(v: &str) -> &str {
    if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
        &v[1..v.len() - 1]
    } else {
        v
    }
}

fn build_test(s: Section) -> Result<TestSpec, (usize, String)> {
    let name = s.name.clone();
    let get = |k: &str| s.keys.get(k).map(|(l, v)| (*l, v.as_str()));

    let file = match get("file") {
        Some((l, "")) => return Err((l, format!("[{name}]: `file` is empty"))),
        Some((_, v)) => v.to_string(),
        None => return Err((s.line, format!("test [{name}] has no `file` key"))),
    };
    let smp = match get("smp") {
        Some((l, v)) => match v.parse::<u32>() {
            Ok(n) if (1..=255).contains(&n) => n,
            _ => {
                return Err((
                    l,
                    format!("[{name}]: smp must be a number from 1 to 255, not {v:?}"),
                ))
            }
        },
        None => 1,
    };
    let memory = match get("memory") {
        Some((l, v)) => MemorySize::parse(v).map_err(|e| (l, format!("[{name}]: {e}")))?,
        None => MemorySize::parse(DEFAULT_MEMORY).map_err(|e| (s.line, e.to_string()))?,
    };
    let append = get("append").map_or(String::new(), |(_, v)| unquote(v).to_string());
    let extra_params = match get("extra_params") {
        Some((l, v)) => split_words(v).map_err(|e| (l, format!("[{name}]: extra_params: {e}")))?,
        None => Vec::new(),
    };
    let expect_status = match get("expect_status") {
        Some((l, v)) => match v.parse::<i32>() {
            Ok(n) if (0..=255).contains(&n) => n,
            _ => {
                return Err((
                    l,
                    format!("[{name}]: expect_status must be a number from 0 to 255, not {v:?}"),
                ))
            }
        },
        None => DEFAULT_EXPECT_STATUS,
    };
    let mut expect_output = Vec::new();
    for (l, v) in &s.outputs {
        let v = unquote(v);
        if v.is_empty() {
            return Err((*l, format!("[{name}]: expect_output is empty")));
        }
        expect_output.push(Pattern::parse(v).map_err(|e| (*l, format!("[{name}]: {e}")))?);
    }
    let timeout = match get("timeout") {
        Some((l, v)) => parse_timeout(v).map_err(|e| (l, format!("[{name}]: {e}")))?,
        None => DEFAULT_TIMEOUT,
    };
    let groups = get("groups").map_or(Vec::new(), |(_, v)| {
        v.split_whitespace().map(str::to_string).collect()
    });
    let emulation_failure_at = match get("emulation_failure_at") {
        Some((l, "")) => return Err((l, format!("[{name}]: emulation_failure_at is empty"))),
        Some((_, v)) => Some(unquote(v).to_string()),
        None => None,
    };
    let boolean = |key: &str, default: bool| match get(key) {
        Some((l, v)) => parse_bool(v)
            .ok_or_else(|| (l, format!("[{name}]: {key} must be yes or no, not {v:?}"))),
        None => Ok(default),
    };
    let no_reboot = boolean("no_reboot", true)?;
    let migrate = boolean("migrate", false)?;
    let disk = match get("disk") {
        Some((l, v)) => {
            Some(MemorySize::parse(v).map_err(|e| (l, format!("[{name}]: disk: {e}")))?)
        }
        None => None,
    };
    Ok(TestSpec {
        name,
        line: s.line,
        file,
        smp,
        memory,
        append,
        extra_params,
        expect_status,
        expect_output,
        timeout,
        groups,
        emulation_failure_at,
        no_reboot,
        migrate,
        disk,
    })
}

/// Parses a boolean value: yes/no, true/false, on/off, 1/0 (any case).
pub fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "yes" | "true" | "on" | "1" => Some(true),
        "no" | "false" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// Parses a timeout: plain seconds, or with an `s` or `m` suffix.
pub fn parse_timeout(v: &str) -> Result<Duration, ValueError> {
    let (num, mult) = if let Some(n) = v.strip_suffix('m') {
        (n, 60)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1)
    } else {
        (v, 1)
    };
    match num.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(Duration::from_secs(n * mult)),
        _ => Err(ValueError::Timeout(v.to_string())),
    }
}

/// Splits a string into words with shell-like quoting: single quotes,
/// double quotes (with `\"` and `\\`) and backslash escapes.
pub fn split_words(s: &str) -> Result<Vec<String>, ValueError> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err(ValueError::Quote("single")),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => cur.push(c),
                            Some(c) => {
                                cur.push('\\');
                                cur.push(c);
                            }
                            None => return Err(ValueError::Quote("double")),
                        },
                        Some(c) => cur.push(c),
                        None => return Err(ValueError::Quote("double")),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => cur.push(c),
                    None => return Err(ValueError::TrailingBackslash),
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syntax_error(text: &str) -> (usize, String) {
        match parse(text) {
            Err(ManifestError::Syntax { line, message, .. }) => (line, message),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("manifest should not parse:\n{text}"),
        }
    }

    #[test]
    fn full_example() {
        let text = r#"
# comment
; another comment
[hello]
file = hello.elf
smp = 2
memory = 4G
append = foo bar=1 # not a comment
extra_params = --initrd 'a b' "c\"d" e\ f
expect_status = 85
expect_output = Hello
expect_output = /argv\[1\]=foo/
expect_output = "  spaced  "
timeout = 2m
groups = smoke  smp
emulation_failure_at = xrstor at
no_reboot = false
migrate = yes

[other]
file=x.elf
"#;
        let m = parse(text).unwrap();
        assert_eq!(m.tests.len(), 2);
        let t = &m.tests[0];
        assert_eq!(t.name, "hello");
        assert_eq!(t.line, 4);
        assert_eq!(t.file, "hello.elf");
        assert_eq!(t.smp, 2);
        assert_eq!(t.memory.bytes, 4 << 30);
        assert_eq!(t.memory.text, "4G");
        assert_eq!(t.append, "foo bar=1 # not a comment");
        assert_eq!(t.extra_params, vec!["--initrd", "a b", "c\"d", "e f"]);
        assert_eq!(t.expect_status, 85);
        assert_eq!(t.expect_output.len(), 3);
        assert!(t.expect_output[1].is_match("argv[1]=foo"));
        assert!(t.expect_output[2].is_match("x  spaced  y"));
        assert!(!t.expect_output[2].is_match("spaced"));
        assert_eq!(t.timeout, Duration::from_secs(120));
        assert_eq!(t.groups, vec!["smoke", "smp"]);
        assert!(t.in_group("smp"));
        assert_eq!(t.emulation_failure_at.as_deref(), Some("xrstor at"));
        assert!(!t.no_reboot && t.migrate);

        let o = m.get("other").unwrap();
        assert_eq!(o.smp, 1);
        assert_eq!(o.memory.text, "256M");
        assert_eq!(o.expect_status, DEFAULT_EXPECT_STATUS);
        assert_eq!(o.timeout, DEFAULT_TIMEOUT);
        assert!(o.expect_output.is_empty() && o.groups.is_empty() && o.append.is_empty());
        assert!(o.no_reboot && !o.migrate);
    }

    #[test]
    fn empty_manifest() {
        assert!(parse("").unwrap().tests.is_empty());
        assert!(parse("# only comments\n\n").unwrap().tests.is_empty());
    }

    #[test]
    fn errors_have_line_numbers() {
        let cases: &[(&str, usize, &str)] = &[
            ("file = x.elf\n", 1, "before the first"),
            (
                "[a]\nfile = x\n[a]\nfile = y\n",
                3,
                "duplicate test [a] (first defined at line 1)",
            ),
            ("[a\nfile = x\n", 1, "missing ']'"),
            ("[a b]\n", 1, "bad test name"),
            ("[]\n", 1, "bad test name"),
            ("[a]\nfile = x\nbogus = 1\n", 3, "unknown key `bogus`"),
            ("[a]\nfile = x\nfile = y\n", 3, "duplicate key `file`"),
            ("[a]\nsmp = 2\n", 1, "has no `file`"),
            ("[a]\nfile =\n", 2, "`file` is empty"),
            ("[a]\nfile = x\nsmp = 0\n", 3, "smp must be"),
            ("[a]\nfile = x\nsmp = two\n", 3, "smp must be"),
            ("[a]\nfile = x\nmemory = lots\n", 3, "bad memory size"),
            ("[a]\nfile = x\nmemory = 4X\n", 3, "unknown unit"),
            ("[a]\nfile = x\nmemory = 0\n", 3, "must not be zero"),
            ("[a]\nfile = x\nexpect_status = 256\n", 3, "expect_status"),
            ("[a]\nfile = x\nexpect_status = -1\n", 3, "expect_status"),
            ("[a]\nfile = x\ntimeout = 0\n", 3, "timeout"),
            ("[a]\nfile = x\ntimeout = soon\n", 3, "timeout"),
            (
                "[a]\nfile = x\n\nexpect_output = /(/\n",
                4,
                "bad regular expression",
            ),
            (
                "[a]\nfile = x\nexpect_output =\n",
                3,
                "expect_output is empty",
            ),
            (
                "[a]\nfile = x\nextra_params = 'open\n",
                3,
                "unterminated single quote",
            ),
            ("[a]\nfile = x\njust words\n", 3, "expected `key = value`"),
            ("[a]\nfile = x\nemulation_failure_at =\n", 3, "empty"),
            (
                "[a]\nfile = x\nmigrate = maybe\n",
                3,
                "migrate must be yes or no",
            ),
            (
                "[a]\nfile = x\nno_reboot = 2\n",
                3,
                "no_reboot must be yes or no",
            ),
        ];
        for (text, line, msg) in cases {
            let (l, m) = syntax_error(text);
            assert_eq!(l, *line, "line for {text:?} ({m})");
            assert!(m.contains(msg), "message for {text:?}: {m:?} lacks {msg:?}");
        }
    }

    #[test]
    fn error_display_names_file_and_line() {
        let dir = std::env::temp_dir().join(format!("guest-tests-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.cfg");
        std::fs::write(&path, "[a]\nfile = x\nnope = 1\n").unwrap();
        let e = load(&path).unwrap_err();
        assert_eq!(e.line(), Some(3));
        let shown = e.to_string();
        assert!(
            shown.starts_with(&format!("{}:3: unknown key", path.display())),
            "{shown}"
        );
        let missing = load(&dir.join("missing.cfg")).unwrap_err();
        assert!(missing.to_string().contains("cannot read manifest"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn memory_sizes() {
        let p = |s| MemorySize::parse(s).map(|m| (m.bytes, m.text));
        assert_eq!(p("256"), Ok((256 << 20, "256M".into())));
        assert_eq!(p("256M"), Ok((256 << 20, "256M".into())));
        assert_eq!(p("256MiB"), Ok((256 << 20, "256M".into())));
        assert_eq!(p("4G"), Ok((4 << 30, "4G".into())));
        assert_eq!(p("4g"), Ok((4 << 30, "4G".into())));
        assert_eq!(p("512K"), Ok((512 << 10, "512K".into())));
        assert!(p("M").is_err());
        assert!(p("99999999999999999999G").is_err());
        assert!(p("99999999T").is_err());
    }

    #[test]
    fn words() {
        assert_eq!(split_words("").unwrap(), Vec::<String>::new());
        assert_eq!(split_words("  a  b ").unwrap(), vec!["a", "b"]);
        assert_eq!(split_words("'' x").unwrap(), vec!["", "x"]);
        assert_eq!(split_words(r#"a"b c"d"#).unwrap(), vec!["ab cd"]);
        assert!(split_words("\"x").is_err());
        assert!(split_words("x\\").is_err());
    }

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_timeout("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_timeout("3m"), Ok(Duration::from_secs(180)));
        assert!(parse_timeout("-1").is_err());
    }

    #[test]
    fn booleans() {
        for v in ["yes", "YES", "true", "on", "1"] {
            assert_eq!(parse_bool(v), Some(true), "{v}");
        }
        for v in ["no", "False", "off", "0"] {
            assert_eq!(parse_bool(v), Some(false), "{v}");
        }
        assert_eq!(parse_bool(""), None);
        assert_eq!(parse_bool("2"), None);
    }

    #[test]
    fn manifest_dir_placeholder() {
        let dir = std::env::temp_dir().join(format!("guest-tests-mdir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.cfg");
        std::fs::write(
            &path,
            "[a]\nfile = x\nextra_params = --initrd {manifest_dir}/data/f --x=y\n",
        )
        .unwrap();
        let m = load(&path).unwrap();
        assert_eq!(
            m.tests[0].extra_params,
            vec![
                "--initrd".to_string(),
                format!("{}/data/f", dir.display()),
                "--x=y".to_string()
            ]
        );
        // Unsubstituted when parsed from text.
        let m = parse("[a]\nfile = x\nextra_params = {manifest_dir}/f\n").unwrap();
        assert_eq!(m.tests[0].extra_params, vec!["{manifest_dir}/f"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn real_manifest_parses() {
        let m = load(&crate::default_manifest_path()).unwrap();
        assert!(!m.tests.is_empty());
        for t in &m.tests {
            let name = t.file.trim_end_matches(".elf");
            assert!(
                crate::IMAGE_NAMES.contains(&name) || crate::STANDALONE_IMAGE_NAMES.contains(&name),
                "[{}] uses unknown image {}",
                t.name,
                t.file
            );
            // Data files named through {manifest_dir} must exist.
            let dir = crate::default_manifest_path();
            let dir = dir.parent().unwrap().to_string_lossy().into_owned();
            for p in t.extra_params.iter().filter(|p| p.starts_with(&dir)) {
                assert!(Path::new(p).exists(), "[{}]: {p} does not exist", t.name);
            }
        }
    }
}
