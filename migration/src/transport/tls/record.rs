//! hopvm's own TLS 1.3 record layer (RFC 8446 §5), used once the handshake is over.
//!
//! rustls runs the handshake and derives the traffic keys; then (through its "kernel
//! connection" API, the one meant for kernel TLS offload) it hands the keys and sequence numbers
//! over, and [`super::TlsChannel`] seals and opens the records itself with ring's AEAD, in its
//! own buffers: the sender copies the pages once, into the record, and seals them there; the
//! receiver opens each record where the socket read put it. (rustls' buffered API copies every
//! record twice more on each side.) rustls still derives the next keys at a KeyUpdate.
//!
//! The wire is standard TLS 1.3: records of type application_data with the inner content type
//! at the end of the plaintext, the header as additional data, the nonce the IV XOR the
//! 64-bit record sequence number. Received handshake messages after the handshake are
//! KeyUpdate (the keys change; an `update_requested` is answered before the next data) and
//! NewSessionTicket (ignored: hopvm does not resume sessions); anything else ends the session.

use ring::aead::{
    Aad, Algorithm, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305,
};
use rustls::{AlertDescription, ConnectionTrafficSecrets};

/// A record header: type, legacy version, length.
pub const HEADER_LEN: usize = 5;
/// The AEAD tag at the end of every record.
pub const TAG_LEN: usize = 16;
/// The most plaintext a record carries.
pub const MAX_PLAIN: usize = 1 << 14;
/// The longest encrypted record body a peer may send (RFC 8446 §5.2: 2^14 + 256).
pub const MAX_CIPHERTEXT: usize = MAX_PLAIN + 256;
/// The longest record, header included.
pub const MAX_RECORD: usize = HEADER_LEN + MAX_CIPHERTEXT;
/// What a record adds to its content when hopvm seals it (no padding).
pub const OVERHEAD: usize = HEADER_LEN + 1 + TAG_LEN;

/// Content type of alerts.
pub const ALERT: u8 = 21;
/// Content type of handshake messages.
pub const HANDSHAKE: u8 = 22;
/// Content type of application data (and the outer type of every encrypted record).
pub const APPLICATION_DATA: u8 = 23;

const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;
/// The largest post-handshake message kept while it arrives (session tickets are small).
const MAX_HANDSHAKE_MESSAGE: usize = 64 << 10;

/// Errors of the record layer; each names the alert it sends the peer, if any.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A record longer than TLS allows.
    #[error("TLS record of {0} bytes, longer than TLS allows (record_overflow)")]
    Overflow(usize),
    /// A record too short to hold a tag and a content type.
    #[error("TLS record of {0} bytes, too short for an encrypted record (decode_error)")]
    TooShort(usize),
    /// A record whose outer type is not application_data (plaintext after the handshake).
    #[error("unexpected TLS record type {0} after the handshake (unexpected_message)")]
    OuterType(u8),
    /// Authentication failed: the record was altered, or is not the next one.
    #[error("TLS record failed authentication: altered, or out of sequence (bad_record_mac)")]
    BadRecordMac,
    /// A record whose plaintext is all padding.
    #[error("TLS record without a content type (unexpected_message)")]
    NoContentType,
    /// An inner content type TLS 1.3 does not allow here.
    #[error("unexpected TLS content type {0} (unexpected_message)")]
    InnerType(u8),
    /// Data while a handshake message is incomplete.
    #[error("TLS application data inside a handshake message (unexpected_message)")]
    Interleaved,
    /// An alert record that is not two bytes.
    #[error("malformed TLS alert (decode_error)")]
    BadAlert,
    /// The peer ended the session with an alert (rustls' wording).
    #[error("received fatal alert: {0:?}")]
    AlertReceived(AlertDescription),
    /// A handshake message that has no place after the handshake.
    #[error(
        "unexpected TLS handshake message of type {0} after the handshake (unexpected_message)"
    )]
    HandshakeMessage(u8),
    /// A malformed KeyUpdate, or one not at the end of its record.
    #[error("malformed TLS KeyUpdate (decode_error)")]
    BadKeyUpdate,
    /// A post-handshake message larger than hopvm keeps.
    #[error("TLS handshake message of {0} bytes after the handshake: too large")]
    HandshakeTooLarge(usize),
    /// 2^64 records under one key.
    #[error("TLS record sequence numbers exhausted")]
    SequenceExhausted,
    /// rustls could not derive the next traffic keys.
    #[error("cannot derive the next TLS traffic keys: {0}")]
    KeyUpdate(#[source] rustls::Error),
    /// Keys of a cipher suite this record layer does not know.
    #[error("the negotiated TLS cipher suite is not supported by hopvm's record layer")]
    UnsupportedSuite,
}

impl RecordError {
    /// The alert to send the peer for this error (none when the peer ended the session).
    pub fn alert(&self) -> Option<AlertDescription> {
        Some(match self {
            Self::Overflow(_) => AlertDescription::RecordOverflow,
            Self::TooShort(_) | Self::BadAlert | Self::BadKeyUpdate => {
                AlertDescription::DecodeError
            }
            Self::OuterType(_)
            | Self::NoContentType
            | Self::InnerType(_)
            | Self::Interleaved
            | Self::HandshakeMessage(_) => AlertDescription::UnexpectedMessage,
            Self::BadRecordMac => AlertDescription::BadRecordMac,
            Self::HandshakeTooLarge(_) => AlertDescription::HandshakeFailure,
            Self::SequenceExhausted | Self::KeyUpdate(_) | Self::UnsupportedSuite => {
                AlertDescription::InternalError
            }
            Self::AlertReceived(_) => return None,
        })
    }
}

/// One direction's traffic keys and its next record sequence number.
pub struct Keys {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Keys {
    /// Keys from rustls' secrets, starting at sequence number `seq`.
    pub fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Self, RecordError> {
        let (alg, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&CHACHA20_POLY1305, key, iv),
            _ => return Err(RecordError::UnsupportedSuite),
        };
        Self::from_parts(alg, key.as_ref(), iv.as_ref(), seq)
    }

    /// Keys for `alg` from their bytes.
    fn from_parts(
        alg: &'static Algorithm,
        key: &[u8],
        iv: &[u8],
        seq: u64,
    ) -> Result<Self, RecordError> {
        let key = UnboundKey::new(alg, key).map_err(|_| RecordError::UnsupportedSuite)?;
        let iv: [u8; 12] = iv.try_into().map_err(|_| RecordError::UnsupportedSuite)?;
        Ok(Self {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The sequence number of the next record.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The next record's nonce: the IV XOR the sequence number (RFC 8446 §5.3).
    fn next_nonce(&mut self) -> Result<Nonce, RecordError> {
        let seq = self.seq;
        self.seq = seq.checked_add(1).ok_or(RecordError::SequenceExhausted)?;
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(seq.to_be_bytes()) {
            *n ^= s;
        }
        Ok(Nonce::assume_unique_for_key(nonce))
    }

    /// Appends to `out` a record of content type `typ` whose `len` bytes of content `fill`
    /// appends (it must append exactly that many; at most [`MAX_PLAIN`]), sealed in place.
    pub fn seal(
        &mut self,
        out: &mut Vec<u8>,
        typ: u8,
        len: usize,
        fill: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), RecordError> {
        debug_assert!(len <= MAX_PLAIN);
        let start = out.len();
        let body = len + 1 + TAG_LEN;
        let header = [APPLICATION_DATA, 3, 3, (body >> 8) as u8, body as u8];
        out.extend_from_slice(&header);
        fill(out);
        debug_assert_eq!(out.len(), start + HEADER_LEN + len);
        out.push(typ);
        let nonce = self.next_nonce()?;
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut out[start + HEADER_LEN..])
            .map_err(|_| RecordError::UnsupportedSuite)?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Opens the whole record `record` (header included, as [`record_len`] measured it) in
    /// place: returns its content type and the length of its content, which is left at
    /// `record[HEADER_LEN..]`.
    pub fn open(&mut self, record: &mut [u8]) -> Result<(u8, usize), RecordError> {
        let (header, body) = record.split_at_mut(HEADER_LEN);
        let nonce = self.next_nonce()?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(&*header), body)
            .map_err(|_| RecordError::BadRecordMac)?;
        inner_content_type(plain)
    }
}

impl Keys {
    /// Opens the record of `len` bytes at `buf[src..]` (header included), writing its
    /// content to `buf[dst..]` (`dst` ≤ `src`: moved down while decrypted, no extra pass):
    /// returns its content type and the length of its content.
    pub fn open_to(
        &mut self,
        buf: &mut [u8],
        src: usize,
        len: usize,
        dst: usize,
    ) -> Result<(u8, usize), RecordError> {
        debug_assert!(dst <= src && len >= HEADER_LEN + TAG_LEN);
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&buf[src..src + HEADER_LEN]);
        let nonce = self.next_nonce()?;
        let plain = self
            .key
            .open_within(
                nonce,
                Aad::from(header),
                &mut buf[dst..src + len],
                src + HEADER_LEN - dst..,
            )
            .map_err(|_| RecordError::BadRecordMac)?;
        inner_content_type(plain)
    }
}

/// A decrypted TLS 1.3 record's content type and content length: the type is its last
/// non-zero byte, the zeros after it padding.
fn inner_content_type(plain: &[u8]) -> Result<(u8, usize), RecordError> {
    let end = plain
        .iter()
        .rposition(|&b| b != 0)
        .ok_or(RecordError::NoContentType)?;
    Ok((plain[end], end))
}

/// The length of the record at the start of `buf`, header included, once its header is
/// there; checks the header.
pub fn record_len(buf: &[u8]) -> Result<Option<usize>, RecordError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    if buf[0] != APPLICATION_DATA {
        return Err(RecordError::OuterType(buf[0]));
    }
    let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if len > MAX_CIPHERTEXT {
        return Err(RecordError::Overflow(len));
    }
    if len < TAG_LEN + 1 {
        return Err(RecordError::TooShort(len));
    }
    Ok(Some(HEADER_LEN + len))
}

/// What an alert record says.
#[derive(Debug, PartialEq, Eq)]
pub enum Alert {
    /// The peer's stream ended cleanly.
    CloseNotify,
    /// A warning that changes nothing (user_canceled, before a close_notify).
    Ignored,
}

/// Reads an alert record's content: close_notify, or the peer's fatal error.
pub fn parse_alert(content: &[u8]) -> Result<Alert, RecordError> {
    let &[_level, desc] = content else {
        return Err(RecordError::BadAlert);
    };
    match AlertDescription::from(desc) {
        AlertDescription::CloseNotify => Ok(Alert::CloseNotify),
        AlertDescription::UserCanceled => Ok(Alert::Ignored),
        d => Err(RecordError::AlertReceived(d)),
    }
}

/// The content of an alert record hopvm sends.
pub fn alert_content(desc: AlertDescription) -> [u8; 2] {
    let level = if desc == AlertDescription::CloseNotify {
        1
    } else {
        2
    };
    [level, u8::from(desc)]
}

/// The content of a KeyUpdate message.
pub fn key_update_content(update_requested: bool) -> [u8; 5] {
    [KEY_UPDATE, 0, 0, 1, u8::from(update_requested)]
}

/// A handshake message received after the handshake.
#[derive(Debug, PartialEq, Eq)]
pub enum PostHandshake {
    /// The peer's keys changed; `update_requested`: it asks this side to change its own.
    KeyUpdate {
        /// The peer asks for a KeyUpdate in return.
        update_requested: bool,
    },
    /// A session ticket (ignored).
    NewSessionTicket,
}

/// Takes the next complete handshake message off the front of `hs` (the handshake content
/// received so far); `None` until one is complete. `record_end`: nothing follows in the
/// record (a KeyUpdate must end its record, RFC 8446 §5.1).
pub fn next_post_handshake(
    hs: &mut Vec<u8>,
    record_end: bool,
) -> Result<Option<PostHandshake>, RecordError> {
    if hs.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([0, hs[1], hs[2], hs[3]]) as usize;
    if len > MAX_HANDSHAKE_MESSAGE {
        return Err(RecordError::HandshakeTooLarge(len));
    }
    if hs.len() < 4 + len {
        return Ok(None);
    }
    let msg = match hs[0] {
        KEY_UPDATE => {
            if len != 1 || hs[4] > 1 || hs.len() != 5 || !record_end {
                return Err(RecordError::BadKeyUpdate);
            }
            PostHandshake::KeyUpdate {
                update_requested: hs[4] == 1,
            }
        }
        NEW_SESSION_TICKET => PostHandshake::NewSessionTicket,
        t => return Err(RecordError::HandshakeMessage(t)),
    };
    hs.drain(..4 + len);
    Ok(Some(msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};

    /// Keys of suite 0 (AES-128-GCM), 1 (AES-256-GCM) or 2 (ChaCha20-Poly1305) made of
    /// `byte`, at sequence number `seq`.
    fn keys(byte: u8, suite: u8, seq: u64) -> Keys {
        let iv = [byte ^ 0x5a; 12];
        match suite {
            0 => Keys::from_parts(&AES_128_GCM, &[byte; 16], &iv, seq).unwrap(),
            // As rustls hands them over.
            1 => Keys::new(
                seq,
                ConnectionTrafficSecrets::Aes256Gcm {
                    key: AeadKey::from([byte; 32]),
                    iv: Iv::from(iv),
                },
            )
            .unwrap(),
            _ => Keys::new(
                seq,
                ConnectionTrafficSecrets::Chacha20Poly1305 {
                    key: AeadKey::from([byte; 32]),
                    iv: Iv::from(iv),
                },
            )
            .unwrap(),
        }
    }

    fn pair(suite: u8) -> (Keys, Keys) {
        (keys(7, suite, 0), keys(7, suite, 0))
    }

    /// Seals `data` as one record of type `typ`.
    fn sealed(k: &mut Keys, typ: u8, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        k.seal(&mut out, typ, data.len(), |o| o.extend_from_slice(data))
            .unwrap();
        out
    }

    #[test]
    fn round_trip_every_suite_and_size() {
        for suite in 0..3 {
            let (mut tx, mut rx) = pair(suite);
            for len in [0, 1, 4095, 4096, MAX_PLAIN] {
                let data: Vec<u8> = (0..len).map(|i| (i * 13 + suite as usize) as u8).collect();
                let mut rec = sealed(&mut tx, APPLICATION_DATA, &data);
                assert_eq!(rec.len(), len + OVERHEAD);
                assert_eq!(record_len(&rec).unwrap(), Some(rec.len()));
                // The plaintext is not on the wire.
                if len >= 64 {
                    assert!(!rec.windows(64).any(|w| w == &data[..64]));
                }
                let (typ, n) = rx.open(&mut rec).unwrap();
                assert_eq!((typ, n), (APPLICATION_DATA, len));
                assert_eq!(&rec[HEADER_LEN..HEADER_LEN + n], &data[..]);
            }
            assert_eq!((tx.seq(), rx.seq()), (5, 5));
        }
    }

    #[test]
    fn records_must_arrive_in_sequence() {
        let (mut tx, mut rx) = pair(0);
        let mut first = sealed(&mut tx, APPLICATION_DATA, b"one");
        let mut second = sealed(&mut tx, APPLICATION_DATA, b"two");
        // The second record first: its nonce is not the receiver's next one.
        assert!(matches!(
            rx.open(&mut second.clone()),
            Err(RecordError::BadRecordMac)
        ));
        // A receiver that starts at the right sequence number opens both in order.
        let mut rx = keys(7, 0, 0);
        assert_eq!(rx.open(&mut first).unwrap(), (APPLICATION_DATA, 3));
        assert_eq!(rx.open(&mut second).unwrap(), (APPLICATION_DATA, 3));
        // Keys taken over at sequence number 2 (as rustls hands them over after the
        // handshake) go on from there.
        let mut third = sealed(&mut tx, APPLICATION_DATA, b"three");
        let mut late = keys(7, 0, 2);
        assert_eq!(late.open(&mut third).unwrap(), (APPLICATION_DATA, 5));
    }

    #[test]
    fn a_tampered_record_is_refused() {
        let (mut tx, _) = pair(0);
        let rec = sealed(&mut tx, APPLICATION_DATA, &[0xab; 100]);
        // Any bit flipped in the header (the additional data), the body or the tag.
        for i in [1, 2, HEADER_LEN, HEADER_LEN + 50, rec.len() - 1] {
            let mut bad = rec.clone();
            bad[i] ^= 0x10;
            let mut rx = keys(7, 0, 0);
            let e = rx.open(&mut bad).unwrap_err();
            assert!(matches!(e, RecordError::BadRecordMac), "byte {i}: {e}");
            assert_eq!(e.alert(), Some(AlertDescription::BadRecordMac));
        }
        // Another key: refused as well.
        let mut other = keys(8, 0, 0);
        assert!(matches!(
            other.open(&mut rec.clone()),
            Err(RecordError::BadRecordMac)
        ));
    }

    #[test]
    fn headers_are_checked() {
        let (mut tx, _) = pair(0);
        let rec = sealed(&mut tx, APPLICATION_DATA, b"hello");
        // Truncated: not a record yet, whatever prefix has arrived.
        for n in 0..HEADER_LEN {
            assert_eq!(record_len(&rec[..n]).unwrap(), None);
        }
        assert_eq!(record_len(&rec[..HEADER_LEN]).unwrap(), Some(rec.len()));
        // A plaintext handshake record after the handshake.
        assert!(matches!(
            record_len(&[22, 3, 3, 0, 40]),
            Err(RecordError::OuterType(22))
        ));
        let big = (MAX_CIPHERTEXT + 1) as u16;
        assert!(matches!(
            record_len(&[23, 3, 3, (big >> 8) as u8, big as u8]),
            Err(RecordError::Overflow(_))
        ));
        assert!(matches!(
            record_len(&[23, 3, 3, 0, TAG_LEN as u8]),
            Err(RecordError::TooShort(16))
        ));
        // A record cut short (its length field says more): opening what is there fails
        // cleanly instead of reading past it.
        let mut rx = keys(7, 0, 0);
        let mut cut = rec[..rec.len() - 3].to_vec();
        assert!(matches!(rx.open(&mut cut), Err(RecordError::BadRecordMac)));
    }

    #[test]
    fn padding_and_content_types() {
        let (mut tx, mut rx) = pair(1);
        // Padded by the peer: zeros after the content type are dropped.
        let mut rec = sealed(&mut tx, 0, &[b'h', b'i', APPLICATION_DATA, 0, 0, 0]);
        assert_eq!(rx.open(&mut rec).unwrap(), (APPLICATION_DATA, 2));
        // All padding: no content type.
        let mut rec = sealed(&mut tx, 0, &[0, 0, 0]);
        assert!(matches!(rx.open(&mut rec), Err(RecordError::NoContentType)));
    }

    #[test]
    fn alerts() {
        assert_eq!(
            parse_alert(&alert_content(AlertDescription::CloseNotify)).unwrap(),
            Alert::CloseNotify
        );
        assert_eq!(alert_content(AlertDescription::CloseNotify), [1, 0]);
        assert_eq!(alert_content(AlertDescription::BadRecordMac), [2, 20]);
        assert_eq!(parse_alert(&[1, 90]).unwrap(), Alert::Ignored);
        let e = parse_alert(&[2, 48]).unwrap_err();
        assert_eq!(e.to_string(), "received fatal alert: UnknownCA");
        assert_eq!(e.alert(), None);
        assert!(matches!(parse_alert(&[2]), Err(RecordError::BadAlert)));
        assert!(matches!(
            parse_alert(&[2, 0, 0]),
            Err(RecordError::BadAlert)
        ));
    }

    #[test]
    fn post_handshake_messages() {
        let mut hs = key_update_content(true).to_vec();
        assert_eq!(
            next_post_handshake(&mut hs, true).unwrap(),
            Some(PostHandshake::KeyUpdate {
                update_requested: true
            })
        );
        assert!(hs.is_empty());
        // A KeyUpdate with more after it in its record.
        let mut hs = key_update_content(false).to_vec();
        assert!(matches!(
            next_post_handshake(&mut hs, false),
            Err(RecordError::BadKeyUpdate)
        ));
        let mut hs = vec![KEY_UPDATE, 0, 0, 1, 2];
        assert!(matches!(
            next_post_handshake(&mut hs, true),
            Err(RecordError::BadKeyUpdate)
        ));
        // A session ticket split over two records, then a KeyUpdate.
        let mut ticket = vec![NEW_SESSION_TICKET, 0, 0, 10];
        ticket.extend_from_slice(&[9; 10]);
        let mut hs = ticket[..7].to_vec();
        assert_eq!(next_post_handshake(&mut hs, true).unwrap(), None);
        hs.extend_from_slice(&ticket[7..]);
        hs.extend_from_slice(&key_update_content(false));
        assert_eq!(
            next_post_handshake(&mut hs, true).unwrap(),
            Some(PostHandshake::NewSessionTicket)
        );
        assert_eq!(
            next_post_handshake(&mut hs, true).unwrap(),
            Some(PostHandshake::KeyUpdate {
                update_requested: false
            })
        );
        // A ClientHello after the handshake (a renegotiation attempt).
        let mut hs = vec![1, 0, 0, 0];
        assert!(matches!(
            next_post_handshake(&mut hs, true),
            Err(RecordError::HandshakeMessage(1))
        ));
        let mut hs = vec![NEW_SESSION_TICKET, 0x10, 0, 0];
        assert!(matches!(
            next_post_handshake(&mut hs, true),
            Err(RecordError::HandshakeTooLarge(_))
        ));
    }
}
