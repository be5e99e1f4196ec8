//! Output patterns for the manifest's `expect_output` key.
//!
//! A value written between slashes, `/.../` (optionally `/.../i` for a
//! case-insensitive match), is a regular expression; anything else is a plain
//! substring.  The regular expressions are the `regex` crate's syntax (linear
//! time, no backtracking), in multi-line CRLF-aware mode: `^` and `$` match at
//! the start and end of any line, `\r\n` counting as one line end.

use std::fmt;

/// An `expect_output` pattern: a substring or a regular expression.
#[derive(Clone, Debug)]
pub enum Pattern {
    /// The output must contain this text.
    Substring(String),
    /// The output must contain a match of this expression.
    Regex(Regex),
}

/// A regular expression in a pattern that does not compile.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("bad regular expression {pattern:?}: {source}")]
pub struct PatternError {
    /// The expression as written.
    pub pattern: String,
    /// What is wrong with it.
    #[source]
    pub source: regex::Error,
}

impl Pattern {
    /// Parses a manifest value: `/regex/`, `/regex/i` or a plain substring.
    pub fn parse(value: &str) -> Result<Pattern, PatternError> {
        if value.len() >= 2 && value.starts_with('/') {
            if let Some(body) = value[1..].strip_suffix('/') {
                return Ok(Pattern::Regex(Regex::new(body)?));
            }
            if let Some(body) = value[1..].strip_suffix("/i") {
                return Ok(Pattern::Regex(Regex::new(&format!("(?i){body}"))?));
            }
        }
        Ok(Pattern::Substring(value.to_string()))
    }

    /// Whether `text` contains the substring or a match of the expression.
    pub fn is_match(&self, text: &str) -> bool {
        match self {
            Pattern::Substring(s) => text.contains(s.as_str()),
            Pattern::Regex(r) => r.is_match(text),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Substring(s) => write!(f, "{s:?}"),
            Pattern::Regex(r) => write!(f, "/{}/", r.source),
        }
    }
}

/// A compiled regular expression (see the module documentation for syntax).
#[derive(Clone, Debug)]
pub struct Regex {
    source: String,
    re: regex::Regex,
}

/// Limit on the compiled size of one expression (counted repetition expands).
const MAX_COMPILED_SIZE: usize = 1 << 20;

impl Regex {
    /// Compiles `source`; see the module documentation for the syntax.
    pub fn new(source: &str) -> Result<Regex, PatternError> {
        let re = regex::RegexBuilder::new(source)
            .multi_line(true)
            .crlf(true)
            .size_limit(MAX_COMPILED_SIZE)
            .build()
            .map_err(|e| PatternError {
                pattern: source.to_string(),
                source: e,
            })?;
        Ok(Regex {
            source: source.to_string(),
            re,
        })
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether `text` contains a match.
    pub fn is_match(&self, text: &str) -> bool {
        self.re.is_match(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(re: &str, text: &str) -> bool {
        Regex::new(re).unwrap().is_match(text)
    }

    #[test]
    fn literals_and_classes() {
        assert!(m("abc", "xxabcxx"));
        assert!(!m("abd", "xxabcxx"));
        assert!(m("a.c", "abc"));
        assert!(!m("a.c", "a\nc"));
        assert!(m(r"\d+ passed", "3 passed, 0 failed"));
        assert!(!m(r"\d+ passed", "x passed"));
        assert!(m("[a-c]x", "bx"));
        assert!(!m("[^a-c]x", "bx"));
        assert!(m(r"[\d_]z", "_z"));
        assert!(m(r"0x[0-9a-f]+", "rip 0x401234"));
        assert!(m(r"\s\S\w\W", " a_!"));
        assert!(m(r"a\.b", "a.b"));
        assert!(!m(r"a\.b", "axb"));
        assert!(m("[]]", "]"));
        assert!(m("[a-]", "-"));
    }

    #[test]
    fn anchors_are_per_line() {
        assert!(m("^PASS", "x\nPASS: y"));
        assert!(!m("^PASS", "x PASS"));
        assert!(m("ok$", "pass 1 ok\nnext"));
        assert!(m("ok$", "pass 1 ok\r\nnext"));
        assert!(!m("ok$", "ok then"));
        assert!(m("^$", ""));
    }

    #[test]
    fn groups_alternation_repetition() {
        assert!(m("(ab)+c", "ababc"));
        assert!(m("a(b|c)d", "acd"));
        assert!(!m("a(b|c)d", "aed"));
        assert!(m("(?:foo|bar)baz", "barbaz"));
        assert!(m("colou?r", "color"));
        assert!(m("a{3}", "caaab"));
        assert!(!m("^a{3}$", "aa"));
        assert!(m("^a{2,3}$", "aaa"));
        assert!(!m("^a{2,3}$", "aaaa"));
        assert!(m("^a{2,}$", "aaaaa"));
        assert!(m("(a*)*b", "aaab"));
        assert!(m(".*?x", "abx"));
        assert!(m("a|", "zzz"));
    }

    #[test]
    fn case_insensitive() {
        assert!(m("(?i)RIP 0X[0-9A-F]+", "rip 0x40ab"));
        assert!(!m("RIP", "rip"));
        assert!(Pattern::parse("/emulation FAILURE/i")
            .unwrap()
            .is_match("Emulation failure at"));
    }

    #[test]
    fn pathological_is_linear() {
        let text = "a".repeat(5000);
        assert!(!m("(a*)*b", &text));
        assert!(!m("(a|aa)*c", &text));
    }

    #[test]
    fn errors() {
        for bad in ["(", "a)", "[a", "*a", "a{3,1}", r"\q", "(?=x)", "a\\"] {
            assert!(Regex::new(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn pattern_parse() {
        assert!(matches!(Pattern::parse("/a+/"), Ok(Pattern::Regex(_))));
        assert!(matches!(
            Pattern::parse("plain /text"),
            Ok(Pattern::Substring(_))
        ));
        assert!(matches!(Pattern::parse("/"), Ok(Pattern::Substring(_))));
        assert!(Pattern::parse("hello [").unwrap().is_match("say hello [x"));
        assert!(Pattern::parse("/(/").is_err());
        assert_eq!(Pattern::parse("/a+/").unwrap().to_string(), "/a+/");
        assert_eq!(Pattern::parse("x y").unwrap().to_string(), "\"x y\"");
    }
}
