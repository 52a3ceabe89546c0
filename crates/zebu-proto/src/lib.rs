//! Zebu wire formats, without I/O.
//!
//! * [`data`] — the engine ↔ replica data protocol (`docs/protocol.md` describes it byte by byte).
//! * [`nbd`] — constants and small codecs of the NBD protocol, used by the NBD frontend.
//!
//! Everything here is fixed-width little-endian for our own formats (NBD itself is big-endian,
//! as its specification says). Parsers never trust a length from the wire: every length is checked
//! against a limit before anything is allocated.

pub mod data;
pub mod nbd;

/// CRC32C (Castagnoli) of a byte slice: the checksum used on the wire and on disk.
#[inline]
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}
