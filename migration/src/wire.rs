//! Big-endian primitives shared by the stream and RAM record codecs.
//!
//! QEMU's migration stream is big-endian throughout (`qemu_put_be32` and friends). These
//! helpers return plain `io::Result`s; each public module maps them onto its own error enum,
//! turning `UnexpectedEof` into its "truncated" variant.

use std::io::{self, Read, Write};

/// Reads one byte.
pub(crate) fn read_u8(r: &mut (impl Read + ?Sized)) -> io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

/// Reads a big-endian u16.
pub(crate) fn read_be16(r: &mut (impl Read + ?Sized)) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

/// Reads a big-endian u32.
pub(crate) fn read_be32(r: &mut (impl Read + ?Sized)) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// Reads a big-endian u64.
pub(crate) fn read_be64(r: &mut (impl Read + ?Sized)) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Reads exactly `len` bytes without trusting `len` for the allocation: the buffer grows with
/// the data actually received, so a corrupted length on a short stream costs nothing.
pub(crate) fn read_vec(r: &mut (impl Read + ?Sized), len: usize) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(len.min(64 * 1024));
    let want = u64::try_from(len).unwrap_or(u64::MAX);
    r.take(want).read_to_end(&mut out)?;
    if out.len() != len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(out)
}

/// Reads a u8-length-prefixed string (QEMU's `qemu_get_counted_string`).
pub(crate) fn read_counted_bytes(r: &mut (impl Read + ?Sized)) -> io::Result<Vec<u8>> {
    let len = read_u8(r)?;
    let mut buf = vec![0u8; usize::from(len)];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// Writes a u8-length-prefixed string; the caller has checked that it is at most 255 bytes.
pub(crate) fn write_counted(w: &mut (impl Write + ?Sized), s: &[u8]) -> io::Result<()> {
    let len = u8::try_from(s.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    w.write_all(&[len])?;
    w.write_all(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primitives_round_trip() {
        let mut buf = Vec::new();
        buf.push(7u8);
        buf.extend_from_slice(&0x1234u16.to_be_bytes());
        buf.extend_from_slice(&0xdead_beefu32.to_be_bytes());
        buf.extend_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        write_counted(&mut buf, b"abc").unwrap();
        let mut r = &buf[..];
        assert_eq!(read_u8(&mut r).unwrap(), 7);
        assert_eq!(read_be16(&mut r).unwrap(), 0x1234);
        assert_eq!(read_be32(&mut r).unwrap(), 0xdead_beef);
        assert_eq!(read_be64(&mut r).unwrap(), 0x0102_0304_0506_0708);
        assert_eq!(read_counted_bytes(&mut r).unwrap(), b"abc");
        assert!(r.is_empty());
    }

    #[test]
    fn short_reads_are_unexpected_eof() {
        let mut r: &[u8] = &[1, 2, 3];
        assert_eq!(
            read_be32(&mut r).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        let mut r: &[u8] = &[5, b'a'];
        let e = read_counted_bytes(&mut r).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let mut r: &[u8] = &[1, 2];
        assert_eq!(
            read_vec(&mut r, 3).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        let mut r: &[u8] = &[1, 2, 3, 4];
        assert_eq!(read_vec(&mut r, 3).unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn counted_rejects_long_strings() {
        let long = vec![b'x'; 256];
        let mut out = Vec::new();
        assert!(write_counted(&mut out, &long).is_err());
        assert!(out.is_empty());
    }
}
