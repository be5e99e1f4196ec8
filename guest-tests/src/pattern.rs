//! Output patterns for the manifest's `expect_output` key.
//!
//! A value written between slashes, `/.../` (optionally `/.../i` for a
//! case-insensitive match), is a regular expression; anything else is a plain
//! substring.  The regular expressions are a small dialect, matched with a
//! Pike VM (linear time, no backtracking):
//!
//! - literals; `.` (any character but a newline); `\d \D \w \W \s \S`;
//!   escapes `\n \r \t \\ \/ \.` and of every other punctuation character;
//! - classes `[abc]`, `[a-z0-9_]`, `[^...]` (with the escapes above inside);
//! - `^` and `$` match at the start and end of any line;
//! - groups `(...)` and `(?:...)`, alternation `|`;
//! - quantifiers `*`, `+`, `?`, `{n}`, `{n,}`, `{n,m}` (a trailing `?` for
//!   laziness is accepted and makes no difference to whether text matches);
//! - `(?i)` at the very start makes the whole expression case-insensitive.

use std::fmt;

/// An `expect_output` pattern: a substring or a regular expression.
#[derive(Clone, Debug)]
pub enum Pattern {
    /// The output must contain this text.
    Substring(String),
    /// The output must contain a match of this expression.
    Regex(Regex),
}

/// Error in a pattern, with a human-readable description.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad regular expression {pattern:?}: {message}")]
pub struct PatternError {
    /// The expression as written.
    pub pattern: String,
    /// What is wrong with it.
    pub message: String,
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
    prog: Vec<Inst>,
    icase: bool,
}

#[derive(Clone, Debug)]
enum Node {
    Empty,
    Char(char),
    Any,
    Class(Class),
    LineStart,
    LineEnd,
    Concat(Vec<Node>),
    Alt(Vec<Node>),
    Repeat(Box<Node>, u32, Option<u32>),
}

#[derive(Clone, Debug)]
struct Class {
    negated: bool,
    ranges: Vec<(char, char)>,
}

impl Class {
    fn matches(&self, c: char, icase: bool) -> bool {
        let hit = |c: char| self.ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi);
        let found =
            hit(c) || (icase && (hit(c.to_ascii_lowercase()) || hit(c.to_ascii_uppercase())));
        found != self.negated
    }
}

#[derive(Clone, Debug)]
enum Inst {
    Char(char),
    Any,
    Class(Class),
    LineStart,
    LineEnd,
    Split(usize, usize),
    Jmp(usize),
    Match,
}

/// Limit on the compiled program size (counted repetition expands).
const MAX_PROGRAM: usize = 20_000;

struct Parser<'a> {
    chars: Vec<char>,
    pos: usize,
    source: &'a str,
}

impl Parser<'_> {
    fn err(&self, message: impl Into<String>) -> PatternError {
        PatternError {
            pattern: self.source.to_string(),
            message: message.into(),
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn parse_alt(&mut self) -> Result<Node, PatternError> {
        let mut branches = vec![self.parse_concat()?];
        while self.eat('|') {
            branches.push(self.parse_concat()?);
        }
        Ok(if branches.len() == 1 {
            branches.pop().unwrap_or(Node::Empty)
        } else {
            Node::Alt(branches)
        })
    }

    fn parse_concat(&mut self) -> Result<Node, PatternError> {
        let mut items = Vec::new();
        while let Some(c) = self.peek() {
            if c == '|' || c == ')' {
                break;
            }
            let atom = self.parse_atom()?;
            let atom = self.parse_quantifiers(atom)?;
            items.push(atom);
        }
        Ok(match items.len() {
            0 => Node::Empty,
            1 => items.pop().unwrap_or(Node::Empty),
            _ => Node::Concat(items),
        })
    }

    fn parse_quantifiers(&mut self, mut atom: Node) -> Result<Node, PatternError> {
        loop {
            let (min, max) = match self.peek() {
                Some('*') => {
                    self.pos += 1;
                    (0, None)
                }
                Some('+') => {
                    self.pos += 1;
                    (1, None)
                }
                Some('?') => {
                    self.pos += 1;
                    (0, Some(1))
                }
                Some('{') => {
                    let save = self.pos;
                    match self.parse_braces()? {
                        Some(r) => r,
                        None => {
                            // Not a quantifier: `{` is a literal.
                            self.pos = save;
                            return Ok(atom);
                        }
                    }
                }
                _ => return Ok(atom),
            };
            if matches!(atom, Node::LineStart | Node::LineEnd | Node::Empty) {
                return Err(self.err("quantifier without an operand"));
            }
            self.eat('?'); // lazy: same match/no-match answer
            atom = Node::Repeat(Box::new(atom), min, max);
        }
    }

    /// Parses `{n}`, `{n,}` or `{n,m}` after the `{`; None if not one.
    fn parse_braces(&mut self) -> Result<Option<(u32, Option<u32>)>, PatternError> {
        self.pos += 1;
        let num = |p: &mut Self| -> Option<u32> {
            let start = p.pos;
            while p.peek().is_some_and(|c| c.is_ascii_digit()) {
                p.pos += 1;
            }
            p.chars[start..p.pos]
                .iter()
                .collect::<String>()
                .parse()
                .ok()
        };
        let Some(min) = num(self) else {
            return Ok(None);
        };
        let max = if self.eat(',') {
            if self.peek() == Some('}') {
                None
            } else {
                match num(self) {
                    Some(m) => Some(m),
                    None => return Ok(None),
                }
            }
        } else {
            Some(min)
        };
        if !self.eat('}') {
            return Ok(None);
        }
        if max.is_some_and(|m| m < min) {
            return Err(self.err(format!("bad repetition {{{min},{}}}", max.unwrap_or(0))));
        }
        if min > 1000 || max.is_some_and(|m| m > 1000) {
            return Err(self.err("repetition count above 1000"));
        }
        Ok(Some((min, max)))
    }

    fn parse_atom(&mut self) -> Result<Node, PatternError> {
        let c = self
            .peek()
            .ok_or_else(|| self.err("unexpected end of expression"))?;
        self.pos += 1;
        Ok(match c {
            '.' => Node::Any,
            '^' => Node::LineStart,
            '$' => Node::LineEnd,
            '(' => {
                if self.eat('?') && !self.eat(':') {
                    return Err(self.err("only (?:...) groups and a leading (?i) are supported"));
                }
                let inner = self.parse_alt()?;
                if !self.eat(')') {
                    return Err(self.err("missing )"));
                }
                inner
            }
            ')' => return Err(self.err("unmatched )")),
            '[' => Node::Class(self.parse_class()?),
            '*' | '+' | '?' => return Err(self.err(format!("nothing to repeat before {c}"))),
            '\\' => self.parse_escape()?,
            c => Node::Char(c),
        })
    }

    fn parse_escape(&mut self) -> Result<Node, PatternError> {
        let c = self.peek().ok_or_else(|| self.err("trailing backslash"))?;
        self.pos += 1;
        Ok(match c {
            'd' | 'D' | 'w' | 'W' | 's' | 'S' => Node::Class(perl_class(c)),
            'n' => Node::Char('\n'),
            'r' => Node::Char('\r'),
            't' => Node::Char('\t'),
            c if c.is_ascii_punctuation() || c == ' ' => Node::Char(c),
            c => return Err(self.err(format!("unsupported escape \\{c}"))),
        })
    }

    fn parse_class(&mut self) -> Result<Class, PatternError> {
        let negated = self.eat('^');
        let mut ranges = Vec::new();
        let mut first = true;
        loop {
            let c = self.peek().ok_or_else(|| self.err("missing ]"))?;
            self.pos += 1;
            if c == ']' && !first {
                break;
            }
            first = false;
            let lo = if c == '\\' {
                let e = self.peek().ok_or_else(|| self.err("trailing backslash"))?;
                self.pos += 1;
                match e {
                    'd' | 'D' | 'w' | 'W' | 's' | 'S' => {
                        let pc = perl_class(e);
                        if pc.negated {
                            return Err(self.err(format!("\\{e} is not supported inside [...]")));
                        }
                        ranges.extend(pc.ranges);
                        continue;
                    }
                    'n' => '\n',
                    'r' => '\r',
                    't' => '\t',
                    e if e.is_ascii_punctuation() || e == ' ' => e,
                    e => return Err(self.err(format!("unsupported escape \\{e}"))),
                }
            } else {
                c
            };
            if self.peek() == Some('-') && self.chars.get(self.pos + 1).is_some_and(|&n| n != ']') {
                self.pos += 1;
                let mut hi = self.peek().ok_or_else(|| self.err("missing ]"))?;
                self.pos += 1;
                if hi == '\\' {
                    hi = self.peek().ok_or_else(|| self.err("trailing backslash"))?;
                    self.pos += 1;
                }
                if hi < lo {
                    return Err(self.err(format!("bad class range {lo}-{hi}")));
                }
                ranges.push((lo, hi));
            } else {
                ranges.push((lo, lo));
            }
        }
        Ok(Class { negated, ranges })
    }
}

fn perl_class(c: char) -> Class {
    let ranges = match c.to_ascii_lowercase() {
        'd' => vec![('0', '9')],
        'w' => vec![('0', '9'), ('A', 'Z'), ('a', 'z'), ('_', '_')],
        _ => vec![(' ', ' '), ('\t', '\r')],
    };
    Class {
        negated: c.is_ascii_uppercase(),
        ranges,
    }
}

fn compile(node: &Node, prog: &mut Vec<Inst>) -> Result<(), String> {
    if prog.len() > MAX_PROGRAM {
        return Err("expression too large".into());
    }
    match node {
        Node::Empty => {}
        Node::Char(c) => prog.push(Inst::Char(*c)),
        Node::Any => prog.push(Inst::Any),
        Node::Class(c) => prog.push(Inst::Class(c.clone())),
        Node::LineStart => prog.push(Inst::LineStart),
        Node::LineEnd => prog.push(Inst::LineEnd),
        Node::Concat(items) => {
            for item in items {
                compile(item, prog)?;
            }
        }
        Node::Alt(branches) => {
            let mut jumps = Vec::new();
            for (i, b) in branches.iter().enumerate() {
                if i + 1 < branches.len() {
                    let split = prog.len();
                    prog.push(Inst::Split(split + 1, 0));
                    compile(b, prog)?;
                    jumps.push(prog.len());
                    prog.push(Inst::Jmp(0));
                    let next = prog.len();
                    prog[split] = Inst::Split(split + 1, next);
                } else {
                    compile(b, prog)?;
                }
            }
            let end = prog.len();
            for j in jumps {
                prog[j] = Inst::Jmp(end);
            }
        }
        Node::Repeat(body, min, max) => {
            for _ in 0..*min {
                compile(body, prog)?;
            }
            match max {
                None => {
                    let split = prog.len();
                    prog.push(Inst::Split(split + 1, 0));
                    compile(body, prog)?;
                    prog.push(Inst::Jmp(split));
                    let end = prog.len();
                    prog[split] = Inst::Split(split + 1, end);
                }
                Some(max) => {
                    let mut splits = Vec::new();
                    for _ in *min..*max {
                        splits.push(prog.len());
                        prog.push(Inst::Split(prog.len() + 1, 0));
                        compile(body, prog)?;
                        if prog.len() > MAX_PROGRAM {
                            return Err("expression too large".into());
                        }
                    }
                    let end = prog.len();
                    for s in splits {
                        prog[s] = Inst::Split(s + 1, end);
                    }
                }
            }
        }
    }
    Ok(())
}

impl Regex {
    /// Compiles `source`; see the module documentation for the syntax.
    pub fn new(source: &str) -> Result<Regex, PatternError> {
        let (icase, body) = match source.strip_prefix("(?i)") {
            Some(rest) => (true, rest),
            None => (false, source),
        };
        let mut p = Parser {
            chars: body.chars().collect(),
            pos: 0,
            source,
        };
        let node = p.parse_alt()?;
        if p.pos != p.chars.len() {
            return Err(p.err("unmatched )"));
        }
        let mut prog = Vec::new();
        compile(&node, &mut prog).map_err(|m| p.err(m))?;
        prog.push(Inst::Match);
        Ok(Regex {
            source: source.to_string(),
            prog,
            icase,
        })
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether `text` contains a match.
    pub fn is_match(&self, text: &str) -> bool {
        let chars: Vec<char> = text.chars().collect();
        let n = self.prog.len();
        let mut clist: Vec<usize> = Vec::with_capacity(n);
        let mut nlist: Vec<usize> = Vec::with_capacity(n);
        // mark[pc] == stamp means pc is already in the list being built.
        let mut mark = vec![usize::MAX; n];
        let mut stack = Vec::new();
        for pos in 0..=chars.len() {
            // Unanchored search: a new thread starts at every position.
            let stamp = pos;
            if self.add(&chars, pos, 0, &mut clist, &mut mark, stamp, &mut stack) {
                return true;
            }
            let Some(&c) = chars.get(pos) else {
                break;
            };
            nlist.clear();
            let next_stamp = pos + 1;
            for &pc in &clist {
                let ok = match &self.prog[pc] {
                    Inst::Char(x) => self.char_eq(c, *x),
                    Inst::Any => c != '\n',
                    Inst::Class(cl) => cl.matches(c, self.icase),
                    _ => false,
                };
                if ok
                    && self.add(
                        &chars,
                        pos + 1,
                        pc + 1,
                        &mut nlist,
                        &mut mark,
                        next_stamp,
                        &mut stack,
                    )
                {
                    return true;
                }
            }
            std::mem::swap(&mut clist, &mut nlist);
        }
        false
    }

    fn char_eq(&self, a: char, b: char) -> bool {
        a == b || (self.icase && a.to_lowercase().eq(b.to_lowercase()))
    }

    /// Adds the thread at `pc` (following jumps and assertions) to `list`;
    /// returns true if it reaches Match.
    #[allow(clippy::too_many_arguments)]
    fn add(
        &self,
        chars: &[char],
        pos: usize,
        pc: usize,
        list: &mut Vec<usize>,
        mark: &mut [usize],
        stamp: usize,
        stack: &mut Vec<usize>,
    ) -> bool {
        stack.clear();
        stack.push(pc);
        while let Some(pc) = stack.pop() {
            if mark[pc] == stamp {
                continue;
            }
            mark[pc] = stamp;
            match &self.prog[pc] {
                Inst::Match => return true,
                Inst::Jmp(x) => stack.push(*x),
                Inst::Split(x, y) => {
                    stack.push(*y);
                    stack.push(*x);
                }
                Inst::LineStart => {
                    if pos == 0 || chars[pos - 1] == '\n' {
                        stack.push(pc + 1);
                    }
                }
                Inst::LineEnd => {
                    if pos == chars.len() || chars[pos] == '\n' || chars[pos] == '\r' {
                        stack.push(pc + 1);
                    }
                }
                _ => list.push(pc),
            }
        }
        false
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
        assert!(m("x{", "x{"));
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
