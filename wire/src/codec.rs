//! Primitive encoding shared by every message: little-endian fixed-width integers, `f32` as its
//! IEEE bits, strings as a `u32` byte length followed by UTF-8.
//!
//! [`Reader`] never indexes or unwraps: every read checks the bytes left first and reports
//! a shortfall as [`WireError::Truncated`] naming the field, so any input is safe to decode.

use super::WireError;

/// A cursor over a payload that is consumed from the front.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(payload: &'a [u8]) -> Self {
        Reader { rest: payload }
    }

    /// Bytes not yet consumed.
    pub(crate) fn left(&self) -> u64 {
        self.rest.len() as u64
    }

    /// Fails unless at least `needed` bytes are left; used to bound a count by the payload
    /// before allocating for it.
    pub(crate) fn require(&self, needed: u64, what: &'static str) -> Result<(), WireError> {
        if needed > self.left() {
            return Err(WireError::Truncated {
                what,
                needed,
                left: self.left(),
            });
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        let Some((head, rest)) = self.rest.split_first_chunk::<N>() else {
            return Err(WireError::Truncated {
                what,
                needed: N as u64,
                left: self.left(),
            });
        };
        self.rest = rest;
        Ok(*head)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(u8::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn f32(&mut self, what: &'static str) -> Result<f32, WireError> {
        Ok(f32::from_le_bytes(self.array(what)?))
    }

    /// A `u32` that must not exceed `max`.
    pub(crate) fn u32_max(&mut self, what: &'static str, max: u32) -> Result<u32, WireError> {
        let v = self.u32(what)?;
        if v > max {
            return Err(WireError::OverLimit {
                what,
                value: v.into(),
                max: max.into(),
            });
        }
        Ok(v)
    }

    /// The next `n` bytes, borrowed from the payload.
    pub(crate) fn bytes(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], WireError> {
        self.require(n, what)?;
        // `require` bounded `n` by the slice length, so it fits in usize.
        let n = usize::try_from(n).map_err(|_| WireError::Truncated {
            what,
            needed: n,
            left: self.left(),
        })?;
        let Some((head, rest)) = self.rest.split_at_checked(n) else {
            return Err(WireError::Truncated {
                what,
                needed: n as u64,
                left: self.left(),
            });
        };
        self.rest = rest;
        Ok(head)
    }

    /// A string: `u32` length (at most `max` bytes) and that many bytes of UTF-8.
    pub(crate) fn text(&mut self, what: &'static str, max: u32) -> Result<String, WireError> {
        let len = self.u32_max(what, max)?;
        let bytes = self.bytes(len.into(), what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(WireError::Malformed {
                what,
                detail: format!("not UTF-8 ({e})"),
            }),
        }
    }

    /// Ends decoding of `message`: a payload must be consumed exactly.
    pub(crate) fn finish(self, message: &'static str) -> Result<(), WireError> {
        if !self.rest.is_empty() {
            return Err(WireError::TrailingBytes {
                what: message,
                extra: self.left(),
            });
        }
        Ok(())
    }
}

/// Appending the primitives to an output buffer.
pub(crate) trait Put {
    fn put_u8(&mut self, v: u8);
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
    fn put_f32(&mut self, v: f32);
    /// `u32` length + UTF-8. A string over 4 GiB cannot be encoded; its length saturates, so
    /// the peer rejects the payload rather than misreading it.
    fn put_text(&mut self, s: &str);
}

impl Put for Vec<u8> {
    fn put_u8(&mut self, v: u8) {
        self.push(v);
    }
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_f32(&mut self, v: f32) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_text(&mut self, s: &str) {
        self.put_u32(u32::try_from(s.len()).unwrap_or(u32::MAX));
        self.extend_from_slice(s.as_bytes());
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub(crate) fn truncate_text(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or("")
}
