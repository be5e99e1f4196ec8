//! QEMU-compatible streaming JSON: the lexer, message splitter, parser and writer QMP runs on.
//!
//! QMP has no framing: a client writes JSON values back to back, possibly split over many
//! `read`s, several on one line or one spread over many lines. QEMU cuts the byte stream into
//! messages with a lexer (`qobject/json-lexer.c`) and a brace counter (`json-streamer.c`), and
//! parses each message with `json-parser.c`. Clients rely on exactly how that machinery reacts
//! to bad input — which error text comes back, how many errors, and where parsing picks up
//! again — so [`JsonStreamParser`] is a port of it rather than a wrapper around `serde_json`:
//!
//! * the same token grammar, including QEMU's single-quoted strings and `\'` escape;
//! * a message ends as soon as the braces and brackets seen so far balance, so a stray scalar
//!   or `}` is a message of its own;
//! * a lexical error answers `JSON parse error, stray '…'` and the lexer skips input until a
//!   structural character, an ASCII control character (such as the newline) or a `0xFE`/`0xFF`
//!   byte, exactly like QEMU's `IN_RECOVERY` state;
//! * syntax errors carry QEMU's texts (`JSON parse error, expecting value`, `…, duplicate key`);
//! * strings are checked as QEMU's "modified UTF-8" (no noncharacters, no surrogates).
//!
//! Two deliberate differences, both to keep one bad message from poisoning the connection:
//!
//! * QEMU's limits (64 MiB a message, 2 Mi tokens, nesting 1024) are kept in spirit, but the
//!   size bound defaults to [`DEFAULT_MAX_MESSAGE_SIZE`] (1 MiB): a monitor command is never
//!   that large, and each connection may buffer that much. After a limit error QEMU keeps
//!   lexing the rest of the oversized message as new top-level input, answering one error per
//!   leftover token; here the rest of the input is skipped up to the next newline (or other
//!   control character, or `0xFE`/`0xFF`), so a 10 MiB line costs one error and no memory.
//! * QEMU's splitter tests `bracket_count >= 0` twice instead of also testing the brace count,
//!   so after `[}` it waits for the `]` forever; here a negative count of either kind ends the
//!   message (and the parser then answers `expecting value`).
//!
//! serde_json cannot take this part over: it reports its own error texts and positions, not
//! QEMU's, takes the last of duplicate keys, rejects single-quoted strings and accepts
//! noncharacters, and it needs the message already cut out. Everything else is serde_json: the
//! values are its [`Value`]s, and the writer ([`write_value`]) is its serializer with a
//! formatter (`QemuFormatter`) in the form of QEMU's `json-writer.c` — `", "` and `": "`
//! separators, pure-ASCII strings with `\uXXXX` escapes — so replies look byte-for-byte like
//! QEMU's.

use std::io;

use serde::Serialize;
use serde_json::ser::{CharEscape, Formatter};
use serde_json::{Map, Number, Value};

/// Default bound on one message: the bytes of its tokens (whitespace is free), or of one token.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1 << 20;
/// Default bound on the number of tokens in one message (QEMU's ratio of 32 bytes a token).
pub const DEFAULT_MAX_TOKEN_COUNT: usize = DEFAULT_MAX_MESSAGE_SIZE / 32;
/// Maximum nesting of objects and arrays, as in QEMU.
pub const MAX_NESTING: usize = 1024;

/// Why a message could not be turned into a JSON value. The texts are QEMU's, sent verbatim to
/// the client as the `desc` of a `GenericError`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QmpJsonError {
    /// The tokens do not form a JSON value.
    #[error("JSON parse error, {0}")]
    Syntax(String),
    /// A character that starts no token, or a malformed number, string or keyword.
    #[error("JSON parse error, stray '{0}'")]
    Stray(String),
    /// The message (or one token) is larger than the size limit.
    #[error("JSON token size limit exceeded")]
    TokenSize,
    /// The message has more tokens than the token limit.
    #[error("JSON token count limit exceeded")]
    TokenCount,
    /// Objects and arrays are nested deeper than the nesting limit.
    #[error("JSON nesting depth limit exceeded")]
    Nesting,
}

/// Resource bounds for one [`JsonStreamParser`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonLimits {
    /// Bytes of tokens in one message; also the longest single token.
    pub max_message_size: usize,
    /// Tokens in one message.
    pub max_token_count: usize,
    /// Depth of nested objects and arrays.
    pub max_nesting: usize,
}

impl Default for JsonLimits {
    fn default() -> Self {
        Self {
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_token_count: DEFAULT_MAX_TOKEN_COUNT,
            max_nesting: MAX_NESTING,
        }
    }
}

/// Lexer states, named after QEMU's `IN_*` states, plus [`Lex::Skip`] for limit recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    Recovery,
    DqStringEscape,
    DqString,
    SqStringEscape,
    SqString,
    Zero,
    ExpDigits,
    ExpSign,
    ExpE,
    Mantissa,
    MantissaDigits,
    Digits,
    Sign,
    Keyword,
    Start,
    /// After a limit error: discard input up to a resynchronisation byte.
    Skip,
}

/// Token types handed from the lexer to the splitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Integer,
    Float,
    Keyword,
    String,
}

/// What the lexer does with one byte in one state.
enum Step {
    /// Consume the byte and move to a state.
    To(Lex),
    /// Consume the byte, which completes a token.
    Emit(Kind),
    /// The token ended before this byte; look at the byte again from the start state.
    EmitLookahead(Kind),
    /// Consume the byte, which makes the token invalid.
    Error,
    /// Consume whitespace between tokens.
    Space,
    /// Leave recovery; look at the byte again from the start state.
    Resync,
}

/// QEMU's lexer transition table (`json_lexer[][]`), without interpolation.
fn step(state: Lex, b: u8) -> Step {
    use Step::*;
    match state {
        Lex::Recovery | Lex::Skip => match b {
            b'\t' => To(state),
            0..=0x1f | 0xfe | 0xff => Resync,
            b'[' | b']' | b'{' | b'}' | b':' | b',' if state == Lex::Recovery => Resync,
            _ => To(state),
        },
        Lex::DqStringEscape => match b {
            0x20..=0xfd => To(Lex::DqString),
            _ => Error,
        },
        Lex::DqString => match b {
            b'\\' => To(Lex::DqStringEscape),
            b'"' => Emit(Kind::String),
            0x20..=0xfd => To(Lex::DqString),
            _ => Error,
        },
        Lex::SqStringEscape => match b {
            0x20..=0xfd => To(Lex::SqString),
            _ => Error,
        },
        Lex::SqString => match b {
            b'\\' => To(Lex::SqStringEscape),
            b'\'' => Emit(Kind::String),
            0x20..=0xfd => To(Lex::SqString),
            _ => Error,
        },
        Lex::Zero => match b {
            b'0'..=b'9' => Error,
            b'.' => To(Lex::Mantissa),
            _ => EmitLookahead(Kind::Integer),
        },
        Lex::ExpDigits => match b {
            b'0'..=b'9' => To(Lex::ExpDigits),
            _ => EmitLookahead(Kind::Float),
        },
        Lex::ExpSign => match b {
            b'0'..=b'9' => To(Lex::ExpDigits),
            _ => Error,
        },
        Lex::ExpE => match b {
            b'-' | b'+' => To(Lex::ExpSign),
            b'0'..=b'9' => To(Lex::ExpDigits),
            _ => Error,
        },
        Lex::MantissaDigits => match b {
            b'0'..=b'9' => To(Lex::MantissaDigits),
            b'e' | b'E' => To(Lex::ExpE),
            _ => EmitLookahead(Kind::Float),
        },
        Lex::Mantissa => match b {
            b'0'..=b'9' => To(Lex::MantissaDigits),
            _ => Error,
        },
        Lex::Digits => match b {
            b'0'..=b'9' => To(Lex::Digits),
            b'e' | b'E' => To(Lex::ExpE),
            b'.' => To(Lex::Mantissa),
            _ => EmitLookahead(Kind::Integer),
        },
        Lex::Sign => match b {
            b'0' => To(Lex::Zero),
            b'1'..=b'9' => To(Lex::Digits),
            _ => Error,
        },
        Lex::Keyword => match b {
            b'a'..=b'z' => To(Lex::Keyword),
            _ => EmitLookahead(Kind::Keyword),
        },
        Lex::Start => match b {
            b'"' => To(Lex::DqString),
            b'\'' => To(Lex::SqString),
            b'0' => To(Lex::Zero),
            b'1'..=b'9' => To(Lex::Digits),
            b'-' => To(Lex::Sign),
            b'{' => Emit(Kind::LCurly),
            b'}' => Emit(Kind::RCurly),
            b'[' => Emit(Kind::LSquare),
            b']' => Emit(Kind::RSquare),
            b',' => Emit(Kind::Comma),
            b':' => Emit(Kind::Colon),
            b'a'..=b'z' => To(Lex::Keyword),
            b' ' | b'\t' | b'\r' | b'\n' => Space,
            _ => Error,
        },
    }
}

/// One token of the message being collected: its type and its bytes in `JsonStreamParser::text`.
#[derive(Debug, Clone, Copy)]
struct Token {
    kind: Kind,
    start: usize,
    end: usize,
}

/// Splits a QMP byte stream into JSON values, QEMU style.
///
/// Feed it whatever `read` returned; it calls the sink once per complete message with the
/// value or the error QEMU would report, and keeps at most one message's worth of input.
#[derive(Debug)]
pub struct JsonStreamParser {
    limits: JsonLimits,
    state: Lex,
    /// The token being lexed.
    token: Vec<u8>,
    /// The bytes of the message's completed tokens, back to back.
    text: Vec<u8>,
    /// The message's completed tokens.
    tokens: Vec<Token>,
    brace_count: i64,
    bracket_count: i64,
}

impl Default for JsonStreamParser {
    fn default() -> Self {
        Self::new(JsonLimits::default())
    }
}

impl JsonStreamParser {
    /// A parser with the given bounds, waiting for the first byte of a message.
    pub fn new(limits: JsonLimits) -> Self {
        Self {
            limits,
            state: Lex::Start,
            token: Vec::new(),
            text: Vec::new(),
            tokens: Vec::new(),
            brace_count: 0,
            bracket_count: 0,
        }
    }

    /// Bytes held for the message in progress (for tests of the memory bound).
    pub fn buffered_len(&self) -> usize {
        self.token.len() + self.text.len()
    }

    /// Whether input is being discarded after a limit error, until the next newline.
    pub fn is_skipping(&self) -> bool {
        self.state == Lex::Skip
    }

    /// Consumes `data`, calling `sink` for every message it completes.
    pub fn feed(&mut self, data: &[u8], sink: &mut dyn FnMut(Result<Value, QmpJsonError>)) {
        for &b in data {
            self.feed_byte(b, sink);
        }
    }

    fn feed_byte(&mut self, b: u8, sink: &mut dyn FnMut(Result<Value, QmpJsonError>)) {
        loop {
            match step(self.state, b) {
                Step::To(next) => {
                    if !matches!(next, Lex::Recovery | Lex::Skip) {
                        self.token.push(b);
                    }
                    self.state = next;
                    break;
                }
                Step::Space => {
                    self.state = Lex::Start;
                    break;
                }
                Step::Emit(kind) => {
                    self.token.push(b);
                    self.state = self.end_token(kind, sink);
                    break;
                }
                Step::EmitLookahead(kind) => {
                    self.state = self.end_token(kind, sink);
                }
                Step::Error => {
                    self.token.push(b);
                    let stray = String::from_utf8_lossy(&self.token).into_owned();
                    self.token.clear();
                    self.reset_message();
                    sink(Err(QmpJsonError::Stray(stray)));
                    self.state = Lex::Recovery;
                    break;
                }
                Step::Resync => {
                    self.state = Lex::Start;
                }
            }
        }
        // Do not let a single token grow without bound.
        if self.token.len() > self.limits.max_message_size {
            self.token.clear();
            self.reset_message();
            sink(Err(QmpJsonError::TokenSize));
            self.state = Lex::Skip;
        }
    }

    /// Hands the finished token to the splitter; returns the lexer's next state.
    fn end_token(&mut self, kind: Kind, sink: &mut dyn FnMut(Result<Value, QmpJsonError>)) -> Lex {
        let limit = self.process_token(kind, sink);
        self.token.clear();
        if limit {
            Lex::Skip
        } else {
            Lex::Start
        }
    }

    /// QEMU's `json_message_process_token`. Returns true when a limit was hit.
    fn process_token(
        &mut self,
        kind: Kind,
        sink: &mut dyn FnMut(Result<Value, QmpJsonError>),
    ) -> bool {
        match kind {
            Kind::LCurly => self.brace_count += 1,
            Kind::RCurly => self.brace_count -= 1,
            Kind::LSquare => self.bracket_count += 1,
            Kind::RSquare => self.bracket_count -= 1,
            _ => {}
        }
        let limit_error = if self.text.len() + self.token.len() + 1 > self.limits.max_message_size {
            Some(QmpJsonError::TokenSize)
        } else if self.tokens.len() + 1 > self.limits.max_token_count {
            Some(QmpJsonError::TokenCount)
        } else if self.brace_count + self.bracket_count > self.limits.max_nesting as i64 {
            Some(QmpJsonError::Nesting)
        } else {
            None
        };
        if let Some(error) = limit_error {
            self.reset_message();
            sink(Err(error));
            return true;
        }

        let start = self.text.len();
        self.text.extend_from_slice(&self.token);
        self.tokens.push(Token {
            kind,
            start,
            end: self.text.len(),
        });

        if (self.brace_count > 0 || self.bracket_count > 0)
            && self.brace_count >= 0
            && self.bracket_count >= 0
        {
            return false;
        }
        let result = Parser {
            tokens: &self.tokens,
            text: &self.text,
            pos: 0,
        }
        .parse();
        self.reset_message();
        sink(result);
        false
    }

    fn reset_message(&mut self) {
        self.text.clear();
        self.tokens.clear();
        self.brace_count = 0;
        self.bracket_count = 0;
        // Give back the memory of an unusually large message.
        if self.text.capacity() > 64 * 1024 {
            self.text.shrink_to(4096);
        }
        if self.tokens.capacity() > 4096 {
            self.tokens.shrink_to(256);
        }
        if self.token.capacity() > 64 * 1024 {
            self.token.shrink_to(4096);
        }
    }
}

/// A recursive-descent parser over one message's tokens (QEMU's `json-parser.c`). The first
/// error wins, as in QEMU. Recursion is bounded by the splitter's nesting limit.
struct Parser<'a> {
    tokens: &'a [Token],
    text: &'a [u8],
    pos: usize,
}

type ParseResult<T> = Result<T, String>;

impl Parser<'_> {
    fn parse(mut self) -> Result<Value, QmpJsonError> {
        self.parse_value().map_err(QmpJsonError::Syntax)
    }

    fn peek(&self) -> Option<Token> {
        self.tokens.get(self.pos).copied()
    }

    fn pop(&mut self) -> ParseResult<Token> {
        let token = self.peek().ok_or_else(|| "premature EOI".to_string())?;
        self.pos += 1;
        Ok(token)
    }

    fn bytes(&self, token: Token) -> &[u8] {
        self.text.get(token.start..token.end).unwrap_or_default()
    }

    fn parse_value(&mut self) -> ParseResult<Value> {
        let token = self.peek().ok_or_else(|| "premature EOI".to_string())?;
        match token.kind {
            Kind::LCurly => self.parse_object(),
            Kind::LSquare => self.parse_array(),
            Kind::Integer | Kind::Float | Kind::String => self.parse_literal(),
            Kind::Keyword => self.parse_keyword(),
            _ => Err("expecting value".to_string()),
        }
    }

    fn parse_pair(&mut self, map: &mut Map<String, Value>) -> ParseResult<()> {
        let Value::String(key) = self.parse_value()? else {
            return Err("key is not a string in object".to_string());
        };
        if self.pop()?.kind != Kind::Colon {
            return Err("missing : in object pair".to_string());
        }
        let value = self.parse_value()?;
        if map.contains_key(&key) {
            return Err("duplicate key".to_string());
        }
        map.insert(key, value);
        Ok(())
    }

    fn parse_object(&mut self) -> ParseResult<Value> {
        self.pop()?; // '{'
        let mut map = Map::new();
        if self.peek().ok_or_else(|| "premature EOI".to_string())?.kind == Kind::RCurly {
            self.pop()?;
            return Ok(Value::Object(map));
        }
        self.parse_pair(&mut map)?;
        loop {
            match self.pop()?.kind {
                Kind::RCurly => return Ok(Value::Object(map)),
                Kind::Comma => self.parse_pair(&mut map)?,
                _ => return Err("expected separator in dict".to_string()),
            }
        }
    }

    fn parse_array(&mut self) -> ParseResult<Value> {
        self.pop()?; // '['
        let mut list = Vec::new();
        if self.peek().ok_or_else(|| "premature EOI".to_string())?.kind == Kind::RSquare {
            self.pop()?;
            return Ok(Value::Array(list));
        }
        list.push(self.parse_value()?);
        loop {
            match self.pop()?.kind {
                Kind::RSquare => return Ok(Value::Array(list)),
                Kind::Comma => list.push(self.parse_value()?),
                _ => return Err("expected separator in list".to_string()),
            }
        }
    }

    fn parse_keyword(&mut self) -> ParseResult<Value> {
        let token = self.pop()?;
        match self.bytes(token) {
            b"true" => Ok(Value::Bool(true)),
            b"false" => Ok(Value::Bool(false)),
            b"null" => Ok(Value::Null),
            other => Err(format!(
                "invalid keyword '{}'",
                String::from_utf8_lossy(other)
            )),
        }
    }

    fn parse_literal(&mut self) -> ParseResult<Value> {
        let token = self.pop()?;
        let bytes = self.bytes(token);
        if token.kind == Kind::String {
            return parse_string(bytes).map(Value::String);
        }
        // The lexer only lets through ASCII digits, signs, '.', 'e' and 'E'.
        let text = std::str::from_utf8(bytes).unwrap_or_default();
        if token.kind == Kind::Integer {
            // Like QEMU: int64 if possible, else uint64, else a double.
            if let Ok(value) = text.parse::<i64>() {
                return Ok(Value::Number(value.into()));
            }
            if !text.starts_with('-') {
                if let Ok(value) = text.parse::<u64>() {
                    return Ok(Value::Number(value.into()));
                }
            }
        }
        let value: f64 = text.parse().unwrap_or(f64::NAN);
        Number::from_f64(value)
            .map(Value::Number)
            .ok_or_else(|| format!("number {text} is out of range"))
    }
}

/// Value of the four hex digits at `s[at..]`, or -1 (QEMU's `cvt4hex`).
fn cvt4hex(s: &[u8], at: usize) -> i64 {
    let mut cp = 0i64;
    for i in 0..4 {
        let Some(digit) = s.get(at + i).and_then(|&b| (b as char).to_digit(16)) else {
            return -1;
        };
        cp = (cp << 4) | i64::from(digit);
    }
    cp
}

/// Whether QEMU's `mod_utf8_encode` accepts the code point.
fn is_valid_codepoint(cp: i64) -> bool {
    (0..=0x10ffff).contains(&cp)
        && !(0xfdd0..=0xfdef).contains(&cp)
        && (cp & 0xfffe) != 0xfffe
        && !(0xd800..=0xdfff).contains(&cp)
}

/// Decodes the modified UTF-8 sequence at the start of `s` (QEMU's `mod_utf8_codepoint`):
/// returns the code point and its length, or `None` if it is invalid.
fn mod_utf8_codepoint(s: &[u8]) -> Option<(char, usize)> {
    const MIN_CP: [i64; 5] = [0x80, 0x800, 0x10000, 0x20_0000, 0x400_0000];
    let &first = s.first()?;
    if first < 0x80 {
        return Some((char::from(first), 1));
    }
    if first >= 0xfe || first & 0x40 == 0 {
        return None; // impossible byte, or unexpected continuation byte
    }
    let len = first.leading_ones() as usize;
    let mut cp = i64::from(first & (0x7f >> len));
    for i in 1..len {
        let byte = s.get(i).copied().unwrap_or(0);
        if byte & 0xc0 != 0x80 {
            return None; // continuation byte missing
        }
        cp = (cp << 6) | i64::from(byte & 0x3f);
    }
    let overlong = cp < MIN_CP[len - 2] && !(cp == 0 && len == 2);
    if overlong || !is_valid_codepoint(cp) {
        return None;
    }
    char::from_u32(u32::try_from(cp).ok()?).map(|c| (c, len))
}

/// Decodes a string token, quotes included (QEMU's `parse_string`).
fn parse_string(token: &[u8]) -> ParseResult<String> {
    let Some((&quote, rest)) = token.split_first() else {
        return Ok(String::new());
    };
    let mut out = String::new();
    let mut i = 0;
    while let Some(&b) = rest.get(i) {
        if b == quote {
            break;
        }
        if b != b'\\' {
            let (c, len) = mod_utf8_codepoint(&rest[i..])
                .ok_or_else(|| "invalid UTF-8 sequence in string".to_string())?;
            out.push(c);
            i += len;
            continue;
        }
        let begin = i;
        let escape = rest.get(i + 1).copied();
        i += 2;
        let c = match escape {
            Some(b'"') => '"',
            Some(b'\'') => '\'',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => {
                let mut cp = cvt4hex(rest, i);
                i += 4;
                if (0xd800..=0xdbff).contains(&cp)
                    && rest.get(i) == Some(&b'\\')
                    && rest.get(i + 1) == Some(&b'u')
                {
                    // A leading surrogate followed by \u: it must be a trailing surrogate.
                    let trailing = cvt4hex(rest, i + 2);
                    if (0xdc00..=0xdfff).contains(&trailing) {
                        cp = 0x10000 + ((cp & 0x3ff) << 10) + (trailing & 0x3ff);
                        i += 6;
                    } else {
                        cp = -1;
                    }
                }
                match u32::try_from(cp).ok().filter(|_| is_valid_codepoint(cp)) {
                    Some(cp) => char::from_u32(cp).unwrap_or(char::REPLACEMENT_CHARACTER),
                    None => {
                        let shown = rest.get(begin..i.min(rest.len())).unwrap_or_default();
                        return Err(format!(
                            "{} is not a valid Unicode character",
                            String::from_utf8_lossy(shown)
                        ));
                    }
                }
            }
            _ => return Err("invalid escape sequence in string".to_string()),
        };
        out.push(c);
    }
    Ok(out)
}

/// serde_json's output in the form of QEMU's JSON writer (`json-writer.c`, compact form):
/// `", "` and `": "` separators, and pure-ASCII strings escaped like its `quoted_str`
/// (`\uXXXX` in upper case, a surrogate pair past the BMP, DEL escaped too).
struct QemuFormatter;

impl QemuFormatter {
    fn write_u_escape<W: ?Sized + io::Write>(w: &mut W, unit: u32) -> io::Result<()> {
        write!(w, "\\u{unit:04X}")
    }
}

impl Formatter for QemuFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        // The same separator as between list items.
        self.begin_array_value(w, first)
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        // serde_json escapes the quote, the backslash and C0 controls itself
        // ([`Formatter::write_char_escape`]); everything else outside printable ASCII is
        // escaped here.
        let mut plain = 0;
        for (i, c) in fragment.char_indices() {
            if (' '..'\u{7f}').contains(&c) {
                continue;
            }
            w.write_all(&fragment.as_bytes()[plain..i])?;
            plain = i + c.len_utf8();
            let cp = u32::from(c);
            if cp > 0xffff {
                let cp = cp - 0x10000;
                Self::write_u_escape(w, 0xd800 + (cp >> 10))?;
                Self::write_u_escape(w, 0xdc00 + (cp & 0x3ff))?;
            } else {
                Self::write_u_escape(w, cp)?;
            }
        }
        w.write_all(&fragment.as_bytes()[plain..])
    }

    fn write_char_escape<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        escape: CharEscape,
    ) -> io::Result<()> {
        let text: &[u8] = match escape {
            CharEscape::Quote => b"\\\"",
            CharEscape::ReverseSolidus => b"\\\\",
            CharEscape::Solidus => b"\\/",
            CharEscape::Backspace => b"\\b",
            CharEscape::FormFeed => b"\\f",
            CharEscape::LineFeed => b"\\n",
            CharEscape::CarriageReturn => b"\\r",
            CharEscape::Tab => b"\\t",
            CharEscape::AsciiControl(byte) => return Self::write_u_escape(w, u32::from(byte)),
        };
        w.write_all(text)
    }
}

/// Appends `value` serialised in QEMU's form ([`QemuFormatter`]).
fn write_qemu<T: Serialize + ?Sized>(out: &mut String, value: &T) {
    let mut bytes = Vec::new();
    // Serialising a JSON value or a string into memory cannot fail, and the formatter writes
    // only ASCII.
    if value
        .serialize(&mut serde_json::Serializer::with_formatter(
            &mut bytes,
            QemuFormatter,
        ))
        .is_ok()
    {
        out.push_str(&String::from_utf8_lossy(&bytes));
    }
}

/// Appends `value` to `out` formatted like QEMU's JSON writer (compact form).
pub fn write_value(out: &mut String, value: &Value) {
    write_qemu(out, value);
}

/// `value` formatted like QEMU's JSON writer.
pub fn to_qemu_json(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value);
    out
}

/// Appends `s` as a JSON string, escaped like QEMU's `quoted_str` (pure ASCII output).
pub fn write_str(out: &mut String, s: &str) {
    write_qemu(out, s);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(input: &[u8]) -> Vec<Result<Value, String>> {
        let mut parser = JsonStreamParser::default();
        let mut out = Vec::new();
        parser.feed(input, &mut |r| out.push(r.map_err(|e| e.to_string())));
        out
    }

    fn ok(s: &str) -> Result<Value, String> {
        Ok(serde_json::from_str(s).unwrap())
    }

    fn err(s: &str) -> Result<Value, String> {
        Err(s.to_string())
    }

    #[test]
    fn splits_messages_like_qemu() {
        assert_eq!(
            parse_all(b"{\"a\":\n1}{\"b\": [1, 2.5, -3, true, null]}\n 7 \"x\""),
            vec![
                ok(r#"{"a":1}"#),
                ok(r#"{"b":[1,2.5,-3,true,null]}"#),
                ok("7"),
                ok(r#""x""#)
            ]
        );
        // A message is complete only at the closing brace, even across feeds.
        let mut parser = JsonStreamParser::default();
        let mut out = Vec::new();
        parser.feed(b"{\"execute\": \"st", &mut |r| out.push(r));
        assert!(out.is_empty());
        parser.feed(b"op\"}", &mut |r| out.push(r));
        assert_eq!(out, vec![Ok(serde_json::json!({"execute": "stop"}))]);
    }

    #[test]
    fn syntax_errors_have_qemu_texts() {
        assert_eq!(
            parse_all(b"{\"a\": 1,}"),
            vec![err("JSON parse error, expecting value")]
        );
        assert_eq!(
            parse_all(b"}"),
            vec![err("JSON parse error, expecting value")]
        );
        assert_eq!(
            parse_all(b"{\"a\" 1}"),
            vec![err("JSON parse error, missing : in object pair")]
        );
        assert_eq!(
            parse_all(b"{1: 1}"),
            vec![err("JSON parse error, key is not a string in object")]
        );
        assert_eq!(
            parse_all(b"{\"a\": 1 \"b\": 2}"),
            vec![err("JSON parse error, expected separator in dict")]
        );
        assert_eq!(
            parse_all(b"[1 2]"),
            vec![err("JSON parse error, expected separator in list")]
        );
        assert_eq!(
            parse_all(b"{\"a\": 1, \"a\": 2}"),
            vec![err("JSON parse error, duplicate key")]
        );
        assert_eq!(
            parse_all(b"nul\n"),
            vec![err("JSON parse error, invalid keyword 'nul'")]
        );
        assert_eq!(
            parse_all(b"\"\\x\""),
            vec![err("JSON parse error, invalid escape sequence in string")]
        );
        assert_eq!(
            parse_all(b"\"\\uD800\""),
            vec![err(
                "JSON parse error, \\uD800 is not a valid Unicode character"
            )]
        );
        assert_eq!(
            parse_all(b"\"\xc3\x28\""),
            vec![err("JSON parse error, invalid UTF-8 sequence in string")]
        );
    }

    #[test]
    fn lexical_errors_recover_like_qemu() {
        // The stray byte is reported, then input is skipped up to the newline.
        assert_eq!(
            parse_all(b"@@@ junk\n{\"a\": 1}"),
            vec![err("JSON parse error, stray '@'"), ok(r#"{"a":1}"#)]
        );
        // Recovery also stops at structural characters.
        assert_eq!(
            parse_all(b"{\"a\": @}"),
            vec![
                err("JSON parse error, stray '@'"),
                err("JSON parse error, expecting value")
            ]
        );
        assert_eq!(parse_all(b"01"), vec![err("JSON parse error, stray '01'")]);
        // QEMU extensions: single quotes and \' escapes.
        assert_eq!(parse_all(b"'it\\'s \"x\"'"), vec![ok(r#""it's \"x\"""#)]);
    }

    #[test]
    fn numbers_follow_qemu_typing() {
        let out = parse_all(
            b"[9223372036854775807, 18446744073709551615, -9223372036854775809, 1e3, 1.5]",
        );
        let Ok(Value::Array(items)) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(items[0].as_i64(), Some(i64::MAX));
        assert_eq!(items[1].as_u64(), Some(u64::MAX));
        assert!(items[2].is_f64());
        assert!(items[3].is_f64());
        assert_eq!(items[4].as_f64(), Some(1.5));
    }

    #[test]
    fn strings_decode_escapes_and_surrogates() {
        assert_eq!(
            parse_all(b"\"a\\n\\u00e9\\ud83d\\ude00\\/\""),
            vec![Ok(Value::String("a\n\u{e9}\u{1f600}/".into()))]
        );
    }

    #[test]
    fn limits_are_enforced_and_recovered_from() {
        let limits = JsonLimits {
            max_message_size: 1024,
            max_token_count: 64,
            max_nesting: 8,
        };
        let mut parser = JsonStreamParser::new(limits);
        let mut out = Vec::new();
        let mut input = b"{\"a\": \"".to_vec();
        input.extend(std::iter::repeat_n(b'x', 100_000));
        input.extend(b"\"}\n{\"b\": 1}");
        parser.feed(&input, &mut |r| {
            out.push(r.map_err(|e| e.to_string()));
        });
        assert_eq!(
            out,
            vec![err("JSON token size limit exceeded"), ok(r#"{"b":1}"#)]
        );

        out.clear();
        parser.feed(b"[[[[[[[[[[1]]]]]]]]]]\n[1]", &mut |r| {
            out.push(r.map_err(|e| e.to_string()));
        });
        assert_eq!(
            out,
            vec![err("JSON nesting depth limit exceeded"), ok("[1]")]
        );

        out.clear();
        let many = format!("[{}1]\n[2]", "1,".repeat(100));
        parser.feed(many.as_bytes(), &mut |r| {
            out.push(r.map_err(|e| e.to_string()))
        });
        assert_eq!(out, vec![err("JSON token count limit exceeded"), ok("[2]")]);
    }

    #[test]
    fn memory_stays_bounded_on_huge_input() {
        let mut parser = JsonStreamParser::default();
        let chunk = vec![b'1'; 64 * 1024];
        let mut errors = 0;
        parser.feed(b"[\"", &mut |_| errors += 1);
        for _ in 0..160 {
            parser.feed(&chunk, &mut |_| errors += 1);
            assert!(parser.buffered_len() <= DEFAULT_MAX_MESSAGE_SIZE + 1);
        }
        assert_eq!(errors, 1);
        assert!(parser.is_skipping());
    }

    #[test]
    fn writer_matches_qemu_format() {
        let value = serde_json::json!({"a": [1, "x\u{e9}\u{1f600}\n"], "b": {}});
        assert_eq!(
            to_qemu_json(&value),
            r#"{"a": [1, "x\u00E9\uD83D\uDE00\n"], "b": {}}"#
        );
        let value = serde_json::json!([
            "\"\\/\u{8}\u{c}\r\t\u{1}\u{1f}\u{7f} ~\u{ffff}",
            -1.5,
            1e300,
            u64::MAX,
            i64::MIN,
            null,
            true,
            []
        ]);
        assert_eq!(
            to_qemu_json(&value),
            r#"["\"\\/\b\f\r\t\u0001\u001F\u007F ~\uFFFF", -1.5, 1e+300, 18446744073709551615, -9223372036854775808, null, true, []]"#
        );
    }
}
