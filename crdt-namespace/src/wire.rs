//! Bounded binary reading and writing, shared by meridian's encodings (namespace operations,
//! manifests, the site-to-site protocol). Every read of untrusted bytes is bounded by the input
//! and by the caller's limits, and fails with a [`DecodeError`] instead of panicking.

use crate::error::DecodeError;

/// Appends `v` as a LEB128 variable-length integer.
pub fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends a length-prefixed byte string.
pub fn push_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    push_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// A bounded reader over untrusted bytes.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `buf`.
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// One byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        let (first, rest) = self.buf.split_first().ok_or(DecodeError::Truncated { what })?;
        self.buf = rest;
        Ok(*first)
    }

    /// A LEB128 integer of at most 64 bits.
    pub fn varint(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8(what)?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(DecodeError::Overflow { what });
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::Overflow { what })
    }

    /// A zigzag-encoded signed LEB128 integer.
    pub fn signed(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        let v = self.varint(what)?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    /// A LEB128 integer that must fit 32 bits.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let v = self.varint(what)?;
        u32::try_from(v).map_err(|_| DecodeError::TooLong { what, len: v, max: u64::from(u32::MAX) })
    }

    /// A length-prefixed byte string of at most `max` bytes.
    pub fn bytes(&mut self, what: &'static str, max: usize) -> Result<&'a [u8], DecodeError> {
        let len = self.varint(what)?;
        if len > max as u64 {
            return Err(DecodeError::TooLong { what, len, max: max as u64 });
        }
        let len = len as usize;
        if len > self.buf.len() {
            return Err(DecodeError::Truncated { what });
        }
        let (head, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(head)
    }

    /// A length-prefixed UTF-8 string of at most `max` bytes.
    pub fn str(&mut self, what: &'static str, max: usize) -> Result<&'a str, DecodeError> {
        let bytes = self.bytes(what, max)?;
        std::str::from_utf8(bytes).map_err(|e| DecodeError::Invalid { what, reason: e.to_string() })
    }

    /// Exactly 32 bytes.
    pub fn array32(&mut self, what: &'static str) -> Result<[u8; 32], DecodeError> {
        if self.buf.len() < 32 {
            return Err(DecodeError::Truncated { what });
        }
        let (head, rest) = self.buf.split_at(32);
        self.buf = rest;
        let mut out = [0u8; 32];
        out.copy_from_slice(head);
        Ok(out)
    }

    /// A count of items, at most `max`, each taking at least `min_item_bytes` of the input.
    /// Returns the count and a capacity to reserve that the input's length bounds.
    pub fn count(
        &mut self,
        what: &'static str,
        max: usize,
        min_item_bytes: usize,
    ) -> Result<(u64, usize), DecodeError> {
        let count = self.varint(what)?;
        if count > max as u64 {
            return Err(DecodeError::TooLong { what, len: count, max: max as u64 });
        }
        Ok((count, (count as usize).min(self.remaining() / min_item_bytes.max(1))))
    }

    /// Fails if bytes are left over.
    pub fn finish(&self, what: &'static str) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes { what, count: self.buf.len() })
        }
    }
}
