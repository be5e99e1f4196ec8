//! QEMU's authorization objects for TLS clients (`tls-authz`): `authz-simple`, `authz-list` and
//! `authz-list-file` (`qapi/authz.json`, `authz/*.c`).
//!
//! An object answers one question: is this identity — the client certificate's distinguished
//! name, as [`super::dn::distinguished_name`] writes it — allowed? `authz-simple` allows one
//! identity (exact match); `authz-list` goes through its rules in order, the first whose
//! `match` fits (`exact`, or `glob` with `*` and `?` as GLib's `g_pattern_match_simple`)
//! decides, and its `policy` (default `deny`) decides when none does; `authz-list-file` is an
//! `authz-list` read from a JSON file — with `refresh=on` (the default, as QEMU built with
//! inotify) hopvm reads the file again at every check, so an edit counts from the next
//! connection on (QEMU reloads it when inotify reports the change); a file that cannot be
//! read or parsed then refuses every client until it is fixed, as in QEMU.
//!
//! Objects come from `-object` / `--object` (QEMU's `key=value` form, the list's rules as
//! dotted keys `rules.0.match=…,rules.0.policy=allow`, or its JSON form) and from QMP
//! `object-add` (JSON). `authz-pam` is refused: hopvm has no PAM.

use std::io;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// Errors of authorization objects: creating one, or reading an `authz-list-file`'s file.
#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    /// A required property is missing (QEMU's wording).
    #[error("Parameter '{0}' is missing")]
    Missing(String),
    /// A property's value is not one it takes (QEMU's wording).
    #[error("Parameter '{key}' does not accept value '{value}'")]
    BadValue {
        /// The property.
        key: String,
        /// Its value.
        value: String,
    },
    /// A property of the wrong JSON type (QEMU's wording).
    #[error("Invalid parameter type for '{key}', expected: {expected}")]
    BadType {
        /// The property.
        key: String,
        /// What it must be.
        expected: &'static str,
    },
    /// A property the object does not have (QEMU's wording).
    #[error("Parameter '{0}' is unexpected")]
    Unexpected(String),
    /// `authz-pam`.
    #[error(
        "authz-pam is not supported: hopvm has no PAM (use authz-simple, authz-list or \
         authz-list-file)"
    )]
    Pam,
    /// Not an authorization object type.
    #[error("invalid object type: {0}")]
    UnknownType(String),
    /// A command-line item that is not `key=value`.
    #[error("'{0}' is not KEY=VALUE")]
    NotKeyValue(String),
    /// Two dotted keys that contradict each other (`rules=x,rules.0.match=y`).
    #[error("Parameter '{0}' is given twice, or both as a value and with sub-keys")]
    Conflict(String),
    /// An `authz-list-file`'s file cannot be read (QEMU's wording).
    #[error("Unable to read '{path}': {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An `authz-list-file`'s file is not JSON.
    #[error("File '{path}' is not valid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// An `authz-list-file`'s file is JSON, but not an object (QEMU's wording).
    #[error("File '{0}' must contain a JSON object")]
    NotObject(PathBuf),
    /// An `authz-list-file`'s file is not a valid list.
    #[error("File '{path}': {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong in it.
        #[source]
        source: Box<AuthzError>,
    },
}

/// What a rule, or a list's default, decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Refuse.
    Deny,
    /// Allow.
    Allow,
}

/// How a rule's `match` is compared with the identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The same string.
    Exact,
    /// A shell-like pattern: `*` any run of characters, `?` one character.
    Glob,
}

/// One rule of an `authz-list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The identity or pattern (`match`).
    pub pattern: String,
    /// What it decides when it matches.
    pub policy: Policy,
    /// Exact or glob (default exact).
    pub format: Format,
}

impl Rule {
    fn matches(&self, identity: &str) -> bool {
        match self.format {
            Format::Exact => self.pattern == identity,
            Format::Glob => glob_match(&self.pattern, identity),
        }
    }
}

/// An `authz-list`: rules in order, and the policy when none matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthzList {
    /// When no rule matches (default deny).
    pub policy: Policy,
    /// The rules, first match wins.
    pub rules: Vec<Rule>,
}

impl AuthzList {
    /// The first matching rule's policy, else the default.
    pub fn is_allowed(&self, identity: &str) -> bool {
        let policy = self
            .rules
            .iter()
            .find(|r| r.matches(identity))
            .map_or(self.policy, |r| r.policy);
        policy == Policy::Allow
    }
}

/// The kinds of authorization object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authz {
    /// `authz-simple`: one identity.
    Simple {
        /// The identity allowed.
        identity: String,
    },
    /// `authz-list`.
    List(AuthzList),
    /// `authz-list-file`: an `authz-list` in a JSON file.
    ListFile {
        /// The file.
        filename: PathBuf,
        /// Read again at every check.
        refresh: bool,
        /// The list as read when the object was created.
        loaded: AuthzList,
    },
}

/// An authorization object: its id and kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthzObject {
    id: String,
    authz: Authz,
}

/// QEMU's type names; `authz-listfile` is how QEMU 7.2's QAPI schema spells `authz-list-file`.
pub const TYPES: [&str; 4] = [
    "authz-simple",
    "authz-list",
    "authz-list-file",
    "authz-listfile",
];

/// Whether `ty` names an authorization object type (including `authz-pam`, which is
/// refused when created).
pub fn is_authz_type(ty: &str) -> bool {
    TYPES.contains(&ty) || ty == "authz-pam"
}

impl AuthzObject {
    /// The object's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What it is.
    pub fn authz(&self) -> &Authz {
        &self.authz
    }

    /// Its QOM type name.
    pub fn type_name(&self) -> &'static str {
        match self.authz {
            Authz::Simple { .. } => "authz-simple",
            Authz::List(_) => "authz-list",
            Authz::ListFile { .. } => "authz-list-file",
        }
    }

    /// Whether `identity` is allowed. Only an `authz-list-file` with `refresh=on` can fail:
    /// its file is read again, and one that cannot be read or parsed allows nobody.
    pub fn is_allowed(&self, identity: &str) -> Result<bool, AuthzError> {
        Ok(match &self.authz {
            Authz::Simple { identity: allowed } => allowed == identity,
            Authz::List(list) => list.is_allowed(identity),
            Authz::ListFile {
                filename,
                refresh: true,
                ..
            } => load_list_file(filename)?.is_allowed(identity),
            Authz::ListFile { loaded, .. } => loaded.is_allowed(identity),
        })
    }

    /// Creates an object from QMP `object-add`'s arguments or a JSON `-object`:
    /// `{"qom-type": …, "id": …, properties…}`.
    pub fn from_json(args: &Map<String, Value>) -> Result<Self, AuthzError> {
        Self::build(args, false)
    }

    /// Creates an object from a command line's `key=value` items (`qom-type` and `id`
    /// among them); dotted keys make nested properties (`rules.0.match=…`).
    pub fn from_keyval<'a>(
        items: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, AuthzError> {
        let mut root = Map::new();
        for (k, v) in items {
            insert_dotted(&mut root, k, v)?;
        }
        let root = arrays_from_indices(Value::Object(root), "")?;
        match root {
            Value::Object(map) => Self::build(&map, true),
            _ => Err(AuthzError::Missing(String::from("qom-type"))),
        }
    }

    fn build(args: &Map<String, Value>, keyval: bool) -> Result<Self, AuthzError> {
        let mut p = Props::new(args, String::new(), keyval);
        let ty = p.required_str("qom-type")?;
        let id = p.required_str("id")?;
        let authz = match ty.as_str() {
            "authz-simple" => Authz::Simple {
                identity: p.required_str("identity")?,
            },
            "authz-list" => Authz::List(parse_list(&mut p)?),
            "authz-list-file" | "authz-listfile" => {
                let filename = PathBuf::from(p.required_str("filename")?);
                let refresh = p.optional_bool("refresh")?.unwrap_or(true);
                p.finish()?;
                let loaded = load_list_file(&filename)?;
                return Ok(Self {
                    id,
                    authz: Authz::ListFile {
                        filename,
                        refresh,
                        loaded,
                    },
                });
            }
            "authz-pam" => return Err(AuthzError::Pam),
            other => return Err(AuthzError::UnknownType(other.to_owned())),
        };
        p.finish()?;
        Ok(Self { id, authz })
    }
}

/// Reads an `authz-list-file`'s file: `{"policy": …, "rules": […]}`.
pub fn load_list_file(path: &Path) -> Result<AuthzList, AuthzError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthzError::Read {
        path: path.to_owned(),
        source,
    })?;
    let json: Value = serde_json::from_str(&text).map_err(|source| AuthzError::Json {
        path: path.to_owned(),
        source,
    })?;
    let Value::Object(map) = json else {
        return Err(AuthzError::NotObject(path.to_owned()));
    };
    let mut p = Props::new(&map, String::new(), false);
    parse_list(&mut p)
        .and_then(|list| p.finish().map(|()| list))
        .map_err(|e| AuthzError::File {
            path: path.to_owned(),
            source: Box::new(e),
        })
}

/// An `authz-list`'s `policy` and `rules` (the rest of `p` is the caller's).
fn parse_list(p: &mut Props) -> Result<AuthzList, AuthzError> {
    let policy = p.optional_policy("policy")?.unwrap_or(Policy::Deny);
    let mut rules = Vec::new();
    if let Some(v) = p.take("rules") {
        let Value::Array(items) = v else {
            return Err(AuthzError::BadType {
                key: p.name("rules"),
                expected: "array",
            });
        };
        for (i, item) in items.iter().enumerate() {
            let name = format!("{}[{i}]", p.name("rules"));
            let Value::Object(rule) = item else {
                return Err(AuthzError::BadType {
                    key: name,
                    expected: "object",
                });
            };
            let mut r = Props::new(rule, name, p.keyval);
            let pattern = r.required_str("match")?;
            let policy = r
                .optional_policy("policy")?
                .ok_or_else(|| AuthzError::Missing(r.name("policy")))?;
            let format = match r.optional_str("format")?.as_deref() {
                None | Some("exact") => Format::Exact,
                Some("glob") => Format::Glob,
                Some(other) => {
                    return Err(AuthzError::BadValue {
                        key: String::from("format"),
                        value: other.to_owned(),
                    })
                }
            };
            r.finish()?;
            rules.push(Rule {
                pattern,
                policy,
                format,
            });
        }
    }
    Ok(AuthzList { policy, rules })
}

/// Takes an object's properties one by one and refuses what is left.
struct Props {
    map: Map<String, Value>,
    /// Where in the whole object this map is (`rules[0]`), for error messages.
    prefix: String,
    /// From a command line: every value is a string, booleans as on/off.
    keyval: bool,
}

impl Props {
    fn new(map: &Map<String, Value>, prefix: String, keyval: bool) -> Self {
        Self {
            map: map.clone(),
            prefix,
            keyval,
        }
    }

    fn name(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key)
    }

    fn optional_str(&mut self, key: &str) -> Result<Option<String>, AuthzError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(AuthzError::BadType {
                key: self.name(key),
                expected: "string",
            }),
        }
    }

    fn required_str(&mut self, key: &str) -> Result<String, AuthzError> {
        self.optional_str(key)?
            .ok_or_else(|| AuthzError::Missing(self.name(key)))
    }

    fn optional_bool(&mut self, key: &str) -> Result<Option<bool>, AuthzError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(Value::String(s)) if self.keyval => match s.as_str() {
                "on" | "yes" | "true" | "y" => Ok(Some(true)),
                "off" | "no" | "false" | "n" => Ok(Some(false)),
                _ => Err(AuthzError::BadValue {
                    key: self.name(key),
                    value: s,
                }),
            },
            Some(_) => Err(AuthzError::BadType {
                key: self.name(key),
                expected: "boolean",
            }),
        }
    }

    fn optional_policy(&mut self, key: &str) -> Result<Option<Policy>, AuthzError> {
        Ok(match self.optional_str(key)?.as_deref() {
            None => None,
            Some("deny") => Some(Policy::Deny),
            Some("allow") => Some(Policy::Allow),
            Some(other) => {
                return Err(AuthzError::BadValue {
                    key: key.to_owned(),
                    value: other.to_owned(),
                })
            }
        })
    }

    fn finish(self) -> Result<(), AuthzError> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(k) => Err(AuthzError::Unexpected(self.name(k))),
        }
    }
}

/// Puts `key=value` into `root`, a dotted key (`rules.0.match`) as nested objects.
fn insert_dotted(root: &mut Map<String, Value>, key: &str, value: &str) -> Result<(), AuthzError> {
    let mut map = root;
    let mut parts = key.split('.').peekable();
    let mut path = String::new();
    while let Some(part) = parts.next() {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(part);
        if part.is_empty() {
            return Err(AuthzError::NotKeyValue(key.to_owned()));
        }
        if parts.peek().is_none() {
            if map.contains_key(part) {
                return Err(AuthzError::Conflict(path));
            }
            map.insert(part.to_owned(), Value::String(value.to_owned()));
            return Ok(());
        }
        let next = map
            .entry(part.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        map = match next {
            Value::Object(m) => m,
            _ => return Err(AuthzError::Conflict(path)),
        };
    }
    Ok(())
}

/// Turns every object whose keys are all indices (`0`, `1`, …) into an array; the indices
/// must run from 0 without a gap.
fn arrays_from_indices(v: Value, path: &str) -> Result<Value, AuthzError> {
    let Value::Object(map) = v else {
        return Ok(v);
    };
    let at = |k: &str| {
        if path.is_empty() {
            k.to_owned()
        } else {
            format!("{path}.{k}")
        }
    };
    let indexed = !map.is_empty() && map.keys().all(|k| k.bytes().all(|b| b.is_ascii_digit()));
    if indexed {
        let mut items: Vec<(usize, Value)> = Vec::with_capacity(map.len());
        for (k, v) in map {
            let i = k
                .parse::<usize>()
                .map_err(|_| AuthzError::NotKeyValue(at(&k)))?;
            items.push((i, arrays_from_indices(v, &at(&k))?));
        }
        items.sort_by_key(|(i, _)| *i);
        for (want, (i, _)) in items.iter().enumerate() {
            if *i != want {
                return Err(AuthzError::Missing(at(&want.to_string())));
            }
        }
        return Ok(Value::Array(items.into_iter().map(|(_, v)| v).collect()));
    }
    let mut out = Map::new();
    for (k, v) in map {
        let v = arrays_from_indices(v, &at(&k))?;
        out.insert(k, v);
    }
    Ok(Value::Object(out))
}

/// GLib's `g_pattern_match_simple`: `*` matches any run of characters (none included), `?`
/// exactly one character; nothing else is special (no escapes, no classes).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    // Where the last `*` was, and the text position it is trying to cover up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                // Let the last `*` take one more character and try again.
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn glob_is_glibs_simple_pattern() {
        let yes = [
            ("", ""),
            ("*", ""),
            ("*", "anything, at all"),
            ("a*", "a"),
            ("a*c", "abbbc"),
            ("a?c", "abc"),
            ("?", "é"),
            ("*.example.com", "CN=x.example.com"),
            (
                "C=GB,*,CN=*.example.com",
                "C=GB,O=Org,CN=laptop.example.com",
            ),
            ("**a**", "xxaxx"),
            ("*a*b", "aaab"),
            ("[ab]", "[ab]"),
            ("a\\*", "a\\xyz"),
        ];
        for (p, t) in yes {
            assert!(glob_match(p, t), "{p:?} should match {t:?}");
        }
        let no = [
            ("", "a"),
            ("a", ""),
            ("?", ""),
            ("??", "é"),
            ("a*c", "abcd"),
            ("a?c", "ac"),
            ("*.example.com", "CN=x.example.org"),
            ("[ab]", "a"),
            ("A*", "a"),
            ("*a*b", "aaaba"),
        ];
        for (p, t) in no {
            assert!(!glob_match(p, t), "{p:?} should not match {t:?}");
        }
    }

    #[test]
    fn simple_allows_exactly_its_identity() {
        let a = AuthzObject::from_keyval([
            ("qom-type", "authz-simple"),
            ("id", "a0"),
            ("identity", "C=GB,CN=src"),
        ])
        .unwrap();
        assert_eq!(a.id(), "a0");
        assert!(a.is_allowed("C=GB,CN=src").unwrap());
        assert!(!a.is_allowed("C=GB,CN=src2").unwrap());
        assert!(!a.is_allowed("c=gb,cn=src").unwrap());
        assert!(!a.is_allowed("").unwrap());
    }

    #[test]
    fn list_first_match_wins_then_the_default() {
        // QEMU's docs example.
        let a = AuthzObject::from_json(&obj(json!({
            "qom-type": "authz-list", "id": "a",
            "rules": [
                {"match": "fred", "policy": "allow", "format": "exact"},
                {"match": "bob", "policy": "allow"},
                {"match": "danb", "policy": "deny", "format": "exact"},
                {"match": "dan*", "policy": "allow", "format": "glob"}
            ],
            "policy": "deny"
        })))
        .unwrap();
        for (who, ok) in [
            ("fred", true),
            ("bob", true),
            ("danb", false),
            ("dan", true),
            ("daniel", true),
            ("fred2", false),
            ("dan*", true),
            ("", false),
        ] {
            assert_eq!(a.is_allowed(who).unwrap(), ok, "{who}");
        }
        // The default policy is deny; allow flips the unmatched.
        let deny =
            AuthzObject::from_json(&obj(json!({"qom-type": "authz-list", "id": "d"}))).unwrap();
        assert!(!deny.is_allowed("anyone").unwrap());
        let allow = AuthzObject::from_keyval([
            ("qom-type", "authz-list"),
            ("id", "d"),
            ("policy", "allow"),
            ("rules.0.match", "*evil*"),
            ("rules.0.policy", "deny"),
            ("rules.0.format", "glob"),
        ])
        .unwrap();
        assert!(allow.is_allowed("good").unwrap());
        assert!(!allow.is_allowed("CN=evil.example").unwrap());
        // Order matters: the same rules the other way round.
        let first_allow = AuthzObject::from_keyval([
            ("qom-type", "authz-list"),
            ("id", "o"),
            ("rules.1.match", "x*"),
            ("rules.1.policy", "deny"),
            ("rules.1.format", "glob"),
            ("rules.0.match", "xy"),
            ("rules.0.policy", "allow"),
        ])
        .unwrap();
        assert!(first_allow.is_allowed("xy").unwrap());
        assert!(!first_allow.is_allowed("xz").unwrap());
        let Authz::List(list) = first_allow.authz() else {
            panic!("not a list")
        };
        assert_eq!(list.rules[0].pattern, "xy");
        assert_eq!(list.rules[0].format, Format::Exact);
        assert_eq!(list.rules[1].format, Format::Glob);
    }

    #[test]
    fn bad_objects_say_what_is_wrong() {
        let cases: [(Value, &str); 10] = [
            (
                json!({"qom-type": "authz-simple", "id": "a"}),
                "Parameter 'identity' is missing",
            ),
            (
                json!({"qom-type": "authz-simple", "identity": "x"}),
                "Parameter 'id' is missing",
            ),
            (
                json!({"qom-type": "authz-list", "id": "a", "rules": [{"match": "x"}]}),
                "Parameter 'rules[0].policy' is missing",
            ),
            (
                json!({"qom-type": "authz-list", "id": "a",
                       "rules": [{"match": "x", "policy": "allow", "format": "regex"}]}),
                "Parameter 'format' does not accept value 'regex'",
            ),
            (
                json!({"qom-type": "authz-list", "id": "a", "policy": "perhaps"}),
                "Parameter 'policy' does not accept value 'perhaps'",
            ),
            (
                json!({"qom-type": "authz-list", "id": "a", "rules": {"match": "x"}}),
                "Invalid parameter type for 'rules', expected: array",
            ),
            (
                json!({"qom-type": "authz-list", "id": "a",
                       "rules": [{"match": "x", "policy": "allow", "extra": 1}]}),
                "Parameter 'rules[0].extra' is unexpected",
            ),
            (
                json!({"qom-type": "authz-simple", "id": "a", "identity": 5}),
                "Invalid parameter type for 'identity', expected: string",
            ),
            (
                json!({"qom-type": "authz-pam", "id": "a", "service": "x"}),
                "authz-pam is not supported",
            ),
            (
                json!({"qom-type": "authz-list-file", "id": "a",
                       "filename": "/nonexistent/acl.json"}),
                "Unable to read '/nonexistent/acl.json'",
            ),
        ];
        for (v, want) in cases {
            let err = AuthzObject::from_json(&obj(v.clone()))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{v}: {err}");
        }
        let kv: [(&[(&str, &str)], &str); 4] = [
            (
                &[
                    ("qom-type", "authz-list"),
                    ("id", "a"),
                    ("rules.0.match", "x"),
                    ("rules.0.policy", "allow"),
                    ("rules.2.match", "y"),
                    ("rules.2.policy", "deny"),
                ],
                "Parameter 'rules.1' is missing",
            ),
            (
                &[
                    ("qom-type", "authz-list"),
                    ("id", "a"),
                    ("rules", "x"),
                    ("rules.0.match", "y"),
                ],
                "Parameter 'rules' is given twice",
            ),
            (
                &[
                    ("qom-type", "authz-list-file"),
                    ("id", "a"),
                    ("filename", "/x"),
                    ("refresh", "maybe"),
                ],
                "Parameter 'refresh' does not accept value 'maybe'",
            ),
            (
                &[
                    ("qom-type", "authz-simple"),
                    ("id", "a"),
                    ("identity", "x"),
                    ("colour", "red"),
                ],
                "Parameter 'colour' is unexpected",
            ),
        ];
        for (items, want) in kv {
            let err = AuthzObject::from_keyval(items.iter().copied())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{items:?}: {err}");
        }
    }

    #[test]
    fn list_file_is_read_again_with_refresh_only() {
        let dir = std::env::temp_dir().join(format!("hopvm-authz-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("acl.json");
        let write = |v: Value| std::fs::write(&file, v.to_string()).unwrap();
        write(json!({"rules": [{"match": "CN=a", "policy": "allow"}]}));
        let name = file.to_str().unwrap();
        let live = AuthzObject::from_keyval([
            ("qom-type", "authz-list-file"),
            ("id", "f"),
            ("filename", name),
        ])
        .unwrap();
        let fixed = AuthzObject::from_json(&obj(json!({
            "qom-type": "authz-listfile", "id": "g", "filename": name, "refresh": false
        })))
        .unwrap();
        assert_eq!(live.type_name(), "authz-list-file");
        assert!(live.is_allowed("CN=a").unwrap() && fixed.is_allowed("CN=a").unwrap());
        assert!(!live.is_allowed("CN=b").unwrap());
        write(json!({"policy": "allow", "rules": [{"match": "CN=a", "policy": "deny"}]}));
        assert!(!live.is_allowed("CN=a").unwrap());
        assert!(live.is_allowed("CN=b").unwrap());
        assert!(
            fixed.is_allowed("CN=a").unwrap(),
            "refresh=off keeps the first read"
        );
        // A broken file refuses everyone, and says why.
        std::fs::write(&file, "{\"rules\": [").unwrap();
        let err = live.is_allowed("CN=b").unwrap_err().to_string();
        assert!(err.contains("is not valid JSON"), "{err}");
        std::fs::write(&file, "[1]").unwrap();
        let err = live.is_allowed("CN=b").unwrap_err().to_string();
        assert!(err.contains("must contain a JSON object"), "{err}");
        write(json!({"rules": [{"match": "CN=a"}]}));
        let err = live.is_allowed("CN=b").unwrap_err().to_string();
        assert!(err.contains("rules[0].policy' is missing"), "{err}");
        std::fs::remove_file(&file).unwrap();
        let err = live.is_allowed("CN=b").unwrap_err().to_string();
        assert!(err.starts_with("Unable to read"), "{err}");
        assert!(fixed.is_allowed("CN=a").unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
