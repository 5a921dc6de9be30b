//! The checksum of a state transfer: XXH64 (seed 0) over every chunk payload in order, fed
//! incrementally.
//!
//! XXH64 is a published, fast (several GB/s: it mixes 32 bytes per round in four independent
//! lanes) non-cryptographic hash; a 1M-token state is tens of GiB, so a byte-at-a-time hash
//! such as FNV would cost seconds. It guards against a peer or store that drops, reorders or
//! corrupts chunks, not against an attacker. Written here (it is short) to keep the crate free
//! of dependencies; the tests check it against the reference implementation's values.

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

/// Bytes one round of the four lanes consumes.
const STRIPE: usize = 32;

/// An XXH64 (seed 0) accumulator: `update` with the bytes in order, then `finish`.
#[derive(Clone, Debug)]
pub struct Checksum {
    lanes: [u64; 4],
    /// Bytes fed so far.
    total: u64,
    /// Bytes of an incomplete stripe, waiting for the next update.
    pending: [u8; STRIPE],
    pending_len: usize,
}

impl Default for Checksum {
    fn default() -> Self {
        Checksum::new()
    }
}

fn round(acc: u64, lane: u64) -> u64 {
    acc.wrapping_add(lane.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

fn merge(acc: u64, lane: u64) -> u64 {
    (acc ^ round(0, lane)).wrapping_mul(P1).wrapping_add(P4)
}

fn u64_at(bytes: &[u8; STRIPE], i: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = bytes.get(i * 8..i * 8 + 8) {
        b.copy_from_slice(s);
    }
    u64::from_le_bytes(b)
}

impl Checksum {
    pub fn new() -> Self {
        Checksum {
            lanes: [P1.wrapping_add(P2), P2, 0, 0u64.wrapping_sub(P1)],
            total: 0,
            pending: [0; STRIPE],
            pending_len: 0,
        }
    }

    fn stripe(&mut self, s: &[u8; STRIPE]) {
        for (i, lane) in self.lanes.iter_mut().enumerate() {
            *lane = round(*lane, u64_at(s, i));
        }
    }

    /// Feeds `bytes`; any split of the same bytes over calls gives the same checksum.
    pub fn update(&mut self, mut bytes: &[u8]) {
        self.total = self.total.wrapping_add(bytes.len() as u64);
        if self.pending_len > 0 {
            let take = (STRIPE - self.pending_len).min(bytes.len());
            let (head, rest) = bytes.split_at(take);
            if let Some(dst) = self
                .pending
                .get_mut(self.pending_len..self.pending_len + take)
            {
                dst.copy_from_slice(head);
            }
            self.pending_len += take;
            bytes = rest;
            if self.pending_len < STRIPE {
                return;
            }
            let full = self.pending;
            self.stripe(&full);
            self.pending_len = 0;
        }
        let (stripes, rest) = bytes.as_chunks::<STRIPE>();
        for s in stripes {
            self.stripe(s);
        }
        if let Some(dst) = self.pending.get_mut(..rest.len()) {
            dst.copy_from_slice(rest);
        }
        self.pending_len = rest.len();
    }

    /// The checksum of everything fed so far (feeding may go on).
    pub fn finish(&self) -> u64 {
        let [v1, v2, v3, v4] = self.lanes;
        let mut h = if self.total >= STRIPE as u64 {
            let h = v1
                .rotate_left(1)
                .wrapping_add(v2.rotate_left(7))
                .wrapping_add(v3.rotate_left(12))
                .wrapping_add(v4.rotate_left(18));
            [v1, v2, v3, v4].into_iter().fold(h, merge)
        } else {
            P5
        };
        h = h.wrapping_add(self.total);
        let tail = self.pending.get(..self.pending_len).unwrap_or_default();
        let (words, tail) = tail.as_chunks::<8>();
        for w in words {
            h ^= round(0, u64::from_le_bytes(*w));
            h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
        }
        let (halves, tail) = tail.as_chunks::<4>();
        for w in halves {
            h ^= u64::from(u32::from_le_bytes(*w)).wrapping_mul(P1);
            h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
        }
        for b in tail {
            h ^= u64::from(*b).wrapping_mul(P5);
            h = h.rotate_left(11).wrapping_mul(P1);
        }
        h ^= h >> 33;
        h = h.wrapping_mul(P2);
        h ^= h >> 29;
        h = h.wrapping_mul(P3);
        h ^ (h >> 32)
    }

    /// Feeds a chunk's payload, encoded straight into the hash (no buffer); the same as
    /// `update(&chunk.encode())`.
    pub fn add_chunk(&mut self, chunk: &super::StateChunk) {
        chunk.write(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values of the reference implementation (libxxhash 0.8.1, `XXH64(data, len, 0)`).
    #[test]
    fn matches_the_reference_xxh64() {
        let long: Vec<u8> = (0..=255u8).cycle().take(1280).chain(*b"xyz").collect();
        let hundred: Vec<u8> = (0..100u8).collect();
        for (data, want) in [
            (&b""[..], 0xef46_db37_51d8_e999u64),
            (b"a", 0xd24e_c4f1_a98c_6e5b),
            (b"abc", 0x44bc_2cf5_ad77_0999),
            (&hundred, 0x6ac1_e580_3216_6597),
            (&long, 0xafd1_8a39_57d3_670a),
        ] {
            let mut c = Checksum::new();
            c.update(data);
            assert_eq!(c.finish(), want, "{} bytes", data.len());
            // Fed a byte at a time, and in uneven pieces.
            let mut c = Checksum::new();
            data.iter().for_each(|b| c.update(&[*b]));
            assert_eq!(c.finish(), want, "{} bytes, one at a time", data.len());
            let mut c = Checksum::new();
            for piece in data.chunks(13) {
                c.update(piece);
                c.update(&[]);
            }
            assert_eq!(c.finish(), want, "{} bytes in 13s", data.len());
        }
    }
}
