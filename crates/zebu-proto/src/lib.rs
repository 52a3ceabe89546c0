//! Zebu wire formats, without I/O.
//!
//! * [`data`] — the engine ↔ replica data protocol (`docs/protocol.md` describes it byte by byte).
//! * [`auth`] — its handshake's mutual challenge–response over the cluster secret.
//! * [`snapshot`] — payloads of the data protocol's snapshot operations.
//! * [`nbd`] — constants and small codecs of the NBD protocol, used by the NBD frontend.
//!
//! Everything here is fixed-width little-endian for our own formats (NBD itself is big-endian,
//! as its specification says). Parsers never trust a length from the wire: every length is checked
//! against a limit before anything is allocated.

pub mod auth;
pub mod data;
pub mod nbd;
pub mod snapshot;

/// CRC32C (Castagnoli) of a byte slice: the checksum used on the wire and on disk.
#[inline]
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// Joins CRC32Cs of consecutive pieces of one fixed length: `combine(crc(A), crc(B))` is
/// `crc(A ‖ B)` whenever B is `len` bytes long. A replica uses it to check a write's transit
/// checksum from the per-block checksums it computes anyway for its index, instead of running
/// over the payload a second time.
///
/// CRC32C with its pre- and post-inversion satisfies `crc(A ‖ B) = Z(crc(A)) ^ crc(B)`, where Z
/// is the GF(2)-linear map "feed `len` zero bytes to the raw CRC register". Z is tabulated by
/// its images of the 32 single-bit states, folded into four byte-indexed tables.
#[derive(Clone)]
pub struct CrcShift {
    tables: Box<[[u32; 256]; 4]>,
}

impl CrcShift {
    /// The operator for pieces of `len` bytes.
    pub fn new(len: usize) -> CrcShift {
        let zeros = vec![0u8; len];
        // The raw register after `len` zero bytes, from the state `s` (no inversions).
        let raw = |s: u32| !crc32c::crc32c_append(!s, &zeros);
        let cols: Vec<u32> = (0..32).map(|i| raw(1u32 << i)).collect();
        let mut tables = Box::new([[0u32; 256]; 4]);
        for (k, table) in tables.iter_mut().enumerate() {
            for (byte, slot) in table.iter_mut().enumerate() {
                *slot = (0..8)
                    .filter(|b| byte & (1 << b) != 0)
                    .fold(0, |acc, b| acc ^ cols[8 * k + b]);
            }
        }
        CrcShift { tables }
    }

    /// `crc(A ‖ B)` from `crc(A)` and `crc(B)`, where B is as long as this operator was built for.
    #[inline]
    pub fn combine(&self, a: u32, b: u32) -> u32 {
        let t = &self.tables;
        t[0][(a & 0xff) as usize]
            ^ t[1][((a >> 8) & 0xff) as usize]
            ^ t[2][((a >> 16) & 0xff) as usize]
            ^ t[3][(a >> 24) as usize]
            ^ b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn combine_equals_the_crc_of_the_concatenation(
            a in proptest::collection::vec(any::<u8>(), 0..300),
            pieces in proptest::collection::vec(any::<u8>(), 1..5),
            len in prop_oneof![Just(1usize), Just(7), Just(512), Just(4096)],
            seed in any::<u8>(),
        ) {
            let shift = CrcShift::new(len);
            let mut whole = a.clone();
            let mut crc = crc32c(&a);
            for (i, p) in pieces.iter().enumerate() {
                let piece: Vec<u8> = (0..len).map(|j| (j as u8).wrapping_mul(*p).wrapping_add(seed ^ i as u8)).collect();
                crc = shift.combine(crc, crc32c(&piece));
                whole.extend_from_slice(&piece);
            }
            prop_assert_eq!(crc, crc32c(&whole));
        }
    }
}
