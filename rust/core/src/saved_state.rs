//! The one binary format of the core's saved states (the KL controller's, the sampler's):
//!
//! ```text
//! magic (8 bytes) | version (u32) | fields... | CRC-32 (u32) of every byte before it
//! ```
//!
//! Little-endian throughout, so a checkpoint reads the same on every machine. Each state has
//! its own magic, so one is never restored as the other, and its own version, bumped when its
//! fields change. This module owns the framing; each state owns what its fields mean and checks
//! their values. `tests/saved_state_format.rs` pins the bytes: saved checkpoints must keep loading.

use crate::error::{Error, Result};

const HEADER_LEN: usize = 8 + 4;
const CRC_LEN: usize = 4;

/// Writes the header, then fields in the order they are appended; `finish` seals with the CRC.
pub(crate) struct StateWriter {
    out: Vec<u8>,
}

impl StateWriter {
    /// `fields_len` is the size of the fields to come, so the buffer is allocated once.
    pub(crate) fn new(magic: &[u8; 8], version: u32, fields_len: usize) -> Self {
        let mut out = Vec::with_capacity(HEADER_LEN + fields_len + CRC_LEN);
        out.extend_from_slice(magic);
        out.extend_from_slice(&version.to_le_bytes());
        StateWriter { out }
    }

    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.put(&v.to_le_bytes())
    }

    pub(crate) fn i64(&mut self, v: i64) -> &mut Self {
        self.put(&v.to_le_bytes())
    }

    pub(crate) fn f64(&mut self, v: f64) -> &mut Self {
        self.put(&v.to_le_bytes())
    }

    pub(crate) fn i8(&mut self, v: i8) -> &mut Self {
        self.put(&v.to_le_bytes())
    }

    fn put(&mut self, bytes: &[u8]) -> &mut Self {
        self.out.extend_from_slice(bytes);
        self
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        let crc = crc32fast::hash(&self.out);
        self.out.extend_from_slice(&crc.to_le_bytes());
        self.out
    }
}

/// Reads fields back in the order they were written, from a state whose framing is verified.
/// Saved state comes from disk and is not trusted: every read is bounds-checked and every
/// failure is an [`Error::State`] naming the state (`what`) and the problem, never a panic.
pub(crate) struct StateReader<'a> {
    what: &'static str,
    fields: &'a [u8],
    at: usize,
}

impl<'a> StateReader<'a> {
    /// Checks magic, version, then length and checksum. The version comes before the checksum
    /// so that a state from another version of the format says so instead of "corrupted".
    pub(crate) fn open(
        bytes: &'a [u8],
        what: &'static str,
        magic: &[u8; 8],
        version: u32,
    ) -> Result<Self> {
        let bad = |reason: String| Error::State(format!("{what} state: {reason}"));
        if bytes.get(..8) != Some(&magic[..]) {
            return Err(Error::State(format!("not a {what} state (bad magic)")));
        }
        let found = match bytes.get(8..HEADER_LEN) {
            Some(v) => u32::from_le_bytes([v[0], v[1], v[2], v[3]]),
            None => return Err(bad(format!("truncated to {} bytes", bytes.len()))),
        };
        if found != version {
            return Err(bad(format!(
                "version {found} is not supported (expected {version})"
            )));
        }
        // Checked before any field is read, so a corrupted count is never believed.
        let body_len = bytes
            .len()
            .checked_sub(CRC_LEN)
            .filter(|&n| n >= HEADER_LEN)
            .ok_or_else(|| bad(format!("truncated to {} bytes", bytes.len())))?;
        let (body, crc) = bytes.split_at(body_len);
        if crc32fast::hash(body).to_le_bytes() != crc {
            return Err(bad(format!(
                "checksum mismatch over {} bytes (truncated or corrupted)",
                bytes.len()
            )));
        }
        Ok(StateReader {
            what,
            fields: &body[HEADER_LEN..],
            at: 0,
        })
    }

    pub(crate) fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take()?))
    }

    pub(crate) fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_le_bytes(self.take()?))
    }

    pub(crate) fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_le_bytes(self.take()?))
    }

    pub(crate) fn i8(&mut self) -> Result<i8> {
        Ok(i8::from_le_bytes(self.take()?))
    }

    /// A u64 count of `elem_len`-byte entries, checked against the bytes left, so that a bad
    /// count fails here instead of making the caller allocate gigabytes first.
    pub(crate) fn count(&mut self, elem_len: usize) -> Result<usize> {
        let n = self.u64()?;
        let left = self.fields.len() - self.at;
        match n.checked_mul(elem_len as u64) {
            Some(need) if need <= left as u64 => Ok(n as usize),
            _ => Err(self.error(format!(
                "count {n} of {elem_len}-byte entries exceeds the remaining {left} bytes"
            ))),
        }
    }

    /// Ends the read: bytes left over mean the fields are not the ones this version writes.
    pub(crate) fn finish(self) -> Result<()> {
        match self.fields.len() - self.at {
            0 => Ok(()),
            extra => Err(self.error(format!("{extra} trailing bytes"))),
        }
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N]> {
        let Some(field) = self.fields[self.at..].get(..N) else {
            let at = HEADER_LEN + self.at;
            return Err(self.error(format!("truncated inside the field at byte {at}")));
        };
        let mut out = [0u8; N];
        out.copy_from_slice(field);
        self.at += N;
        Ok(out)
    }

    fn error(&self, reason: String) -> Error {
        Error::State(format!("{} state: {reason}", self.what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAGIC: &[u8; 8] = b"EDPOTEST";

    fn sample() -> Vec<u8> {
        let mut w = StateWriter::new(MAGIC, 3, 8 + 8 + 8 + 1 + 8);
        w.u64(2).i64(-5).f64(0.25).i8(-1).f64(1.5);
        w.finish()
    }

    fn message(result: Result<impl std::fmt::Debug>) -> String {
        match result {
            Err(Error::State(m)) => m,
            other => panic!("expected Error::State, got {other:?}"),
        }
    }

    #[test]
    fn layout_is_magic_version_fields_crc() {
        let bytes = sample();
        assert_eq!(bytes.len(), 12 + 33 + 4, "the capacity hint was exact");
        assert_eq!(&bytes[..8], MAGIC);
        assert_eq!(bytes[8..12], 3u32.to_le_bytes());
        assert_eq!(bytes[12..20], 2u64.to_le_bytes());
        assert_eq!(bytes[36], 0xff);
        assert_eq!(bytes[45..], crc32fast::hash(&bytes[..45]).to_le_bytes());
    }

    #[test]
    fn fields_read_back_in_order() {
        let bytes = sample();
        let mut r = StateReader::open(&bytes, "test", MAGIC, 3).unwrap();
        assert_eq!(r.u64().unwrap(), 2);
        assert_eq!(r.i64().unwrap(), -5);
        assert_eq!(r.f64().unwrap(), 0.25);
        assert_eq!(r.i8().unwrap(), -1);
        assert_eq!(r.f64().unwrap(), 1.5);
        r.finish().unwrap();
    }

    #[test]
    fn each_failure_names_the_state_and_the_problem() {
        let good = sample();
        let open = |b: &[u8]| StateReader::open(b, "test", MAGIC, 3).map(|_| ());
        let mut other_magic = good.clone();
        other_magic[0] ^= 1;
        let mut flipped = good.clone();
        flipped[20] ^= 1;
        for (bytes, expected) in [
            (&b"EDPO"[..], "bad magic"),
            (&other_magic[..], "bad magic"),
            (&good[..10], "truncated"),
            (&good[..14], "truncated"),
            (&good[..30], "checksum"),
            (&flipped[..], "checksum"),
        ] {
            let m = message(open(bytes));
            assert!(m.contains("test state") && m.contains(expected), "{m}");
        }
        let m = message(StateReader::open(&good, "test", MAGIC, 4).map(|_| ()));
        assert!(m.contains("version 3 is not supported (expected 4)"), "{m}");
    }

    #[test]
    fn reads_past_the_fields_or_leaving_bytes_are_errors() {
        let bytes = sample();
        let mut r = StateReader::open(&bytes, "test", MAGIC, 3).unwrap();
        assert!(message(r.count(100))
            .contains("count 2 of 100-byte entries exceeds the remaining 25 bytes"));
        let mut r = StateReader::open(&bytes, "test", MAGIC, 3).unwrap();
        r.u64().unwrap();
        assert!(message(r.finish()).contains("25 trailing bytes"));

        let mut w = StateWriter::new(MAGIC, 3, 4);
        w.i8(1).i8(2).i8(3).i8(4);
        let short = w.finish();
        let mut r = StateReader::open(&short, "test", MAGIC, 3).unwrap();
        assert!(message(r.u64()).contains("truncated inside the field at byte 12"));
    }

    #[test]
    fn count_bounds_the_allocation() {
        let mut w = StateWriter::new(MAGIC, 3, 8 + 16);
        w.u64(2).u64(7).u64(8);
        let bytes = w.finish();
        let mut r = StateReader::open(&bytes, "test", MAGIC, 3).unwrap();
        assert_eq!(r.count(8).unwrap(), 2);
        let mut r = StateReader::open(&bytes, "test", MAGIC, 3).unwrap();
        assert!(r.count(9).is_err());
        let mut w = StateWriter::new(MAGIC, 3, 8);
        w.u64(u64::MAX);
        let bytes = w.finish();
        let mut r = StateReader::open(&bytes, "test", MAGIC, 3).unwrap();
        assert!(r.count(8).is_err(), "overflowing count * size");
    }
}
