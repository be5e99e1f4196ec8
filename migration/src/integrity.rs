//! The `x-integrity` capability: a checksum after every section part, verified on load.
//!
//! QEMU's stream has no checksums: a changed byte in a page record or in a device's state
//! loads silently. With `x-integrity` on (on both ends, like every capability that changes
//! the stream), hopvm's [`StreamWriter`](crate::StreamWriter) follows every section footer —
//! so every RAM part (one batch of page records), every START and END, and every device's
//! FULL section — with an *integrity record*, and ends the stream with one more after the VM
//! description:
//!
//! ```text
//! integrity := u8 0x49 ('I'), be32 section id (0xffffffff after the description),
//!              be64 XXH3-64 of every stream byte before this record
//! ```
//!
//! The digest is a running one over the whole stream from its first byte (the earlier
//! integrity records included), not one per part, so a part that is dropped, repeated or
//! moved breaks every later digest too. The [`StreamReader`](crate::StreamReader) checks each
//! record as it reads the footer before it: a device section's state is checked before the
//! device sees it, a RAM part before the next part is read — in any case before the load
//! returns and so before any vCPU runs. A stream that ends early lacks its final record.
//!
//! XXH3-64 (the `xxhash-rust` crate) is a non-cryptographic hash: it catches corruption —
//! a flipped bit on a disk, a broken middlebox, an edited snapshot file — not an attacker,
//! who can recompute it. Its cost is measured by the `integrity_hash` benchmark (see the
//! README): far above the 1.5–1.8 GiB/s at which this machine can load page records.
//!
//! Record type 0x49 is unused by QEMU (0x00–0x08 and 0x7e are taken); a hopvm without the
//! capability recognises it and says that the source has `x-integrity` on.

use xxhash_rust::xxh3::Xxh3;

/// The integrity record's type byte.
pub const QEMU_VM_HOPVM_INTEGRITY: u8 = 0x49;
/// The section id of the final integrity record, after the VM description.
pub const STREAM_END_ID: u32 = u32::MAX;
/// Bytes of an integrity record.
pub const INTEGRITY_RECORD_LEN: usize = 13;

/// Errors checking a stream's integrity records.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntegrityError {
    /// The digest in the stream is not that of the bytes read.
    #[error("x-integrity checksum mismatch in {what}: the stream says {stream:#018x}, its bytes hash to {computed:#018x}")]
    Mismatch {
        /// Where: the section (and for RAM the pages) whose bytes differ.
        what: String,
        /// The digest carried by the stream.
        stream: u64,
        /// The digest of the bytes received.
        computed: u64,
    },
    /// Something else where an integrity record belongs.
    #[error(
        "x-integrity: no checksum after {what} (found {found}); is x-integrity on at the source?"
    )]
    Missing {
        /// The section or the end of the stream.
        what: String,
        /// What came instead.
        found: String,
    },
    /// An integrity record for another section.
    #[error("x-integrity: checksum record for section {found} after {what}")]
    WrongSection {
        /// The section just read.
        what: String,
        /// The section id in the record.
        found: u32,
    },
    /// An integrity record in a stream read without the capability.
    #[error("the stream carries x-integrity checksums: enable the x-integrity capability on this side too")]
    Unexpected,
}

/// A running XXH3-64 over every byte of a stream.
#[derive(Clone)]
pub struct Digest {
    hasher: Box<Xxh3>,
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Digest({:#018x})", self.value())
    }
}

impl Default for Digest {
    fn default() -> Self {
        Self::new()
    }
}

impl Digest {
    /// A digest of no bytes.
    pub fn new() -> Self {
        Self {
            hasher: Box::new(Xxh3::new()),
        }
    }

    /// Adds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
    }

    /// The digest of every byte so far (the digest goes on).
    pub fn value(&self) -> u64 {
        self.hasher.digest()
    }

    /// The integrity record for section `id` at this point of the stream.
    pub fn record(&self, id: u32) -> [u8; INTEGRITY_RECORD_LEN] {
        let mut b = [0u8; INTEGRITY_RECORD_LEN];
        b[0] = QEMU_VM_HOPVM_INTEGRITY;
        b[1..5].copy_from_slice(&id.to_be_bytes());
        b[5..].copy_from_slice(&self.value().to_be_bytes());
        b
    }
}

/// Checks an integrity record's id and digest (its type byte was read already) against the
/// section `id` just read and the digest `computed` of the bytes before the record.
pub fn check(
    what: impl FnOnce() -> String,
    id: u32,
    record_id: u32,
    stream: u64,
    computed: u64,
) -> Result<(), IntegrityError> {
    if record_id != id {
        return Err(IntegrityError::WrongSection {
            what: what(),
            found: record_id,
        });
    }
    if stream != computed {
        return Err(IntegrityError::Mismatch {
            what: what(),
            stream,
            computed,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_digest_and_record() {
        let mut d = Digest::new();
        let empty = d.value();
        d.update(b"abc");
        let abc = d.value();
        assert_ne!(abc, empty);
        // Split updates give the same digest as one.
        let mut e = Digest::new();
        e.update(b"a");
        e.update(b"bc");
        assert_eq!(e.value(), abc);
        let r = d.record(7);
        assert_eq!(r[0], QEMU_VM_HOPVM_INTEGRITY);
        assert_eq!(&r[1..5], &[0, 0, 0, 7]);
        assert_eq!(u64::from_be_bytes(r[5..].try_into().unwrap()), abc);
        // Taking the value does not end the digest.
        d.update(b"d");
        let mut f = Digest::new();
        f.update(b"abcd");
        assert_eq!(d.value(), f.value());
    }

    #[test]
    fn check_names_what_failed() {
        assert!(check(|| "x".into(), 3, 3, 9, 9).is_ok());
        let e = check(|| "section ram 0".into(), 3, 3, 1, 2).unwrap_err();
        assert!(e.to_string().contains("section ram 0"), "{e}");
        assert!(matches!(
            check(|| "s".into(), 3, 4, 1, 1),
            Err(IntegrityError::WrongSection { found: 4, .. })
        ));
    }
}
